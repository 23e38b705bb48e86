"""Azure mode at the wire: the real OpenCensus exporters POST envelopes to a fake ingestion endpoint."""
import json
import logging
import os
import re
import threading
import types
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from opencensus.ext.azure.common.protocol import Data, Envelope, Event
from opencensus.ext.azure.log_exporter import AzureEventHandler, BaseLogHandler
from opencensus.ext.azure.trace_exporter import AzureExporter
from opencensus.trace.span import SpanKind
from opencensus.trace.span_context import SpanContext
from opencensus.trace.span_data import SpanData
from opencensus.trace.status import Status

import azure_monitor
import opencensus_adapter
from app import create_app
from fake_ingestion import IKEY, FakeIngestion
from usage_tracking import log_crud_activity, log_user_login
from telemetry import DependencyRecord, EventRecord, RequestRecord, TraceForwarder, monitor_of


@pytest.fixture
def ingestion():
    """A fake ingestion endpoint, stopped after the test."""
    fake = FakeIngestion().start()
    yield fake
    fake.stop()


def azure_config(ingestion, tmp_path, **extra):
    """Settings for an Azure-mode app whose exporters send to the fake endpoint."""
    return {"TESTING": True, "APPLICATIONINSIGHTS_CONNECTION_STRING": ingestion.connection_string,
            "TELEMETRY_STORAGE": str(tmp_path / "outbox"), "EXPORT_INTERVAL": "0.05",
            "METRICS_EXPORT_INTERVAL": "3600", **extra}


@pytest.fixture
def azure_app(ingestion, tmp_path):
    """An Azure-mode app whose exporters send to the fake endpoint."""
    application = create_app(azure_config(ingestion, tmp_path))
    yield application
    monitor_of(application).close()


def _flush(app):
    assert monitor_of(app).flush(10)


def test_posted_event_arrives_as_custom_event_with_string_properties(azure_app, ingestion):
    client = azure_app.test_client()
    resp = client.post("/event", json={"event_name": "ReportExported",
                                       "details": {"format": "pdf", "pages": 3, "draft": False, "note": None}})
    assert resp.status_code == 202
    event_id = resp.get_json()["event_id"]
    _flush(azure_app)
    events = ingestion.wait_for(lambda f: f.of_type("EventData"))
    assert len(events) == 1
    envelope = events[0]
    assert envelope["name"] == "Microsoft.ApplicationInsights.Event"
    assert envelope["iKey"] == IKEY
    data = envelope["data"]["baseData"]
    assert data["name"] == "ReportExported"
    assert data["properties"] == {"format": "pdf", "pages": "3", "draft": "false", "note": "null",
                                  "event_id": event_id}
    # Events are correlated with the request that posted them.
    requests_seen = ingestion.wait_for(lambda f: f.of_type("RequestData"))
    assert envelope["tags"]["ai.operation.id"] == requests_seen[0]["tags"]["ai.operation.id"]
    assert not ingestion.of_type("MessageData"), "custom events must not land in traces"


def test_trackers_fill_the_authenticated_user_tag(azure_app, ingestion):
    with azure_app.test_request_context():
        login_id = log_user_login("alice")
        crud_id = log_crud_activity("UPDATE", "bob", "invoice")
    _flush(azure_app)
    events = {e["data"]["baseData"]["name"]: e for e in ingestion.wait_for(
        lambda f: len(f.of_type("EventData")) >= 2 and f.of_type("EventData"))}
    login, crud = events["UserLogin"], events["CrudActivity"]
    assert login["tags"]["ai.user.authUserId"] == "alice"
    assert login["data"]["baseData"]["properties"] == {"user_id": "alice", "event_id": login_id}
    assert crud["tags"]["ai.user.authUserId"] == "bob"
    assert crud["data"]["baseData"]["properties"] == {
        "action": "update", "entity": "invoice", "user_id": "bob", "event_id": crud_id}


def test_requests_become_request_telemetry_named_by_route(azure_app, ingestion):
    @azure_app.get("/items/<int:item_id>")
    def item(item_id):
        return {"id": item_id}, 200 if item_id else 500

    @azure_app.get("/files/<name>")
    def file(name):
        return {"name": name}, 404

    client = azure_app.test_client()
    assert client.get("/items/7?token=secret").status_code == 200
    assert client.get("/items/0").status_code == 500
    assert client.get("/files/r%C3%A9sum%C3%A9.pdf?sig=x#top", headers={"Host": "example.test:8080"}).status_code == 404
    _flush(azure_app)
    reqs = ingestion.wait_for(lambda f: len(f.of_type("RequestData")) >= 3 and f.of_type("RequestData"))
    by_code = {r["data"]["baseData"]["responseCode"]: r for r in reqs}
    assert by_code["404"]["data"]["baseData"]["url"] == "http://example.test:8080/files/résumé.pdf"
    ok, failed = by_code["200"]["data"]["baseData"], by_code["500"]["data"]["baseData"]
    assert ok["name"] == "GET /items/<int:item_id>"
    assert ok["success"] is True and failed["success"] is False
    assert ok["url"] == "http://localhost/items/7", "the query string must not be exported"
    assert ok["duration"].startswith("0.00:00:0")
    assert by_code["200"]["tags"]["ai.operation.name"] == "GET /items/<int:item_id>"


def test_outgoing_calls_become_dependencies(azure_app, ingestion, backend):
    @azure_app.get("/proxy/<path:path>")
    def proxy(path):
        return {"status": requests.get(f"{backend.url}/{path}?sig=secret", timeout=5).status_code}

    client = azure_app.test_client()
    client.get("/proxy/ok")
    client.get("/proxy/boom")
    _flush(azure_app)
    deps = ingestion.wait_for(lambda f: len(f.of_type("RemoteDependencyData")) >= 2
                              and f.of_type("RemoteDependencyData"))
    by_code = {d["data"]["baseData"]["resultCode"]: d["data"]["baseData"] for d in deps}
    assert by_code["200"]["target"] == backend.netloc
    assert by_code["200"]["type"] == "HTTP"
    assert by_code["200"]["name"] == "GET /ok"
    assert by_code["200"]["data"] == f"{backend.url}/ok"
    assert by_code["200"]["success"] is True
    assert by_code["500"]["success"] is False
    # The dependency is a child of the request that made it.
    reqs = {r["tags"]["ai.operation.id"] for r in ingestion.of_type("RequestData")}
    assert {d["tags"]["ai.operation.id"] for d in deps} <= reqs


def test_response_times_arrive_as_custom_metrics(azure_app, ingestion):
    client = azure_app.test_client()
    for _ in range(3):
        client.post("/event", json={"event_name": "Ping"})
    client.get("/nowhere")
    _flush(azure_app)
    metrics = ingestion.wait_for(lambda f: f.of_type("MetricData"))
    points = {}
    for envelope in metrics:
        base = envelope["data"]["baseData"]
        key = (base["metrics"][0]["name"], base["properties"]["route"], base["properties"]["method"],
               base["properties"]["status"])
        points[key] = base["metrics"][0]["value"]
    assert points[("request_count", "/event", "POST", "202")] == 3
    assert points[("request_count", "<unmatched>", "GET", "404")] == 1
    assert points[("request_duration_ms", "/event", "POST", "202")] > 0
    # The next interval carries only new requests: nothing is re-sent cumulatively.
    before = len(ingestion.of_type("MetricData"))
    _flush(azure_app)
    assert len(ingestion.of_type("MetricData")) == before


def test_logger_warnings_become_traces_and_setup_twice_adds_no_handler(azure_app, ingestion, tmp_path):
    azure_app.test_client().post("/event", json={"event_name": "Ping"})  # starts the sink
    azure_monitor.logger.warning("disk almost full")  # outside any app context: the last started app
    second = create_app(azure_config(ingestion, tmp_path))
    second.test_client().post("/event", json={"event_name": "Ping"})
    def ours(logger):
        return [h for h in logger.handlers if isinstance(h, BaseLogHandler)]

    first_sink, second_sink = monitor_of(azure_app).sink, monitor_of(second).sink
    assert first_sink._event_handler is second_sink._event_handler, "the same settings share one event exporter"
    assert first_sink._log_handler is second_sink._log_handler
    forwarders = [h for h in azure_monitor.logger.handlers if isinstance(h, TraceForwarder)]
    assert ours(azure_monitor.logger) == [], "traces reach the exporter through the forwarder only"
    assert len(forwarders) == 1, "two apps, one forwarder on the trace logger"
    assert ours(logging.getLogger()) == [], "nothing goes on the root logger"
    _flush(azure_app)
    _flush(second)
    traces = ingestion.wait_for(lambda f: f.of_type("MessageData"))
    messages = [t["data"]["baseData"]["message"] for t in traces]
    assert "disk almost full" in messages
    assert messages.count("disk almost full") == 1, "one handler, one trace"
    assert all(t["data"]["baseData"]["severityLevel"] >= 2 for t in traces), "warnings and errors only"
    monitor_of(second).close()


# -- the one adapter for OpenCensus' private internals ---------------------------------------------

def test_a_different_sdk_version_fails_at_start_naming_package_and_versions():
    with pytest.raises(opencensus_adapter.SdkVersionMismatch) as caught:
        opencensus_adapter.check_versions({"opencensus": "0.11.4", "opencensus-ext-azure": "1.1.16"})
    message = str(caught.value)
    assert "opencensus-ext-azure: pinned 1.1.15, installed 1.1.16" in message
    assert "opencensus:" not in message.replace("opencensus-ext-azure:", ""), "only the mismatching package"
    assert "requirements.txt" in message
    with pytest.raises(opencensus_adapter.SdkVersionMismatch, match="opencensus: pinned 0.11.4, installed none"):
        opencensus_adapter.check_versions({"opencensus-ext-azure": "1.1.15"})
    opencensus_adapter.check_versions(dict(opencensus_adapter.PINNED))  # the pinned versions pass


def test_the_installed_sdk_is_the_pinned_one_and_requirements_pin_the_same():
    opencensus_adapter.check_versions()
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "requirements.txt")) as fh:
        pins = dict(line.split("#")[0].strip().split("==") for line in fh if "==" in line.split("#")[0])
    assert {name: pins[name] for name in opencensus_adapter.PINNED} == opencensus_adapter.PINNED


def test_an_azure_app_does_not_start_on_another_sdk_version(ingestion, tmp_path, monkeypatch):
    monkeypatch.setitem(opencensus_adapter.PINNED, "opencensus-ext-azure", "0.0.1")  # as if 0.0.1 were pinned
    with pytest.raises(opencensus_adapter.SdkVersionMismatch,
                       match=r"opencensus-ext-azure: pinned 0\.0\.1, installed 1\.1\.15"):
        create_app(azure_config(ingestion, tmp_path))


def test_no_module_but_the_adapter_touches_the_sdk_internals():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    private = re.compile(r"_queue\._queue|\._worker\b|\._stop\(|exporter_thread|createLock|QueueEvent|LocalFileBlob"
                         r"|LocalFileStorage|\._check_storage_size|def _export\b|\._transmit|\b_telemetry_processors")
    offenders = []
    for name in sorted(os.listdir(root)):
        if name.endswith(".py") and name != "opencensus_adapter.py":
            with open(os.path.join(root, name)) as fh:
                offenders += [f"{name}:{n}" for n, line in enumerate(fh, 1) if private.search(line.split("#")[0])]
    assert offenders == []


# -- envelopes built in the exporters' workers: the same JSON as the SDK's own converters ----------

SDK_SELF = types.SimpleNamespace(options=types.SimpleNamespace(instrumentation_key=IKEY),
                                 format=logging.Formatter().format)


def _json(envelope):
    return json.loads(json.dumps(envelope))


def _sdk_event(rec):
    """What the event logger's record became through AzureEventHandler, plus our tags and the event's time."""
    record = logging.LogRecord("telemetry.events.1", logging.INFO, __file__, 1, rec.name, None, None)
    # the event_id property, as the event logger's records carried it
    record.custom_dimensions, record.traceId = {**rec.properties, "event_id": rec.event_id}, rec.operation_id or "0" * 32
    envelope = AzureEventHandler.log_record_to_envelope(SDK_SELF, record)
    for value, tag in ((rec.user_id, "ai.user.authUserId"), (rec.anonymous_id, "ai.user.id"),
                       (rec.session_id, "ai.session.id")):
        if value:
            envelope.tags[tag] = value
    envelope.time = datetime.fromtimestamp(rec.timestamp, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return envelope


def _sdk_span(rec, rate):
    """What the record became as a SpanData through AzureExporter, plus our success rule, user tag and sampleRate."""
    iso = lambda ts: datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # noqa: E731
    if isinstance(rec, RequestRecord):
        attributes = {"http.method": rec.method, "http.route": rec.route, "http.url": rec.url,
                      "http.status_code": rec.status}
        kind, status = SpanKind.SERVER, 0
    else:
        attributes = {"component": rec.type, "http.url": rec.data, "http.method": rec.method}
        if rec.status:
            attributes["http.status_code"] = rec.status
        else:
            attributes["error.name"] = rec.result_code
        kind, status = SpanKind.CLIENT, 0 if rec.success else 2
    sd = SpanData(name=rec.name, context=SpanContext(trace_id=rec.operation_id or "0" * 32), span_id=rec.span_id,
                  parent_span_id=rec.parent_id or None, attributes=attributes, start_time=iso(rec.timestamp),
                  end_time=iso(rec.timestamp + rec.duration_ms / 1000.0), child_span_count=0, stack_trace=None,
                  annotations=None, message_events=None, links=None, status=Status(status),
                  same_process_as_parent_span=None, span_kind=kind)
    [envelope] = list(AzureExporter.span_data_to_envelope(SDK_SELF, sd))
    base = envelope.data.baseData
    if envelope.data.baseType == "RequestData":
        base.success = int(base.responseCode) < 500
        if rec.user_id:
            envelope.tags["ai.user.authUserId"] = rec.user_id
    if rate < 1:
        envelope.sampleRate = rate * 100.0
    return envelope


TS = 1764504000.1234565  # rounds half-even at the microsecond


@pytest.mark.parametrize("rec", [
    EventRecord(name="ReportExported", properties={"format": "pdf"}, event_id="e1", user_id="alice",
                timestamp=TS, operation_id="a" * 32, anonymous_id="anon-1", session_id="s-1"),
    EventRecord(name="100% done", properties={}, timestamp=1.5),
], ids=["tagged", "bare"])
def test_event_envelopes_are_the_sdks(rec):
    ours = azure_monitor.event_envelope(IKEY, rec)
    assert isinstance(ours, Envelope) and isinstance(ours.data, Data) and isinstance(ours.data.baseData, Event)
    assert _json(ours) == _json(_sdk_event(rec))


@pytest.mark.parametrize("rec, rate", [
    (RequestRecord("GET", "/items/<int:item_id>", "http://localhost/items/7", 200, 12.3456, TS, "b" * 32,
                   "c" * 16, user_id="bob", parent_id="d" * 16), 0.25),
    (RequestRecord("POST", "/event", "http://localhost/event", 503, 1500.0004, 1764504000.9999996, "", "e" * 16), 1.0),
    (RequestRecord("GET", "<unmatched>", "http://localhost/x", 404, 0.0, TS, "f" * 32, "1" * 16), 0.05),
    (DependencyRecord("HTTP", "127.0.0.1:9", "GET /ok", "http://127.0.0.1:9/ok", "200", True, 3.21, TS,
                      "b" * 32, "c" * 16, "GET", 200), 1.0),
    (DependencyRecord("HTTP", "127.0.0.1:9", "GET /boom", "http://127.0.0.1:9/boom", "500", False, 86400123.4, TS,
                      "b" * 32, "c" * 16, "GET", 500), 0.5),
    (DependencyRecord("HTTP", "host:1", "GET /", "http://host:1", "ConnectionError", False, 2.0, TS, "b" * 32,
                      "", "GET", 0), 1.0),
    (DependencyRecord("HTTP", "host:1", "PUT /a", "http://host:1/a", "Timeout", True, 2.0, TS, "", "", "PUT", 0), 1.0),
], ids=["request-sampled", "request-5xx", "request-404", "dependency", "dependency-5xx", "dependency-refused",
        "dependency-no-status"])
def test_span_envelopes_are_the_sdks(rec, rate):
    builder = azure_monitor.request_envelope if isinstance(rec, RequestRecord) else azure_monitor.dependency_envelope
    ours = builder(IKEY, rec, rate)
    assert isinstance(ours, Envelope) and isinstance(ours.data, Data)
    theirs = _json(_sdk_span(rec, rate))
    if not rec.operation_id:  # a span outside any operation starts a new trace: a random id, in both
        assert re.fullmatch("[0-9a-f]{32}", ours.tags["ai.operation.id"]) and ours.tags["ai.operation.id"] != "0" * 32
        theirs["tags"]["ai.operation.id"] = ours.tags["ai.operation.id"]
    assert _json(ours) == theirs


def test_the_exporters_honour_the_proxy_environment(tmp_path, monkeypatch):
    """Sessions are kept alive and read the environment once; HTTP(S)_PROXY still routes every POST."""
    seen = []

    class Proxy(BaseHTTPRequestHandler):
        def do_POST(self):
            items = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, len(items)))
            body = json.dumps({"itemsReceived": len(items), "itemsAccepted": len(items), "errors": []}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    proxy = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    for var in ("NO_PROXY", "no_proxy", "http_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.server_address[1]}")
    application = create_app({"TESTING": True, "TELEMETRY_STORAGE": str(tmp_path / "outbox"), "EXPORT_INTERVAL": "0.05",
                              "METRICS_EXPORT_INTERVAL": "3600", "APPLICATIONINSIGHTS_CONNECTION_STRING":
                              f"InstrumentationKey={IKEY};IngestionEndpoint=http://ingestion.invalid/"})
    try:
        for _ in range(3):
            assert application.test_client().post("/event", json={"event_name": "ViaProxy"}).status_code == 202
        assert monitor_of(application).flush(10)
        assert {path for path, _ in seen} == {"http://ingestion.invalid/v2.1/track"}
        assert sum(n for _, n in seen) >= 6, "3 events and 3 requests, all through the proxy"
        assert monitor_of(application).health()["delivery"]["stored"] == 0
    finally:
        monitor_of(application).close()
        proxy.shutdown()
        proxy.server_close()
