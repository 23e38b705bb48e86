"""OpenTelemetry spans as dependencies: the spans of `opentelemetry-instrumentation-*` libraries
(SQLAlchemy, sqlite3, httpx, Redis, ...) become DependencyRecords handed to the app's UsageMonitor,
the same path as the `requests` hook, in both modes.

Nothing happens at import time. `instrument(names)` (called by UsageMonitor.init_app) starts each
named instrumentation once per process, on a private TracerProvider (the global one is left to the
host). Its sampler records a span only inside an app context with a UsageMonitor, outside the
telemetry's own threads; every other span costs OpenTelemetry's non-recording path. A root span
started while a request is served takes the request's operation id as its trace id, so a
`traceparent` an instrumentation injects downstream names the request's operation, and its parent
is the request's span.
"""
import importlib
import logging
import random
import threading
from urllib.parse import urlsplit, urlunsplit

from flask import current_app, has_app_context

import security
import telemetry

log = logging.getLogger("telemetry.otel_bridge")

# name -> (module, instrumentor class, the pip package that provides it)
SUPPORTED = {
    "sqlalchemy": ("opentelemetry.instrumentation.sqlalchemy", "SQLAlchemyInstrumentor",
                   "opentelemetry-instrumentation-sqlalchemy"),
    "sqlite3": ("opentelemetry.instrumentation.sqlite3", "SQLite3Instrumentor",
                "opentelemetry-instrumentation-sqlite3"),
    "httpx": ("opentelemetry.instrumentation.httpx", "HTTPXClientInstrumentor",
              "opentelemetry-instrumentation-httpx"),
    "redis": ("opentelemetry.instrumentation.redis", "RedisInstrumentor", "opentelemetry-instrumentation-redis"),
    "psycopg": ("opentelemetry.instrumentation.psycopg", "PsycopgInstrumentor",
                "opentelemetry-instrumentation-psycopg"),
    "psycopg2": ("opentelemetry.instrumentation.psycopg2", "Psycopg2Instrumentor",
                 "opentelemetry-instrumentation-psycopg2"),
}
BUILTIN = frozenset({"requests"})  # our own hook (request_tracking), always on

DATA_MAX = 8192  # RemoteDependencyData.data's limit in Application Insights
# db.system -> dependency type, as the Distro's exporter names them; other SQL databases are "SQL".
_DB_TYPES = {"mysql": "mysql", "postgresql": "postgresql", "mongodb": "mongodb", "redis": "redis"}
_SQL_SYSTEMS = frozenset({"sqlite", "mssql", "oracle", "db2", "mariadb", "other_sql", "hsqldb", "h2", "derby",
                          "hive", "cockroachdb", "sybase", "informix", "firebird", "ingres", "teradata"})

_lock = threading.Lock()
_provider = None
_started = set()


def parse_names(names):
    """The instrumentation names as a tuple; ValueError naming an unknown one."""
    if isinstance(names, str):
        names = names.split(",")
    out = tuple(dict.fromkeys(n.strip().lower() for n in names if n and n.strip()))
    unknown = [n for n in out if n not in SUPPORTED and n not in BUILTIN]
    if unknown:
        raise ValueError(f"unknown instrumentation {', '.join(unknown)}: supported are "
                         f"{', '.join(sorted(BUILTIN | set(SUPPORTED)))}")
    return out


def instrument(names):
    """Start each named instrumentation in this process, once; returns the names that are on.

    A named instrumentation whose package is not installed is skipped with a warning.
    """
    wanted = [n for n in parse_names(names) if n in SUPPORTED]
    if not wanted:
        return sorted(_started)
    with _lock:
        for name in wanted:
            if name not in _started and _instrument_one(name):
                _started.add(name)
    return sorted(_started)


def _instrument_one(name):
    """Instrument one library on the bridge's provider: True, or False (logged) when it is not installed."""
    module_name, class_name, package = SUPPORTED[name]
    try:
        instrumentor = getattr(importlib.import_module(module_name), class_name)()
    except ImportError as exc:
        log.warning("instrumentation %r is named but %s is not installed (%s): its calls are not tracked",
                    name, package, exc)
        return False
    instrumentor.instrument(tracer_provider=_tracer_provider())
    return instrumentor.is_instrumented_by_opentelemetry


def started():
    """The instrumentations on in this process."""
    return sorted(_started)


def _tracer_provider():
    """The bridge's private TracerProvider, built on first use."""
    global _provider
    if _provider is None:
        from opentelemetry.sdk.trace import TracerProvider
        _provider = TracerProvider(sampler=_sampler(), id_generator=_id_generator())
        _provider.add_span_processor(_processor())
    return _provider


def _monitor():
    """The UsageMonitor of the current app, or None (no app context, no monitor, or a telemetry thread)."""
    if not has_app_context() or telemetry.is_internal_thread():
        return None
    return telemetry.monitor_of(current_app)


def _sampler():
    """A sampler that records spans only where a UsageMonitor can take them."""
    from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult

    drop = SamplingResult(Decision.DROP)

    class InMonitoredApp(Sampler):
        """Record a span inside an app context with a UsageMonitor, outside telemetry's own threads."""

        def should_sample(self, parent_context, trace_id, name, kind=None, attributes=None, links=None,
                          trace_state=None):
            """RECORD_AND_SAMPLE (the span keeps its start attributes) where a monitor takes it, DROP elsewhere."""
            if _monitor() is None:
                return drop
            return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes, trace_state)

        def get_description(self):
            """The sampler's name."""
            return "UsageMonitorInApp"

    return InMonitoredApp()


def _id_generator():
    """An id generator whose root spans, inside a request, take the request's operation id as trace id."""
    from opentelemetry.sdk.trace.id_generator import IdGenerator

    class RequestOperationIds(IdGenerator):
        """Random span ids; the current request's operation id as the trace id of a root span."""

        def generate_span_id(self):
            """A random non-zero 64-bit span id."""
            return random.getrandbits(64) or 1

        def generate_trace_id(self):
            """The request's operation id, or a random 128-bit id outside a request."""
            state = telemetry.current_request_state()
            if state is not None and state.operation_id:
                return int(state.operation_id, 16)
            return random.getrandbits(128) or 1

    return RequestOperationIds()


def _processor():
    """The span processor that turns each ended dependency span into a DependencyRecord."""
    from opentelemetry.sdk.trace import SpanProcessor

    class DependencyBridge(SpanProcessor):
        """Hands each ended CLIENT (or database) span to the current app's UsageMonitor."""

        def on_end(self, span):
            """Record the span as a dependency of the request being served (never raises into the caller)."""
            monitor = _monitor()
            if monitor is None:
                return
            attributes = dict(span.attributes or {})  # one copy: each read of the span's mapping takes a lock
            if not is_dependency(span, attributes):
                return
            record = to_record(span, telemetry.current_request_state(), monitor.settings.redact_keys, attributes)
            monitor.track_dependency(record)  # counts and logs its own failures, never raises

    return DependencyBridge()


def is_dependency(span, attributes):
    """A CLIENT or PRODUCER span, or any span about a database call."""
    from opentelemetry.trace import SpanKind
    return span.kind in (SpanKind.CLIENT, SpanKind.PRODUCER) or "db.system" in attributes \
        or "db.system.name" in attributes


def to_record(span, state, redact_keys, attributes):
    """One ended span (its attributes as a dict) as a DependencyRecord under the request `state` (None outside a request)."""
    fields = _http_fields(attributes) if _url_of(attributes) else _db_fields(span, attributes, redact_keys)
    parent = span.parent
    parent_id = f"{parent.span_id:016x}" if parent is not None and parent.is_valid and not parent.is_remote \
        else (state.span_id if state is not None else "")
    ok = not _failed(span)
    status = fields.pop("status", 0)
    return telemetry.DependencyRecord(
        **fields, result_code=str(status) if status else ("" if ok else _error_name(span)),
        success=(0 < status < 400 and ok) if status else ok,
        duration_ms=(span.end_time - span.start_time) / 1e6, timestamp=span.start_time / 1e9,
        operation_id=state.operation_id if state is not None else "", parent_id=parent_id,
        status=status, span_id=f"{span.context.span_id:016x}")


def _failed(span):
    """True when the instrumentation set the span's status to ERROR."""
    from opentelemetry.trace import StatusCode
    return span.status.status_code is StatusCode.ERROR


def _error_name(span):
    """The exception type the span recorded, else its status description, else 'error'."""
    for event in span.events:
        if event.name == "exception" and event.attributes:
            return str(event.attributes.get("exception.type", "error"))
    return (span.status.description or "error")[:100]


def _url_of(attributes):
    """The URL of an HTTP client span (old or stable semantic conventions), or ''."""
    return attributes.get("http.url") or attributes.get("url.full") or ""


def _http_fields(attributes):
    """Type, target, name, data, method and status of an HTTP client span (the query string dropped)."""
    url = urlsplit(str(_url_of(attributes)))
    method = str(attributes.get("http.method") or attributes.get("http.request.method") or "GET")
    status = attributes.get("http.status_code") or attributes.get("http.response.status_code") or 0
    return {"type": "HTTP", "target": url.netloc, "name": f"{method} {url.path or '/'}",
            "data": urlunsplit((url.scheme, url.netloc, url.path, "", "")), "method": method, "status": int(status)}


def _db_fields(span, attributes, redact_keys):
    """Type, target, name and data of a database (or other client) span, as the Distro's exporter maps them."""
    system = str(attributes.get("db.system") or attributes.get("db.system.name") or "")
    kind = _DB_TYPES.get(system) or ("SQL" if system in _SQL_SYSTEMS else system or "Other")
    host = attributes.get("server.address") or attributes.get("net.peer.name") or ""
    port = attributes.get("server.port") or attributes.get("net.peer.port")
    peer = f"{host}:{port}" if host and port else str(host)
    database = str(attributes.get("db.name") or attributes.get("db.namespace") or "")
    target = f"{peer}|{database}" if peer and database else peer or database or system or span.name
    statement = attributes.get("db.statement") or attributes.get("db.query.text") or \
        attributes.get("db.operation") or ""
    data = security.redact_statement(str(statement), redact_keys)[:DATA_MAX]
    return {"type": kind, "target": target[:1024], "name": span.name[:1024], "data": data}


def uninstrument():
    """Stop every instrumentation this process started (the libraries are unwrapped again)."""
    with _lock:
        for name in sorted(_started):
            module_name, class_name, _package = SUPPORTED[name]
            getattr(importlib.import_module(module_name), class_name)().uninstrument()
        _started.clear()
