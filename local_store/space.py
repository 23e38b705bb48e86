"""Disk space: refuse new events at a free-space watermark, and keep a reserve for what was already accepted.

* Watermark (LOCAL_MIN_FREE_MB): while the filesystem that holds TELEMETRY_DB has less free space,
  events are refused (503 with Retry-After) before the disk is full, and /healthz says why.
* Reserve (LOCAL_RESERVE_MB, after CockroachDB's emergency ballast): a file `<db>.reserve` of that
  size, written at start. When a write of what was already accepted meets a full disk (a commit, the
  pending file at shutdown), the reserve is deleted to make room, once; it is written again when the
  free space is back above the watermark plus the reserve.
"""
import contextlib
import errno
import logging
import os
import shutil
import time

log = logging.getLogger(__name__)

_CHECK_INTERVAL = 0.5          # seconds between free-space checks on the request path
_MB = 1024 * 1024


class Space:
    """The free-space watermark and the reserve file of one store."""

    def __init__(self, db_path, min_free_mb, reserve_mb):
        self.folder = os.path.dirname(os.path.abspath(db_path))
        self.reserve_path = db_path + ".reserve"
        self.min_free_mb = float(min_free_mb)
        self.reserve_mb = float(reserve_mb)
        self._next_check = 0.0
        self._low = None           # why events are refused, while the disk is under the watermark
        self.released = 0          # times the reserve was given up

    def free_mb(self):
        """Free megabytes for this process on the store's filesystem (None when it cannot be read)."""
        try:
            return shutil.disk_usage(self.folder).free / _MB
        except OSError:
            return None

    def low(self):
        """Why new events are refused now (the disk under the watermark), or None; checked twice a second."""
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + _CHECK_INTERVAL
            free = self.free_mb()
            self._low = None if free is None or free >= self.min_free_mb else (
                f"the disk holding the local store has {free:.1f} MB free, under LOCAL_MIN_FREE_MB="
                f"{self.min_free_mb:g}; events are refused until there is room")
        return self._low

    def keep_reserve(self):
        """Write the reserve file when it is missing and there is room for it above the watermark."""
        if self.reserve_mb <= 0 or os.path.exists(self.reserve_path):
            return
        free = self.free_mb()
        if free is None or free < self.min_free_mb + self.reserve_mb:
            return
        size = int(self.reserve_mb * _MB)
        try:
            with open(self.reserve_path + ".tmp", "wb") as fh:
                try:
                    os.posix_fallocate(fh.fileno(), 0, size)  # real blocks, without writing them
                except (AttributeError, OSError) as exc:
                    if getattr(exc, "errno", None) == errno.ENOSPC:
                        raise
                    fh.write(b"\0" * size)
            os.replace(self.reserve_path + ".tmp", self.reserve_path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.remove(self.reserve_path + ".tmp")
            log.warning("local store could not write its %g MB reserve %s (%s)", self.reserve_mb,
                        self.reserve_path, exc)

    def release(self):
        """Delete the reserve to make room for what was accepted; True when there was one to give."""
        try:
            os.remove(self.reserve_path)
        except OSError:
            return False
        self.released += 1
        log.warning("local store: the disk is full; released the %g MB reserve %s so that accepted records "
                    "can be written", self.reserve_mb, self.reserve_path)
        return True
