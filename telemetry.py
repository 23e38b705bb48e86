"""The one code path: telemetry records and the dispatcher that hands them to the mode's sink."""
import atexit
import logging
import os
import random
import threading
import time
import uuid
from dataclasses import dataclass, field

from flask import current_app, has_app_context

log = logging.getLogger(__name__)

_local = threading.local()


@dataclass
class EventRecord:
    """One custom event; properties are already validated strings."""

    name: str
    properties: dict
    user_id: str = ""
    event_id: str = field(default_factory=lambda: new_event_id())
    timestamp: float = field(default_factory=time.time)
    operation_id: str = ""


@dataclass
class RequestRecord:
    """One request served by the app."""

    method: str
    route: str
    url: str
    status: int
    duration_ms: float
    timestamp: float
    operation_id: str
    span_id: str
    user_id: str = ""

    @property
    def name(self):
        """Application Insights' request name: method and route template."""
        return f"{self.method} {self.route}"

    @property
    def success(self):
        """A request succeeds unless it answered 5xx (4xx is the caller's fault)."""
        return self.status < 500


@dataclass
class DependencyRecord:
    """One outgoing call made while serving a request."""

    type: str
    target: str
    name: str
    data: str
    result_code: str
    success: bool
    duration_ms: float
    timestamp: float
    operation_id: str = ""
    parent_id: str = ""
    method: str = ""
    status: int = 0


class Telemetry:
    """Routes every record to one sink; the sink starts lazily, once per process."""

    def __init__(self, settings, sink):
        self.settings = settings
        self.sink = sink
        self._pid = None
        self._lock = threading.Lock()

    def _started_sink(self):
        """Return the sink, starting it in this process first if needed (after fork, too)."""
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():
                    self.sink.start()
                    self._pid = os.getpid()
                    atexit.register(self.close)
        return self.sink

    def start(self):
        """Start the sink in this process now rather than on first use (gunicorn's post_worker_init)."""
        self._started_sink()

    def track_event(self, record):
        """Queue one custom event; never blocks on I/O."""
        self._started_sink().track_event(record)
        return record.event_id

    def track_request(self, record):
        """Queue one request record."""
        self._started_sink().track_request(record)

    def track_dependency(self, record):
        """Queue one dependency record."""
        self._started_sink().track_dependency(record)

    def flush(self, timeout=10.0):
        """Block until everything queued so far is written or sent; for tests and shutdown."""
        if self._pid == os.getpid():
            return self.sink.flush(timeout)
        return True

    def close(self, timeout=None):
        """Flush and stop the sink's background work in this process (the sink's own grace by default)."""
        with self._lock:
            if self._pid != os.getpid():
                return
            self._pid = None
        self.sink.close(timeout)

    def health(self):
        """The sink's own counters for /healthz."""
        return self.sink.health() if self._pid == os.getpid() else {"started": False}


def new_event_id():
    """A random (version 4) UUID string.

    Drawn from the `random` module, which is seeded from the OS and reseeded in every forked
    child: uuid.uuid4() calls os.urandom each time, which costs ~29 µs per call on this VM and
    was the largest single cost of log_event. Event ids need uniqueness, not secrecy.
    """
    return str(uuid.UUID(int=random.getrandbits(128), version=4))


def new_trace_id():
    """A 32-hex-digit operation (trace) id."""
    return f"{random.getrandbits(128):032x}"


def new_span_id():
    """A 16-hex-digit span id."""
    return f"{random.getrandbits(64):016x}"


def current():
    """The Telemetry of the current Flask app; raises RuntimeError outside an app context."""
    if not has_app_context():
        raise RuntimeError("telemetry needs a Flask application context (call it inside a request)")
    return current_app.extensions["telemetry"]


def is_internal_thread():
    """True in threads that deliver telemetry, whose own HTTP calls must not be tracked."""
    if getattr(_local, "internal", False):
        return True
    try:
        from opencensus.trace import execution_context
        return bool(execution_context.is_exporter())
    except ImportError:  # pragma: no cover - opencensus is a runtime dependency
        return False


def mark_internal_thread():
    """Mark the calling thread as a telemetry delivery thread."""
    _local.internal = True


def current_operation_id():
    """The operation (trace) id of the request being served, or '' outside a request."""
    from flask import g, has_request_context
    return getattr(g, "operation_id", "") if has_request_context() else ""
