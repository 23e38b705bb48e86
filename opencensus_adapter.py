"""The one module that touches private internals of opencensus-ext-azure (pinned, frozen upstream).

azure_monitor.py and delivery.py need a few things the SDK does not expose: its exporters' queue
and worker thread, a real lock for its log handlers, the trace exporter's stop, the metrics
exporter's thread, and its offline storage. Each is a small function or class here, written
against the pinned versions in PINNED; `check_versions()` refuses to start on any other version,
because these internals may have changed. Nothing else in the project touches them.
"""
import contextlib
import datetime
import importlib.metadata
import logging
import os
import queue
import random
import threading
import time

from opencensus.common.schedule import QueueEvent
from opencensus.ext.azure.common.storage import LocalFileBlob, LocalFileStorage

# The versions these internals were read from; requirements.txt pins the same (a test checks it).
PINNED = {"opencensus": "0.11.4", "opencensus-ext-azure": "1.1.15"}


class SdkVersionMismatch(RuntimeError):
    """An installed OpenCensus package is not the version opencensus_adapter was written against."""


def installed_versions(names=tuple(PINNED)):
    """The installed version of each package (None when it is not installed)."""
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def check_versions(installed=None, pinned=None):
    """Raise SdkVersionMismatch naming each package whose installed version is not the pinned one."""
    pinned = PINNED if pinned is None else pinned
    installed = installed_versions(tuple(pinned)) if installed is None else installed
    wrong = [f"{name}: pinned {version}, installed {installed.get(name) or 'none'}"
             for name, version in pinned.items() if installed.get(name) != version]
    if wrong:
        raise SdkVersionMismatch(
            "Azure mode uses private internals of the OpenCensus SDK that may differ in other versions "
            f"({'; '.join(wrong)}): install the versions pinned in requirements.txt, or update "
            "opencensus_adapter.py for the new version and its PINNED table")


class RealLockMixin:
    """The SDK's log handlers set `self.lock = None`, which breaks every log call on Python 3.13; keep a real lock."""

    def createLock(self):
        """Create the standard handler lock."""
        logging.Handler.createLock(self)


class LogHandlerHooks(RealLockMixin):
    """The SDK log handler's worker calls its private `_export(batch, event)`: hand the batch to deliver_batch."""

    def _export(self, batch, event=None):
        """Deliver one batch taken from the queue by the SDK's worker."""
        self.deliver_batch(batch, event)


class TraceExporterHooks:
    """The SDK trace exporter's worker calls `emit(batch, event)`: hand the batch to deliver_batch."""

    def emit(self, batch, event=None):
        """Deliver one batch taken from the queue by the SDK's worker."""
        self.deliver_batch(batch, event)


def put_nowait(exporter, item):
    """Queue one item on the exporter's worker queue; raises queue.Full when it is full."""
    exporter._queue._queue.put_nowait(item)


def take_queued(exporter):
    """Take every item still queued (without waiting); flush markers found on the way are released."""
    items = []
    source = getattr(exporter, "_queue", None)
    if source is None:
        return items
    while True:
        try:
            item = source._queue.get_nowait()
        except queue.Empty:
            return items
        if isinstance(item, QueueEvent):
            item.set()
        else:
            items.append(item)


def queue_depth(exporter):
    """Items waiting in the exporter's queue."""
    return exporter._queue._queue.qsize()


def wait_until_exported(exporter, timeout):
    """Wait until the worker has exported everything queued before this call; False on timeout.

    The SDK's own Queue.flush returns at once when the worker has already taken the items out
    of the queue but not yet sent them; a marker in the queue always waits for them.
    """
    marker = QueueEvent("SYNC")
    try:
        exporter._queue._queue.put(marker, timeout=timeout)
    except queue.Full:
        return False
    return marker.wait(timeout)


def worker_alive(exporter):
    """True while the exporter's worker thread runs."""
    return exporter._worker.is_alive()


def stop_trace_exporter(exporter, timeout):
    """Stop the trace exporter's worker and its storage's maintenance thread."""
    exporter._stop(timeout)


def close_storage(exporter):
    """Stop the maintenance thread of the exporter's offline storage."""
    exporter.storage.close()


def start_metrics_thread(exporter, producers, interval):
    """Start the OpenCensus thread that hands `producers`' metrics to the exporter every interval."""
    from opencensus.metrics import transport

    exporter.exporter_thread = transport.get_exporter_thread(producers, exporter, interval=interval)
    return exporter.exporter_thread


def cancel_metrics_thread(exporter):
    """Stop the metrics exporter's interval thread (no final export)."""
    if exporter.exporter_thread is not None:
        exporter.exporter_thread.cancel()


def stored_blob(path):
    """The stored batch at `path` (a file of the SDK's storage format)."""
    return LocalFileBlob(path)


def read_lines(blob):
    """The JSON lines (one envelope each) of a stored batch, unparsed; None when it cannot be read."""
    try:
        with open(blob.fullpath, encoding="utf-8") as fh:
            return [line for line in fh.read().split("\n") if line.strip()]
    except OSError:  # leased or sent by another process meanwhile
        return None


class Outbox(LocalFileStorage):
    """The SDK's LocalFileStorage (same folder layout, file names, leases and maintenance), with a cheap put.

    `put_lines` writes envelopes already serialised (one JSON line each) in one write, and the size
    bound is checked against a running total: the folder is walked at most every RESCAN_S seconds,
    and again before refusing a write, instead of on every put (the SDK stats every file each time,
    O(files) per batch during an outage). Other processes sharing the folder are seen at each walk.
    """

    RESCAN_S = 1.0
    FULL_RESCAN_S = 0.1  # while full, a refusal holds this long before the folder is walked again

    def __init__(self, *args, **kwargs):
        self._size_lock = threading.Lock()
        self._size = 0
        self._scanned_at = float("-inf")
        super().__init__(*args, **kwargs)

    def _scan_size(self):
        """Walk the folder: the bytes of every file in it (the SDK's measure)."""
        size = 0
        try:
            with os.scandir(self.path) as entries:
                for entry in entries:
                    try:
                        if entry.is_file(follow_symlinks=False):
                            size += entry.stat(follow_symlinks=False).st_size
                    except OSError:  # sent and deleted while we looked
                        continue
        except FileNotFoundError:
            return 0
        return size

    def _room_for(self, nbytes):
        """True when `nbytes` more keep the folder under max_size (counted as written when True)."""
        with self._size_lock:
            now = time.monotonic()
            age = now - self._scanned_at
            if age >= self.RESCAN_S or (self._size >= self.max_size and age >= self.FULL_RESCAN_S):
                self._size, self._scanned_at = self._scan_size(), now
            if self._size >= self.max_size:
                return False
            self._size += nbytes
            return True

    def _check_storage_size(self):
        """The SDK's check before a write, on the running total."""
        return self._room_for(0)

    def put_lines(self, lines, lease_period=0):
        """Store serialised envelopes as one batch file (leased for `lease_period` s); None when full or on error."""
        data = "\n".join(lines) + "\n"
        if not self._room_for(len(data)):
            return None
        blob = LocalFileBlob(os.path.join(self.path, f"{_now_name()}-{random.getrandbits(32):08x}.blob"))
        tmp = blob.fullpath + ".tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(data)
            if lease_period:
                blob.fullpath += f"@{_now_name(lease_period)}.lock"
            os.rename(tmp, blob.fullpath)
        except OSError as exc:  # a full disk, or the folder removed under us: the caller counts it as not stored
            logging.getLogger("azure_monitor.delivery").debug("could not write a batch to %s: %s",
                                                               self.path, exc.strerror or type(exc).__name__)
            with contextlib.suppress(OSError):
                os.remove(tmp)
            return None
        return blob


def use_outbox(exporter):
    """Replace the storage the SDK's constructor made with an Outbox on the same folder and settings."""
    old = exporter.storage
    if old is None or isinstance(old, Outbox):
        return
    old.close()
    exporter.storage = Outbox(path=old.path, max_size=old.max_size, maintenance_period=old.maintenance_period,
                              retention_period=old.retention_period, source=type(exporter).__name__)


def _now_name(plus_seconds=0.0):
    """The UTC time (plus `plus_seconds`) in the SDK's storage file-name format."""
    stamp = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None) + datetime.timedelta(seconds=plus_seconds)
    return stamp.strftime("%Y-%m-%dT%H%M%S.%f")


def protocol_object(cls, fields):
    """An instance of one of the SDK's protocol classes (Envelope, Data, Event, Request, ...) holding exactly `fields`.

    They are dicts whose constructors set each field twice and then read and write some again
    through Python-level __getattr__/__setattr__ (~8 µs per envelope); filling the dict directly
    gives the same object and the same JSON for ~2 µs. `fields` must name every field the class's
    constructor would set (e.g. `ver`); the tests compare the JSON with the SDK's own converters.
    """
    obj = dict.__new__(cls)
    dict.update(obj, fields)
    return obj
