"""Azure mode: OpenCensus exporters for custom events, traces, requests, dependencies and metrics.

`logger` is the seed's trace logger: once an app with a UsageMonitor has started, its records
become Application Insights traces (MessageData; ExceptionData for logger.exception) in Azure
mode and rows of the local store's `traces` table in local mode.
"""
import itertools
import logging
import os
import threading
import time
from datetime import datetime, timezone

from opencensus.ext.azure.log_exporter import AzureEventHandler, AzureLogHandler
from opencensus.ext.azure.metrics_exporter import MetricsExporter
from opencensus.ext.azure.trace_exporter import AzureExporter
from opencensus.trace.span import SpanKind
from opencensus.trace.span_context import SpanContext
from opencensus.trace.span_data import SpanData
from opencensus.trace.status import Status

import opencensus_adapter
import system_health
from sampling import Sampler
import telemetry
from delivery import Courier, DeliveryStats, ReliableExporterMixin, outbox_summary

# This module's own log lines go to the "azure_monitor" logger, which is never exported:
# an exporter warning fed back into the exporter would loop.
log = logging.getLogger("azure_monitor")

# The public trace logger (TRACE_LOG_LEVEL, INFO by default): `from azure_monitor import logger`.
logger = logging.getLogger(telemetry.TRACE_LOGGER)

EVENT_LOGGER = "telemetry.events"
_ZERO_TRACE = "0" * 32
_SAMPLE_RATE = "sampling.rate"  # a span attribute carrying the kept fraction to the envelope (then removed)

_lock = threading.Lock()
_registry = {}  # (pid, settings) -> handlers of one Azure configuration in this process
_serial = itertools.count(1)


class _ReliableHandlerMixin(opencensus_adapter.RealLockMixin, ReliableExporterMixin):
    """Log handler side of reliable delivery: queue without dropping, export with write-ahead."""

    def emit(self, record):
        """Queue the record; never blocks, never drops."""
        self.enqueue(record)

    def _export(self, batch, event=None):
        """Deliver one batch taken from the queue by the SDK's worker."""
        self._deliver_batch(batch, event)

    def _to_envelopes(self, items):
        """Log records to envelopes."""
        return self.apply_telemetry_processors([self.log_record_to_envelope(r) for r in items])


class EventHandler(_ReliableHandlerMixin, AzureEventHandler):
    """AzureEventHandler that also fills the user and session tags and keeps the event's own time."""

    _TAGS = (("auth_user_id", "ai.user.authUserId"), ("anonymous_id", "ai.user.id"),
             ("session_id", "ai.session.id"))

    def log_record_to_envelope(self, record):
        """Build the EventData envelope, then add the record's user and session tags and its time."""
        envelope = super().log_record_to_envelope(record)
        for attribute, tag in self._TAGS:
            value = getattr(record, attribute, "")
            if value:
                envelope.tags[tag] = value
        event_time = getattr(record, "event_time", None)
        if event_time is not None:  # a client's timestamp: the event lands on its own day
            envelope.time = _iso(event_time)
        return envelope


class LogHandler(_ReliableHandlerMixin, AzureLogHandler):
    """AzureLogHandler with reliable delivery."""


class TraceExporter(ReliableExporterMixin, AzureExporter):
    """AzureExporter (requests and dependencies) with reliable delivery."""

    def export(self, items):
        """Queue finished spans; never blocks, never drops."""
        for item in items:
            self.enqueue(item)

    def emit(self, batch, event=None):
        """Deliver one batch taken from the queue by the SDK's worker."""
        self._deliver_batch(batch, event)

    def _to_envelopes(self, items):
        """Spans to envelopes."""
        return self.apply_telemetry_processors(
            [e for sd in items for e in self.span_data_to_envelope(sd)])


class MetricExporter(ReliableExporterMixin, MetricsExporter):
    """MetricsExporter with reliable delivery."""

    def export_metrics(self, metrics):
        """Deliver metrics in batches (called by the exporter thread every interval)."""
        envelopes = [e for m in metrics for e in self.metric_to_envelopes(m)]
        envelopes = self.apply_telemetry_processors(envelopes)
        for start in range(0, len(envelopes), self.max_batch_size):
            self._deliver(envelopes[start:start + self.max_batch_size])

    def _to_envelopes(self, items):
        """Metrics have no queue; nothing overflows."""
        return list(items)


def _exporter_options(settings, stats, kind):
    """Options shared by every exporter: endpoint, limits and a per-kind storage folder."""
    return dict(
        stats=stats,
        retry_interval=settings.export_retry_interval,
        overflow_capacity=settings.export_overflow_capacity,
        connection_string=f"InstrumentationKey={settings.instrumentation_key};"
                          f"IngestionEndpoint={settings.ingestion_endpoint}",
        export_interval=settings.export_interval,
        max_batch_size=settings.export_batch_size,
        queue_capacity=settings.export_queue_capacity,
        timeout=settings.export_timeout,
        grace_period=settings.shutdown_grace,
        enable_local_storage=True,
        storage_path=os.path.join(settings.telemetry_storage, kind),
        storage_max_size=int(settings.telemetry_storage_max_mb * 1024 * 1024),
        storage_maintenance_period=max(settings.export_retry_interval, 1.0),
    )


def setup_logging(settings, stats):
    """Attach the event and trace handlers for these settings once per process.

    Returns (event logger, event handler, log handler). The same settings again add nothing
    (the handlers are shared and reference-counted); other settings (another app in the same
    process) get their own event logger, so each app's events reach its own resource.
    """
    key = (os.getpid(), settings)
    with _lock:
        entry = _registry.get(key)
        if entry is None:
            _forget_other_processes()
            entry = _attach(settings, stats)
            _registry[key] = entry
        entry["users"] += 1
        return entry["event_logger"], entry["event_handler"], entry["log_handler"]


def _attach(settings, stats):
    """Create the handlers and put them on their loggers (never on the root logger)."""
    _setup_statsbeat(settings)
    _silence_sdk_capacity_warnings()
    event_handler = EventHandler(**_exporter_options(settings, stats, "events"))
    log_handler = LogHandler(**_exporter_options(settings, stats, "traces"))  # fed by AzureSink.track_trace
    event_logger = logging.getLogger(f"{EVENT_LOGGER}.{next(_serial)}")
    event_logger.setLevel(logging.INFO)
    event_logger.propagate = False
    event_logger.addHandler(event_handler)
    return {"event_logger": event_logger, "event_handler": event_handler, "log_handler": log_handler,
            "users": 0}


class _SdkCapacityFilter(logging.Filter):
    """The SDK warns "Persistent storage max capacity" on every refused write (719 lines in 20 s were
    seen); delivery.py logs one line per folder per episode instead, so these repeats are dropped."""

    def filter(self, record):
        return "max capacity" not in str(record.msg)


_capacity_filter = _SdkCapacityFilter()


def _silence_sdk_capacity_warnings():
    """Install the filter on the SDK's storage logger, once."""
    sdk_storage = logging.getLogger("opencensus.ext.azure.common.storage")
    if _capacity_filter not in sdk_storage.filters:
        sdk_storage.addFilter(_capacity_filter)


def _setup_statsbeat(settings):
    """Statsbeat is off unless enabled: it POSTs to a Microsoft endpoint from the constructor."""
    if not settings.applicationinsights_statsbeat_enabled:
        os.environ["APPLICATIONINSIGHTS_STATSBEAT_DISABLED_ALL"] = "true"


def _detach(entry, timeout=None):
    """Remove an entry's handlers from their loggers and, in their own process, close them."""
    entry["event_logger"].removeHandler(entry["event_handler"])
    for handler in (entry["event_handler"], entry["log_handler"]):
        handler.close(timeout)


def _forget_other_processes():
    """After a fork, drop the parent's handlers: their worker threads do not exist here."""
    for key in [k for k in _registry if k[0] != os.getpid()]:
        entry = _registry.pop(key)
        entry["event_logger"].removeHandler(entry["event_handler"])


def shutdown_logging(handler, timeout=None):
    """Release the handlers; the last user in this process removes and closes them."""
    with _lock:
        for key, entry in list(_registry.items()):
            if entry["event_handler"] is handler and key[0] == os.getpid():
                entry["users"] -= 1
                if entry["users"] <= 0:
                    del _registry[key]
                    _detach(entry, timeout)


def _iso(ts):
    """An epoch timestamp in OpenCensus' span time format."""
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class AzureSink:
    """The Azure sink: events to customEvents, requests and dependencies as spans, metrics."""

    def __init__(self, settings):
        opencensus_adapter.check_versions()  # the adapter's use of private internals holds for the pinned SDK only
        self.settings = settings
        self.stats = DeliveryStats()
        self._events = self._event_handler = self._log_handler = None
        self._traces = self._metrics = self._producer = self._courier = None
        self._sampler = Sampler(settings.trace_sampling, rate=settings.trace_sampling_rate,
                                target_per_s=settings.trace_sampling_target,
                                interval_s=settings.trace_sampling_interval)

    def start(self):
        """Create the exporters and their threads in this process."""
        self._events, self._event_handler, self._log_handler = setup_logging(self.settings, self.stats)
        self._traces = TraceExporter(**_exporter_options(self.settings, self.stats, "requests"))
        self._traces.add_telemetry_processor(self._tag_envelope)
        self._producer = system_health.ResponseTimeProducer()
        self._metrics = MetricExporter(**dict(
            _exporter_options(self.settings, self.stats, "metrics"),
            export_interval=self.settings.metrics_export_interval, enable_standard_metrics=False))
        system_health.start_metrics_thread(self._metrics, self._producer, self.settings.metrics_export_interval)
        self._courier = Courier(self._exporters(), self.settings.export_retry_interval)
        self._courier.start()

    @property
    def metrics_exporter(self):
        """The response-time MetricsExporter (system_health.setup_metrics_exporter returns it)."""
        return self._metrics

    def _exporters(self):
        """Every reliable exporter this sink feeds."""
        return [self._event_handler, self._log_handler, self._traces, self._metrics]

    def _tag_envelope(self, envelope):
        """User id into its tag, our success rule (only 5xx fail), and the sampling rate for ItemCount."""
        base = envelope.data.baseData
        if envelope.data.baseType == "RequestData":
            base.success = not telemetry.is_failure(int(base.responseCode))
        props = base.properties
        user = props.pop("enduser.id", None) if props else None
        if user:
            envelope.tags["ai.user.authUserId"] = user
        rate = props.pop(_SAMPLE_RATE, None) if props else None
        if rate is not None and rate < 1:  # the operation's rate when it was decided: ItemCount = 1 / rate
            envelope.sampleRate = rate * 100.0
        return True

    def track_event(self, rec):
        """Send a custom event through the event logger (queued by the handler)."""
        self._events.info(rec.name, extra={
            "custom_dimensions": rec.properties, "auth_user_id": rec.user_id, "event_time": rec.timestamp,
            "anonymous_id": rec.anonymous_id, "session_id": rec.session_id,
            "traceId": rec.operation_id or _ZERO_TRACE})

    def track_trace(self, record):
        """Queue one log record of the trace logger (MessageData, or ExceptionData with exc_info)."""
        self._log_handler.emit(record)

    def _sampled(self, operation_id):
        """The kept fraction of this operation, or None when it is dropped; its request and dependencies agree."""
        return self._sampler.decide(operation_id or _ZERO_TRACE)

    def track_request(self, rec):
        """Record the response-time metric and export a SERVER span (RequestData)."""
        self._producer.record(rec.route, rec.method, rec.status, rec.duration_ms)  # every request, unsampled
        rate = self._sampled(rec.operation_id)
        if rate is None:
            return
        attributes = {"http.method": rec.method, "http.route": rec.route, "http.url": rec.url,
                      "http.status_code": rec.status, _SAMPLE_RATE: rate}
        if rec.user_id:
            attributes["enduser.id"] = rec.user_id
        self._export_span(rec.name, rec.operation_id, rec.span_id, rec.parent_id or None, attributes,
                          rec.timestamp, rec.duration_ms, SpanKind.SERVER)

    def track_dependency(self, rec):
        """Export a CLIENT span (RemoteDependencyData) for an outgoing call."""
        rate = self._sampled(rec.operation_id)
        if rate is None:
            return
        attributes = {"component": rec.type, "http.url": rec.data, "http.method": rec.method, _SAMPLE_RATE: rate}
        if rec.status:
            attributes["http.status_code"] = rec.status
        else:
            attributes["error.name"] = rec.result_code
        self._export_span(rec.name, rec.operation_id, rec.span_id, rec.parent_id or None,
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
        """Deliver (or store) everything queued so far, including this interval's metrics."""
        done = True
        for exporter in self._queued_exporters():
            exporter.spill_overflow()
            done = opencensus_adapter.wait_until_exported(exporter, timeout) and done
        self._metrics.export_metrics(self._producer.get_metrics())
        return done

    def close(self, timeout=None):
        """Stop within SHUTDOWN_GRACE: send what is queued if the endpoint answers, store the rest.

        A batch being sent when the time is up is already in storage (write-ahead), so nothing
        waits for a hanging endpoint beyond the grace period.
        """
        deadline = time.monotonic() + (self.settings.shutdown_grace if timeout is None else timeout)
        remaining = lambda: max(0.0, deadline - time.monotonic())  # noqa: E731
        self._courier.stop(remaining())
        for exporter in self._queued_exporters():
            if exporter.backing_off() or not opencensus_adapter.wait_until_exported(exporter, remaining()):
                exporter.spill_queue()
        self._close_metrics(remaining)
        opencensus_adapter.stop_trace_exporter(self._traces, remaining() or 0.01)
        opencensus_adapter.close_storage(self._metrics)
        shutdown_logging(self._event_handler, remaining() or 0.01)

    def _close_metrics(self, remaining):
        """The last interval's metrics: sent when ingestion answers within the grace, stored otherwise."""
        metrics = self._metrics
        opencensus_adapter.cancel_metrics_thread(metrics)
        envelopes = metrics.apply_telemetry_processors(
            [e for m in self._producer.get_metrics() for e in metrics.metric_to_envelopes(m)])
        if not envelopes:
            return
        if metrics.backing_off() or remaining() <= 0:
            metrics._store(envelopes)
            return
        metrics.options.timeout = max(0.1, min(metrics.options.timeout, remaining()))  # the process is stopping
        for start in range(0, len(envelopes), metrics.max_batch_size):
            metrics._deliver(envelopes[start:start + metrics.max_batch_size])  # write-ahead: stored unless sent

    def problems(self, grace_s):
        """What makes this sink unhealthy: full storage folders, an outage longer than `grace_s`, a full queue."""
        found = []
        delivery = self.stats.snapshot()
        if delivery["full_folders"]:
            found.append(f"telemetry storage full ({', '.join(delivery['full_folders'])}): "
                         f"{delivery['dropped_storage_full']} items dropped; raise TELEMETRY_STORAGE_MAX_MB")
        if delivery["failing_for_s"] is not None and delivery["failing_for_s"] > grace_s:
            found.append(f"ingestion failing for {delivery['failing_for_s']:.0f} s: {delivery['last_error']}")
        capacity = self.settings.export_queue_capacity
        for name, depth in self._queue_depths().items():
            if depth > 0.8 * capacity:
                found.append(f"{name} queue {100 * depth // capacity} % full")
        return found

    def _queue_depths(self):
        """Items waiting in each exporter's queue."""
        depth = opencensus_adapter.queue_depth
        return {"events": depth(self._event_handler), "traces": depth(self._log_handler), "spans": depth(self._traces)}

    def outbox(self):
        """The offline storage on disk, per folder (files, leased, bytes, oldest_age_s, full); no start needed."""
        settings = self.settings
        return outbox_summary(settings.telemetry_storage, int(settings.telemetry_storage_max_mb * 1024 * 1024))

    def drain(self, timeout=60.0, progress=None):
        """Send everything stored in the outbox now, folder by folder, through the exporters' own storage
        and transport (the Courier's send path, ignoring any back-off). The sink must be started.

        Stops at the first batch ingestion does not accept (refused connection, 5xx, 429, timeout): that
        batch and the rest stay stored. A batch leased by another process (being sent, or waiting for its
        retry) is taken when its lease ends, until `timeout`. `progress(1)` is called after each batch.
        Returns {"batches", "items", "error": None or the reason, "folder": where it stopped}.
        """
        if self._courier is None:
            raise RuntimeError("the Azure sink is not started: call UsageMonitor.start() first")
        deadline = time.monotonic() + timeout
        result = {"batches": 0, "items": 0, "error": None, "folder": None}
        exporters = self._exporters()
        for exporter in exporters:
            exporter.spill_overflow()
        with telemetry.internal_thread():  # its POSTs to ingestion are not dependencies of anything
            return self._drain(exporters, deadline, progress, result)

    def _drain(self, exporters, deadline, progress, result):
        """The rounds of drain(): every folder, then wait for batches leased by another sender."""
        while True:
            for exporter in exporters:
                batches, items, error = exporter.drain_stored(deadline, progress)
                result["batches"] += batches
                result["items"] += items
                if error:
                    result.update(error=error, folder=exporter._folder())
                    return result
            leased = {name: f["leased"] for name, f in self.outbox().items() if f["leased"]}
            if not leased:
                return result
            if time.monotonic() >= deadline:
                folder, count = next(iter(leased.items()))
                result.update(error=f"timed out: {count} batches still leased by another sender", folder=folder)
                return result
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    def _queued_exporters(self):
        """The exporters with a queue whose worker is still running."""
        return [e for e in (self._event_handler, self._log_handler, self._traces) if opencensus_adapter.worker_alive(e)]

    def health(self):
        """Delivery counters and queue depths for /healthz."""
        return {"started": True, "delivery": self.stats.snapshot(), "queued": self._queue_depths(),
                "backing_off": any(e.backing_off() for e in self._exporters())}
