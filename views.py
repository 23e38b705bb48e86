"""The service's routes: a module-level Blueprint, its view functions and the JSON error contract."""
import logging
import re

from flask import Blueprint, current_app, jsonify, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed

import security
import system_health
from api_spec import ApiError, ApiSpec, EventAccepted, Health, UsageQuery, UsageReport
from log_analytics import UsageQueryError
from logging_utils import PublicEvent, record_event
from monitoring_utils import UsageSourceUnavailable, get_usage_stats
from telemetry import TelemetryUnavailable, current_monitor

log = logging.getLogger("usage_monitor.service")

bp = Blueprint("usage_monitor", __name__)
spec = ApiSpec("Usage monitoring backend", "1.0.0")

_SECURITY_SCHEMES = {
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-Api-Key"},
    "bearerAuth": {"type": "http", "scheme": "bearer"},
}
RETRY_AFTER_UNAVAILABLE = "5"


def init_app(app):
    """Register the blueprint, and JSON 405 answers for our paths (raised before any blueprint is known)."""
    app.register_blueprint(bp)
    app.register_error_handler(MethodNotAllowed, _method_not_allowed)


# The rate limit of each limited endpoint, checked before the body is read or validated.
_RATE_LIMITS = {"usage_monitor.post_event": "event", "usage_monitor.dashboard_usage": "dashboard"}


@bp.before_request
def _before():
    """Our routes only: bodies above MAX_EVENT_BYTES answer 413 (the host keeps its own limit); rate limits."""
    monitor = current_monitor()
    request.max_content_length = monitor.settings.max_event_bytes
    limit = _RATE_LIMITS.get(request.endpoint)
    if limit:
        monitor.check_rate_limit(limit)


bp.after_request(security.security_headers)


@bp.post("/event")
@spec.operation("/event", "POST", "Record one custom event (asynchronously)", body=PublicEvent,
                response=EventAccepted, status=202, errors=(400, 413, 415, 422, 429, 503), security="apiKey")
def post_event(body):
    """Accept one custom event from a frontend; it is recorded asynchronously."""
    security.require_event_api_key(current_monitor().settings)
    try:
        event_id = record_event(body.event_name, body.details)
    except TelemetryUnavailable as exc:
        raise ApiError(503, "telemetry_unavailable", f"{exc}; try again later",
                       headers={"Retry-After": RETRY_AFTER_UNAVAILABLE}) from None
    return jsonify({"status": "accepted", "event_id": event_id}), 202


@bp.get("/dashboard/usage")
@spec.operation("/dashboard/usage", "GET", "Usage statistics for the dashboard", query=UsageQuery,
                response=UsageReport, errors=(400, 429, 502, 503), security="bearerAuth")
def dashboard_usage(query):
    """Usage statistics for the dashboard."""
    security.require_dashboard_token(current_monitor().settings)
    try:
        return jsonify(get_usage_stats(query.days))
    except UsageSourceUnavailable as exc:
        raise ApiError(503, "usage_source_unavailable", str(exc)) from None
    except UsageQueryError as exc:
        log.warning("usage query failed: %s", exc.message)
        raise ApiError(exc.status, "upstream_unavailable" if exc.status == 503 else "upstream_error",
                       exc.message, headers={"Retry-After": str(exc.retry_after)} if exc.retry_after else None
                       ) from None


@bp.get("/healthz")
@spec.operation("/healthz", "GET", "Liveness and telemetry counters", response=Health)
def healthz():
    """Liveness and telemetry counters; never secrets."""
    return jsonify(system_health.health_report(current_monitor()))


@bp.get("/openapi.json")
def openapi():
    """The OpenAPI document, generated from the models the routes validate with."""
    settings = current_monitor().settings
    active = {name for name, on in (("apiKey", settings.event_api_keys), ("bearerAuth", settings.dashboard_token))
              if on}
    return jsonify(spec.render(security_schemes=_SECURITY_SCHEMES, active_security=active))


# -- the JSON error contract ------------------------------------------------------------------
def error_response(status, code, message, field=None, headers=None):
    """The single JSON error body."""
    body = {"code": code, "message": message}
    if field:
        body["field"] = field
    response = jsonify({"error": body})
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


@bp.errorhandler(ApiError)
def _api_error(exc):
    return error_response(exc.status, exc.code, exc.message, exc.field, exc.headers)


@bp.errorhandler(security.Unauthorized)
def _unauthorized(exc):
    return error_response(401, "unauthorized", exc.message, headers={"WWW-Authenticate": exc.challenge})


@bp.errorhandler(HTTPException)
def http_error(exc):
    """Any HTTP error as the JSON body (413 and 429 name their limit)."""
    code = re.sub(r"[^a-z0-9]+", "_", (exc.name or "error").lower()).strip("_")
    headers = {k: v for k, v in exc.get_headers() if k.lower() in ("allow", "retry-after")}
    if exc.code == 413:
        limit = current_monitor().settings.max_event_bytes
        return error_response(413, code, f"The body is larger than {limit} bytes (MAX_EVENT_BYTES)", field="body")
    if exc.code == 429:
        return error_response(429, "rate_limited", f"Rate limit exceeded ({exc.description})", headers=headers)
    return error_response(exc.code or 500, code, exc.description or exc.name, headers=headers)


@bp.errorhandler(Exception)
def unexpected_error(exc):
    """An unexpected failure: logged with its traceback, answered without one."""
    log.exception("unhandled error on %s %s", request.method, request.path)
    return error_response(500, "internal_error", "The server failed to handle the request.")


def _method_not_allowed(exc):
    """405 on one of our paths answers JSON; on the host's paths, the host's own page."""
    ours = {rule.rule for rule in current_app.url_map.iter_rules() if rule.endpoint.startswith(f"{bp.name}.")}
    if request.path in ours:
        return security.security_headers(http_error(exc))
    return exc


def register_json_errors(app):
    """Make every error of `app` answer JSON (create_app's own app, where every route is ours)."""
    app.register_error_handler(HTTPException, http_error)
    app.register_error_handler(MethodNotAllowed, http_error)
    app.register_error_handler(Exception, unexpected_error)
    app.after_request(security.security_headers)
