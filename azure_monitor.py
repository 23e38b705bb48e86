"""Azure mode: OpenCensus exporters for custom events, traces, requests, dependencies and metrics."""
import logging
import os
import threading
from datetime import datetime, timezone

from opencensus.common.schedule import QueueEvent
from opencensus.ext.azure.log_exporter import AzureEventHandler, AzureLogHandler
from opencensus.ext.azure.trace_exporter import AzureExporter
from opencensus.trace.samplers import ProbabilitySampler
from opencensus.trace.span import SpanKind
from opencensus.trace.span_context import SpanContext
from opencensus.trace.span_data import SpanData
from opencensus.trace.status import Status

import system_health

# This module's own log lines go to the "azure_monitor" logger, which is never exported:
# an exporter warning fed back into the exporter would loop.
log = logging.getLogger("azure_monitor")

EVENT_LOGGER = "telemetry.events"
# Warnings and errors of these loggers become Application Insights traces.
SERVICE_LOGGERS = ("service", "app")
_ZERO_TRACE = "0" * 32

_lock = threading.Lock()
_state = {}


class _RealLockMixin:
    """The SDK sets `self.lock = None`, which breaks every log call on Python 3.13; keep a real lock."""

    def createLock(self):
        """Create the standard handler lock."""
        logging.Handler.createLock(self)


class EventHandler(_RealLockMixin, AzureEventHandler):
    """AzureEventHandler that also fills the authenticated-user and operation tags."""

    def log_record_to_envelope(self, record):
        """Build the EventData envelope, then add ai.user.authUserId when the record has a user."""
        envelope = super().log_record_to_envelope(record)
        user = getattr(record, "auth_user_id", "")
        if user:
            envelope.tags["ai.user.authUserId"] = user
        return envelope


class LogHandler(_RealLockMixin, AzureLogHandler):
    """AzureLogHandler with a real lock."""


def _exporter_options(settings, kind):
    """Options shared by every exporter: endpoint, interval and a per-kind storage folder."""
    return dict(
        connection_string=f"InstrumentationKey={settings.instrumentation_key};"
                          f"IngestionEndpoint={settings.ingestion_endpoint}",
        export_interval=settings.export_interval,
        enable_local_storage=True,
        storage_path=os.path.join(settings.telemetry_storage, kind),
    )


def setup_logging(settings):
    """Attach the event and trace handlers once per process; a second call adds nothing.

    Returns the event logger. A call with a different connection string (tests build many
    apps) replaces the handlers rather than adding more.
    """
    key = (os.getpid(), settings.applicationinsights_connection_string, settings.telemetry_storage)
    with _lock:
        if _state.get("key") == key:
            return _state["event_logger"]
        _detach(close=_state.get("key", (None,))[0] == os.getpid())
        _setup_statsbeat(settings)
        event_handler = EventHandler(**_exporter_options(settings, "events"))
        log_handler = LogHandler(**_exporter_options(settings, "traces"))
        log_handler.setLevel(logging.WARNING)
        event_logger = logging.getLogger(EVENT_LOGGER)
        event_logger.setLevel(logging.INFO)
        event_logger.propagate = False
        event_logger.addHandler(event_handler)
        for name in SERVICE_LOGGERS:
            logger = logging.getLogger(name)
            if logger.level == logging.NOTSET or logger.level > logging.WARNING:
                logger.setLevel(logging.WARNING)
            logger.addHandler(log_handler)
        _state.update(key=key, event_handler=event_handler, log_handler=log_handler,
                      event_logger=event_logger)
        return event_logger


def _setup_statsbeat(settings):
    """Statsbeat is off unless enabled: it POSTs to a Microsoft endpoint from the constructor."""
    if not settings.applicationinsights_statsbeat_enabled:
        os.environ["APPLICATIONINSIGHTS_STATSBEAT_DISABLED_ALL"] = "true"


def _detach(close):
    """Remove this module's handlers from their loggers; close them if they belong to this process."""
    event_handler = _state.pop("event_handler", None)
    log_handler = _state.pop("log_handler", None)
    _state.clear()
    if event_handler:
        logging.getLogger(EVENT_LOGGER).removeHandler(event_handler)
    if log_handler:
        for name in SERVICE_LOGGERS:
            logging.getLogger(name).removeHandler(log_handler)
    if close:
        for handler in (event_handler, log_handler):
            if handler:
                handler.close()


def shutdown_logging():
    """Flush and remove the handlers (tests and process exit)."""
    with _lock:
        _detach(close=_state.get("key", (None,))[0] == os.getpid())


def _iso(ts):
    """An epoch timestamp in OpenCensus' span time format."""
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _drain(q, timeout):
    """Wait until the exporter worker has exported everything queued before this call.

    The SDK's own Queue.flush returns at once when the worker has already taken the items
    out of the queue but not yet sent them; a marker in the queue always waits for them.
    """
    marker = QueueEvent("SYNC")
    q._queue.put(marker, timeout=timeout)
    return marker.wait(timeout)


class AzureSink:
    """The Azure sink: events to customEvents, requests and dependencies as spans, metrics."""

    def __init__(self, settings):
        self.settings = settings
        self._events = None
        self._traces = None
        self._metrics = None
        self._producer = None
        self._sampler = ProbabilitySampler(settings.trace_sampling_rate)

    def start(self):
        """Create the exporters and their threads in this process."""
        self._events = setup_logging(self.settings)
        self._traces = AzureExporter(**_exporter_options(self.settings, "requests"))
        self._traces.add_telemetry_processor(self._tag_envelope)
        self._producer = system_health.ResponseTimeProducer()
        self._metrics = system_health.setup_metrics_exporter(
            self.settings, self._producer, _exporter_options(self.settings, "metrics"))

    def _tag_envelope(self, envelope):
        """Move the user id into its tag and record the sampling rate so ItemCount is right."""
        props = envelope.data.baseData.properties
        user = props.pop("enduser.id", None) if props else None
        if user:
            envelope.tags["ai.user.authUserId"] = user
        if self.settings.trace_sampling_rate < 1:
            envelope.sampleRate = self.settings.trace_sampling_rate * 100.0
        return True

    def track_event(self, rec):
        """Send a custom event through the event logger (queued by the handler)."""
        self._events.info(rec.name, extra={
            "custom_dimensions": rec.properties, "auth_user_id": rec.user_id,
            "traceId": rec.operation_id or _ZERO_TRACE})

    def _sampled(self, operation_id):
        """The sampling decision for one operation; its request and dependencies agree."""
        return self._sampler.should_sample(SpanContext(trace_id=operation_id or _ZERO_TRACE))

    def track_request(self, rec):
        """Record the response-time metric and export a SERVER span (RequestData)."""
        self._producer.record(rec.route, rec.method, rec.status, rec.duration_ms)
        if not self._sampled(rec.operation_id):
            return
        attributes = {"http.method": rec.method, "http.route": rec.route, "http.url": rec.url,
                      "http.status_code": rec.status}
        if rec.user_id:
            attributes["enduser.id"] = rec.user_id
        self._export_span(rec.name, rec.operation_id, rec.span_id, None, attributes,
                          rec.timestamp, rec.duration_ms, SpanKind.SERVER)

    def track_dependency(self, rec):
        """Export a CLIENT span (RemoteDependencyData) for an outgoing call."""
        if not self._sampled(rec.operation_id):
            return
        attributes = {"component": rec.type, "http.url": rec.data, "http.method": rec.method}
        if rec.status:
            attributes["http.status_code"] = rec.status
        else:
            attributes["error.name"] = rec.result_code
        self._export_span(rec.name, rec.operation_id, os.urandom(8).hex(), rec.parent_id or None,
                          attributes, rec.timestamp, rec.duration_ms, SpanKind.CLIENT,
                          status_code=0 if rec.success else 2)

    def _export_span(self, name, trace_id, span_id, parent_id, attributes, ts, duration_ms, kind,
                     status_code=0):
        """Queue one finished span on the trace exporter."""
        self._traces.export([SpanData(
            name=name, context=SpanContext(trace_id=trace_id or _ZERO_TRACE), span_id=span_id,
            parent_span_id=parent_id, attributes=attributes, start_time=_iso(ts),
            end_time=_iso(ts + duration_ms / 1000.0), child_span_count=0, stack_trace=None,
            annotations=None, message_events=None, links=None, status=Status(status_code),
            same_process_as_parent_span=None, span_kind=kind)])

    def flush(self, timeout=10.0):
        """Export everything queued so far (events, spans and this interval's metrics)."""
        handler = _state.get("event_handler")
        done = _drain(handler._queue, timeout) if handler else True
        done = _drain(self._traces._queue, timeout) and done
        self._metrics.export_metrics(self._producer.get_metrics())
        return done

    def close(self, timeout=10.0):
        """Flush and stop this sink's exporters."""
        self.flush(timeout)
        self._traces._stop(timeout)
        self._metrics.shutdown()
        shutdown_logging()

    def health(self):
        """Queue depths for /healthz."""
        handler = _state.get("event_handler")
        return {"started": True, "events_queued": handler._queue._queue.qsize() if handler else 0,
                "spans_queued": self._traces._queue._queue.qsize()}
