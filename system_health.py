"""Service health: per-route response-time metrics for Application Insights and the /healthz report."""
import os
import threading
from datetime import datetime, timezone

from opencensus.metrics import label_key, label_value
from opencensus.metrics.export import metric, metric_descriptor, point, time_series, value
from opencensus.metrics.export.metric_producer import MetricProducer

import opencensus_adapter
from telemetry import current_monitor, monitor_of

_LABELS = [label_key.LabelKey("route", "route template"), label_key.LabelKey("method", "HTTP method"),
           label_key.LabelKey("status", "response status code")]
_GAUGE_DOUBLE = metric_descriptor.MetricDescriptorType.GAUGE_DOUBLE
_GAUGE_INT = metric_descriptor.MetricDescriptorType.GAUGE_INT64
DURATION_METRIC = "request_duration_ms"
COUNT_METRIC = "request_count"


class ResponseTimeProducer(MetricProducer):
    """Per-interval response-time figures per route, method and status.

    OpenCensus' Azure metrics exporter silently drops Distribution views and re-sends
    cumulative Sum/Count views forever, which chart as ever-rising lines. This producer
    instead hands the exporter, at every interval, the mean duration and the request count
    of that interval only, as gauges: each customMetrics row then means "this interval".
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._current = {}

    def record(self, route, method, status, duration_ms):
        """Add one request to the current interval."""
        key = (route, method, str(status))
        with self._lock:
            count, total = self._current.get(key, (0, 0.0))
            self._current[key] = (count + 1, total + duration_ms)

    def get_metrics(self):
        """Return this interval's metrics and start a new interval."""
        with self._lock:
            current, self._current = self._current, {}
        if not current:
            return []
        now = datetime.now(timezone.utc).replace(tzinfo=None)
        durations, counts = [], []
        for (route, method, status), (count, total) in sorted(current.items()):
            labels = [label_value.LabelValue(route), label_value.LabelValue(method),
                      label_value.LabelValue(status)]
            durations.append(time_series.TimeSeries(
                labels, [point.Point(value.ValueDouble(total / count), now)], now))
            counts.append(time_series.TimeSeries(
                labels, [point.Point(value.ValueLong(count), now)], now))
        return [
            metric.Metric(metric_descriptor.MetricDescriptor(
                DURATION_METRIC, "Mean response time in the interval", "ms", _GAUGE_DOUBLE, _LABELS),
                durations),
            metric.Metric(metric_descriptor.MetricDescriptor(
                COUNT_METRIC, "Requests served in the interval", "1", _GAUGE_INT, _LABELS), counts),
        ]


def start_metrics_thread(exporter, producer, interval):
    """Start the OpenCensus exporter thread that ships `producer`'s metrics every interval."""
    return opencensus_adapter.start_metrics_thread(exporter, [producer], interval)


def setup_metrics_exporter(app=None):
    """Start the response-time metrics exporter of `app` (default: the current app) once per process; return it.

    Azure mode: the OpenCensus MetricsExporter that sends request_duration_ms and request_count
    every METRICS_EXPORT_INTERVAL. Local mode: None (each request's duration is stored with it).
    """
    monitor = current_monitor() if app is None else monitor_of(app)
    if monitor is None:
        raise RuntimeError(f"the Flask app {app.name!r} has no UsageMonitor: add `UsageMonitor(app)` first")
    return monitor.metrics_exporter()


def health_report(monitor):
    """The /healthz document: "ok", or "degraded" with its problems; never secrets.

    `telemetry` (queues, counters) is the answering worker's own view, named by `pid`; `disk` and
    `shared` (the database, or the outbox on disk) hold for every worker.
    """
    problems = monitor.problems()
    return {
        "status": "degraded" if problems else "ok",
        "problems": problems,
        "mode": monitor.settings.mode,
        "usage_source": monitor.source_name,
        "pid": os.getpid(),
        "telemetry": monitor.health(),
        "disk": monitor.disk(),
        "shared": monitor.shared_state(),
    }
