"""The one module that touches private internals of opencensus-ext-azure (pinned, frozen upstream).

azure_monitor.py and delivery.py need a few things the SDK does not expose: its exporters' queue
and worker thread, a real lock for its log handlers, the trace exporter's stop, the metrics
exporter's thread, and its offline storage. Each is a small function or class here, written
against the pinned versions in PINNED; `check_versions()` refuses to start on any other version,
because these internals may have changed. Nothing else in the project touches them.
"""
import importlib.metadata
import logging
import queue

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


Storage = LocalFileStorage


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
