"""OpenTelemetry instrumentations through the bridge (otel_bridge): SQLAlchemy over SQLite, plain sqlite3,
httpx against a local server and a real redis-server become dependencies of the request that made them, in the
local store and as RemoteDependencyData at the fake ingestion endpoint."""
import os
import sqlite3
import subprocess
import sys
import uuid

import httpx
import pytest
import redis
import sqlalchemy
from flask import Flask, current_app, jsonify

import otel_bridge
from azure_monitor import logger
from app import UsageMonitor
from fake_ingestion import FakeIngestion
from telemetry import monitor_of
from test_limit_store import RedisServer
from test_production import _free_port

INSTRUMENT = ("sqlalchemy", "sqlite3", "httpx", "redis")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def instrumentations():
    """The instrumentations stay on for this module only (they wrap libraries process-wide)."""
    yield
    otel_bridge.uninstrument()


@pytest.fixture(scope="module")
def redis_port():
    """A real redis-server on a free port of 127.0.0.1."""
    server = RedisServer(_free_port())
    server.start()
    yield server.port
    server.close()


def create_db_host(config, tmp_path):
    """A host app whose routes query SQLite (SQLAlchemy and sqlite3), call out with httpx and use Redis."""
    host = Flask(__name__)
    host.config.update(config)
    UsageMonitor(host, routes=False, instrument=INSTRUMENT)
    db_path = str(tmp_path / "host-data.db")
    engine = sqlalchemy.create_engine(f"sqlite:///{db_path}")  # after UsageMonitor: instrumented
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text("CREATE TABLE IF NOT EXISTS users (id INTEGER PRIMARY KEY, password TEXT)"))

    @host.get("/alchemy")
    def alchemy():
        with engine.connect() as conn:
            return jsonify({"n": conn.execute(sqlalchemy.text("SELECT COUNT(*) FROM users")).scalar()})

    @host.get("/plain")
    def plain():
        conn = sqlite3.connect(db_path)
        try:
            cursor = conn.cursor()  # the instrumentation traces cursors (conn.execute is a C shortcut)
            cursor.execute("SELECT COUNT(*) FROM users")
            return jsonify({"n": cursor.fetchone()[0]})
        finally:
            conn.close()

    @host.get("/broken-query")
    def broken_query():
        conn = sqlite3.connect(db_path)
        try:
            conn.cursor().execute("SELECT * FROM no_such_table")
        except sqlite3.OperationalError:
            return jsonify({"failed": True})
        finally:
            conn.close()
        return jsonify({"failed": False})

    @host.get("/secret")
    def secret():
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text("UPDATE users SET password = 'hunter2-s3cr3t' WHERE id = 1"))
        return jsonify({"ok": True})

    @host.get("/call")
    def call():
        return jsonify({"status": httpx.get(f"{current_app.config['BACKEND']}/ok?sig=secret", timeout=5).status_code})

    @host.get("/cache")
    def cache():
        client = redis.Redis(host="127.0.0.1", port=current_app.config["REDIS_PORT"], socket_timeout=5)
        client.set("greeting", "hello")
        logger.warning("cache written")  # a log record inside the request: it carries the operation id
        return jsonify({"value": client.get("greeting").decode()})

    return host


def _operation(client, path):
    """Serve `path` under a caller's traceparent; returns the operation id and the caller's span id."""
    operation_id, caller_span = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    response = client.get(path, headers={"traceparent": f"00-{operation_id}-{caller_span}-01"})
    assert response.status_code == 200, response.data
    return operation_id


def _rows(app, sql, *params):
    assert monitor_of(app).flush()
    with sqlite3.connect(monitor_of(app).settings.telemetry_db) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute(sql, params)]


@pytest.fixture
def local_host(tmp_path, backend, redis_port):
    """The host in local mode."""
    host = create_db_host({"TELEMETRY_DB": str(tmp_path / "telemetry.db"), "LOCAL_FLUSH_INTERVAL": "0.01",
                           "BACKEND": backend.url, "REDIS_PORT": redis_port}, tmp_path)
    yield host
    monitor_of(host).close()


def test_each_library_call_is_a_dependency_of_its_request_in_the_local_store(local_host, backend):
    client = local_host.test_client()
    ops = {path: _operation(client, path) for path in ("/alchemy", "/plain", "/call", "/cache", "/broken-query")}
    rows = _rows(local_host, "SELECT type, target, name, success, result_code, operation_id FROM dependencies")
    by_op = {}
    for row in rows:
        by_op.setdefault(row["operation_id"], []).append(row)
    alchemy = by_op[ops["/alchemy"]]
    assert {r["type"] for r in alchemy} == {"SQL"} and any("SELECT" in r["name"] for r in alchemy), alchemy
    plain = by_op[ops["/plain"]]
    assert [(r["type"], r["success"]) for r in plain] == [("SQL", 1)], plain
    call = by_op[ops["/call"]]
    assert [(r["type"], r["target"], r["name"], r["success"]) for r in call] == \
        [("HTTP", backend.netloc, "GET /ok", 1)], call
    cache = by_op[ops["/cache"]]
    assert {r["type"] for r in cache} == {"redis"} and len(cache) == 2, cache
    traces = _rows(local_host, "SELECT operation_id FROM traces WHERE message = 'cache written'")
    assert traces == [{"operation_id": ops["/cache"]}], "a log record inside the request carries its operation id"
    assert all(r["target"].startswith("127.0.0.1") for r in cache), cache
    broken = by_op[ops["/broken-query"]]
    assert [(r["type"], r["success"], r["result_code"]) for r in broken] == [("SQL", 0, "sqlite3.OperationalError")], broken
    # The telemetry store's own SQL never shows up: every dependency belongs to one of the requests.
    assert set(by_op) <= set(ops.values()), by_op.keys()


def test_httpx_sends_the_requests_operation_downstream(local_host, backend):
    operation_id = _operation(local_host.test_client(), "/call")
    assert backend.traceparents[-1].split("-")[1] == operation_id


def test_no_spans_outside_a_monitored_app(tmp_path, local_host):
    monitor_of(local_host).start()
    conn = sqlite3.connect(str(tmp_path / "x.db"))
    conn.cursor().execute("SELECT 1").fetchone()
    conn.close()
    assert _rows(local_host, "SELECT COUNT(*) AS n FROM dependencies") == [{"n": 0}]


@pytest.fixture
def ingestion():
    """A fake ingestion endpoint."""
    fake = FakeIngestion().start()
    yield fake
    fake.stop()


@pytest.fixture
def azure_host(tmp_path, backend, redis_port, ingestion):
    """The host in Azure mode, sending to the fake ingestion endpoint."""
    host = create_db_host({"TESTING": True, "APPLICATIONINSIGHTS_CONNECTION_STRING": ingestion.connection_string,
                           "TELEMETRY_STORAGE": str(tmp_path / "outbox"), "EXPORT_INTERVAL": "0.05",
                           "METRICS_EXPORT_INTERVAL": "3600", "DASHBOARD_AUTH": "off",
                           "BACKEND": backend.url, "REDIS_PORT": redis_port}, tmp_path)
    yield host
    monitor_of(host).close()


def test_dependencies_arrive_as_remote_dependency_data_under_their_request(azure_host, ingestion, backend):
    client = azure_host.test_client()
    ops = {path: _operation(client, path) for path in ("/alchemy", "/plain", "/call", "/cache", "/broken-query",
                                                       "/secret")}
    assert monitor_of(azure_host).flush(10)
    deps = ingestion.wait_for(lambda f: len(f.of_type("RemoteDependencyData")) >= 7 and f.of_type("RemoteDependencyData"))
    requests_ = {r["tags"]["ai.operation.id"]: r["data"]["baseData"]["id"] for r in ingestion.of_type("RequestData")}
    by_op = {}
    for dep in deps:
        op = dep["tags"]["ai.operation.id"]
        by_op.setdefault(op, []).append((dep["tags"]["ai.operation.parentId"], dep["data"]["baseData"]))
    ids = {data["id"] for deps_ in by_op.values() for _parent, data in deps_}
    for path, op in ops.items():
        assert op in by_op, path
        for parent, data in by_op[op]:  # each under its request, or under another span of the same request
            assert parent == requests_[op] or parent in ids, (path, parent)
    [(_, plain)] = by_op[ops["/plain"]]
    assert (plain["type"], plain["success"], plain["data"]) == ("SQL", True, "SELECT COUNT(*) FROM users")
    assert plain["target"].endswith("host-data.db") or plain["target"], plain
    [(_, call)] = by_op[ops["/call"]]
    assert (call["type"], call["target"], call["name"], call["resultCode"], call["success"], call["data"]) == \
        ("HTTP", backend.netloc, "GET /ok", "200", True, f"{backend.url}/ok")
    cache = [data for _parent, data in by_op[ops["/cache"]]]
    assert {d["type"] for d in cache} == {"redis"} and all(d["success"] for d in cache), cache
    [(_, broken)] = by_op[ops["/broken-query"]]
    assert (broken["type"], broken["success"]) == ("SQL", False), broken
    messages = ingestion.wait_for(lambda f: [m for m in f.of_type("MessageData")
                                             if m["data"]["baseData"]["message"] == "cache written"])
    assert [m["tags"]["ai.operation.id"] for m in messages] == [ops["/cache"]]
    secret = [data for _parent, data in by_op[ops["/secret"]] if "UPDATE" in data["data"]]
    assert secret and all("hunter2" not in d["data"] and "[REDACTED]" in d["data"] for d in secret), secret


def test_unknown_instrumentation_is_refused(tmp_path):
    from config import ConfigError
    with pytest.raises(ConfigError, match="unknown instrumentation"):
        UsageMonitor(Flask(__name__), instrument=("sqlalchemy", "mysqlx"))


def test_the_setting_names_the_instrumentations_and_one_not_installed_is_skipped_with_a_warning(tmp_path, caplog):
    host = Flask(__name__)
    host.config.update({"TELEMETRY_DB": str(tmp_path / "t.db"), "OTEL_INSTRUMENT": "sqlite3, psycopg"})
    monitor = UsageMonitor(host, routes=False)
    assert "sqlite3" in monitor.instrumented and "psycopg" not in monitor.instrumented
    assert any("opentelemetry-instrumentation-psycopg is not installed" in r.getMessage() for r in caplog.records)


def test_a_statement_naming_a_redaction_word_loses_its_literals():
    from security import redact_statement
    keys = ("password", "token")
    assert redact_statement("UPDATE users SET password = 'hunter2' WHERE name = 'o''brien'", keys) == \
        "UPDATE users SET password = '[REDACTED]' WHERE name = '[REDACTED]'"
    assert redact_statement("SELECT * FROM users WHERE name = 'bob'", keys) == "SELECT * FROM users WHERE name = 'bob'"
    assert redact_statement("SELECT token FROM t WHERE id = ?", keys) == "SELECT token FROM t WHERE id = ?"


def test_without_instrumentations_the_bridge_loads_nothing(tmp_path):
    code = ("import sys; from flask import Flask; from app import UsageMonitor; host = Flask('h');"
            f" host.config['TELEMETRY_DB'] = {str(tmp_path / 't.db')!r}; monitor = UsageMonitor(host);"
            " print(monitor.instrumented, sorted(m for m in sys.modules if m.startswith('opentelemetry.sdk')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "OTEL_INSTRUMENT": ""}, check=True).stdout
    assert out.strip() == "[] []"
