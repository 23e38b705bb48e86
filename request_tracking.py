"""Request and dependency telemetry: Flask hooks for requests served, a `requests` hook for calls made."""
import logging
import threading
import time
from urllib.parse import urlsplit, urlunsplit

import requests
from flask import current_app, g, has_app_context, request

import telemetry

log = logging.getLogger("telemetry.requests")

_patch_lock = threading.Lock()
_original_send = None
UNTRACKED_PATHS = frozenset({"/healthz"})


def init_app(app):
    """Time every request the app serves and record it (health probes excepted)."""
    app.before_request(_start_request)
    app.after_request(_finish_request)
    instrument_requests()


def _start_request():
    """Stamp the request with its start time and a fresh operation id."""
    g.request_started = time.perf_counter()
    g.request_timestamp = time.time()
    g.operation_id = telemetry.new_trace_id()
    g.span_id = telemetry.new_span_id()


def _finish_request(response):
    """Record the finished request; telemetry failures never break the response."""
    started = g.pop("request_started", None)
    if started is None or request.path in UNTRACKED_PATHS:
        return response
    rule = request.url_rule.rule if request.url_rule is not None else "<unmatched>"
    record = telemetry.RequestRecord(
        method=request.method, route=rule, url=_strip_query(request.base_url),
        status=response.status_code, duration_ms=(time.perf_counter() - started) * 1000.0,
        timestamp=g.request_timestamp, operation_id=g.operation_id, span_id=g.span_id,
        user_id=g.get("authenticated_user_id", ""))
    try:
        current_app.extensions["telemetry"].track_request(record)
    except Exception:  # telemetry must never change the answer; the failure is logged
        log.exception("could not record the request %s", record.name)
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


def uninstrument_requests():
    """Undo instrument_requests (for tests)."""
    global _original_send
    with _patch_lock:
        if _original_send is not None:
            requests.Session.send = _original_send
            _original_send = None


def _tracked_send(session, prepared, **kwargs):
    """requests.Session.send that records a DependencyRecord when called inside an app context."""
    if not has_app_context() or telemetry.is_internal_thread():
        return _original_send(session, prepared, **kwargs)
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
        current_app.extensions["telemetry"].track_dependency(telemetry.DependencyRecord(
            type="HTTP", target=parts.netloc, name=f"{prepared.method} {parts.path or '/'}",
            data=_strip_query(prepared.url), result_code=result_code,
            success=0 < status < 400, duration_ms=(time.perf_counter() - started) * 1000.0,
            timestamp=timestamp, operation_id=telemetry.current_operation_id(),
            parent_id=g.get("span_id", "") if has_app_context() else "",
            method=prepared.method or "", status=status))
