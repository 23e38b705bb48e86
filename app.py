"""The Flask application: create_app() factory, routes and the JSON error contract."""
import logging
import re
import sys

from flask import Flask, jsonify, request
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException

import request_tracking
import system_health
from config import ConfigError, load_settings
from local_store import LocalStore
from log_analytics import UsageQueryError
from logging_utils import PublicEvent, describe_error, record_event
from monitoring_utils import UsageSourceUnavailable, get_usage_stats
from telemetry import Telemetry

log = logging.getLogger("service.app")

_DAYS = re.compile(r"[0-9]{1,2}")


class APIError(Exception):
    """An error answered as {"error": {"code", "message"}} with an HTTP status."""

    def __init__(self, status, code, message, field=None, headers=None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.field, self.headers = field, headers or {}


def create_app(config=None):
    """Build the app: settings from the environment (config overrides them), sinks, routes."""
    app = Flask(__name__, instance_relative_config=True)
    settings = load_settings(app.instance_path, overrides=config)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_event_bytes
    app.config["TESTING"] = bool(config and config.get("TESTING"))
    app.extensions["settings"] = settings
    _init_telemetry(app, settings, (config or {}).get("LOG_ANALYTICS_CREDENTIAL"))
    request_tracking.init_app(app)
    _init_errors(app)
    _init_routes(app)
    return app


def _init_telemetry(app, settings, credential=None):
    """Choose the sink and the usage source for the mode; nothing starts until first use."""
    if settings.mode == "azure":
        from azure_monitor import AzureSink
        sink = AzureSink(settings)
        source, source_name = _log_analytics_source(settings, credential), "azure_monitor"
    else:
        sink = LocalStore(settings.telemetry_db, settings.local_batch_size, settings.local_flush_interval,
                          top=settings.usage_top)
        source, source_name = sink, "local"
    app.extensions["telemetry"] = Telemetry(settings, sink)
    app.extensions["usage_source"] = source
    app.extensions["usage_source_name"] = source_name


def _log_analytics_source(settings, credential=None):
    """The Log Analytics usage source, or None (with a warning) when no workspace is configured.

    The credential is DefaultAzureCredential unless the embedding code (or a test) passes a
    TokenCredential as config["LOG_ANALYTICS_CREDENTIAL"].
    """
    if not settings.log_analytics_workspace_id:
        log.warning("LOG_ANALYTICS_WORKSPACE_ID is not set: /dashboard/usage will answer 503")
        return None
    if credential is None:
        from azure.identity import DefaultAzureCredential
        credential = DefaultAzureCredential()

    from log_analytics import LogAnalyticsUsageSource
    return LogAnalyticsUsageSource(
        settings.log_analytics_workspace_id, credential,
        cache_ttl=settings.usage_cache_ttl, timeout=settings.usage_query_timeout, top=settings.usage_top)


def _error_response(status, code, message, field=None, headers=None):
    """The single JSON error body."""
    body = {"code": code, "message": message}
    if field:
        body["field"] = field
    response = jsonify({"error": body})
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def _init_errors(app):
    """Every error, expected or not, answers JSON; nothing leaks a stack trace."""

    @app.errorhandler(APIError)
    def api_error(exc):
        return _error_response(exc.status, exc.code, exc.message, exc.field, exc.headers)

    @app.errorhandler(HTTPException)
    def http_error(exc):
        code = re.sub(r"[^a-z0-9]+", "_", (exc.name or "error").lower()).strip("_")
        headers = {k: v for k, v in exc.get_headers() if k.lower() in ("allow", "retry-after")}
        if exc.code == 413:
            limit = app.config["MAX_CONTENT_LENGTH"]
            return _error_response(413, code, f"The body is larger than {limit} bytes (MAX_EVENT_BYTES)",
                                   field="body")
        return _error_response(exc.code or 500, code, exc.description or exc.name, headers=headers)

    @app.errorhandler(Exception)
    def unexpected_error(exc):
        log.exception("unhandled error on %s %s", request.method, request.path)
        return _error_response(500, "internal_error", "The server failed to handle the request.")


def _json_object():
    """The request body as a JSON object, or an APIError naming what is wrong."""
    if not request.is_json:
        raise APIError(415, "unsupported_media_type", "Content-Type must be application/json")
    body = request.get_json(silent=True)
    if body is None:
        raise APIError(400, "invalid_json", "The body is not valid JSON", field="body")
    if not isinstance(body, dict):
        raise APIError(400, "invalid_body", "The body must be a JSON object", field="body")
    return body


def _init_routes(app):
    """Register the public routes."""

    @app.post("/event")
    def post_event():
        """Accept one custom event from a frontend; it is recorded asynchronously."""
        body = _json_object()
        try:
            event = PublicEvent.model_validate(body)
        except ValidationError as exc:
            field, message = describe_error(exc)
            raise APIError(422, "validation_error", message, field=field) from None
        event_id = record_event(event.event_name, event.details)
        return jsonify({"status": "accepted", "event_id": event_id}), 202

    @app.get("/dashboard/usage")
    def dashboard_usage():
        """Usage statistics for the dashboard."""
        raw = request.args.get("days", "30")
        if not _DAYS.fullmatch(raw) or not 1 <= int(raw) <= 90:
            raise APIError(400, "invalid_parameter", "days must be an integer from 1 to 90", field="days")
        try:
            return jsonify(get_usage_stats(int(raw)))
        except UsageSourceUnavailable as exc:
            raise APIError(503, "usage_source_unavailable", str(exc)) from None
        except UsageQueryError as exc:
            log.warning("usage query failed: %s", exc.message)
            raise APIError(exc.status, "upstream_unavailable" if exc.status == 503 else "upstream_error",
                           exc.message, headers={"Retry-After": str(exc.retry_after)} if exc.retry_after else None
                           ) from None

    @app.get("/healthz")
    def healthz():
        """Liveness and telemetry counters; never secrets."""
        return jsonify(system_health.health_report(app))


def __getattr__(name):
    """`app:app` for gunicorn and `flask --app app`: built on first access, not at import."""
    if name != "app":
        raise AttributeError(name)
    try:
        application = create_app()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    globals()["app"] = application
    return application
