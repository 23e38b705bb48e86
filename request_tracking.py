"""Request and dependency telemetry: Flask hooks for requests served, a `requests` hook for calls made."""
import threading
import time
from urllib.parse import urlsplit, urlunsplit

import requests
from flask import current_app, g, has_app_context, request

import telemetry
from telemetry import current_monitor, monitor_of

_patch_lock = threading.Lock()
_original_send = None
UNTRACKED_ENDPOINTS = frozenset({"usage_monitor.healthz", "usage_monitor.livez"})  # health probes


def start_request():
    """Stamp the request with its start time and its operation: the caller's trace (traceparent) or a new one."""
    g.request_started = time.perf_counter()
    g.request_timestamp = time.time()
    caller = telemetry.parse_traceparent(request.headers.get("traceparent"))
    g.operation_id, g.parent_id = caller if caller else (telemetry.new_trace_id(), "")
    g.span_id = telemetry.new_span_id()


def finish_request(response):
    """Record the finished request; telemetry failures never break the response."""
    started = g.pop("request_started", None)
    if started is None or request.endpoint in UNTRACKED_ENDPOINTS:
        return response
    rule = request.url_rule.rule if request.url_rule is not None else "<unmatched>"
    record = telemetry.RequestRecord(
        method=request.method, route=rule, url=_strip_query(request.base_url),
        status=response.status_code, duration_ms=(time.perf_counter() - started) * 1000.0,
        timestamp=g.request_timestamp, operation_id=g.operation_id, span_id=g.span_id,
        user_id=g.get("authenticated_user_id", ""), parent_id=g.parent_id)
    current_monitor().track_request(record)  # counts and logs its own failures, never raises
    return response


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
    operation_id, span_id = telemetry.current_operation_id(), telemetry.new_span_id()
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
            parent_id=g.get("span_id", ""),
            method=prepared.method or "", status=status))
