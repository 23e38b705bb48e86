"""The journal: every accepted event is appended here before it is acknowledged, so a crash loses none.

One journal per start() of a store: segments `<db>.journal.<pid>-<start>-<token>.<n>` (the process's
id and start time, so that a later process reusing the id does not take the segments for its own,
and a random token per journal), one JSON line a row (the pending file's format). An append is one write() to a file opened with O_APPEND: it reaches the
operating system's page cache before the 202, so it survives a `kill -9` of the process (not a
power cut: that is what SQLite's own synchronous=NORMAL promises too). The writer rotates the
segment every _ROTATE_BYTES or _ROTATE_AGE seconds and deletes a closed segment once every record
queued before its rotation is committed. A process that dies leaves its segments; the next start()
renames those of dead processes to pending claims, and the writer imports them as its first batch.
Events are unique by (ts, event_id), so a row both committed and journaled is stored once.
"""
import contextlib
import glob
import json
import logging
import os
import secrets
import time

from local_store.pending import pid_alive, process_start

log = logging.getLogger(__name__)

_ROTATE_BYTES = 1 << 20
_ROTATE_AGE = 2.0
_encoder = json.JSONEncoder(separators=(",", ":"), check_circular=False)


def event_line(row):
    """The journal line (bytes) of one event row: {"kind": "event", "row": [...]}."""
    return ('{"kind":"event","row":' + _encoder.encode(row) + "}\n").encode()


class Journal:
    """This process's journal segments: the open one, and the closed ones not yet committed."""

    def __init__(self, db_path):
        self.prefix = f"{db_path}.journal.{os.getpid()}-{process_start()}-{secrets.token_hex(4)}."
        self.n = 0
        self.fd = None
        self.path = None
        self.size = 0
        self.opened_at = 0.0
        self.closed = []           # (path, seq): deletable once the writer has committed `seq` queue items

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

    def hand_over(self, pending_path):
        """Close every segment and rename it to a pending claim of this process: the next start imports it."""
        self.rotate(0)
        for path, _ in self.closed:
            with contextlib.suppress(OSError):
                os.replace(path, f"{pending_path}.{os.getpid()}.{os.path.basename(path).replace('.', '-')}")
        self.closed = []


def claim_orphans(db_path, pending_path):
    """Rename the journal segments of dead processes to pending claims of this one; their count."""
    found = 0
    for path in sorted(glob.glob(glob.escape(f"{db_path}.journal.") + "*.*")):
        pid, _, rest = path[len(db_path) + len(".journal."):].partition("-")
        started = rest.partition("-")[0]
        if not pid.isdigit() or pid_alive(int(pid), started or None):
            continue  # a live process's (this one's included)
        try:
            os.replace(path, f"{pending_path}.{os.getpid()}.{os.path.basename(path).replace('.', '-')}")
            found += 1
        except OSError:  # another worker claimed it first
            continue
    if found:
        log.warning("local store: replaying the journal of %d segment(s) a stopped process left", found)
    return found
