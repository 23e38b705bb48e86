"""Azure mode at the wire: the real OpenCensus exporters POST envelopes to a fake ingestion endpoint."""
import logging
import os
import re

import pytest
import requests

from opencensus.ext.azure.log_exporter import BaseLogHandler

import azure_monitor
import opencensus_adapter
from app import create_app
from fake_ingestion import IKEY, FakeIngestion
from usage_tracking import log_crud_activity, log_user_login
from telemetry import TraceForwarder, monitor_of


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

    client = azure_app.test_client()
    assert client.get("/items/7?token=secret").status_code == 200
    assert client.get("/items/0").status_code == 500
    _flush(azure_app)
    reqs = ingestion.wait_for(lambda f: len(f.of_type("RequestData")) >= 2 and f.of_type("RequestData"))
    by_code = {r["data"]["baseData"]["responseCode"]: r for r in reqs}
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
    assert first_sink._events is second_sink._events, "the same settings share one event logger"
    assert len(ours(first_sink._events)) == 1
    forwarders = [h for h in azure_monitor.logger.handlers if isinstance(h, TraceForwarder)]
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
                         r"|LocalFileStorage|\._check_storage_size")
    offenders = []
    for name in sorted(os.listdir(root)):
        if name.endswith(".py") and name != "opencensus_adapter.py":
            with open(os.path.join(root, name)) as fh:
                offenders += [f"{name}:{n}" for n, line in enumerate(fh, 1) if private.search(line.split("#")[0])]
    assert offenders == []
