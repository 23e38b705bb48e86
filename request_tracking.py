"""Request and dependency telemetry: Flask hooks for requests served, a `requests` hook for calls made."""
import threading
import time
from urllib.parse import urlsplit, urlunsplit

import requests
from flask import current_app, g, has_app_context, request

import telemetry
from telemetry import REQUEST_STATE, RequestState, current_monitor, current_request_state, monitor_of

_patch_lock = threading.Lock()
_original_send = None
UNTRACKED_ENDPOINTS = frozenset({"usage_monitor.healthz", "usage_monitor.livez"})  # health probes


def start_request():
    """Stamp the request with its start time and its operation: the caller's trace (traceparent) or a new one."""
    header = request.environ.get("HTTP_TRACEPARENT")
    caller = telemetry.parse_traceparent(header) if header else None
    operation_id, parent_id = caller if caller else (telemetry.new_trace_id(), "")
    setattr(g, REQUEST_STATE, RequestState(time.perf_counter(), time.time(), operation_id, parent_id,
                                           telemetry.new_span_id()))


def finish_request(response):
    """Record the finished request; telemetry failures never break the response."""
    state = g.pop(REQUEST_STATE, None)
    if state is None:
        return response
    req = request._get_current_object()  # one context lookup for the many reads below
    if req.endpoint in UNTRACKED_ENDPOINTS:
        return response
    rule = req.url_rule
    record = telemetry.RequestRecord(
        method=req.method, route=rule.rule if rule is not None else "<unmatched>",
        url=_url(req.environ),
        status=response.status_code, duration_ms=(time.perf_counter() - state.started) * 1000.0,
        timestamp=state.timestamp, operation_id=state.operation_id, span_id=state.span_id,
        user_id=state.user_id, parent_id=state.parent_id)
    current_monitor().track_request(record)  # counts and logs its own failures, never raises
    return response


def _url(environ):
    """The request's URL without its query string (it may carry secrets), straight from the WSGI environ."""
    host = environ.get("HTTP_HOST") or f"{environ.get('SERVER_NAME', '')}:{environ.get('SERVER_PORT', '')}"
    path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
    if not path.isascii():  # WSGI strings are bytes as latin-1: decode the UTF-8 the client sent
        path = path.encode("latin-1", "replace").decode("utf-8", "replace")
    return f"{environ.get('wsgi.url_scheme', 'http')}://{host}{path}"


def _strip_query(url):
    """Drop the query string and fragment, which may carry secrets."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def instrument_requests():
    """Wrap requests.Session.send once per process so outgoing calls become dependencies."""
    global _original_send
    with _patch_lock:
        if _original_send is not None:
            return
        _original_send = requests.Session.send
        requests.Session.send = _tracked_send


def _tracked_send(session, prepared, **kwargs):
    """requests.Session.send that records a DependencyRecord when called inside an app context."""
    monitor = monitor_of(current_app) if has_app_context() else None
    if monitor is None or telemetry.is_internal_thread():
        return _original_send(session, prepared, **kwargs)
    state = current_request_state()
    operation_id, span_id = (state.operation_id if state else ""), telemetry.new_span_id()
    if operation_id and "traceparent" not in prepared.headers:  # the downstream service joins the trace
        prepared.headers["traceparent"] = telemetry.traceparent(operation_id, span_id)
    started, timestamp = time.perf_counter(), time.time()
    status, result_code = 0, ""
    try:
        response = _original_send(session, prepared, **kwargs)
        status, result_code = response.status_code, str(response.status_code)
        return response
    except Exception as exc:
        result_code = type(exc).__name__
        raise
    finally:
        parts = urlsplit(prepared.url)
        monitor.track_dependency(telemetry.DependencyRecord(
            type="HTTP", target=parts.netloc, name=f"{prepared.method} {parts.path or '/'}",
            data=_strip_query(prepared.url), result_code=result_code,
            success=0 < status < 400, duration_ms=(time.perf_counter() - started) * 1000.0,
            timestamp=timestamp, operation_id=operation_id, span_id=span_id,
            parent_id=state.span_id if state else "",
            method=prepared.method or "", status=status))
