"""Azure mode: OpenCensus exporters for custom events, traces, requests, dependencies and metrics.

`logger` is the seed's trace logger: once an app with a UsageMonitor has started, its records
become Application Insights traces (MessageData; ExceptionData for logger.exception) in Azure
mode and rows of the local store's `traces` table in local mode.

The request path only queues the record itself (an EventRecord, or a RequestRecord or
DependencyRecord with its sampling rate); each exporter's worker thread turns a batch of them
into envelopes of the SDK's protocol classes, with the same fields the SDK's own converters
(`log_record_to_envelope`, `span_data_to_envelope`) give, and delivers it.
"""
import json
import logging
import os
import threading
import time
from datetime import datetime, timezone
from urllib.parse import urlparse

from opencensus.ext.azure.common import utils as sdk_utils
from opencensus.ext.azure.common.protocol import Data, Envelope, Event, RemoteDependency, Request
from opencensus.ext.azure.log_exporter import AzureEventHandler, AzureLogHandler
from opencensus.ext.azure.metrics_exporter import MetricsExporter
from opencensus.ext.azure.trace_exporter import AzureExporter

import opencensus_adapter
import system_health
import telemetry
from delivery import Courier, DeliveryStats, ReliableExporterMixin, outbox_summary
from journal import Journal, claim_orphans, json_line, lines
from sampling import Sampler

# This module's own log lines go to the "azure_monitor" logger, which is never exported:
# an exporter warning fed back into the exporter would loop.
log = logging.getLogger("azure_monitor")

# The public trace logger (TRACE_LOG_LEVEL, INFO by default): `from azure_monitor import logger`.
logger = logging.getLogger(telemetry.TRACE_LOGGER)

_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
_UTC = timezone.utc
_build = opencensus_adapter.protocol_object

_lock = threading.Lock()
_registry = {}  # (pid, settings) -> handlers of one Azure configuration in this process


def _iso(ts):
    """An epoch timestamp in OpenCensus' envelope time format (2026-11-30T12:00:00.123456Z)."""
    return datetime.fromtimestamp(ts, _UTC).isoformat(timespec="microseconds")[:-6] + "Z"


def _span_times(ts, duration_ms):
    """(start time, duration) of a span as OpenCensus renders them: the difference of the two rounded times."""
    start = datetime.fromtimestamp(ts, _UTC)
    delta = datetime.fromtimestamp(ts + duration_ms / 1000.0, _UTC) - start
    micros = (delta.days * 86400 + delta.seconds) * 1000000 + delta.microseconds
    return start.isoformat(timespec="microseconds")[:-6] + "Z", sdk_utils.microseconds_to_duration(micros)


def _tags(operation_id):
    """The SDK's context tags plus the operation id."""
    tags = dict(sdk_utils.azure_monitor_context)
    tags["ai.operation.id"] = operation_id
    return tags


def _span_tags(rec):
    """A span's tags: its operation (OpenCensus gives a span without one a new trace) and its parent, if any."""
    tags = _tags(rec.operation_id or telemetry.new_trace_id())
    if rec.parent_id:
        tags["ai.operation.parentId"] = rec.parent_id
    return tags


def event_envelope(ikey, rec):
    """An EventRecord as the EventData envelope AzureEventHandler builds, with its user and session tags and its own time."""
    tags = _tags(rec.operation_id or _ZERO_TRACE)
    tags["ai.operation.parentId"] = f"|{tags['ai.operation.id']}.{_ZERO_SPAN}."
    if rec.user_id:
        tags["ai.user.authUserId"] = rec.user_id
    if rec.anonymous_id:
        tags["ai.user.id"] = rec.anonymous_id
    if rec.session_id:
        tags["ai.session.id"] = rec.session_id
    properties = dict(rec.properties)
    properties["event_id"] = rec.event_id  # what a retried send is deduplicated by in Log Analytics
    event = _build(Event, {"name": rec.name, "properties": properties, "measurements": {}, "ver": 2})
    return _build(Envelope, {"iKey": ikey, "tags": tags, "time": _iso(rec.timestamp),  # the client's time
                             "name": "Microsoft.ApplicationInsights.Event",
                             "data": _build(Data, {"baseData": event, "baseType": "EventData"})})


def request_envelope(ikey, rec, rate):
    """A RequestRecord as the RequestData envelope of a SERVER span, with our success rule (only 5xx fails),
    the user tag and, when sampled, the sampleRate that makes ItemCount 1 / rate."""
    start, duration = _span_times(rec.timestamp, rec.duration_ms)
    tags = _span_tags(rec)
    name = rec.name
    tags["ai.operation.name"] = name
    if rec.user_id:
        tags["ai.user.authUserId"] = rec.user_id
    data = _build(Request, {"id": rec.span_id, "duration": duration, "responseCode": str(rec.status),
                            "success": not telemetry.is_failure(rec.status),
                            "properties": {"request.name": name, "request.url": rec.url},
                            "ver": 2, "name": name, "url": rec.url})
    return _span_envelope(ikey, tags, start, "Microsoft.ApplicationInsights.Request", data, "RequestData", rate)


def dependency_envelope(ikey, rec, rate):
    """A DependencyRecord as the RemoteDependencyData envelope of a CLIENT span (an HTTP or database call)."""
    start, duration = _span_times(rec.timestamp, rec.duration_ms)
    tags = _span_tags(rec)
    url = urlparse(rec.data)
    properties = {"component": rec.type}
    if rec.status:
        result_code, success = str(rec.status), 200 <= rec.status < 400
    else:  # no response: the span's status says whether the call failed
        result_code, success = ("0", True) if rec.success else ("2", False)
        properties["error.name"] = rec.result_code
    if rec.type == "HTTP":
        name, target = f"{rec.method} {url.path}", url.netloc
    else:  # a database or other client span from the OpenTelemetry bridge: its own name and target
        name, target = rec.name, rec.target
    data = _build(RemoteDependency, {"name": name, "id": rec.span_id, "resultCode": result_code,
                                     "duration": duration, "success": success, "properties": properties, "ver": 2,
                                     "type": rec.type, "data": rec.data, "target": target})
    return _span_envelope(ikey, tags, start, "Microsoft.ApplicationInsights.RemoteDependency", data,
                          "RemoteDependencyData", rate)


def _span_envelope(ikey, tags, start, name, data, base_type, rate):
    """The envelope around a span's data; sampleRate (percent) only when the operation was sampled."""
    envelope = _build(Envelope, {"iKey": ikey, "tags": tags, "time": start, "name": name,
                                 "data": _build(Data, {"baseData": data, "baseType": base_type})})
    if rate < 1:
        envelope["sampleRate"] = rate * 100.0
    return envelope


class _ReliableHandlerMixin(opencensus_adapter.LogHandlerHooks, ReliableExporterMixin):
    """Log handler side of reliable delivery: queue without dropping, export with write-ahead."""

    def emit(self, record):
        """Queue the record; never blocks, never drops."""
        self.enqueue(record)


class EventHandler(_ReliableHandlerMixin, AzureEventHandler):
    """The custom events' exporter: its queue holds EventRecords, its worker builds their envelopes."""

    def _to_envelopes(self, items):
        """EventRecords to EventData envelopes."""
        ikey = self.options.instrumentation_key
        return self.apply_telemetry_processors([event_envelope(ikey, rec) for rec in items])


class LogHandler(_ReliableHandlerMixin, AzureLogHandler):
    """AzureLogHandler with reliable delivery: trace log records to MessageData (ExceptionData) envelopes."""

    def _to_envelopes(self, items):
        """Log records to envelopes (the SDK's converter)."""
        return self.apply_telemetry_processors([self.log_record_to_envelope(r) for r in items])


_SPAN_ENVELOPES = {telemetry.RequestRecord: request_envelope, telemetry.DependencyRecord: dependency_envelope}


class TraceExporter(opencensus_adapter.TraceExporterHooks, ReliableExporterMixin, AzureExporter):
    """The requests' and dependencies' exporter: its queue holds (record, sampling rate) pairs."""

    def _to_envelopes(self, items):
        """(RequestRecord or DependencyRecord, rate) pairs to RequestData and RemoteDependencyData envelopes."""
        ikey = self.options.instrumentation_key
        return self.apply_telemetry_processors([_SPAN_ENVELOPES[type(rec)](ikey, rec, rate) for rec, rate in items])


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

    def send_or_store(self, metrics, remaining):
        """The last interval's metrics at shutdown: sent when ingestion answers within `remaining()` s, stored otherwise."""
        envelopes = self.apply_telemetry_processors([e for m in metrics for e in self.metric_to_envelopes(m)])
        if not envelopes:
            return
        if self.backing_off() or remaining() <= 0:
            self._store(envelopes)
            return
        self.options.timeout = max(0.1, min(self.options.timeout, remaining()))  # the process is stopping
        for start in range(0, len(envelopes), self.max_batch_size):
            self._deliver(envelopes[start:start + self.max_batch_size])  # write-ahead: stored unless sent


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
    """Create the event and trace handlers for these settings once per process.

    Returns (event handler, log handler). The same settings again create nothing (the handlers
    are shared and reference-counted); other settings (another app in the same process) get
    their own, so each app's events reach its own resource. No handler goes on any logger:
    events are queued by AzureSink.track_event, traces by the trace logger's forwarder.
    """
    key = (os.getpid(), settings)
    with _lock:
        entry = _registry.get(key)
        if entry is None:
            _forget_other_processes()
            entry = _attach(settings, stats)
            _registry[key] = entry
        entry["users"] += 1
        return entry["event_handler"], entry["log_handler"]


def _attach(settings, stats):
    """Create the handlers (fed by AzureSink.track_event and track_trace)."""
    _setup_statsbeat(settings)
    _silence_sdk_capacity_warnings()
    event_handler = EventHandler(**_exporter_options(settings, stats, "events"))
    log_handler = LogHandler(**_exporter_options(settings, stats, "traces"))
    return {"event_handler": event_handler, "log_handler": log_handler, "users": 0}


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
    """Close an entry's handlers (in their own process)."""
    for handler in (entry["event_handler"], entry["log_handler"]):
        handler.close(timeout)


def _forget_other_processes():
    """After a fork, drop the parent's handlers: their worker threads do not exist here."""
    for key in [k for k in _registry if k[0] != os.getpid()]:
        del _registry[key]


def shutdown_logging(handler, timeout=None):
    """Release the handlers; the last user in this process removes and closes them."""
    with _lock:
        for key, entry in list(_registry.items()):
            if entry["event_handler"] is handler and key[0] == os.getpid():
                entry["users"] -= 1
                if entry["users"] <= 0:
                    del _registry[key]
                    _detach(entry, timeout)


class AzureSink:
    """The Azure sink: events to customEvents, requests and dependencies as spans, metrics."""

    def __init__(self, settings):
        opencensus_adapter.check_versions()  # the adapter's use of private internals holds for the pinned SDK only
        self.settings = settings
        self.stats = DeliveryStats()
        self._event_handler = self._log_handler = None
        self._traces = self._metrics = self._producer = self._courier = None
        self._journal, self._journal_lock, self._journaled = None, threading.Lock(), 0
        self._sampler = Sampler(settings.trace_sampling, rate=settings.trace_sampling_rate,
                                target_per_s=settings.trace_sampling_target,
                                interval_s=settings.trace_sampling_interval)

    def start(self):
        """Create the exporters and their threads in this process."""
        self._event_handler, self._log_handler = setup_logging(self.settings, self.stats)
        self._traces = TraceExporter(**_exporter_options(self.settings, self.stats, "requests"))
        self._producer = system_health.ResponseTimeProducer()
        self._metrics = MetricExporter(**dict(
            _exporter_options(self.settings, self.stats, "metrics"),
            export_interval=self.settings.metrics_export_interval, enable_standard_metrics=False))
        system_health.start_metrics_thread(self._metrics, self._producer, self.settings.metrics_export_interval)
        self._start_journal()
        self._courier = Courier(self._exporters(), self.settings.export_retry_interval)
        self._courier.start()

    @property
    def metrics_exporter(self):
        """The response-time MetricsExporter (system_health.setup_metrics_exporter returns it)."""
        return self._metrics

    def _exporters(self):
        """Every reliable exporter this sink feeds."""
        return [self._event_handler, self._log_handler, self._traces, self._metrics]

    def track_event(self, rec):
        """Journal one custom event, then queue it (its envelope is built by the exporter's worker).

        Once this returns a crash cannot lose it: a later start sends what the journal holds again
        (Log Analytics then has it twice; the usage queries count an event_id once).
        """
        line = json_line('{"rec":', vars(rec))
        with self._journal_lock:
            journal = self._journal
            journal.append(line, self._journaled)
            self._journaled += 1
            self._event_handler.enqueue(rec)
            if journal.rotation_due():
                journal.rotate(self._journaled)
            if journal.closed:
                self._release_journal()

    def _release_journal(self):
        """Delete the journal segments whose events the exporter has sent or stored."""
        handler = self._event_handler
        if not handler.out_of_order:
            self._journal.release(handler.settled)
        elif handler.settled >= self._journaled:  # an overflow upset the order: only once all are settled
            self._journal.release(self._journaled)
            handler.out_of_order = False

    def _start_journal(self):
        """Open this process's journal and queue again what processes that died had journaled."""
        folder = os.path.join(self.settings.telemetry_storage, "journal")
        os.makedirs(folder, exist_ok=True)
        self._journal = journal = Journal(os.path.join(folder, "events"))
        claimed = claim_orphans(journal.base, lambda path: f"{journal.prefix}r-{path[len(journal.base) + 1:]}")
        for path in claimed:
            bad = 0
            for line in lines(path):
                try:
                    rec = telemetry.EventRecord(**json.loads(line)["rec"])
                except (ValueError, KeyError, TypeError):
                    bad += 1
                    continue
                self._journaled += 1
                self._event_handler.enqueue(rec)
            journal.closed.append((path, self._journaled))
            if bad:
                log.error("skipped %d unreadable line(s) of the journal %s", bad, path)

    def track_trace(self, record):
        """Queue one log record of the trace logger (MessageData, or ExceptionData with exc_info)."""
        self._log_handler.enqueue(record)

    def _sampled(self, operation_id):
        """The kept fraction of this operation, or None when it is dropped; its request and dependencies agree."""
        return self._sampler.decide(operation_id)  # none: decided alone, at the current rate

    def track_request(self, rec):
        """Record the response-time metric and queue the request (RequestData) unless it is sampled out."""
        self._producer.record(rec.route, rec.method, rec.status, rec.duration_ms)  # every request, unsampled
        rate = self._sampled(rec.operation_id)
        if rate is not None:
            self._traces.enqueue((rec, rate))

    def track_dependency(self, rec):
        """Queue an outgoing call (RemoteDependencyData) unless its operation is sampled out."""
        rate = self._sampled(rec.operation_id)
        if rate is not None:
            self._traces.enqueue((rec, rate))

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
        opencensus_adapter.cancel_metrics_thread(self._metrics)
        self._metrics.send_or_store(self._producer.get_metrics(), remaining)
        opencensus_adapter.stop_trace_exporter(self._traces, remaining() or 0.01)
        opencensus_adapter.close_storage(self._metrics)
        shutdown_logging(self._event_handler, remaining() or 0.01)
        with self._journal_lock:
            if self._event_handler.settled >= self._journaled:  # every event sent or stored
                self._journal.discard()
            else:  # the next start sends them again
                self._journal.rotate(self._journaled)

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
                    result.update(error=error, folder=exporter.folder())
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
