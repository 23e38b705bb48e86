"""The Flask CLI: `flask usage`, `flask telemetry status` and `flask telemetry drain` (Flask's CLI runner).

The drain tests use the real OpenCensus exporters: batches are stored while the fake ingestion
endpoint on 127.0.0.1 is down or failing, then drained with it up (everything arrives) or still
failing (a non-zero exit naming the reason, and everything still stored).
"""
import json
import os
import re
import time

import pytest
from azure.core.credentials import AccessToken

from app import create_app
from fake_ingestion import FakeIngestion
from host_app import create_host
from logging_utils import log_event
from telemetry import monitor_of
from test_delivery import wait_until
from usage_tracking import log_crud_activity, log_user_login

WORKSPACE = "00000000-1111-2222-3333-444444444444"
LA_URL = f"https://api.loganalytics.io/v1/workspaces/{WORKSPACE}/query"


# -- helpers ---------------------------------------------------------------------------------------

class FakeCredential:
    """A TokenCredential that never touches the network."""

    def get_token(self, *scopes, **kwargs):
        return AccessToken("test-token", int(time.time()) + 3600)


@pytest.fixture
def fake():
    server = FakeIngestion().start()
    server.hang_accepts = False
    yield server
    server.mode = "ok"
    server.stop()


@pytest.fixture
def make_app():
    """Build apps; every monitor is closed after the test."""
    built = []

    def build(config, **kwargs):
        application = create_app(config, **kwargs)
        built.append(application)
        return application

    yield build
    for application in reversed(built):
        monitor_of(application).close(5)


def azure_config(fake, storage, **extra):
    config = {"TESTING": True, "APPLICATIONINSIGHTS_CONNECTION_STRING": fake.connection_string,
              "TELEMETRY_STORAGE": str(storage), "EXPORT_INTERVAL": "0.05", "EXPORT_RETRY_INTERVAL": "20",
              "EXPORT_TIMEOUT": "0.5", "METRICS_EXPORT_INTERVAL": "3600", "SHUTDOWN_GRACE": "2"}
    config.update({k: str(v) for k, v in extra.items()})
    return config


def stored_files(storage, kind=None):
    """Batch files (leased or not) in one storage folder, or in all of them."""
    kinds = [kind] if kind else ["events", "traces", "requests", "metrics"]
    out = []
    for k in kinds:
        folder = os.path.join(str(storage), k)
        if os.path.isdir(folder):
            out += [os.path.join(folder, n) for n in os.listdir(folder) if not n.endswith(".tmp")]
    return out


def stored_event_ids(storage):
    ids = set()
    for path in stored_files(storage, "events"):
        with open(path) as fh:
            for line in fh:
                envelope = json.loads(line)
                if envelope["data"]["baseType"] == "EventData":
                    ids.add(envelope["data"]["baseData"]["properties"]["event_id"])
    return ids


def post_events(client, n):
    ids = []
    for seq in range(n):
        resp = client.post("/event", json={"event_name": "CliDrain", "details": {"seq": seq}})
        assert resp.status_code == 202, resp.get_data(as_text=True)
        ids.append(resp.get_json()["event_id"])
    return ids


def store_during_outage(application, fake, n=120, mode="down"):
    """Post n events while ingestion is down (or failing): every one ends up stored, the exporters back off."""
    if mode == "down":
        fake.stop()
    else:
        fake.mode = mode
    ids = post_events(application.test_client(), n)
    assert monitor_of(application).flush(30)
    storage = monitor_of(application).settings.telemetry_storage
    assert stored_event_ids(storage) == set(ids)
    assert monitor_of(application).health()["delivery"]["retries"] > 0
    return ids


# -- flask usage ---------------------------------------------------------------------------------------

def _seed(app, client):
    for name, times in (("ReportExported", 3), ("Search", 1)):
        for i in range(times):
            assert client.post("/event", json={"event_name": name, "details": {"i": i}}).status_code == 202
    with app.test_request_context():
        for user in ("alice", "bob"):
            log_user_login(user)
        for action, user, entity in (("create", "alice", "invoice"), ("update", "alice", "invoice"),
                                     ("read", "bob", "customer")):
            log_crud_activity(action, user, entity)
        log_event("Exported", {"format": "pdf"})
    assert monitor_of(app).flush()


def test_usage_json_is_the_routes_json(app, client, runner):
    _seed(app, client)
    result = runner.invoke(args=["usage", "--days", "7", "--json"])
    assert result.exit_code == 0, result.output
    from_cli = json.loads(result.stdout)
    # The route's own request is recorded after it answers: both read the same rows.
    from_route = client.get("/dashboard/usage?days=7").get_json()
    for doc in (from_cli, from_route):  # "now": generated_at and the window's end
        assert doc.pop("generated_at") and doc["timespan"].pop("end")
    assert from_cli == from_route
    assert from_cli["timespan"]["days"] == 7 and from_cli["events"]["total"] == 4 + 2 + 3 + 1
    assert result.stdout.startswith('{\n  "source": "local",')  # indent=2, the document's own key order


def test_usage_tables_show_the_figures(app, client, runner):
    _seed(app, client)
    result = runner.invoke(args=["usage", "--days", "3"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "Usage, last 3 days:" in out and "(source: local)" in out
    for title in ("Headline figures", "Top operations", "Top dependency targets", "Top events", "CRUD by entity"):
        assert f"\n{title}\n" in out
    lines = out.splitlines()

    def line(pattern):
        found = [entry for entry in lines if re.fullmatch(pattern, entry)]
        assert len(found) == 1, (pattern, out)
        return found[0]

    line(r"  requests +4")  # the 4 POST /event
    line(r"  failed requests +0  \(0\.0 %\)")
    line(r"  events +10")
    line(r"  logins +2")
    line(r"  unique users +2")
    line(r"  CRUD operations +3  create 1, read 1, update 1, delete 0")
    line(r"  POST /event +4 +0 +\d+\.\d")
    line(r"  ReportExported +3 +0")
    line(r"  UserLogin +2 +2")
    line(r"  invoice +1 +0 +1 +0 +2")
    line(r"  customer +0 +1 +0 +0 +1")
    line(r"  operation +count +failed +p95 ms")  # headers, aligned over their columns
    assert "Top dependency targets\n  (none)" in out
    # Columns line up: every row of the top-events table has its count ending in the same column.
    table = out.split("Top events\n")[1].split("\n\n")[0].splitlines()
    assert len({len(row.rsplit("  ", 1)[0].rstrip()) for row in table if not row.strip().startswith("-")}) == 1


@pytest.mark.parametrize("days", ["0", "91", "x"])
def test_usage_days_must_be_1_to_90(runner, days):
    result = runner.invoke(args=["usage", "--days", days])
    assert result.exit_code == 2
    assert "--days" in result.stderr


def test_usage_without_a_workspace_is_one_line_and_exit_1(make_app, tmp_path):
    application = make_app({"TESTING": True, "APPLICATIONINSIGHTS_CONNECTION_STRING":
                            "InstrumentationKey=11111111-2222-3333-4444-555555555555;"
                            "IngestionEndpoint=http://127.0.0.1:9/", "TELEMETRY_STORAGE": str(tmp_path)})
    result = application.test_cli_runner().invoke(args=["usage"])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == "Error: no usage source: LOG_ANALYTICS_WORKSPACE_ID is not set\n"


def test_usage_log_analytics_failure_is_one_line_and_exit_1(make_app, tmp_path, requests_mock):
    application = make_app({"TESTING": True, "APPLICATIONINSIGHTS_CONNECTION_STRING":
                            "InstrumentationKey=11111111-2222-3333-4444-555555555555;"
                            "IngestionEndpoint=http://127.0.0.1:9/", "TELEMETRY_STORAGE": str(tmp_path),
                            "LOG_ANALYTICS_WORKSPACE_ID": WORKSPACE}, credential=FakeCredential())
    monitor_of(application).source._client_kwargs.update(retry_total=0)
    requests_mock.post(LA_URL, status_code=429, headers={"Retry-After": "17"},
                       json={"error": {"code": "ThrottledError", "message": "slow down"}})
    result = application.test_cli_runner().invoke(args=["usage", "--json"])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == ("Error: usage query failed: Log Analytics is throttling queries "
                             "(HTTP 429, ThrottledError); retry after 17 s\n")


def test_usage_from_log_analytics_is_the_routes_json(make_app, tmp_path, requests_mock):
    from usage_kql import COLUMNS
    row = {"section": "req_summary", "day": "", "name": "", "type": "", "target": "", "action": "",
           "count": 3, "failed": 1, "users": 0, "avg_ms": 5.0, "p50_ms": 4.0, "p95_ms": 9.0, "p99_ms": 9.5}
    requests_mock.post(LA_URL, json={"tables": [{"name": "PrimaryResult",
                                                 "columns": [{"name": n, "type": t} for n, t in COLUMNS],
                                                 "rows": [[row[n] for n, _ in COLUMNS]]}]})
    application = make_app({"TESTING": True, "APPLICATIONINSIGHTS_CONNECTION_STRING":
                            "InstrumentationKey=11111111-2222-3333-4444-555555555555;"
                            "IngestionEndpoint=http://127.0.0.1:9/", "TELEMETRY_STORAGE": str(tmp_path),
                            "LOG_ANALYTICS_WORKSPACE_ID": WORKSPACE}, credential=FakeCredential())
    result = application.test_cli_runner().invoke(args=["usage", "--days", "2", "--json"])
    assert result.exit_code == 0, result.output
    from_cli = json.loads(result.stdout)
    from_route = application.test_client().get("/dashboard/usage?days=2").get_json()
    for doc in (from_cli, from_route):
        assert doc.pop("generated_at") and doc["timespan"].pop("end")
    assert from_cli == from_route and from_cli["source"] == "azure_monitor"
    assert from_cli["requests"]["total"] == 3
    text = application.test_cli_runner().invoke(args=["usage", "--days", "2"]).stdout
    assert re.search(r"\n  failed requests +1  \(33\.3 %\)\n", text)
    for figure, value in (("avg", "5.0"), ("p50", "4.0"), ("p95", "9.0"), ("p99", "9.5")):
        assert re.search(rf"\n  request {figure} ms +{re.escape(value)}\n", text), (figure, text)
    assert re.search(r"\n  dependency avg ms +-\n", text)


def test_commands_come_with_the_extension_in_a_host_app(tmp_path):
    host = create_host({"TELEMETRY_DB": str(tmp_path / "host.db")})
    try:
        result = host.test_cli_runner().invoke(args=["usage", "--days", "1", "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["timespan"]["days"] == 1
        assert host.test_cli_runner().invoke(args=["telemetry", "status"]).exit_code == 0
    finally:
        monitor_of(host).close()


# -- flask telemetry status --------------------------------------------------------------------------

def test_status_in_local_mode(app, client, runner):
    _seed(app, client)
    text = runner.invoke(args=["telemetry", "status"])
    assert text.exit_code == 0, text.output
    db = monitor_of(app).settings.telemetry_db
    assert "mode: local\n" in text.stdout
    assert "sink: started in this process; queued: 0 (written " in text.stdout
    assert "record failures: none" in text.stdout
    assert f"database: {db} (" in text.stdout and " MB with its WAL)" in text.stdout
    assert re.search(r"\n  events +10\n", text.stdout)
    assert re.search(r"\n  requests +4\n", text.stdout)

    report = json.loads(runner.invoke(args=["telemetry", "status", "--json"]).stdout)
    assert report["mode"] == "local"
    assert report["health"]["started"] is True and report["health"]["record_failures"] == {}
    assert report["database"]["path"] == db and report["database"]["bytes"] > 0
    assert report["database"]["rows"] == {"events": 10, "requests": 4, "dependencies": 0, "traces": 0}


def test_status_in_local_mode_before_anything_is_stored(tmp_path, make_app):
    application = make_app({"TESTING": True, "TELEMETRY_DB": str(tmp_path / "none.db")})
    result = application.test_cli_runner().invoke(args=["telemetry", "status"])
    assert result.exit_code == 0, result.output
    assert "sink: not started in this process" in result.stdout
    assert "(not created yet)" in result.stdout
    assert not (tmp_path / "none.db").exists()  # status never creates the store


def test_status_in_azure_mode_reads_the_outbox(fake, make_app, tmp_path):
    storage = tmp_path / "outbox"
    application = make_app(azure_config(fake, storage))
    ids = store_during_outage(application, fake)
    result = application.test_cli_runner().invoke(args=["telemetry", "status", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["mode"] == "azure"
    assert report["health"]["started"] is True
    assert set(report["health"]["queued"]) == {"events", "traces", "spans"}
    folders = report["outbox"]["folders"]
    assert set(folders) == {"events", "traces", "requests", "metrics"}
    events = folders["events"]
    assert events["files"] == len(stored_files(storage, "events")) > 0
    assert events["bytes"] >= sum(os.path.getsize(p) for p in stored_files(storage, "events"))
    assert 0 <= events["oldest_age_s"] < 60 and events["full"] is False
    assert events["leased"] >= 1  # the batch whose send failed waits for its retry under a lease
    for name, folder in folders.items():  # requests (spans) and metrics (flush exports them) are stored too
        assert folder["files"] == len(stored_files(storage, name)), name
    assert folders["traces"] == {"files": 0, "leased": 0, "bytes": 0, "oldest_age_s": None, "full": False}
    delivery = report["delivery"]
    assert delivery["storage_full"] is False and delivery["full_folders"] == []
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ (events|requests|metrics): connection refused \(ConnectionError\)",
                        delivery["last_error"]), delivery["last_error"]
    assert len(ids) == 120

    text = application.test_cli_runner().invoke(args=["telemetry", "status"]).stdout
    assert "mode: azure\n" in text
    assert f"outbox: {storage} (at most 50 MB per folder)" in text
    assert re.search(rf"\n  events +{events['files']} +{events['leased']} +\d+\.\d\d +\d+\.\d +no\n", text)
    assert "last delivery error: " in text and "connection refused" in text
    assert fake.connection_string not in text and "InstrumentationKey" not in text


def test_status_flags_a_full_folder(fake, make_app, tmp_path):
    storage = tmp_path / "outbox"
    application = make_app(azure_config(fake, storage, TELEMETRY_STORAGE_MAX_MB="0.01"))
    store_during_outage(application, fake, n=10)
    client = application.test_client()
    post_events(client, 150)  # beyond 10 KB: the rest is dropped
    assert monitor_of(application).flush(30)
    report = json.loads(application.test_cli_runner().invoke(args=["telemetry", "status", "--json"]).stdout)
    assert report["outbox"]["folders"]["events"]["full"] is True
    assert report["delivery"]["storage_full"] is True and "events" in report["delivery"]["full_folders"]
    text = application.test_cli_runner().invoke(args=["telemetry", "status"]).stdout
    assert re.search(r"\n  events +\d+ +\d+ +\d+\.\d\d +\d+\.\d +FULL\n", text)
    assert "storage full (this process saw): events" in text


# -- flask telemetry drain -----------------------------------------------------------------------------

def test_drain_sends_everything_stored_when_ingestion_is_back(fake, make_app, tmp_path):
    storage = tmp_path / "outbox"
    application = make_app(azure_config(fake, storage))
    ids = store_during_outage(application, fake)
    batches = len(stored_files(storage))
    fake.start()
    # EXPORT_RETRY_INTERVAL is 20 s: only the drain can deliver within this test.
    started = time.monotonic()
    result = application.test_cli_runner().invoke(args=["telemetry", "drain", "--timeout", "30"])
    assert result.exit_code == 0, result.output
    assert time.monotonic() - started < 15
    assert set(ids) <= fake.event_ids(), f"{len(set(ids) - fake.event_ids())} events not delivered"
    assert stored_files(storage) == []
    assert "Sending stored telemetry" in result.stdout
    delivery = monitor_of(application).health()["delivery"]
    assert delivery["resent"] >= len(ids) and delivery["rejected"] == 0
    assert result.stdout.endswith(f"sent {delivery['resent']} stored items, {batches} of {batches} batches; "
                                  "0 left in the outbox\n")
    # The drain's own POSTs to ingestion are not tracked as dependencies (no feedback loop).
    assert monitor_of(application).flush(10)
    own = f"127.0.0.1:{fake.port}"
    assert not [e for e in fake.of_type("RemoteDependencyData") if own in json.dumps(e)]
    assert stored_files(storage) == []


@pytest.mark.parametrize("outage, reason", [
    ("down", "connection refused (ConnectionError)"),
    ("unavailable", "HTTP 503"),
    ("throttle", "HTTP 429, Retry-After 1 s"),
    ("hang", "timed out (ReadTimeout)"),
])
def test_drain_fails_with_the_reason_and_keeps_everything(outage, reason, fake, make_app, tmp_path):
    storage = tmp_path / "outbox"
    fake.hang_seconds = 2.0
    application = make_app(azure_config(fake, storage))
    ids = store_during_outage(application, fake, mode=outage)
    batches = len(stored_files(storage))
    result = application.test_cli_runner().invoke(args=["telemetry", "drain", "--timeout", "30"])
    assert result.exit_code == 1, result.output
    message = result.stderr.strip()
    assert message.startswith("Error: ingestion did not accept a batch of events: ") and reason in message
    assert f"sent 0 stored items, 0 of {batches} batches; {batches} left in the outbox ({storage})" in message
    assert "\n" not in message
    assert stored_event_ids(storage) == set(ids), "a failed drain lost stored events"
    assert len(stored_files(storage)) == batches
    assert not (fake.event_ids() & set(ids))


def test_drain_in_a_new_process_sends_what_an_earlier_one_stored(fake, make_app, tmp_path):
    """What `flask telemetry drain` does after a server stopped mid-outage: a fresh app on the same storage."""
    storage = tmp_path / "outbox"
    first = make_app(azure_config(fake, storage, EXPORT_RETRY_INTERVAL="2"))
    ids = store_during_outage(first, fake)
    monitor_of(first).close(5)
    # The batches the first process leased until its next retry (2 s) are taken when the lease ends.
    assert any(path.endswith(".lock") for path in stored_files(storage))
    fake.start()
    second = make_app(azure_config(fake, storage))
    result = second.test_cli_runner().invoke(args=["telemetry", "drain"])
    assert result.exit_code == 0, result.output
    assert set(ids) <= fake.event_ids()
    assert wait_until(lambda: stored_files(storage) == [], 5)
    assert "; 0 left in the outbox" in result.stdout


def test_drain_with_an_empty_outbox(fake, make_app, tmp_path):
    application = make_app(azure_config(fake, tmp_path / "outbox"))
    result = application.test_cli_runner().invoke(args=["telemetry", "drain"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "the outbox is empty; nothing to drain\n"


def test_drain_in_local_mode_has_nothing_to_do(app, runner):
    result = runner.invoke(args=["telemetry", "drain"])
    assert result.exit_code == 0, result.output
    assert result.stdout == (f"local mode: telemetry is written straight to "
                             f"{monitor_of(app).settings.telemetry_db}; nothing to drain\n")
