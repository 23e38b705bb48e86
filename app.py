"""The Flask application: create_app() factory, routes and the JSON error contract."""
import logging
import re
import sys

from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException

import request_tracking
import security
import system_health
from api_spec import ApiError, ApiSpec, EventAccepted, Health, UsageQuery, UsageReport
from config import ConfigError, load_settings
from local_store import LocalStore
from log_analytics import LogAnalyticsUsageSource, UsageQueryError
from logging_utils import PublicEvent, record_event
from monitoring_utils import UsageSourceUnavailable, get_usage_stats
from telemetry import Telemetry

log = logging.getLogger("service.app")


def create_app(config=None):
    """Build the app: settings from the environment (config overrides them), sinks, routes."""
    app = Flask(__name__, instance_relative_config=True)
    settings = load_settings(app.instance_path, overrides=config)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_event_bytes
    app.config["DEBUG"] = False  # never from FLASK_DEBUG: the debugger would answer with stack traces
    app.config["TESTING"] = bool(config and config.get("TESTING"))
    app.extensions["settings"] = settings
    _init_telemetry(app, settings, (config or {}).get("LOG_ANALYTICS_CREDENTIAL"))
    request_tracking.init_app(app)
    security.init_app(app, settings)
    _init_errors(app)
    _init_routes(app, settings)
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

    @app.errorhandler(ApiError)
    def api_error(exc):
        return _error_response(exc.status, exc.code, exc.message, exc.field, exc.headers)

    @app.errorhandler(security.Unauthorized)
    def unauthorized(exc):
        return _error_response(401, "unauthorized", exc.message, headers={"WWW-Authenticate": exc.challenge})

    @app.errorhandler(HTTPException)
    def http_error(exc):
        code = re.sub(r"[^a-z0-9]+", "_", (exc.name or "error").lower()).strip("_")
        headers = {k: v for k, v in exc.get_headers() if k.lower() in ("allow", "retry-after")}
        if exc.code == 413:
            limit = app.config["MAX_CONTENT_LENGTH"]
            return _error_response(413, code, f"The body is larger than {limit} bytes (MAX_EVENT_BYTES)",
                                   field="body")
        if exc.code == 429:
            return _error_response(429, "rate_limited", f"Rate limit exceeded ({exc.description})",
                                   headers=headers)
        return _error_response(exc.code or 500, code, exc.description or exc.name, headers=headers)

    @app.errorhandler(Exception)
    def unexpected_error(exc):
        log.exception("unhandled error on %s %s", request.method, request.path)
        return _error_response(500, "internal_error", "The server failed to handle the request.")


def _init_routes(app, settings):
    """Register the public routes; each declares its models in the OpenAPI registry."""
    spec = ApiSpec("Usage monitoring backend", "1.0.0")
    app.extensions["api_spec"] = spec

    @app.post("/event")
    @security.limit(app, settings.event_rate_limit)
    @spec.operation("/event", "POST", "Record one custom event (asynchronously)", body=PublicEvent,
                    response=EventAccepted, status=202, errors=(400, 413, 415, 422, 429), security="apiKey")
    def post_event(body):
        """Accept one custom event from a frontend; it is recorded asynchronously."""
        security.require_event_api_key(settings)
        event_id = record_event(body.event_name, body.details)
        return jsonify({"status": "accepted", "event_id": event_id}), 202

    @app.get("/dashboard/usage")
    @security.limit(app, settings.dashboard_rate_limit)
    @spec.operation("/dashboard/usage", "GET", "Usage statistics for the dashboard", query=UsageQuery,
                    response=UsageReport, errors=(400, 429, 502, 503), security="bearerAuth")
    def dashboard_usage(query):
        """Usage statistics for the dashboard."""
        security.require_dashboard_token(settings)
        try:
            return jsonify(get_usage_stats(query.days))
        except UsageSourceUnavailable as exc:
            raise ApiError(503, "usage_source_unavailable", str(exc)) from None
        except UsageQueryError as exc:
            log.warning("usage query failed: %s", exc.message)
            raise ApiError(exc.status, "upstream_unavailable" if exc.status == 503 else "upstream_error",
                           exc.message, headers={"Retry-After": str(exc.retry_after)} if exc.retry_after else None
                           ) from None

    @app.get("/healthz")
    @spec.operation("/healthz", "GET", "Liveness and telemetry counters", response=Health)
    def healthz():
        """Liveness and telemetry counters; never secrets."""
        return jsonify(system_health.health_report(app))

    @app.get("/openapi.json")
    def openapi():
        """The OpenAPI document, generated from the models the routes validate with."""
        active = {name for name, on in (("apiKey", settings.event_api_keys), ("bearerAuth", settings.dashboard_token))
                  if on}
        return jsonify(spec.render(security_schemes=_SECURITY_SCHEMES, active_security=active))

    if settings.bench_bare_endpoint:
        @app.route("/bench/bare", methods=["GET", "POST"])
        def bench_bare():
            """Does nothing: the ceiling for benchmarks (BENCH_BARE_ENDPOINT=true only)."""
            return "", 204


_SECURITY_SCHEMES = {
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-Api-Key"},
    "bearerAuth": {"type": "http", "scheme": "bearer"},
}


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
