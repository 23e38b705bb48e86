"""UsageMonitor in a developer's own Flask app (tests/host_app.py), in local and Azure mode, and its wrong uses."""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request

import pytest
from flask import Flask

import system_health
from app import UsageMonitor
from azure_monitor import logger
from config import ConfigError
from fake_ingestion import FakeIngestion
from host_app import BACKEND_URL, create_host
from logging_utils import log_event
from monitoring_utils import get_usage_stats
from telemetry import monitor_of
from usage_tracking import log_crud_activity, log_user_login

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def host(tmp_path, backend):
    """The host app in local mode."""
    application = create_host({"TELEMETRY_DB": str(tmp_path / "host.db"), "LOCAL_FLUSH_INTERVAL": "0.01",
                               BACKEND_URL: backend.url})
    yield application
    monitor_of(application).close()


def _exercise(client):
    """What the host's users do: two logins, an update, an outgoing call, log lines, an export, a 500."""
    assert client.post("/login/42").status_code == 200
    assert client.post("/login/43").status_code == 200
    assert client.put("/items/5").status_code == 200
    assert client.get("/fetch").get_json() == {"backend": 200}
    assert client.get("/log").status_code == 200
    assert client.get("/export").status_code == 200
    assert client.get("/broken").status_code == 500
    crashed = client.get("/crash")
    assert crashed.status_code == 500 and crashed.mimetype == "text/html", "the host's own 500 page"


def _rows(app, sql):
    assert monitor_of(app).flush()
    with sqlite3.connect(monitor_of(app).settings.telemetry_db) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute(sql)]


def test_host_routes_trackers_dependencies_and_logger_in_local_mode(host, backend):
    client = host.test_client()
    _exercise(client)
    assert monitor_of(host).flush()
    report = client.get("/dashboard/usage?days=1").get_json()

    assert report["source"] == "local"
    assert report["users"]["logins"] == 2
    assert report["users"]["unique_users"] == 3  # 42 and 43 logged in; 7 updated
    assert report["crud"]["by_action"] == {"create": 0, "read": 0, "update": 1, "delete": 0}
    assert report["crud"]["by_entity"] == [{"entity": "item", "create": 0, "read": 0, "update": 1, "delete": 0}]
    operations = {op["name"]: op for op in report["requests"]["top_operations"]}
    assert operations["POST /login/<int:user_id>"]["count"] == 2
    assert operations["PUT /items/<int:item_id>"]["count"] == 1
    assert operations["GET /broken"]["failed"] == 1, "the host's own 5xx is a failure"
    assert operations["GET /crash"]["failed"] == 1, "an exception in a host route is tracked too"
    assert report["requests"]["failed"] == 2
    targets = {(t["type"], t["target"]): t for t in report["dependencies"]["top_targets"]}
    assert targets[("HTTP", backend.netloc)]["count"] == 1
    assert {e["name"] for e in report["events"]["top"]} == {"UserLogin", "CrudActivity", "ReportExported"}

    logins = _rows(host, "SELECT user_id FROM events WHERE name = 'UserLogin' ORDER BY user_id")
    assert [r["user_id"] for r in logins] == ["42", "43"], "an int id is stored as its decimal string"
    request_users = _rows(host, "SELECT name, user_id FROM requests WHERE name LIKE 'P%' ORDER BY id")
    assert [(r["name"], r["user_id"]) for r in request_users] == [
        ("POST /login/<int:user_id>", "42"), ("POST /login/<int:user_id>", "43"), ("PUT /items/<int:item_id>", "7")
    ], "a request that records a user's login or activity is that user's request"

    traces = _rows(host, "SELECT * FROM traces ORDER BY id")
    assert [(t["message"], t["severity_level"], t["level"]) for t in traces] == [
        ("cache warmed", 1, "INFO"), ("disk almost full", 2, "WARNING"), ("export failed", 3, "ERROR")]
    assert json.loads(traces[0]["properties"]) == {"entries": "12", "region": "eu"}
    assert "ZeroDivisionError" in traces[2]["exception"]
    assert traces[0]["exception"] is None
    log_request = _rows(host, "SELECT operation_id FROM requests WHERE name = 'GET /log'")[0]
    assert {t["operation_id"] for t in traces} == {log_request["operation_id"]}, "traces join their request"


def test_logger_lines_also_reach_stderr_in_local_mode(tmp_path):
    code = ("import logging, sys; sys.path[:0] = ['.', 'tests']; logging.basicConfig(level='INFO'); "
            "from host_app import create_host; host = create_host(); "
            "host.test_client().get('/log'); print('ok')")
    env = dict(os.environ, TELEMETRY_DB=str(tmp_path / "t.db"))
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.stdout.strip() == "ok", result.stderr
    for line in ("INFO:usage_monitor:cache warmed", "WARNING:usage_monitor:disk almost full",
                 "ERROR:usage_monitor:export failed", "ZeroDivisionError"):
        assert line in result.stderr


def test_trace_log_level_filters_the_logger(tmp_path, backend):
    application = create_host({"TELEMETRY_DB": str(tmp_path / "w.db"), "TRACE_LOG_LEVEL": "warning",
                               BACKEND_URL: backend.url})
    try:
        application.test_client().get("/log")
        assert [t["level"] for t in _rows(application, "SELECT level FROM traces ORDER BY id")] == ["WARNING", "ERROR"]
    finally:
        monitor_of(application).close()
        logger.setLevel("INFO")


def test_seed_names_work_in_an_app_context_of_the_host(host):
    with host.app_context():
        assert log_user_login(9)
        assert log_crud_activity("DELETE", "9", "item")
        assert log_event("Exported", {"rows": 3})
        assert system_health.setup_metrics_exporter() is None, "local mode stores durations with each request"
        stats = get_usage_stats(days=1)
    assert monitor_of(host).flush()
    with host.app_context():
        stats = get_usage_stats(days=1)
    assert stats["users"]["logins"] == 1 and stats["crud"]["by_action"]["delete"] == 1


def test_init_app_later_and_settings_from_app_config_first(tmp_path, monkeypatch):
    monkeypatch.setenv("USAGE_TOP", "5")
    monkeypatch.setenv("TELEMETRY_DB", str(tmp_path / "env.db"))
    monitor = UsageMonitor()
    application = Flask("later")
    application.config["USAGE_TOP"] = 3
    monitor.init_app(application)
    assert monitor_of(application) is monitor
    assert monitor.settings.usage_top == 3, "app.config wins over the environment"
    assert monitor.settings.telemetry_db == str(tmp_path / "env.db"), "then the environment"
    with pytest.raises(RuntimeError, match="already has a UsageMonitor"):
        UsageMonitor(application)
    with pytest.raises(RuntimeError, match="one UsageMonitor per app"):
        monitor.init_app(Flask("other"))


def test_invalid_app_config_names_the_variable_and_hides_secrets():
    application = Flask("bad")
    application.config["USAGE_TOP"] = "lots"
    with pytest.raises(ConfigError, match="USAGE_TOP"):
        UsageMonitor(application)
    secret = "InstrumentationKey=not-a-guid-but-secret"
    application = Flask("bad2")
    application.config["APPLICATIONINSIGHTS_CONNECTION_STRING"] = secret
    with pytest.raises(ConfigError) as info:
        UsageMonitor(application)
    assert "APPLICATIONINSIGHTS_CONNECTION_STRING" in str(info.value)
    assert "not-a-guid-but-secret" not in str(info.value)


def test_our_routes_answer_json_and_the_host_keeps_its_own_pages(host):
    client = host.test_client()
    bad = client.post("/event", data="{", content_type="application/json")
    assert bad.status_code == 400 and bad.get_json()["error"]["field"] == "body"
    wrong_method = client.get("/event")
    assert wrong_method.status_code == 405 and wrong_method.get_json()["error"]["code"] == "method_not_allowed"
    too_big = client.post("/event", json={"event_name": "x", "details": {"v": "x" * 70000}})
    assert too_big.status_code == 413 and too_big.get_json()["error"]["field"] == "body"

    plain = Flask("plain")
    plain.add_url_rule("/login/<int:user_id>", view_func=lambda user_id: "", methods=["POST"])
    plain_client = plain.test_client()
    for path, method in (("/nothing-here", "get"), ("/login/1", "get")):
        theirs, ours = getattr(plain_client, method)(path), getattr(client, method)(path)
        assert ours.status_code == theirs.status_code
        assert ours.get_data() == theirs.get_data(), "the host's error page is unchanged"
        assert ours.mimetype == "text/html"
    assert "Cache-Control" not in client.put("/items/1").headers, "the host's responses keep their headers"
    # A large body on the host's own route is the host's business: our limit is for our routes only.
    assert client.put("/items/1", data="x" * 100000).status_code == 200


def test_routes_false_registers_only_the_hooks(tmp_path, backend):
    application = create_host({"TELEMETRY_DB": str(tmp_path / "h.db"), BACKEND_URL: backend.url}, routes=False)
    plain = Flask("plain")
    try:
        client = application.test_client()
        for path in ("/event", "/dashboard/usage", "/healthz", "/openapi.json"):
            response, theirs = client.get(path), plain.test_client().get(path)
            assert response.status_code == 404
            assert response.get_data() == theirs.get_data()
        client.post("/login/1")
        client.get("/fetch")
        assert {r["name"] for r in _rows(application, "SELECT name FROM requests")} == {
            "POST /login/<int:user_id>", "GET /fetch", "GET <unmatched>"}
        assert len(_rows(application, "SELECT * FROM dependencies")) == 1
        with application.app_context():
            assert get_usage_stats(1)["users"]["logins"] == 1
    finally:
        monitor_of(application).close()


_CALLS = {
    "log_user_login": lambda: log_user_login(1),
    "log_crud_activity": lambda: log_crud_activity("read", 1, "item"),
    "log_event": lambda: log_event("Clicked"),
    "get_usage_stats": lambda: get_usage_stats(),
    "setup_metrics_exporter": lambda: system_health.setup_metrics_exporter(),
}


@pytest.mark.parametrize("name", sorted(_CALLS))
def test_outside_an_app_context_says_what_to_do(name):
    with pytest.raises(RuntimeError) as info:
        _CALLS[name]()
    assert "with app.app_context():" in str(info.value)


@pytest.mark.parametrize("name", sorted(_CALLS))
def test_an_app_without_the_extension_says_what_to_do(name):
    with Flask("bare").app_context():
        with pytest.raises(RuntimeError) as info:
            _CALLS[name]()
    assert "UsageMonitor(app)" in str(info.value)


def test_setup_metrics_exporter_names_an_app_without_the_extension():
    with pytest.raises(RuntimeError, match="UsageMonitor"):
        system_health.setup_metrics_exporter(Flask("bare"))


def test_a_broken_store_never_breaks_the_host_and_event_answers_503(tmp_path, backend):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")  # the store's folder cannot be created: the sink fails to start
    application = create_host({"TELEMETRY_DB": str(blocker / "sub" / "t.db"), BACKEND_URL: backend.url})
    client = application.test_client()
    login = client.post("/login/5")
    assert login.status_code == 200 and login.get_json() == {"event_id": None}
    assert client.put("/items/1").status_code == 200
    assert client.get("/log").status_code == 200
    refused = client.post("/event", json={"event_name": "Clicked"})
    assert refused.status_code == 503
    assert refused.get_json()["error"]["code"] == "storage_unavailable"
    assert refused.headers["Retry-After"] == "5"
    failures = client.get("/healthz").get_json()["telemetry"]["record_failures"]
    assert failures["event"] == 3 and failures["request"] >= 4 and failures["trace"] == 3


# -- Azure mode, at the wire ------------------------------------------------------------------------

@pytest.fixture
def ingestion():
    fake = FakeIngestion().start()
    yield fake
    fake.stop()


def test_host_in_azure_mode_at_the_wire(ingestion, tmp_path, backend):
    application = create_host({
        "APPLICATIONINSIGHTS_CONNECTION_STRING": ingestion.connection_string, "DASHBOARD_AUTH": "off",
        "TELEMETRY_STORAGE": str(tmp_path / "outbox"), "EXPORT_INTERVAL": "0.05",
        "METRICS_EXPORT_INTERVAL": "3600", BACKEND_URL: backend.url})
    try:
        _exercise(application.test_client())
        exporter = system_health.setup_metrics_exporter(application)
        assert exporter is monitor_of(application).sink.metrics_exporter
        assert system_health.setup_metrics_exporter(application) is exporter, "idempotent"
        assert monitor_of(application).flush(10)
        ingestion.wait_for(lambda f: f.of_type("MetricData") and f.of_type("ExceptionData")
                           and len(f.of_type("MessageData")) >= 2 and len(f.of_type("EventData")) >= 4)

        events = {}
        for envelope in ingestion.of_type("EventData"):
            events.setdefault(envelope["data"]["baseData"]["name"], []).append(envelope)
        assert sorted(e["tags"]["ai.user.authUserId"] for e in events["UserLogin"]) == ["42", "43"]
        assert events["CrudActivity"][0]["tags"]["ai.user.authUserId"] == "7"
        assert events["CrudActivity"][0]["data"]["baseData"]["properties"]["action"] == "update"

        requests_by_name = {r["data"]["baseData"]["name"]: r["data"]["baseData"]
                            for r in ingestion.of_type("RequestData")}
        assert requests_by_name["PUT /items/<int:item_id>"]["success"] is True
        assert requests_by_name["GET /broken"]["success"] is False
        assert requests_by_name["GET /crash"]["success"] is False
        deps = [d["data"]["baseData"] for d in ingestion.of_type("RemoteDependencyData")]
        assert [d["target"] for d in deps] == [backend.netloc]

        messages = {m["data"]["baseData"]["message"]: m for m in ingestion.of_type("MessageData")}
        assert messages["cache warmed"]["data"]["baseData"]["severityLevel"] == 1
        assert messages["cache warmed"]["data"]["baseData"]["properties"]["region"] == "eu"
        assert messages["cache warmed"]["data"]["baseData"]["properties"]["entries"] == "12", "strings, as events"
        assert messages["disk almost full"]["data"]["baseData"]["severityLevel"] == 2
        log_operation = [r for r in ingestion.of_type("RequestData")
                         if r["data"]["baseData"]["name"] == "GET /log"][0]["tags"]["ai.operation.id"]
        assert messages["cache warmed"]["tags"]["ai.operation.id"] == log_operation
        exceptions = [e["data"]["baseData"] for e in ingestion.of_type("ExceptionData")]
        assert len(exceptions) == 1
        assert exceptions[0]["exceptions"][0]["typeName"] == "ZeroDivisionError"
        assert exceptions[0]["exceptions"][0]["message"].startswith("export failed")

        metric_names = {m["data"]["baseData"]["metrics"][0]["name"] for m in ingestion.of_type("MetricData")}
        assert metric_names == {"request_duration_ms", "request_count"}
        routes = {m["data"]["baseData"]["properties"]["route"] for m in ingestion.of_type("MetricData")}
        assert "/items/<int:item_id>" in routes
        feedback = [m for m in messages if "ingestion" in m.lower() or "queue" in m.lower()]
        assert not feedback, feedback
    finally:
        monitor_of(application).close()


# -- gunicorn.conf.py with any app that has the extension -----------------------------------------

def test_gunicorn_conf_starts_and_closes_the_host_app(tmp_path):
    db = tmp_path / "gunicorn.db"
    port = _free_port()
    env = dict(os.environ, TELEMETRY_DB=str(db), PORT=str(port), HOST="127.0.0.1", WEB_CONCURRENCY="1",
               PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    gunicorn = os.path.join(os.path.dirname(sys.executable), "gunicorn")
    proc = subprocess.Popen([gunicorn, "-c", "gunicorn.conf.py", "host_app:app"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/login/77", method="POST")
                assert urllib.request.urlopen(request, timeout=5).status == 200
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "gunicorn did not come up"
                time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "has no UsageMonitor" not in stderr
    with sqlite3.connect(db) as conn:  # worker_exit closed the monitor: the queued rows were written
        assert conn.execute("SELECT user_id FROM events WHERE name = 'UserLogin'").fetchall() == [("77",)]


def _free_port():
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
