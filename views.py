"""The service's routes: a module-level Blueprint, its view functions and the JSON error contract."""
import logging
import os
import re

from flask import Blueprint, current_app, jsonify, redirect, render_template, request, send_from_directory, url_for
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException, MethodNotAllowed

import security
import system_health
from api_spec import (ApiError, ApiSpec, BatchAccepted, EventAccepted, EventBatch, Health, Live, UsageQuery,
                      UsageReport)
from log_analytics import UsageQueryError
from logging_utils import PublicEvent, SingleEvent, describe_error, record_event
from monitoring_utils import UsageSourceUnavailable, get_usage_stats
from telemetry import TelemetryUnavailable, current_monitor

log = logging.getLogger("usage_monitor.service")

bp = Blueprint("usage_monitor", __name__, static_folder="static", static_url_path="/dashboard/static",
               template_folder="templates")
spec = ApiSpec("Usage monitoring backend", "1.0.0")

_SECURITY_SCHEMES = {
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-Api-Key"},
    "bearerAuth": {"type": "http", "scheme": "bearer"},
}
RETRY_AFTER_UNAVAILABLE = "5"
# The dashboard page: its own scripts and styles only, no inline code, nothing from elsewhere.
DASHBOARD_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                 "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


def init_app(app):
    """Register the blueprint, and JSON 405 answers for our paths (raised before any blueprint is known)."""
    app.register_blueprint(bp)
    app.register_error_handler(MethodNotAllowed, _method_not_allowed)


# The rate limit of each limited endpoint, checked before the body is read or validated.
_RATE_LIMITS = {"usage_monitor.post_event": "event", "usage_monitor.post_events": "event",
                "usage_monitor.dashboard_usage": "dashboard"}
_BATCH = "usage_monitor.post_events"


@bp.before_request
def _before():
    """Our routes only: body limits (413; the host keeps its own) and rate limits."""
    monitor = current_monitor()
    settings = monitor.settings
    req = request._get_current_object()  # one context lookup for the reads below
    endpoint = req.endpoint
    req.max_content_length = settings.max_batch_bytes if endpoint == _BATCH else settings.max_event_bytes
    limit = _RATE_LIMITS.get(endpoint)
    if limit and req.method != "OPTIONS":  # a CORS preflight is not a use: a 429 on it would hide Retry-After
        monitor.check_rate_limit(limit)


bp.after_request(security.security_headers)


@bp.post("/event")
@spec.operation("/event", "POST", "Record one custom event (asynchronously)", body=SingleEvent,
                response=EventAccepted, status=202, errors=(400, 413, 415, 422, 429, 503), security="apiKey")
def post_event(body):
    """Accept one custom event from a frontend (JSON, or JSON sent as text/plain by a beacon)."""
    security.require_event_api_key(current_monitor().settings, body.api_key)
    try:
        event_id = record_event(body.event_name, body.details, client=body)
    except TelemetryUnavailable as exc:
        raise _unavailable(exc) from None
    # What jsonify would answer, without its machinery (an event id is a UUID: nothing to escape).
    return current_app.response_class(f'{{"event_id":"{event_id}","status":"accepted"}}\n', 202,
                                      mimetype="application/json")


@bp.post("/events")
@spec.operation("/events", "POST", "Record a batch of custom events; valid items are recorded even when others fail",
                body=EventBatch, response=BatchAccepted, status=202, errors=(400, 413, 415, 422, 429, 503),
                security="apiKey")
def post_events(body):
    """Accept 1 to MAX_BATCH_EVENTS events: a 202 lists each item's event_id or why it was refused."""
    settings = current_monitor().settings
    security.require_event_api_key(settings, body.api_key)
    if len(body.events) > settings.max_batch_events:
        raise ApiError(422, "validation_error", f"events: at most {settings.max_batch_events} items "
                       "(MAX_BATCH_EVENTS)", field="events")
    event_ids, errors, unavailable = [], [], None
    for index, item in enumerate(body.events):
        event_id = None
        try:
            if body.sent_at and isinstance(item, dict) and item.get("sent_at") is None:
                item = {**item, "sent_at": body.sent_at}  # the batch's clock, for items without their own
            event = PublicEvent.model_validate(item)
            event_id = record_event(event.event_name, event.details, client=event)
        except ValidationError as exc:
            field, message = describe_error(exc)
            field = f"events[{index}]" + ("" if field == "body" else f".{field}")
            errors.append({"index": index, "code": "validation_error", "field": field,
                           "message": f"{field}: {message.partition(': ')[2]}"})
        except TelemetryUnavailable as exc:
            unavailable = exc
            errors.append({"index": index, "code": "storage_unavailable", "message": str(exc)})
        event_ids.append(event_id)
    accepted = sum(event_id is not None for event_id in event_ids)
    if not accepted:
        if unavailable is not None:
            raise _unavailable(unavailable)
        first = errors[0]
        raise ApiError(422, "validation_error", f"no event in the batch is valid; {first['message']}",
                       field=first["field"], errors=errors)
    return jsonify({"status": "accepted", "accepted": accepted, "event_ids": event_ids, "errors": errors}), 202


def _unavailable(exc):
    """The 503 of an event the sink cannot take: the client should retry after Retry-After."""
    return ApiError(503, "storage_unavailable", f"{exc}; try again later",
                    headers={"Retry-After": RETRY_AFTER_UNAVAILABLE})


@bp.get("/dashboard")
def dashboard():
    """The dashboard page: it fetches /dashboard/usage itself (with the token the user types, if one is set)."""
    response = current_app.make_response(render_template("usage_monitor/dashboard.html"))
    response.headers["Content-Security-Policy"] = DASHBOARD_CSP
    return response


def redirect_to_dashboard():
    """`/` in create_app()'s own app (a host app keeps its own `/`)."""
    return redirect(url_for("usage_monitor.dashboard"))


@bp.get("/usage.js")
def usage_js():
    """The browser client, loadable from any origin: static/usage.min.js, static/usage.js minified (`make usage-js`)."""
    response = send_from_directory(STATIC_DIR, "usage.min.js", mimetype="text/javascript", max_age=300)
    response.headers["Cross-Origin-Resource-Policy"] = "cross-origin"
    return response


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
        raise ApiError(exc.status, _usage_error_code(exc), exc.message,
                       headers={"Retry-After": str(exc.retry_after)} if exc.retry_after else None) from None


def _usage_error_code(exc):
    """The error code of a failed usage query: the local store, or Log Analytics (unavailable, or an error)."""
    if exc.status != 503:
        return "upstream_error"
    return "storage_unavailable" if current_monitor().source_name == "local" else "upstream_unavailable"


@bp.get("/healthz")
@spec.operation("/healthz", "GET", "Readiness: 200 ok, or 503 degraded with the problems; telemetry counters",
                response=Health, alternate=(503, Health))
def healthz():
    """200 when telemetry can be stored and sent, 503 with the problems otherwise; never secrets."""
    report = system_health.health_report(current_monitor())
    return jsonify(report), 503 if report["problems"] else 200


@bp.get("/livez")
@spec.operation("/livez", "GET", "Liveness: 200 while the process serves", response=Live)
def livez():
    """200 while the process answers, whatever the state of telemetry (for liveness probes)."""
    return jsonify({"status": "alive"})


@bp.get("/openapi.json")
def openapi():
    """The OpenAPI document, generated from the models the routes validate with."""
    settings = current_monitor().settings
    active = {name for name, on in (("apiKey", settings.event_api_keys), ("bearerAuth", settings.dashboard_token))
              if on}
    return jsonify(spec.render(security_schemes=_SECURITY_SCHEMES, active_security=active))


# -- the JSON error contract ------------------------------------------------------------------
def error_response(status, code, message, field=None, headers=None, errors=None):
    """The single JSON error body (`errors`: POST /events' refused items)."""
    body = {"code": code, "message": message}
    if field:
        body["field"] = field
    if errors:
        body["errors"] = errors
    response = jsonify({"error": body})
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


@bp.errorhandler(ApiError)
def _api_error(exc):
    return error_response(exc.status, exc.code, exc.message, exc.field, exc.headers, exc.errors)


@bp.errorhandler(security.Unauthorized)
def _unauthorized(exc):
    return error_response(401, "unauthorized", exc.message, headers={"WWW-Authenticate": exc.challenge})


@bp.errorhandler(HTTPException)
def http_error(exc):
    """Any HTTP error as the JSON body (413 and 429 name their limit)."""
    code = re.sub(r"[^a-z0-9]+", "_", (exc.name or "error").lower()).strip("_")
    headers = {k: v for k, v in exc.get_headers() if k.lower() in ("allow", "retry-after")}
    if exc.code == 413:
        settings = current_monitor().settings
        limit, var = ((settings.max_batch_bytes, "MAX_BATCH_BYTES") if request.endpoint == _BATCH
                      else (settings.max_event_bytes, "MAX_EVENT_BYTES"))
        return error_response(413, code, f"The body is larger than {limit} bytes ({var})", field="body")
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
    app.after_request(_security_headers_elsewhere)


def _security_headers_elsewhere(response):
    """The security headers on the app's other answers (the blueprint's own hook covers its routes)."""
    return response if request.blueprint == bp.name else security.security_headers(response)
