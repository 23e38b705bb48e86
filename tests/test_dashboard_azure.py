"""/dashboard/usage in Azure mode: the real LogsQueryClient against requests-mock replies."""
import json
import time
from datetime import datetime, timedelta, timezone

import pytest
from azure.core.credentials import AccessToken

from app import create_app
from kql_check import kql_errors
from usage_kql import COLUMNS
from telemetry import monitor_of

WORKSPACE = "00000000-1111-2222-3333-444444444444"
URL = f"https://api.loganalytics.io/v1/workspaces/{WORKSPACE}/query"
CONN = "InstrumentationKey=11111111-2222-3333-4444-555555555555;IngestionEndpoint=http://127.0.0.1:9/"


class FakeCredential:
    """A TokenCredential that never touches the network."""

    def get_token(self, *scopes, **kwargs):
        return AccessToken("test-token", int(time.time()) + 3600)


def _row(section, **values):
    row = {"section": section, "day": "", "name": "", "type": "", "target": "", "action": "",
           "count": 0, "failed": 0, "users": 0, "avg_ms": None, "p50_ms": None, "p95_ms": None,
           "p99_ms": None, **values}
    return [row[name] for name, _ in COLUMNS]


def _tables(rows, error=None):
    body = {"tables": [{"name": "PrimaryResult",
                        "columns": [{"name": n, "type": t} for n, t in COLUMNS], "rows": rows}]}
    if error:
        body["error"] = error
    return body


@pytest.fixture
def azure_client(tmp_path):
    """An Azure-mode app with a workspace and a fake credential (exporters never start here)."""
    app = create_app({"TESTING": True, "APPLICATIONINSIGHTS_CONNECTION_STRING": CONN,
                      "LOG_ANALYTICS_WORKSPACE_ID": WORKSPACE, "TELEMETRY_STORAGE": str(tmp_path),
                      "USAGE_CACHE_TTL": "60"}, credential=FakeCredential())
    monitor_of(app).source._client_kwargs.update(retry_total=0)
    yield app.test_client()
    monitor_of(app).close()


def test_azure_usage_has_the_local_shape_and_the_numbers(azure_client, requests_mock, client):
    requests_mock.post(URL, json=_tables([
        _row("req_summary", count=12, failed=2, avg_ms=20.5, p50_ms=10.0, p95_ms=80.0, p99_ms=99.0),
        _row("req_top", name="GET /items/<int:id>", count=12, failed=2, p95_ms=80.0),
        _row("evt_summary", count=5),
        _row("evt_top", name="UserLogin", count=3, users=2),
        _row("login_summary", count=3, users=2),
        _row("active_summary", users=2),
        _row("crud", name="invoice", action="update", count=2),
    ]))
    resp = azure_client.get("/dashboard/usage?days=7")
    assert resp.status_code == 200
    body = resp.get_json()
    assert body["source"] == "azure_monitor"
    assert body["requests"]["total"] == 12 and body["requests"]["failed"] == 2
    assert body["requests"]["p95_ms"] == 80.0
    assert body["requests"]["top_operations"] == [
        {"name": "GET /items/<int:id>", "count": 12, "failed": 2, "p95_ms": 80.0}]
    assert body["users"] == {"logins": 3, "unique_users": 2, "anonymous": 0, "sessions": 0,
                             "daily_active": body["users"]["daily_active"]}
    assert len(body["users"]["daily_active"]) == 7
    assert body["crud"]["by_entity"] == [{"entity": "invoice", "create": 0, "read": 0, "update": 2, "delete": 0}]

    # Same JSON shape as local mode, key for key, type for type.
    local = client.get("/dashboard/usage?days=7").get_json()

    def shape(doc):
        if isinstance(doc, dict):
            return {k: shape(v) for k, v in doc.items()}
        if isinstance(doc, list):
            return "list"
        return "number" if isinstance(doc, (int, float)) or doc is None else type(doc).__name__

    assert shape(local) == shape(body)

    # The query that went over the wire is valid KQL against the documented schemas.
    sent = requests_mock.request_history[0]
    assert sent.headers["Authorization"] == "Bearer test-token"
    assert kql_errors([json.loads(sent.body)["query"]]) == [[]]


def test_azure_daily_request_latency_is_mapped(azure_client, requests_mock):
    """req_daily rows' avg_ms/p95_ms land on their own day, rounded; days without a row are null."""
    today = datetime.now(timezone.utc).date()
    yesterday = (today - timedelta(days=1)).isoformat()
    requests_mock.post(URL, json=_tables([
        _row("req_summary", count=14, failed=1, avg_ms=30.0, p50_ms=20.0, p95_ms=90.0, p99_ms=99.0),
        _row("req_daily", day=yesterday, count=10, failed=1, avg_ms=12.34567, p95_ms=80.0004),
        _row("req_daily", day=today.isoformat(), count=4, failed=0, avg_ms=75, p95_ms=None),
    ]))
    body = azure_client.get("/dashboard/usage?days=7").get_json()
    daily = body["requests"]["daily"]
    assert [d["date"] for d in daily][-2:] == [yesterday, today.isoformat()]
    assert daily[-2] == {"date": yesterday, "count": 10, "failed": 1, "avg_ms": 12.346, "p95_ms": 80.0}
    assert daily[-1] == {"date": today.isoformat(), "count": 4, "failed": 0, "avg_ms": 75.0, "p95_ms": None}
    assert all(d == {"date": d["date"], "count": 0, "failed": 0, "avg_ms": None, "p95_ms": None}
               for d in daily[:-2])
    # The query asks Log Analytics for both figures per day.
    query = json.loads(requests_mock.request_history[0].body)["query"]
    daily_section = query.split('section = "req_daily"')[0].rsplit("(Req", 1)[1]
    assert "percentilew(DurationMs, ItemCount, 95) by d = startofday(TimeGenerated)" in daily_section
    assert "w = sum(DurationMs * ItemCount)" in daily_section


def test_azure_usage_is_cached(azure_client, requests_mock):
    requests_mock.post(URL, json=_tables([_row("evt_summary", count=1)]))
    assert azure_client.get("/dashboard/usage?days=7").status_code == 200
    assert azure_client.get("/dashboard/usage?days=7").status_code == 200
    assert requests_mock.call_count == 1


def test_throttled_log_analytics_answers_503_with_retry_after(azure_client, requests_mock):
    requests_mock.post(URL, status_code=429, headers={"Retry-After": "17"},
                       json={"error": {"code": "ThrottledError", "message": "slow down"}})
    resp = azure_client.get("/dashboard/usage?days=7")
    assert resp.status_code == 503
    assert resp.headers["Retry-After"] == "17"
    assert resp.get_json()["error"]["code"] == "upstream_unavailable"


def test_log_analytics_500_answers_503_json(azure_client, requests_mock):
    requests_mock.post(URL, status_code=500, json={"error": {"code": "InternalServerError", "message": "x"}})
    resp = azure_client.get("/dashboard/usage?days=7")
    assert resp.status_code == 503
    assert "Traceback" not in resp.get_data(as_text=True)


def test_partial_result_answers_502(azure_client, requests_mock):
    requests_mock.post(URL, json=_tables([_row("evt_summary", count=1)],
                                         error={"code": "PartialError", "message": "timeout"}))
    resp = azure_client.get("/dashboard/usage?days=7")
    assert resp.status_code == 502
    assert resp.get_json()["error"] == {"code": "upstream_error",
                                        "message": "Log Analytics returned a partial result (PartialError: timeout)"}
    assert resp.headers["Retry-After"] == "10"
    assert azure_client.get("/dashboard/usage?days=7").status_code == 502
    assert requests_mock.call_count == 1, "held briefly, like a throttle"
    assert azure_client.get("/healthz").status_code == 200, "a partial result is not a throttle"


def test_a_throttle_without_retry_after_is_held_30_s_and_named_by_healthz(azure_client, requests_mock):
    requests_mock.post(URL, status_code=429, json={"error": {"code": "ThrottledError", "message": "slow down"}})
    resp = azure_client.get("/dashboard/usage?days=7")
    assert resp.status_code == 503 and resp.headers["Retry-After"] == "30"
    again = azure_client.get("/dashboard/usage?days=7")
    assert again.status_code == 503 and 1 <= int(again.headers["Retry-After"]) <= 30
    assert requests_mock.call_count == 1
    health = azure_client.get("/healthz")
    problems = health.get_json()["problems"]
    assert health.status_code == 503
    assert problems == [p for p in problems if p.startswith("Log Analytics is throttling queries (HTTP 429")]
    assert len(problems) == 1


def test_a_503_with_a_short_retry_after_costs_at_most_3_s_of_retries(tmp_path, requests_mock, monkeypatch):
    from azure.core.pipeline.transport import RequestsTransport
    slept = []
    monkeypatch.setattr(RequestsTransport, "sleep", lambda self, seconds: slept.append(seconds))
    app = create_app({"TESTING": True, "APPLICATIONINSIGHTS_CONNECTION_STRING": CONN,
                      "LOG_ANALYTICS_WORKSPACE_ID": WORKSPACE, "TELEMETRY_STORAGE": str(tmp_path)},
                     credential=FakeCredential())  # the default retry policy
    requests_mock.post(URL, status_code=503, headers={"Retry-After": "5"},
                       json={"error": {"code": "ServiceUnavailable", "message": "later"}})
    resp = app.test_client().get("/dashboard/usage?days=7")
    monitor_of(app).close()
    assert resp.status_code == 503 and resp.headers["Retry-After"] == "5"
    queries = [r for r in requests_mock.request_history if r.url == URL]  # not the exporters' calls
    assert len(queries) == 1 and slept == [], "it used to sleep 5 s twice and ask three times"


def test_no_workspace_answers_503(tmp_path):
    app = create_app({"TESTING": True, "APPLICATIONINSIGHTS_CONNECTION_STRING": CONN,
                      "TELEMETRY_STORAGE": str(tmp_path)})
    resp = app.test_client().get("/dashboard/usage")
    monitor_of(app).close()
    assert resp.status_code == 503
    assert "LOG_ANALYTICS_WORKSPACE_ID" in resp.get_json()["error"]["message"]
