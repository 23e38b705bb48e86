"""The one code path: telemetry records and the dispatcher that hands them to the mode's sink."""
import contextlib
import json
import logging
import random
import re
import threading
import time
import weakref
from dataclasses import dataclass, field

from flask import current_app, g, has_app_context, has_request_context

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
    anonymous_id: str = ""
    session_id: str = ""
    client_event_id: bool = False  # made by the client: a retried send must be stored once


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
    parent_id: str = ""  # the caller's span, from an incoming traceparent

    @property
    def name(self):
        """Application Insights' request name: method and route template."""
        return f"{self.method} {self.route}"

    @property
    def success(self):
        """A request succeeds unless it answered 5xx (the one failure rule: is_failure)."""
        return not is_failure(self.status)


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
    span_id: str = field(default_factory=lambda: new_span_id())  # also sent downstream in traceparent


_SPELLING = {True: "true", False: "false", None: "null"}


def stringify(value):
    """Render one scalar as Application Insights expects: a string (JSON spelling for non-strings)."""
    if isinstance(value, str):
        return value
    if value is None or isinstance(value, bool):
        return _SPELLING[value]
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float):
        return json.dumps(value)
    return str(value)


def new_event_id():
    """A random (version 4) UUID string.

    Drawn from the `random` module, which is seeded from the OS and reseeded in every forked
    child: uuid.uuid4() calls os.urandom each time, which costs ~29 µs per call on this VM and
    was the largest single cost of log_event. Event ids need uniqueness, not secrecy.
    """
    n = random.getrandbits(128) & _UUID_CLEAR | _UUID_V4  # the version (4) and variant (RFC 4122) bits
    h = f"{n:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_UUID_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_UUID_V4 = (0x4000 << 64) | (0x8000 << 48)


def new_trace_id():
    """A 32-hex-digit operation (trace) id."""
    return f"{random.getrandbits(128):032x}"


_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")


def parse_traceparent(value):
    """(trace id, parent span id) from a W3C traceparent header, or None when it is not valid."""
    match = _TRACEPARENT.fullmatch(value or "")
    if match is None:
        return None
    version, trace_id, parent_id, _flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest) or trace_id == "0" * 32 or parent_id == "0" * 16:
        return None
    return trace_id, parent_id


def traceparent(trace_id, span_id):
    """The W3C traceparent header for an outgoing call (sampled)."""
    return f"00-{trace_id}-{span_id}-01"


def new_span_id():
    """A 16-hex-digit span id."""
    return f"{random.getrandbits(64):016x}"


EXTENSION_NAME = "usage_monitor"


class TelemetryUnavailable(Exception):
    """The sink could not take a record (it failed to start or to queue); the caller may retry later."""


def is_failure(status):
    """The one failure rule: a request fails when it answered 5xx (4xx is the caller's fault)."""
    return status >= 500


def monitor_of(app):
    """The UsageMonitor of `app`, or None when the app has none."""
    return app.extensions.get(EXTENSION_NAME)


def current_monitor():
    """The UsageMonitor of the current Flask app; RuntimeError saying what to do when there is none."""
    if not has_app_context():
        raise RuntimeError(
            "usage tracking needs a Flask application context: call it while a request is being "
            "handled, or inside `with app.app_context():`")
    monitor = monitor_of(current_app)
    if monitor is None:
        raise RuntimeError(
            f"the Flask app {current_app.name!r} has no UsageMonitor: add `UsageMonitor(app)` "
            "(from app import UsageMonitor) where the app is created")
    return monitor


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


@contextlib.contextmanager
def internal_thread():
    """Treat the calling thread as a delivery thread inside the block (`flask telemetry drain` sends
    from the command's own thread: its POSTs to ingestion must not become dependencies)."""
    previous = getattr(_local, "internal", False)
    _local.internal = True
    try:
        yield
    finally:
        _local.internal = previous


class RequestState:
    """What the request hooks know of the request being served: its timing, its operation and its user."""

    __slots__ = ("started", "timestamp", "operation_id", "parent_id", "span_id", "user_id")

    def __init__(self, started, timestamp, operation_id, parent_id, span_id):
        self.started, self.timestamp = started, timestamp
        self.operation_id, self.parent_id, self.span_id = operation_id, parent_id, span_id
        self.user_id = ""


REQUEST_STATE = "usage_monitor_request"  # its attribute on flask.g


def current_request_state():
    """The RequestState of the request being served, or None (outside a request, or not tracked)."""
    return getattr(g, REQUEST_STATE, None) if has_request_context() else None


TRACE_LOGGER = "usage_monitor"
_last_started = None  # weakref to the UsageMonitor that started last in this process


def set_last_started(monitor):
    """Remember the monitor that started last: traces logged outside any app context go to it."""
    global _last_started
    _last_started = weakref.ref(monitor)


def forget_started(monitor):
    """A closed monitor no longer takes the traces logged outside any app context."""
    global _last_started
    if _last_started is not None and _last_started() is monitor:
        _last_started = None


def _trace_monitor():
    """The monitor a trace belongs to: the current app's, else (no app context) the last started one."""
    if has_app_context():
        return monitor_of(current_app)
    return _last_started() if _last_started is not None else None


class TraceForwarder(logging.Handler):
    """Hands each record of azure_monitor.logger to its app's UsageMonitor (traces in either mode).

    Records logged while a record is being forwarded, and by telemetry's own threads, are
    skipped, so a sink's own log lines can never feed back into it.
    """

    def emit(self, record):
        """Forward one record; never raises into the caller."""
        if getattr(_local, "forwarding", False) or is_internal_thread():
            return
        _local.forwarding = True
        try:
            monitor = _trace_monitor()
            if monitor is not None:
                state = current_request_state()
                operation_id = state.operation_id if state is not None else ""
                if operation_id:
                    record.traceId, record.spanId = operation_id, state.span_id
                record.operation_id = operation_id
                monitor.track_trace(record)
        finally:
            _local.forwarding = False


_forwarder = TraceForwarder()


def install_trace_forwarder(level):
    """Attach the forwarder to the trace logger (once per process) and set the logger's level."""
    logger = logging.getLogger(TRACE_LOGGER)
    logger.setLevel(level)
    if _forwarder not in logger.handlers:
        logger.addHandler(_forwarder)
    return logger


