"""The benchmark's own pieces (bench/): the bare app's contract and the counting fake ingestion."""
import importlib.util
import json
import os
import urllib.request
import uuid

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(BENCH, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bare_app_answers_202_with_an_event_id():
    client = _load("bare_app").app.test_client()
    resp = client.post("/event", json={"event_name": "ReportExported", "details": {"format": "pdf", "pages": 3}})
    assert resp.status_code == 202
    assert resp.get_json()["status"] == "accepted"
    assert uuid.UUID(resp.get_json()["event_id"]).version == 4


def test_counting_ingestion_answers_like_application_insights():
    fake = _load("counting_ingestion").FakeIngestion("ok")
    try:
        items = [{"data": {"baseType": "EventData"}}, {"data": {"baseType": "RequestData"}}]
        req = urllib.request.Request(f"http://127.0.0.1:{fake.port}/v2.1/track", json.dumps(items).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert resp.status == 200
            assert json.load(resp) == {"itemsReceived": 2, "itemsAccepted": 2, "errors": []}
        assert fake.counts() == {"EventData": 1, "RequestData": 1, "posts": 1, "total": 2}
    finally:
        fake.stop()
