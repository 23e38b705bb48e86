"""The journal of accepted events: each is appended here before it is acknowledged, so a crash loses none.

Both sinks keep one (local_store's record queue; AzureSink). A journal is one start()'s segments
`<base>.<pid>-<start>-<token>.<n>`: the process's id and start time (so that a later process reusing
the id does not take them for its own) and a random token; one line a record, in the sink's format.
An append is a copy into the segment's shared memory mapping: it is in the operating system's page
cache before the 202, so it survives a `kill -9` of the process (not a power cut: SQLite's own
synchronous=NORMAL promises the same). The owner rotates the open segment when it is full or
_ROTATE_AGE seconds old and deletes a closed one once every record queued before its rotation is safe
(committed, or stored by the exporter). A process that dies leaves its segments; the next start
claims those of dead processes (claim_orphans) and hands their records to its sink again.
"""
import contextlib
import errno
import glob
import json
import logging
import mmap
import os
import secrets
import time

log = logging.getLogger(__name__)

_SEGMENT_BYTES = 256 * 1024  # an event line is at most about 70 KB
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
    """This process's journal segments: the open one (mapped into memory), and the closed ones not yet safe.

    A segment is allocated whole (_SEGMENT_BYTES, posix_fallocate: a full disk is known when it is
    opened, never in the middle of a line) and mapped shared: an append is a copy into the mapping,
    no system call, so the request thread keeps the GIL (a write() per event let the writer thread
    take it for a whole switch interval each time). The kernel writes the mapped pages back to the
    file after a crash of the process just as it does a write()'s. What follows the last line is
    zeros; readers skip them (see lines()).
    """

    def __init__(self, base):
        self.base = base
        self.prefix = f"{base}.{os.getpid()}-{process_start()}-{secrets.token_hex(4)}."
        self.n = 0
        self.fd = None
        self.map = None
        self.path = None
        self.size = 0
        self.opened_at = 0.0
        self.closed = []           # (path, seq): deletable once the first `seq` records queued are safe

    def open(self):
        """Allocate and map the next segment; OSError (a full disk) when it cannot be: events are refused."""
        path = f"{self.prefix}{self.n}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.posix_fallocate(fd, 0, _SEGMENT_BYTES)
            self.map = mmap.mmap(fd, _SEGMENT_BYTES)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.remove(path)
            raise
        self.fd, self.path, self.size, self.opened_at = fd, path, 0, time.monotonic()
        self.n += 1

    def append(self, data, seq):
        """Copy one line (bytes, no NUL) into the open segment; `seq` records were queued before it (a segment
        that is full is closed with that count and the next one opened)."""
        if self.map is not None and self.size + len(data) > _SEGMENT_BYTES:
            self.rotate(seq)
        if self.map is None:
            if len(data) > _SEGMENT_BYTES:
                raise OSError(errno.EFBIG, "a journal line larger than a segment")
            self.open()
        end = self.size + len(data)
        self.map[self.size:end] = data
        self.size = end

    def rotation_due(self):
        """True when the open segment holds lines and is old enough to be closed."""
        return bool(self.size) and time.monotonic() - self.opened_at >= _ROTATE_AGE

    def rotate(self, seq):
        """Close the open segment (under the caller's lock: `seq` records were queued before it closes)."""
        if self.map is not None:
            self.map.close()
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, self.size)  # the unused rest of the allocation goes back
            os.close(self.fd)
            self.closed.append((self.path, seq))
            self.map = self.fd = None

    def release(self, done):
        """Delete the closed segments whose records are all safe (the first `done` records queued)."""
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
        return [path for path, _ in self.closed] + ([self.path] if self.map is not None else [])

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


_encoder = json.JSONEncoder(separators=(",", ":"), check_circular=False)


def json_line(head, value):
    """One journal line (bytes): `head` (the start of a JSON object, up to its last key) + value as JSON + "}"."""
    return (head + _encoder.encode(value) + "}\n").encode()


def lines(path):
    """The lines of a journal segment (or pending file), without the zeros that follow the last line."""
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip("\x00\r\n")
            if line.strip():
                yield line


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
