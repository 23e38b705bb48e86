"""GET /dashboard/usage end to end in local mode: real requests, real trackers, real SQLite."""
import contextlib
import http.server
import sqlite3
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest
import requests
from flask import jsonify, request

from local_store import queries
from app import create_app
from local_store.schema import SCHEMA
from monitoring_utils import get_usage_stats
from usage_tracking import log_crud_activity, log_user_login
from telemetry import monitor_of

DAY = 86400


# -- helpers ---------------------------------------------------------------

def _flush(app):
    assert monitor_of(app).flush() is True


def _db(app):
    return sqlite3.connect(monitor_of(app).settings.telemetry_db)


@contextlib.contextmanager
def _writing(app):
    """A connection whose inserts are committed when the block ends."""
    conn = _db(app)
    try:
        with conn:
            yield conn
    finally:
        conn.close()


def _usage(client, days=None):
    url = "/dashboard/usage" if days is None else f"/dashboard/usage?days={days}"
    response = client.get(url)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


def _today():
    return datetime.now(timezone.utc).date()


def _utc_day(ts):
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d")


def _midnight(day):
    return datetime.combine(day, datetime.min.time(), timezone.utc).timestamp()


def _by_date(daily):
    return {entry["date"]: entry for entry in daily}


def _counts(entry):
    """A daily entry without its latency fields (requests.daily has avg_ms and p95_ms)."""
    return {k: v for k, v in entry.items() if k not in ("avg_ms", "p95_ms")}


def _assert_daily_shape(doc, days):
    """Every daily list: `days` consecutive dates ending today (UTC), zero-filled."""
    today = _today()
    expected = [(today - timedelta(days=days - 1 - i)).isoformat() for i in range(days)]
    latency = {"avg_ms", "p95_ms"}
    for daily, fields in ((doc["requests"]["daily"], {"date", "count", "failed"} | latency),
                          (doc["dependencies"]["daily"], {"date", "count", "failed", "p95_ms"}),
                          (doc["events"]["daily"], {"date", "count"}),
                          (doc["users"]["daily_active"], {"date", "users"})):
        assert [entry["date"] for entry in daily] == expected
        for entry in daily:
            assert set(entry) == fields
            assert all(isinstance(entry[f], int) and entry[f] >= 0 for f in fields - {"date"} - latency)
    for entry in doc["requests"]["daily"]:  # latencies: null exactly on the days without requests
        for f in latency:
            assert (entry[f] is None) == (entry["count"] == 0)
            assert entry[f] is None or (isinstance(entry[f], float) and entry[f] >= 0)


def _assert_envelope(doc, days):
    assert doc["source"] == "local"
    generated = datetime.fromisoformat(doc["generated_at"])
    assert generated.tzinfo is not None and generated.utcoffset() == timedelta(0)
    assert doc["generated_at"].endswith("Z")
    assert abs((datetime.now(timezone.utc) - generated).total_seconds()) < 3600
    span = doc["timespan"]
    assert span["days"] == days
    start = datetime.fromisoformat(span["start"])
    end = datetime.fromisoformat(span["end"])
    assert start == datetime.combine(_today() - timedelta(days=days - 1), datetime.min.time(), timezone.utc)
    assert start < end <= datetime.now(timezone.utc)
    _assert_daily_shape(doc, days)


def _ensure_schema(app):
    """Create the store's tables the way the writer does, without recording anything."""
    conn = _db(app)
    try:
        conn.executescript(SCHEMA)
    finally:
        conn.close()


def _insert_request(conn, ts, name="GET /old", status=200, duration_ms=10.0, user_id=""):
    conn.execute("INSERT INTO requests (ts, day, name, status, success, duration_ms, user_id, operation_id)"
                 " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                 (ts, _utc_day(ts), name, status, int(status < 500), duration_ms, user_id, uuid.uuid4().hex))


def _insert_event(conn, ts, name="OldEvent", user_id=""):
    event_id = str(uuid.uuid4())
    conn.execute("INSERT INTO events (event_id, ts, day, name, user_id, action, entity, operation_id,"
                 " properties) VALUES (?, ?, ?, ?, ?, NULL, NULL, '', ?)",
                 (event_id, ts, _utc_day(ts), name, user_id, '{"event_id":"%s"}' % event_id))


def _insert_dependency(conn, ts, target="old.example:443", success=True, type_="HTTP", duration_ms=5.0):
    conn.execute("INSERT INTO dependencies (ts, day, type, target, name, result_code, success, duration_ms,"
                 " operation_id) VALUES (?, ?, ?, ?, 'GET /', ?, ?, ?, '')",
                 (ts, _utc_day(ts), type_, target, "200" if success else "500", int(success), duration_ms))


# -- the whole picture ----------------------------------------------------

def test_dashboard_counts_everything_exactly(app, client):
    @app.get("/boom")
    def boom():
        raise RuntimeError("deliberate failure for the dashboard test")

    # 6 custom events through the API: 6 requests "POST /event" answered 202.
    for name, times in (("ReportExported", 3), ("PageViewed", 2), ("Search", 1)):
        for i in range(times):
            assert client.post("/event", json={"event_name": name, "details": {"i": i}}).status_code == 202
    # Audit events from server code: 4 logins by 3 users, 6 CRUD operations. No requests.
    with app.test_request_context():
        for user in ("alice", "alice", "bob", "carol"):
            log_user_login(user)
        for action, user, entity in (("Create", "alice", "invoice"), ("update", "alice", "invoice"),
                                     ("READ", "bob", "customer"), ("delete", "bob", "invoice"),
                                     ("create", "carol", "customer"), ("read", "carol", "invoice")):
            log_crud_activity(action, user, entity)
    # One 422 (not stored as an event), one 404, one 500; /healthz is never recorded.
    assert client.post("/event", json={"event_name": ""}).status_code == 422
    assert client.get("/no/such/page").status_code == 404
    assert client.get("/boom").status_code == 500
    assert client.get("/healthz").status_code == 200
    _flush(app)
    # A first dashboard call sees the 9 requests so far; it is recorded only after its own response.
    assert _usage(client, 7)["requests"]["total"] == 9
    _flush(app)

    doc = _usage(client, 7)
    _assert_envelope(doc, 7)
    today = _today().isoformat()

    req = doc["requests"]
    # 6 + 1 POST /event, 1 GET <unmatched>, 1 GET /boom, 1 GET /dashboard/usage (the first call).
    assert req["total"] == 10
    assert req["failed"] == 1  # only 5xx fail; 4xx are the caller's fault
    assert [(op["name"], op["count"], op["failed"]) for op in req["top_operations"]] == [
        ("POST /event", 7, 0),
        ("GET /boom", 1, 1),
        ("GET /dashboard/usage", 1, 0),
        ("GET <unmatched>", 1, 0),
    ]
    assert all(op["p95_ms"] >= 0 for op in req["top_operations"])
    assert 0 <= req["p50_ms"] <= req["p95_ms"] <= req["p99_ms"]
    assert req["avg_ms"] > 0
    daily = _by_date(req["daily"])
    assert _counts(daily[today]) == {"date": today, "count": 10, "failed": 1}
    assert 0 < daily[today]["avg_ms"] == req["avg_ms"] and daily[today]["p95_ms"] == req["p95_ms"]
    assert sum(d["count"] for d in req["daily"]) == 10

    evt = doc["events"]
    assert evt["total"] == 6 + 4 + 6
    assert evt["top"] == [
        {"name": "CrudActivity", "count": 6, "users": 3},
        {"name": "UserLogin", "count": 4, "users": 3},
        {"name": "ReportExported", "count": 3, "users": 0},
        {"name": "PageViewed", "count": 2, "users": 0},
        {"name": "Search", "count": 1, "users": 0},
    ]
    assert _by_date(evt["daily"])[today]["count"] == 16
    assert sum(d["count"] for d in evt["daily"]) == 16

    users = doc["users"]
    assert users["logins"] == 4
    assert users["unique_users"] == 3
    assert _by_date(users["daily_active"])[today]["users"] == 3
    assert sum(d["users"] for d in users["daily_active"]) == 3

    crud = doc["crud"]
    assert crud["total"] == 6
    assert crud["by_action"] == {"create": 2, "read": 2, "update": 1, "delete": 1}
    assert crud["by_entity"] == [
        {"entity": "invoice", "create": 1, "read": 1, "update": 1, "delete": 1},
        {"entity": "customer", "create": 1, "read": 1, "update": 0, "delete": 0},
    ]

    dep = doc["dependencies"]
    assert (dep["total"], dep["failed"], dep["avg_ms"], dep["top_targets"]) == (0, 0, None, [])


def test_dashboard_call_is_itself_recorded_after_it_answers(app, client):
    assert client.get("/nope").status_code == 404
    _flush(app)
    counts = []
    for _ in range(3):
        counts.append(_usage(client, 1)["requests"]["total"])
        _flush(app)
    assert counts == [1, 2, 3]


# -- the time window ------------------------------------------------------

def test_window_boundaries_and_daily_placement(app, client):
    assert client.get("/nope").status_code == 404  # starts the store: 1 request today
    _flush(app)
    today = _today()
    start7 = _midnight(today - timedelta(days=6))
    ten_days_ago = time.time() - 10 * DAY
    with _writing(app) as conn:
        for ts, user in ((start7, "edge_in"), (start7 - 1, "edge_out"), (ten_days_ago, "old")):
            _insert_request(conn, ts, status=503)
            _insert_event(conn, ts, user_id=user)
            _insert_dependency(conn, ts, success=False)

    week = _usage(client, 7)
    _assert_envelope(week, 7)
    first = (today - timedelta(days=6)).isoformat()
    # Only the row at exactly midnight six days ago is inside the 7-day window.
    assert week["requests"]["total"] == 2 and week["requests"]["failed"] == 1
    assert week["requests"]["daily"][0] == {"date": first, "count": 1, "failed": 1, "avg_ms": 10.0, "p95_ms": 10.0}
    assert _counts(week["requests"]["daily"][-1]) == {"date": today.isoformat(), "count": 1, "failed": 0}
    assert week["events"]["total"] == 1
    assert week["events"]["daily"][0] == {"date": first, "count": 1}
    assert week["events"]["top"] == [{"name": "OldEvent", "count": 1, "users": 1}]
    assert week["users"]["unique_users"] == 1
    assert week["users"]["daily_active"][0] == {"date": first, "users": 1}
    assert (week["dependencies"]["total"], week["dependencies"]["failed"]) == (1, 1)
    assert week["dependencies"]["daily"][0] == {"date": first, "count": 1, "failed": 1, "p95_ms": 5.0}
    assert sum(d["count"] for d in week["dependencies"]["daily"]) == 1
    _flush(app)

    month = _usage(client, 30)
    _assert_envelope(month, 30)
    edge_out_day = (today - timedelta(days=7)).isoformat()
    old_day = _utc_day(ten_days_ago)
    assert old_day == (today - timedelta(days=10)).isoformat()
    # /nope and the 7-day dashboard call today, plus all three inserted rows.
    assert month["requests"]["total"] == 5 and month["requests"]["failed"] == 3
    req_daily = _by_date(month["requests"]["daily"])
    assert _counts(req_daily[old_day]) == {"date": old_day, "count": 1, "failed": 1}
    assert _counts(req_daily[edge_out_day]) == {"date": edge_out_day, "count": 1, "failed": 1}
    assert _counts(req_daily[first]) == {"date": first, "count": 1, "failed": 1}
    assert req_daily[today.isoformat()]["count"] == 2
    assert sum(d["count"] for d in month["requests"]["daily"]) == 5
    assert month["events"]["total"] == 3
    assert _by_date(month["events"]["daily"])[old_day]["count"] == 1
    assert month["users"]["unique_users"] == 3
    assert _by_date(month["users"]["daily_active"])[old_day]["users"] == 1
    assert month["dependencies"]["total"] == 3
    assert _by_date(month["dependencies"]["daily"])[old_day] == {"date": old_day, "count": 1, "failed": 1,
                                                                 "p95_ms": 5.0}
    assert month["dependencies"]["top_targets"] == [
        {"type": "HTTP", "target": "old.example:443", "count": 3, "failed": 3, "avg_ms": 5.0, "p95_ms": 5.0}]


def test_rows_older_than_ninety_days_never_count(app, client):
    _ensure_schema(app)
    with _writing(app) as conn:
        _insert_request(conn, _midnight(_today() - timedelta(days=90)))
        _insert_request(conn, _midnight(_today() - timedelta(days=89)))
    doc = _usage(client, 90)
    _assert_envelope(doc, 90)
    assert doc["requests"]["total"] == 1
    assert doc["requests"]["daily"][0]["count"] == 1


# -- latency --------------------------------------------------------------

def test_percentiles_are_nearest_rank(app, client):
    _ensure_schema(app)
    now = time.time()
    with _writing(app) as conn:
        for ms in range(100, 0, -1):  # inserted out of order on purpose
            _insert_request(conn, now - ms / 1000.0, name="GET /timed", duration_ms=float(ms))
    req = _usage(client, 1)["requests"]
    assert req["total"] == 100
    assert (req["p50_ms"], req["p95_ms"], req["p99_ms"], req["avg_ms"]) == (50.0, 95.0, 99.0, 50.5)
    assert req["top_operations"] == [{"name": "GET /timed", "count": 100, "failed": 0, "p95_ms": 95.0}]


def test_percentiles_of_a_small_sample(app, client):
    _ensure_schema(app)
    now = time.time()
    with _writing(app) as conn:
        for ms in (10.0, 20.0, 30.0):
            _insert_request(conn, now - 0.001, name="GET /a", duration_ms=ms)
        _insert_request(conn, now - 0.001, name="GET /b", duration_ms=1000.0)
    req = _usage(client, 1)["requests"]
    # Overall 10, 20, 30, 1000: ranks ceil(2)=2, ceil(3.8)=4, ceil(3.96)=4.
    assert (req["p50_ms"], req["p95_ms"], req["p99_ms"], req["avg_ms"]) == (20.0, 1000.0, 1000.0, 265.0)
    # Per operation p95: /a -> rank ceil(2.85)=3 -> 30.
    assert req["top_operations"] == [{"name": "GET /a", "count": 3, "failed": 0, "p95_ms": 30.0},
                                     {"name": "GET /b", "count": 1, "failed": 0, "p95_ms": 1000.0}]


def test_daily_latency_is_exact_and_the_rollups_agree_with_the_raw_rows(app, monkeypatch):
    """requests.daily avg_ms/p95_ms per day: the same exact figures from the rollups and from raw SQL."""
    _ensure_schema(app)
    today = _today()
    seeded, other = today - timedelta(days=3), today - timedelta(days=1)
    with _writing(app) as conn:
        # 5, 10, ..., 100 ms: consecutive values differ by more than a histogram bucket (4.4 %).
        for i in range(20, 0, -1):
            _insert_request(conn, _midnight(seeded) + i, name="GET /a", duration_ms=5.0 * i,
                            status=503 if i == 7 else 200)
        for ms in (300.0, 7.0):
            _insert_request(conn, _midnight(other) + 60, name="GET /b", duration_ms=ms)
    paths = []
    real_raw = queries.raw_usage_rows
    monkeypatch.setattr(queries, "raw_usage_rows", lambda *a: paths.append("raw") or real_raw(*a))

    def daily():
        with app.app_context():  # no request: nothing else is recorded between the two reads
            return get_usage_stats(7)["requests"]["daily"]

    from_rollups = daily()
    with _writing(app) as conn:  # invalidate the rollups: the next read answers from the raw rows
        conn.execute("DELETE FROM store_meta WHERE key = 'rollups'")
    from_raw = daily()
    assert paths == ["raw"]

    by_date = _by_date(from_rollups)
    # 20 requests: mean 52.5; nearest rank ceil(0.95 * 20) = 19 -> 95 ms.
    assert by_date[seeded.isoformat()] == {"date": seeded.isoformat(), "count": 20, "failed": 1,
                                           "avg_ms": 52.5, "p95_ms": 95.0}
    # 2 requests: mean 153.5; rank ceil(1.9) = 2 -> 300 ms.
    assert by_date[other.isoformat()] == {"date": other.isoformat(), "count": 2, "failed": 0,
                                          "avg_ms": 153.5, "p95_ms": 300.0}
    empty = [d for d in from_rollups if d["date"] not in (seeded.isoformat(), other.isoformat())]
    assert len(empty) == 5 and all(d["avg_ms"] is None and d["p95_ms"] is None and d["count"] == 0
                                   for d in empty)
    assert from_raw == from_rollups


def test_dependency_p95_per_day_and_target_from_the_rollups_and_the_raw_rows_agree(app):
    """dependencies.daily[].p95_ms and top_targets[].p95_ms: exact, the same from the rollups and from raw SQL."""
    _ensure_schema(app)
    today = _today()
    seeded = today - timedelta(days=2)
    with _writing(app) as conn:
        for i in range(1, 21):  # SQL: 5, 10, ..., 100 ms; redis: 1 and 2 ms
            _insert_dependency(conn, _midnight(seeded) + i, target="db.sqlite", type_="SQL", duration_ms=5.0 * i)
        for ms in (1.0, 2.0):
            _insert_dependency(conn, _midnight(today) + 1, target="127.0.0.1:6379", type_="redis", duration_ms=ms)

    def dependencies():
        with app.app_context():
            return get_usage_stats(7)["dependencies"]

    from_rollups = dependencies()
    with _writing(app) as conn:  # invalidate the rollups: the next read answers from the raw rows
        conn.execute("DELETE FROM store_meta WHERE key = 'rollups'")
    from_raw = dependencies()
    daily = _by_date(from_rollups["daily"])
    assert daily[seeded.isoformat()]["p95_ms"] == 95.0  # rank ceil(0.95 * 20) = 19
    assert daily[today.isoformat()]["p95_ms"] == 2.0
    assert [(t["type"], t["target"], t["count"], t["p95_ms"]) for t in from_rollups["top_targets"]] == [
        ("SQL", "db.sqlite", 20, 95.0), ("redis", "127.0.0.1:6379", 2, 2.0)]
    assert from_raw["daily"] == from_rollups["daily"] and from_raw["top_targets"] == from_rollups["top_targets"]


def test_empty_store_reports_zeros_and_nulls(app, client):
    _ensure_schema(app)
    doc = _usage(client)
    _assert_envelope(doc, 30)
    req = doc["requests"]
    assert (req["total"], req["failed"], req["avg_ms"], req["p50_ms"], req["p95_ms"], req["p99_ms"]) == \
        (0, 0, None, None, None, None)
    assert req["top_operations"] == []
    assert all(d["count"] == 0 and d["failed"] == 0 for d in req["daily"])
    assert doc["events"] == {"total": 0, "daily": doc["events"]["daily"], "top": []}
    assert doc["users"]["logins"] == 0 and doc["users"]["unique_users"] == 0
    assert doc["crud"] == {"total": 0, "by_action": {"create": 0, "read": 0, "update": 0, "delete": 0},
                           "by_entity": []}


def test_dashboard_on_a_brand_new_store(app, client):
    """Regression: the first call used to answer 500 'no such table: requests' (nothing had created the schema)."""
    response = client.get("/dashboard/usage?days=7")
    assert response.status_code == 200, response.get_data(as_text=True)
    doc = response.get_json()
    _assert_envelope(doc, 7)
    assert doc["requests"]["total"] == 0 and doc["events"]["total"] == 0
    _flush(app)
    # The dashboard call itself is then recorded like any other request.
    ops = _usage(client, 7)["requests"]["top_operations"]
    assert [(op["name"], op["count"], op["failed"]) for op in ops] == [("GET /dashboard/usage", 1, 0)]


def test_usage_top_limits_the_top_lists_in_local_mode(tmp_path):
    application = create_app({"TESTING": True, "TELEMETRY_DB": str(tmp_path / "top.db"),
                              "LOCAL_FLUSH_INTERVAL": "0.01", "USAGE_TOP": "2"})
    try:
        client = application.test_client()
        for path in ("/a", "/b", "/c"):
            client.get(path)
        client.post("/event", json={"event_name": "One"})
        client.post("/event", json={"event_name": "Two"})
        client.post("/event", json={"event_name": "Three"})
        _flush(application)
        doc = _usage(client, 1)
        assert len(doc["requests"]["top_operations"]) == 2
        assert len(doc["events"]["top"]) == 2
    finally:
        monitor_of(application).close()


# -- dependencies -----------------------------------------------------------

class _Upstream(http.server.BaseHTTPRequestHandler):
    """200 for /ok, 500 for /fail, 404 otherwise."""

    def do_GET(self):
        status = {"/ok": 200, "/fail": 500}.get(self.path.split("?")[0], 404)
        body = b"upstream"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def upstream():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(10)


def test_outgoing_calls_are_dependencies(app, client, upstream):
    @app.get("/proxy")
    def proxy():
        response = requests.get(f"http://{upstream}/{request.args['to']}?secret=s3cr3t", timeout=10)
        return jsonify({"upstream_status": response.status_code})

    for to in ("ok", "fail", "ok"):
        response = client.get(f"/proxy?to={to}")
        assert response.status_code == 200
        assert response.get_json()["upstream_status"] == (200 if to == "ok" else 500)
    # Outside an app context a call is not a dependency of anything.
    assert requests.get(f"http://{upstream}/ok", timeout=10).status_code == 200
    _flush(app)

    doc = _usage(client, 7)
    dep = doc["dependencies"]
    assert (dep["total"], dep["failed"]) == (3, 1)
    assert len(dep["top_targets"]) == 1
    top = dep["top_targets"][0]
    assert {k: top[k] for k in ("type", "target", "count", "failed")} == \
        {"type": "HTTP", "target": upstream, "count": 3, "failed": 1}
    assert top["avg_ms"] > 0 and dep["avg_ms"] > 0 and top["p95_ms"] >= top["avg_ms"]
    assert _counts(_by_date(dep["daily"])[_today().isoformat()]) == {"date": _today().isoformat(), "count": 3,
                                                                     "failed": 1}
    assert _by_date(dep["daily"])[_today().isoformat()]["p95_ms"] == top["p95_ms"]
    assert doc["requests"]["top_operations"] == [
        {"name": "GET /proxy", "count": 3, "failed": 0, "p95_ms": doc["requests"]["top_operations"][0]["p95_ms"]}]

    conn = _db(app)
    try:
        deps = conn.execute("SELECT name, result_code, success, operation_id FROM dependencies ORDER BY ts").fetchall()
        ops = {row[0] for row in conn.execute("SELECT operation_id FROM requests WHERE name = 'GET /proxy'")}
    finally:
        conn.close()
    assert [(name, code, ok) for name, code, ok, _ in deps] == [("GET /ok", "200", 1), ("GET /fail", "500", 0),
                                                                ("GET /ok", "200", 1)]
    # Each dependency belongs to the request that made it.
    assert {op for *_, op in deps} == ops and len(ops) == 3


def test_unreachable_dependency_is_a_failure(app, client):
    with socket_closed_port() as port:
        @app.get("/down")
        def down():
            try:
                requests.get(f"http://127.0.0.1:{port}/x", timeout=5)
            except requests.ConnectionError:
                return jsonify({"reached": False})
            return jsonify({"reached": True})

        assert client.get("/down").get_json() == {"reached": False}
    _flush(app)
    conn = _db(app)
    try:
        rows = conn.execute("SELECT target, result_code, success FROM dependencies").fetchall()
    finally:
        conn.close()
    assert rows == [(f"127.0.0.1:{port}", "ConnectionError", 0)]


class socket_closed_port:
    """A 127.0.0.1 port nobody listens on (bound then closed)."""

    def __enter__(self):
        import socket
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        return self.port

    def __exit__(self, *exc):
        return False


# -- the days parameter -----------------------------------------------------

@pytest.mark.parametrize("value", ["0", "91", "-1", "abc", "7.5", "", "100", " 7", "1e1", "0x7"])
def test_bad_days_is_400_naming_days(client, value):
    response = client.get("/dashboard/usage", query_string={"days": value})
    text = response.get_data(as_text=True)
    assert "Traceback" not in text and "<html" not in text.lower()
    assert response.status_code == 400
    err = response.get_json()["error"]
    assert err["code"] == "invalid_parameter"
    assert err["field"] == "days" and "days" in err["message"]


@pytest.mark.parametrize("days", [1, 90])
def test_days_bounds_are_inclusive(app, client, days):
    _ensure_schema(app)
    doc = _usage(client, days)
    _assert_envelope(doc, days)


def test_days_defaults_to_thirty(app, client):
    _ensure_schema(app)
    doc = _usage(client)
    _assert_envelope(doc, 30)
    assert len(doc["requests"]["daily"]) == 30


def test_days_with_trailing_newline_is_refused(client):
    response = client.get("/dashboard/usage", query_string={"days": "7\n"})
    assert response.status_code == 400
