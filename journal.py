"""The journal of accepted events: each is appended here before it is acknowledged, so a crash loses none.

Both sinks keep one (local_store's record queue; AzureSink). A journal is one start()'s segments
`<base>.<pid>-<start>-<token>.<n>`: the process's id and start time (so that a later process reusing
the id does not take them for its own) and a random token; one line a record, in the sink's format.
An append is one write() to a file opened with O_APPEND: it is in the operating system's page cache
before the 202, so it survives a `kill -9` of the process (not a power cut: SQLite's own
synchronous=NORMAL promises the same). The owner rotates the open segment every _ROTATE_BYTES or
_ROTATE_AGE seconds and deletes a closed one once every record queued before its rotation is safe
(committed, or stored by the exporter). A process that dies leaves its segments; the next start
claims those of dead processes (claim_orphans) and hands their records to its sink again.
"""
import contextlib
import glob
import logging
import os
import secrets
import time

log = logging.getLogger(__name__)

_ROTATE_BYTES = 1 << 20
_ROTATE_AGE = 2.0


def pid_alive(pid, started=None):
    """True when a process with this id runs (or may: one we may not signal); a zombie is dead.

    `started` (its start time, see process_start) tells a process from a later one that reuses its
    id, as a restarted container's processes do.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    stat = _stat(pid)
    if stat is None:
        return True  # no /proc: trust the signal
    return stat[0] != "Z" and (started is None or stat[1] == started)


def _stat(pid):
    """(state, start time in clock ticks since boot) of a process from /proc, or None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            fields = fh.read().rpartition(")")[2].split()
    except OSError:
        return None
    return fields[0], fields[19]


def process_start(pid=None):
    """This (or `pid`'s) process's start time as /proc gives it ("" where there is none)."""
    stat = _stat(pid or os.getpid())
    return stat[1] if stat else ""


class Journal:
    """This process's journal segments: the open one, and the closed ones not yet committed."""

    def __init__(self, base):
        self.base = base
        self.prefix = f"{base}.{os.getpid()}-{process_start()}-{secrets.token_hex(4)}."
        self.n = 0
        self.fd = None
        self.path = None
        self.size = 0
        self.opened_at = 0.0
        self.closed = []           # (path, seq): deletable once the first `seq` records queued are safe

    def open(self):
        """Open the next segment; OSError when it cannot be created (the caller refuses events meanwhile)."""
        path = f"{self.prefix}{self.n}"
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self.path, self.size, self.opened_at = path, 0, time.monotonic()
        self.n += 1

    def append(self, data):
        """Append one line; on any failure (a full disk) cut the segment back to its last whole line and raise."""
        if self.fd is None:
            self.open()
        try:
            written = os.write(self.fd, data)
            if written != len(data):
                raise OSError(28, "No space left on device (short write to the journal)")
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, self.size)
            raise
        self.size += written

    def rotation_due(self):
        """True when the open segment is big or old enough to be closed."""
        return self.size >= _ROTATE_BYTES or (self.size and time.monotonic() - self.opened_at >= _ROTATE_AGE)

    def rotate(self, seq):
        """Close the open segment (under the queue's lock: `seq` records were queued before it closes)."""
        if self.fd is not None:
            os.close(self.fd)
            self.closed.append((self.path, seq))
            self.fd = None

    def release(self, done):
        """Delete the closed segments whose records are all committed (`done` queue items taken and written)."""
        keep = []
        for path, seq in self.closed:
            if seq <= done:
                with contextlib.suppress(OSError):
                    os.remove(path)
            else:
                keep.append((path, seq))
        self.closed = keep

    def segments(self):
        """Every segment of this journal still on disk."""
        return [path for path, _ in self.closed] + ([self.path] if self.fd is not None else [])

    def discard(self):
        """Close and delete every segment: what they hold is committed or saved to the pending file."""
        self.rotate(0)
        self.release(float("inf"))

    def hand_over(self, rename):
        """Close every segment and rename it to rename(path) (a claim the next start imports)."""
        self.rotate(0)
        for path, _ in self.closed:
            with contextlib.suppress(OSError):
                os.replace(path, rename(path))
        self.closed = []


def claim_orphans(base, rename):
    """Rename the segments of `base` that dead processes left to rename(path); return the new paths."""
    claimed = []
    for path in sorted(glob.glob(glob.escape(f"{base}.") + "*.*")):
        pid, _, rest = path[len(base) + 1:].partition("-")
        started = rest.partition("-")[0]
        if not pid.isdigit() or pid_alive(int(pid), started or None):
            continue  # a live process's (this one's included)
        target = rename(path)
        try:
            os.replace(path, target)
        except OSError:  # another process claimed it first
            continue
        claimed.append(target)
    if claimed:
        log.warning("replaying %d journal segment(s) that a stopped process left at %s", len(claimed), base)
    return claimed
