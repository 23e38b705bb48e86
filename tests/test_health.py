"""Honest health: /healthz answers 503 "degraded" with its problems, /livez stays 200; Azure-mode faults
against the fake ingestion endpoint, the local store's own problems, and a nearly full disk."""
import logging
import os
import time

import pytest

from app import create_app
from telemetry import monitor_of
import test_delivery
from test_delivery import azure_config, fill_events_storage, post_events, wait_until

fake, make_app = test_delivery.fake, test_delivery.make_app  # the fake ingestion endpoint and app factory fixtures


def _health(app):
    response = app.test_client().get("/healthz")
    body = response.get_json()
    assert response.status_code == (503 if body["problems"] else 200)
    assert body["status"] == ("degraded" if body["problems"] else "ok")
    return body


def test_a_healthy_local_app_is_ok_and_says_whose_view_it_is(app, client):
    client.post("/event", json={"event_name": "x"})
    body = _health(app)
    assert body["status"] == "ok" and body["problems"] == []
    assert body["pid"] == os.getpid()
    assert body["disk"]["path"] == os.path.dirname(monitor_of(app).settings.telemetry_db)
    assert body["disk"]["free_mb"] > 0
    assert body["shared"]["database"]["path"] == monitor_of(app).settings.telemetry_db
    assert body["shared"]["database"]["mb"] > 0
    assert client.get("/livez").get_json() == {"status": "alive"}


def test_a_nearly_full_disk_is_degraded_but_alive(tmp_path):
    application = create_app({"TESTING": True, "TELEMETRY_DB": str(tmp_path / "t.db"),
                              "HEALTH_MIN_FREE_MB": "1000000"})
    try:
        body = _health(application)
        assert body["status"] == "degraded"
        assert any(p.startswith("disk nearly full") and "HEALTH_MIN_FREE_MB" in p for p in body["problems"])
        live = application.test_client().get("/livez")
        assert live.status_code == 200
    finally:
        monitor_of(application).close()


def test_health_probes_are_not_counted_as_requests(app, client):
    for path in ("/healthz", "/livez"):
        client.get(path)
    client.post("/event", json={"event_name": "x"})
    assert monitor_of(app).flush()
    names = {op["name"] for op in client.get("/dashboard/usage?days=1").get_json()["requests"]["top_operations"]}
    assert names == {"POST /event"}


def test_an_ingestion_outage_longer_than_the_grace_degrades_health_until_it_ends(fake, make_app, tmp_path):
    application = make_app(azure_config(fake, tmp_path / "outbox", DASHBOARD_AUTH="off",
                                        HEALTH_INGESTION_GRACE="1"))
    client = application.test_client()
    fake.stop()
    ids = post_events(client, 5)
    assert monitor_of(application).flush(30)
    assert _health(application)["status"] == "ok", "within the grace an outage is not yet a problem"
    time.sleep(1.2)
    post_events(client, 1)
    assert monitor_of(application).flush(30)
    body = _health(application)
    assert body["status"] == "degraded"
    assert any(p.startswith("ingestion failing for") for p in body["problems"]), body["problems"]
    assert body["shared"]["outbox"]["events"]["files"] > 0, "the stored batches, as every worker sees them"
    assert client.get("/livez").status_code == 200
    fake.start()
    fake.wait_all(ids, 30)
    assert wait_until(lambda: _health(application)["status"] == "ok", 10), "healthy again once ingestion accepts"


def test_full_storage_degrades_health_and_the_sdk_repeats_are_silenced(fake, make_app, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    application = make_app(azure_config(fake, tmp_path / "outbox", DASHBOARD_AUTH="off",
                                        TELEMETRY_STORAGE_MAX_MB="0.02"))
    fake.stop()
    fill_events_storage(application)
    fill_events_storage(application, 50)  # more refused writes: the SDK would warn on each
    body = _health(application)
    assert any(p.startswith("telemetry storage full (events)") for p in body["problems"]), body["problems"]
    sdk = [r for r in caplog.records if r.name.startswith("opencensus") and "capacity" in r.getMessage()]
    assert sdk == [], f"{len(sdk)} SDK 'max capacity' lines"
    ours = [r for r in caplog.records if r.name == "azure_monitor.delivery" and "is full" in r.getMessage()]
    assert len(ours) == 1, "one line per folder per episode"


def test_the_last_metrics_are_sent_at_shutdown_when_ingestion_answers(fake, make_app, tmp_path):
    storage = tmp_path / "outbox"
    application = make_app(azure_config(fake, storage, DASHBOARD_AUTH="off"))
    post_events(application.test_client(), 3)
    assert monitor_of(application).flush(30)  # exports this interval's metrics
    before = len(fake.of_type("MetricData"))
    post_events(application.test_client(), 2)  # the next interval, still open at shutdown
    monitor_of(application).close()
    metrics = fake.of_type("MetricData")
    assert len(metrics) > before, "the last interval's metrics reached ingestion"
    assert not list((storage / "metrics").glob("*.blob*")), "nothing left in the outbox"


def test_the_last_metrics_are_stored_at_shutdown_when_ingestion_is_down(fake, make_app, tmp_path):
    storage = tmp_path / "outbox"
    application = make_app(azure_config(fake, storage, DASHBOARD_AUTH="off"))
    post_events(application.test_client(), 3)
    assert monitor_of(application).flush(30)
    fake.stop()
    post_events(application.test_client(), 2)  # requests of an interval still open at shutdown
    started = time.monotonic()
    monitor_of(application).close()
    assert time.monotonic() - started < 10
    assert list((storage / "metrics").glob("*.blob*")), "stored (leased until the retry) for the next process"


@pytest.mark.parametrize("path", ["/healthz", "/livez"])
def test_health_documents_are_in_the_openapi_description(client, path):
    doc = client.get("/openapi.json").get_json()
    assert path in doc["paths"]
    if path == "/healthz":
        assert set(doc["paths"][path]["get"]["responses"]) == {"200", "503"}


def test_a_store_that_cannot_be_opened_is_named_and_the_dashboard_answers_503(tmp_path):
    folder = tmp_path / "a-folder"
    folder.mkdir()
    application = create_app({"TESTING": True, "TELEMETRY_DB": str(folder)})
    client = application.test_client()
    assert client.post("/event", json={"event_name": "x"}).status_code == 503
    body = _health(application)
    assert any(p.startswith("telemetry store not open") and "TELEMETRY_DB" in p for p in body["problems"]), body
    usage = client.get("/dashboard/usage?days=1")
    assert usage.status_code == 503 and usage.headers["Retry-After"] == "5"
    assert usage.get_json()["error"]["code"] == "storage_unavailable"
    folder.rmdir()  # the operator fixes it: the next event opens the store
    assert client.post("/event", json={"event_name": "x"}).status_code == 202
    assert _health(application)["problems"] == []
    assert client.get("/dashboard/usage?days=1").status_code == 200
    monitor_of(application).close()
