"""UsageMonitor, the Flask extension: settings, the mode's sink and usage source, hooks and routes."""
import atexit
import collections
import logging
import os
import shutil
import sqlite3
import threading
import time

import cli
import otel_bridge
import request_tracking
import security
import views
from config import ConfigError, load_settings
from local_store import LocalStore, StorageUnavailable
from log_analytics import LogAnalyticsUsageSource, UsageQueryError
from telemetry import (EXTENSION_NAME, TelemetryUnavailable, current_monitor, forget_started, install_trace_forwarder,
                       monitor_of, set_last_started)

__all__ = ["UsageMonitor", "current_monitor", "monitor_of"]

# Operational failures are logged here, outside the trace logger, so they never feed back into a sink.
log = logging.getLogger("telemetry.monitor")
_FAILURE_LOG_INTERVAL = 60.0
_RETRY_AFTER_STORE = 5  # seconds a dashboard client waits when the local store cannot be read


class UsageMonitor:
    """Usage and performance telemetry for one Flask app: `UsageMonitor(app)` or `init_app(app)` later.

    `routes=False` registers only the hooks (request timing, dependency tracking, traces), for a
    host that serves its own routes. `credential` is the Log Analytics TokenCredential used in
    Azure mode (DefaultAzureCredential when None). `instrument` names the OpenTelemetry
    instrumentations whose spans become dependencies ("sqlalchemy", "sqlite3", "httpx", "redis", ...;
    the OTEL_INSTRUMENT setting when None); `requests` calls are always tracked.
    """

    def __init__(self, app=None, *, routes=True, credential=None, instrument=None):
        self.routes = routes
        self.credential = credential
        self.instrument = instrument
        self.instrumented = []
        self.app = None
        self.settings = self.sink = self.source = self.limiter = self.limit_store = None
        self.source_name = ""
        self.failures = collections.Counter()
        self._rate_limits = {}
        self._pid = None
        self._lock = threading.Lock()
        self._last_failure_log = float("-inf")
        self._start_error = None  # (pid, why the sink could not start in that process)
        if app is not None:
            self.init_app(app)

    # -- setup -------------------------------------------------------------
    def init_app(self, app):
        """Read the settings and attach the sink, source, hooks and (unless routes=False) the routes."""
        if monitor_of(app) is not None:
            raise RuntimeError(f"the Flask app {app.name!r} already has a UsageMonitor")
        if self.app is not None:
            raise RuntimeError("a UsageMonitor serves one app: create one UsageMonitor per app")
        self.settings = load_settings(app.instance_path, app.config)
        self.app = app
        self._setup_sink()
        self._setup_hooks(app)
        self._setup_instrumentations()
        self.limiter, self._rate_limits, self.limit_store = security.init_app(app, self.settings)
        install_trace_forwarder(self.settings.trace_log_level)
        if self.routes:
            views.init_app(app)
        for command in cli.COMMANDS:  # flask usage, flask telemetry status|drain
            app.cli.add_command(command)
        app.extensions[EXTENSION_NAME] = self

    def _setup_sink(self):
        """Choose the sink and the usage source for the mode; nothing starts until first use."""
        settings = self.settings
        if settings.mode == "azure":
            from azure_monitor import AzureSink
            self.sink = AzureSink(settings)
            self.source, self.source_name = self._log_analytics_source(), "azure_monitor"
        else:
            self.sink = LocalStore.from_settings(settings)
            self.source, self.source_name = self.sink, "local"

    def _log_analytics_source(self):
        """The Log Analytics usage source, or None (with a warning) when no workspace is configured."""
        settings = self.settings
        if not settings.log_analytics_workspace_id:
            logging.getLogger("usage_monitor.service").warning(
                "LOG_ANALYTICS_WORKSPACE_ID is not set: /dashboard/usage will answer 503")
            return None
        credential = self.credential
        if credential is None:
            from azure.identity import DefaultAzureCredential
            credential = DefaultAzureCredential()
        return LogAnalyticsUsageSource(
            settings.log_analytics_workspace_id, credential,
            cache_ttl=settings.usage_cache_ttl, timeout=settings.usage_query_timeout, top=settings.usage_top,
            ikey=settings.usage_ikey or None)

    @staticmethod
    def _setup_hooks(app):
        """Request timing for every route of the app, and `requests` calls as dependencies."""
        app.before_request(request_tracking.start_request)
        app.after_request(request_tracking.finish_request)
        request_tracking.instrument_requests()

    def _setup_instrumentations(self):
        """Start the named OpenTelemetry instrumentations in this process (once each; see otel_bridge)."""
        names = self.instrument if self.instrument is not None else self.settings.otel_instrument
        try:
            self.instrumented = otel_bridge.instrument(names)
        except ValueError as exc:
            raise ConfigError(f"OTEL_INSTRUMENT: {exc}") from None

    def check_rate_limit(self, name):
        """Apply the rate limit `name` ('event' or 'dashboard') to the current request (429 when over)."""
        gate = self._rate_limits.get(name)
        if gate is not None:
            gate()

    # -- the sink, started once per process ------------------------------------
    def _started_sink(self):
        """Return the sink, starting it in this process first if needed (after fork, too)."""
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():
                    try:
                        self.sink.start()
                    except Exception as exc:  # remembered for /healthz, then raised to the caller
                        self._start_error = (os.getpid(), f"{type(exc).__name__}: {exc}")
                        raise
                    self._start_error = None
                    self._pid = os.getpid()
                    atexit.register(self.close)
                    set_last_started(self)
        return self.sink

    def start(self):
        """Start the sink in this process now rather than on first use (gunicorn's post_worker_init)."""
        self._started_sink()
        return self

    def _hand_over(self, kind, record):
        """Give one record to the sink: True, or (counted and logged) the reason it could not take it."""
        try:
            getattr(self._started_sink(), f"track_{kind}")(record)
            return True
        except Exception as exc:  # any sink failure: counted and logged, never raised into the host
            self._failed(kind, exc)
            # The store's own refusals say why in words fit for a client (queue full, disk full);
            # anything else may name paths or endpoints: it is in the log, not in the answer.
            return str(exc) if isinstance(exc, StorageUnavailable) else f"telemetry could not record the {kind}"

    def _failed(self, kind, exc):
        """Count a record the sink could not take; log the first failure and then at most once a minute."""
        self.failures[kind] += 1
        now = time.monotonic()
        if now - self._last_failure_log >= _FAILURE_LOG_INTERVAL:
            self._last_failure_log = now
            log.error("telemetry could not record a %s (%s: %s); failures so far: %s",
                      kind, type(exc).__name__, exc, dict(self.failures))

    def track_event(self, record):
        """Queue one custom event; returns its event_id, or raises TelemetryUnavailable."""
        reason = self._hand_over("event", record)
        if reason is not True:
            raise TelemetryUnavailable(reason)
        return record.event_id

    def track_request(self, record):
        """Queue one request record (failures are counted, never raised)."""
        self._hand_over("request", record)

    def track_dependency(self, record):
        """Queue one dependency record (failures are counted, never raised)."""
        self._hand_over("dependency", record)

    def track_trace(self, record):
        """Queue one log record of azure_monitor.logger (failures are counted, never raised).

        Its custom_dimensions become string properties, redacted like event details.
        """
        dims = getattr(record, "custom_dimensions", None)
        if isinstance(dims, dict):
            record.custom_dimensions = security.redact_strings({str(k): v for k, v in dims.items()},
                                                               self.settings.redact_keys)
        self._hand_over("trace", record)

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
        forget_started(self)
        self.sink.close(timeout)

    def health(self):
        """The sink's counters and this monitor's failure counts, for /healthz."""
        report = self.sink.health() if self._pid == os.getpid() else {"started": False}
        report["record_failures"] = dict(self.failures)
        return report

    def problems(self):
        """What is wrong now, in short sentences: the sink (this process), the rate-limit store and the disk."""
        found = []
        if self._pid == os.getpid():
            found += self.sink.problems(self.settings.health_ingestion_grace)
        elif self._start_error is not None and self._start_error[0] == os.getpid():
            found.append(f"telemetry store not open ({self._start_error[1]}); events are refused")
        limit_store = self.limit_store.problem() if self.limit_store is not None else None
        if limit_store:
            found.append(limit_store)
        if isinstance(self.source, LogAnalyticsUsageSource):
            found += self.source.problems()
        disk = self.disk()
        if disk["free_mb"] is not None and disk["free_mb"] < self.settings.health_min_free_mb:
            found.append(f"disk nearly full: {disk['free_mb']:.0f} MB free at {disk['path']} "
                         f"(HEALTH_MIN_FREE_MB {self.settings.health_min_free_mb:g})")
        return found

    def usage_rows(self, start, end):
        """The usage source's rows for [start, end]; a local store that cannot be read is a 503 to retry."""
        if self.source is not self.sink:
            return self.source.rows(start, end)
        try:
            return self.source.rows(start, end)
        except (sqlite3.Error, OSError, ConfigError) as exc:
            log.warning("the local store cannot be read for the dashboard (%s: %s)", type(exc).__name__, exc)
            raise UsageQueryError("the local store cannot be read now; try again later", 503,
                                  _RETRY_AFTER_STORE) from None

    def disk(self):
        """Free space where this mode stores telemetry (the database's folder, or the outbox), shared by all workers."""
        settings = self.settings
        path = os.path.dirname(os.path.abspath(settings.telemetry_db)) if settings.mode == "local" \
            else settings.telemetry_storage
        probe = path
        while probe and not os.path.exists(probe):
            probe = os.path.dirname(probe) if os.path.dirname(probe) != probe else ""
        try:
            free_mb = shutil.disk_usage(probe).free / 1048576 if probe else None
        except OSError:
            free_mb = None
        return {"path": path, "free_mb": None if free_mb is None else round(free_mb, 1)}

    def shared_state(self):
        """What every worker shares on disk: the local database's size, or the Azure outbox per folder."""
        settings = self.settings
        if settings.mode == "azure":
            return {"outbox": self.sink.outbox()}
        size = sum(os.path.getsize(path) for path in (settings.telemetry_db, settings.telemetry_db + "-wal")
                   if os.path.exists(path))
        return {"database": {"path": settings.telemetry_db, "mb": round(size / 1048576, 2)}}

    def metrics_exporter(self):
        """Start the sink here and return its response-time metrics exporter (None in local mode)."""
        return getattr(self._started_sink(), "metrics_exporter", None)
