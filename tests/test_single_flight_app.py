"""Single flight through the whole app: concurrent GET /dashboard/usage during a cache miss make one
Log Analytics call, counted at the requests-mock boundary (the real LogsQueryClient underneath)."""
import threading
import time

import pytest
from azure.core.credentials import AccessToken

from app import create_app
from usage_kql import COLUMNS
from telemetry import monitor_of

WORKSPACE = "00000000-1111-2222-3333-444444444444"
URL = f"https://api.loganalytics.io/v1/workspaces/{WORKSPACE}/query"
# Telemetry of these requests goes to a port nobody listens on; it is stored, never sent.
CONN = "InstrumentationKey=11111111-2222-3333-4444-555555555555;IngestionEndpoint=http://127.0.0.1:9/"
TOKEN = "single-flight-test-token"
CALLERS = 8


class FakeCredential:
    """A TokenCredential that never touches the network."""

    def get_token(self, *scopes, **kwargs):
        return AccessToken("test-token", int(time.time()) + 3600)


def _body(count):
    row = {"section": "evt_summary", "day": "", "name": "", "type": "", "target": "", "action": "",
           "count": count, "failed": 0, "users": 0, "avg_ms": None, "p50_ms": None, "p95_ms": None,
           "p99_ms": None}
    return {"tables": [{"name": "PrimaryResult", "columns": [{"name": n, "type": t} for n, t in COLUMNS],
                        "rows": [[row[n] for n, _ in COLUMNS]]}]}


@pytest.fixture
def azure_app(tmp_path):
    app = create_app({"TESTING": True, "APPLICATIONINSIGHTS_CONNECTION_STRING": CONN,
                      "LOG_ANALYTICS_WORKSPACE_ID": WORKSPACE, "TELEMETRY_STORAGE": str(tmp_path),
                      "USAGE_CACHE_TTL": "60", "DASHBOARD_TOKEN": TOKEN, "RATE_LIMIT_ENABLED": "false"},
                     credential=FakeCredential())
    monitor_of(app).source._client_kwargs.update(retry_total=0)
    yield app
    monitor_of(app).close()


def _concurrent_gets(app, url, n=CALLERS):
    """GET url from n threads released together (one test client each); returns the responses."""
    barrier = threading.Barrier(n)
    responses = [None] * n

    def call(i):
        client = app.test_client()
        barrier.wait()
        responses[i] = client.get(url, headers={"Authorization": f"Bearer {TOKEN}"})

    threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads)
    return responses


def test_concurrent_dashboard_requests_during_a_miss_make_one_log_analytics_call(azure_app, requests_mock):
    def slow(request, context):
        time.sleep(0.5)  # every caller arrives while the first query is in flight
        return _body(7)

    query = requests_mock.post(URL, json=slow)
    responses = _concurrent_gets(azure_app, "/dashboard/usage?days=7")
    assert [r.status_code for r in responses] == [200] * CALLERS, [r.get_data(as_text=True) for r in responses]
    assert query.call_count == 1
    assert all(r.get_json()["events"]["total"] == 7 for r in responses)

    # A second burst within USAGE_CACHE_TTL is answered from the cache: still one call.
    responses = _concurrent_gets(azure_app, "/dashboard/usage?days=7")
    assert [r.status_code for r in responses] == [200] * CALLERS
    assert query.call_count == 1


def test_concurrent_requests_for_different_windows_make_one_call_each(azure_app, requests_mock):
    def slow(request, context):
        time.sleep(0.5)
        return _body(3)

    query = requests_mock.post(URL, json=slow)
    results = {}

    def burst(days):
        results[days] = _concurrent_gets(azure_app, f"/dashboard/usage?days={days}", n=4)

    bursts = [threading.Thread(target=burst, args=(days,)) for days in (7, 30)]
    for thread in bursts:
        thread.start()
    for thread in bursts:
        thread.join(60)
    assert all(r.status_code == 200 for rs in results.values() for r in rs)
    assert query.call_count == 2
