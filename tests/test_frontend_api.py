"""The frontend's door at the API: text/plain beacons, POST /events, client event fields, traceparent,
CORS details and the refusal of invisible characters (the real browser is in test_browser.py)."""
import json
import sqlite3
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest
import requests

from app import create_app
from fake_ingestion import FakeIngestion
from local_store.connection import connect
from local_store.queries import raw_usage_rows, rollup_usage_rows
from local_store.rows import utc_day
from telemetry import monitor_of

KEY = "browser-key-1"
TRACE, PARENT = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


@pytest.fixture
def keyed(tmp_path):
    """A local-mode app with an API key and a CORS origin, as a browser-facing deployment has."""
    application = create_app({"TESTING": True, "TELEMETRY_DB": str(tmp_path / "t.db"), "LOCAL_FLUSH_INTERVAL": "0.01",
                              "EVENT_API_KEYS": KEY, "CORS_ORIGINS": "http://shop.example"})
    yield application
    monitor_of(application).close()


def _events(app):
    assert monitor_of(app).flush()
    with sqlite3.connect(monitor_of(app).settings.telemetry_db) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT * FROM events ORDER BY ts, name")]


def _iso(dt):
    return dt.isoformat().replace("+00:00", "Z")


# -- text/plain and the key in the body -------------------------------------------------------------

@pytest.mark.parametrize("content_type", ["text/plain", "text/plain;charset=UTF-8"])
def test_a_beacon_body_sent_as_text_plain_is_recorded(keyed, content_type):
    body = json.dumps({"event_name": "Unload", "details": {"page": "/cart"}, "api_key": KEY})
    response = keyed.test_client().post("/event", data=body, content_type=content_type)
    assert response.status_code == 202, response.get_json()
    [event] = _events(keyed)
    assert event["name"] == "Unload"
    assert "api_key" not in json.loads(event["properties"]), "the key is never stored"


def test_text_plain_gets_the_same_validation(keyed):
    response = keyed.test_client().post("/event", data='{"event_name": "", "api_key": "%s"}' % KEY,
                                        content_type="text/plain")
    assert response.status_code == 422 and response.get_json()["error"]["field"] == "event_name"
    response = keyed.test_client().post("/event", data="not json", content_type="text/plain")
    assert response.status_code == 400 and response.get_json()["error"]["field"] == "body"


def test_the_header_key_wins_over_the_body_key(keyed):
    client = keyed.test_client()
    assert client.post("/event", json={"event_name": "A", "api_key": KEY}).status_code == 202
    assert client.post("/event", json={"event_name": "B", "api_key": "wrong"}, headers={"X-Api-Key": KEY}
                       ).status_code == 202
    refused = client.post("/event", json={"event_name": "C", "api_key": KEY}, headers={"X-Api-Key": "wrong"})
    assert refused.status_code == 401 and refused.get_json()["error"]["code"] == "unauthorized"
    assert client.post("/event", json={"event_name": "D"}).status_code == 401
    assert [e["name"] for e in _events(keyed)] == ["A", "B"]


# -- POST /events ---------------------------------------------------------------------------------

def test_a_batch_is_accepted_item_by_item(keyed):
    response = keyed.test_client().post("/events", data=json.dumps({"api_key": KEY, "events": [
        {"event_name": "First", "details": {"n": 1}},
        {"event_name": "", "details": {}},
        {"event_name": "Third", "details": {"nested": {"x": 1}}},
        "not an object",
        {"event_name": "Fifth"},
    ]}), content_type="text/plain")
    assert response.status_code == 202
    body = response.get_json()
    assert body["status"] == "accepted" and body["accepted"] == 2
    ids = body["event_ids"]
    assert len(ids) == 5 and ids[1] is None and ids[2] is None and ids[3] is None
    assert [(e["index"], e["code"], e["field"]) for e in body["errors"]] == [
        (1, "validation_error", "events[1].event_name"), (2, "validation_error", "events[2].details.nested"),
        (3, "validation_error", "events[3]")]
    assert all(e["message"].startswith(e["field"] + ": ") for e in body["errors"])
    stored = _events(keyed)
    assert {e["name"]: e["event_id"] for e in stored} == {"First": ids[0], "Fifth": ids[4]}


def test_a_batch_with_no_valid_item_is_422_listing_each(keyed):
    response = keyed.test_client().post("/events", json={"api_key": KEY, "events": [{"event_name": ""}, {}]})
    assert response.status_code == 422
    error = response.get_json()["error"]
    assert error["code"] == "validation_error" and error["field"] == "events[0].event_name"
    assert [e["index"] for e in error["errors"]] == [0, 1]
    assert _events(keyed) == []


@pytest.mark.parametrize("body, field", [
    ({"events": []}, "events"),
    ({"events": {"event_name": "x"}}, "events"),
    ({}, "events"),
    ({"events": [{"event_name": "x"}], "extra": 1}, "extra"),
])
def test_a_malformed_batch_names_the_field(keyed, body, field):
    response = keyed.test_client().post("/events", json=dict(body, api_key=KEY))
    assert response.status_code == 422
    assert response.get_json()["error"]["field"] == field


def test_batch_limits(tmp_path):
    application = create_app({"TESTING": True, "TELEMETRY_DB": str(tmp_path / "l.db"),
                              "MAX_BATCH_EVENTS": "3", "MAX_BATCH_BYTES": "2048"})
    client = application.test_client()
    try:
        at_limit = client.post("/events", json={"events": [{"event_name": f"E{i}"} for i in range(3)]})
        assert at_limit.status_code == 202 and at_limit.get_json()["accepted"] == 3
        over = client.post("/events", json={"events": [{"event_name": f"E{i}"} for i in range(4)]})
        assert over.status_code == 422
        assert over.get_json()["error"]["field"] == "events" and "MAX_BATCH_EVENTS" in over.get_json()["error"]["message"]
        big = client.post("/events", json={"events": [{"event_name": "x", "details": {"v": "y" * 3000}}]})
        assert big.status_code == 413 and "MAX_BATCH_BYTES" in big.get_json()["error"]["message"]
        assert client.post("/events", data=b"{}", content_type="application/xml").status_code == 415
    finally:
        monitor_of(application).close()


def test_batch_needs_the_key(keyed):
    assert keyed.test_client().post("/events", json={"events": [{"event_name": "x"}]}).status_code == 401


# -- client fields ----------------------------------------------------------------------------------

def test_a_client_event_id_is_stored_once_however_often_it_is_sent(keyed):
    client = keyed.test_client()
    event_id = str(uuid.uuid4())
    for _ in range(3):  # retries: no timestamp, so each arrives with another server time
        response = client.post("/event", json={"event_name": "Paid", "event_id": event_id.upper(), "api_key": KEY})
        assert response.get_json()["event_id"] == event_id
        time.sleep(0.002)
    batch = client.post("/events", json={"api_key": KEY, "events": [
        {"event_name": "Paid", "event_id": event_id}, {"event_name": "Paid", "event_id": event_id}]})
    assert batch.get_json()["event_ids"] == [event_id, event_id]
    assert [e["event_id"] for e in _events(keyed)] == [event_id]
    assert keyed.test_client().get("/dashboard/usage?days=1").get_json()["events"]["total"] == 1


@pytest.mark.parametrize("event_id", ["not-a-uuid", "00000000-0000-0000-0000-000000000000",
                                      "6ba7b810-9dad-11d1-80b4-00c04fd430c8"])
def test_a_client_event_id_must_be_a_random_uuid(keyed, event_id):
    response = keyed.test_client().post("/event", json={"event_name": "x", "event_id": event_id, "api_key": KEY})
    assert response.status_code == 422 and response.get_json()["error"]["field"] == "event_id"


def test_timestamp_bounds_and_the_stored_time(keyed):
    client = keyed.test_client()
    now = datetime.now(timezone.utc)
    accepted = {"past": now - timedelta(hours=47, minutes=59), "ahead": now + timedelta(minutes=4)}
    for name, when in accepted.items():
        response = client.post("/event", json={"event_name": name, "timestamp": _iso(when), "api_key": KEY})
        assert response.status_code == 202, response.get_json()
    offset = now.astimezone(timezone(timedelta(hours=-5))).isoformat()
    assert client.post("/event", json={"event_name": "offset", "timestamp": offset, "api_key": KEY}).status_code == 202
    for bad in (_iso(now - timedelta(hours=48, minutes=1)), _iso(now + timedelta(minutes=6)),
                now.replace(tzinfo=None).isoformat(), "yesterday", "2026-13-01T00:00:00Z"):
        response = client.post("/event", json={"event_name": "x", "timestamp": bad, "api_key": KEY})
        assert response.status_code == 422, bad
        assert response.get_json()["error"]["field"] == "timestamp"
    stored = {e["name"]: e for e in _events(keyed)}
    assert stored["past"]["ts"] == pytest.approx(accepted["past"].timestamp(), abs=1e-3)
    assert stored["past"]["day"] == accepted["past"].strftime("%Y-%m-%d"), "an offline event lands on its own day"
    assert stored["offset"]["ts"] == pytest.approx(now.timestamp(), abs=1e-3)


@pytest.mark.parametrize("clock_error", [timedelta(hours=1), -timedelta(hours=1), timedelta(days=3)])
def test_sent_at_corrects_a_client_clock_that_is_wrong(keyed, clock_error):
    """Segment's and PostHog's rule: each timestamp is shifted by the server's clock minus the client's sent_at."""
    client = keyed.test_client()
    now = datetime.now(timezone.utc)
    browser = now + clock_error  # what the wrong clock reads now
    happened = {"single": timedelta(minutes=10), "first": timedelta(hours=30), "second": timedelta(seconds=5)}
    response = client.post("/event", json={"event_name": "single", "api_key": KEY, "sent_at": _iso(browser),
                                           "timestamp": _iso(browser - happened["single"])})
    assert response.status_code == 202, response.get_json()
    batch = {"api_key": KEY, "sent_at": _iso(browser), "events": [
        {"event_name": "first", "timestamp": _iso(browser - happened["first"])},
        {"event_name": "second", "timestamp": _iso(browser - happened["second"])}]}
    response = client.post("/events", json=batch)
    assert response.status_code == 202 and response.get_json()["accepted"] == 2, response.get_json()
    stored = {e["name"]: e["ts"] for e in _events(keyed)}
    for name, ago in happened.items():  # within the time the request took
        assert stored[name] == pytest.approx((now - ago).timestamp(), abs=2.0), name
    # Without sent_at, the same wrong clock is refused beyond the window (or believed within it).
    response = client.post("/event", json={"event_name": "x", "api_key": KEY, "timestamp": _iso(browser)})
    assert response.status_code == (202 if clock_error < timedelta(0) else 422)


def test_a_client_clock_within_2_s_is_believed(keyed):
    """The difference left is the request's transit time: the client's timestamp is stored as it is."""
    now = datetime.now(timezone.utc)
    when = now - timedelta(minutes=3)
    response = keyed.test_client().post("/event", json={"event_name": "close", "api_key": KEY, "timestamp": _iso(when),
                                                        "sent_at": _iso(now - timedelta(seconds=1.5))})
    assert response.status_code == 202
    [event] = _events(keyed)
    assert event["ts"] == pytest.approx(when.timestamp(), abs=1e-3)


def test_a_malformed_sent_at_is_a_422_naming_it(keyed):
    client = keyed.test_client()
    for bad in ("yesterday", "2026-12-04T10:00:00", 12):
        for path, body in (("/event", {"event_name": "x", "sent_at": bad}),
                           ("/events", {"events": [{"event_name": "x"}], "sent_at": bad}),
                           ("/events", {"events": [{"event_name": "x", "sent_at": bad}]})):
            response = client.post(path, json=dict(body, api_key=KEY))
            assert response.status_code == 422, (path, bad)
            assert response.get_json()["error"]["field"] in ("sent_at", "events[0].sent_at"), response.get_json()


def test_anonymous_visitors_and_sessions_are_counted(keyed):
    client = keyed.test_client()
    events = [{"event_name": "View", "anonymous_id": anon, "session_id": session}
              for anon, session in (("a1", "s1"), ("a1", "s1"), ("a1", "s2"), ("a2", "s3"))] + [{"event_name": "View"}]
    assert client.post("/events", json={"api_key": KEY, "events": events}).get_json()["accepted"] == 5
    _events(keyed)
    users = client.get("/dashboard/usage?days=7").get_json()["users"]
    assert (users["anonymous"], users["sessions"]) == (2, 3)
    # The exact path over raw rows (any window) agrees with the rollups (whole days).
    conn = connect(monitor_of(keyed).settings.telemetry_db)
    try:
        now = time.time()
        day0 = now - now % 86400
        raw = {r["section"]: r["users"] for r in raw_usage_rows(conn, day0, now + 1, 10)}
        rolled = {r["section"]: r["users"] for r in rollup_usage_rows(
            conn, utc_day(day0), utc_day(now), 10)}
    finally:
        conn.close()
    assert raw["anonymous_summary"] == rolled["anonymous_summary"] == 2
    assert raw["session_summary"] == rolled["session_summary"] == 3


# -- invisible and direction-changing characters -------------------------------------------------

HIDDEN = ["\u200b", "\u200c", "\u200d", "\u200e", "\u200f", "\u202a", "\u202b", "\u202c", "\u202d", "\u202e",
          "\u2060", "\u2064", "\u2066", "\u2069", "\ufeff", "\u0085", "\u2028", "\u2029"]


@pytest.mark.parametrize("char", HIDDEN, ids=[f"U+{ord(c):04X}" for c in HIDDEN])
def test_hidden_characters_are_refused_naming_the_field(keyed, char):
    client = keyed.test_client()
    for body, field in (({"event_name": f"{char}gnp.exe"}, "event_name"),
                        ({"event_name": "ok", "details": {f"k{char}": "v"}}, "details"),
                        ({"event_name": "ok", "anonymous_id": f"a{char}"}, "anonymous_id")):
        response = client.post("/event", json=dict(body, api_key=KEY))
        assert response.status_code == 422, (body, response.get_json())
        error = response.get_json()["error"]
        assert error["field"] == field
        assert "invisible" in error["message"]
    assert _events(keyed) == []


def test_visible_unicode_is_still_welcome(keyed):
    response = keyed.test_client().post("/event", json={"event_name": "Bestellung aufgegeben ✓ 注文",
                                                        "details": {"Größe": "groß"}, "api_key": KEY})
    assert response.status_code == 202


# -- CORS details ---------------------------------------------------------------------------------

def test_cors_preflight_lists_only_the_routes_methods_and_exposes_retry_after(keyed):
    client = keyed.test_client()
    preflight = client.options("/events", headers={
        "Origin": "http://shop.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, traceparent"})
    assert preflight.headers["Access-Control-Allow-Origin"] == "http://shop.example"
    assert {m.strip() for m in preflight.headers["Access-Control-Allow-Methods"].split(",")} == {"POST"}
    assert "traceparent" in preflight.headers["Access-Control-Allow-Headers"].lower()
    assert preflight.headers["Access-Control-Max-Age"] == "600"
    assert preflight.headers["Access-Control-Allow-Credentials"] == "true", "a JSON Blob beacon carries credentials"
    dashboard = client.options("/dashboard/usage", headers={
        "Origin": "http://shop.example", "Access-Control-Request-Method": "GET"})
    assert {m.strip() for m in dashboard.headers["Access-Control-Allow-Methods"].split(",")} == {"GET"}
    assert "Access-Control-Allow-Credentials" not in dashboard.headers, "the dashboard takes a bearer token only"
    posted = client.post("/events", json={"api_key": KEY, "events": [{"event_name": "x"}]},
                         headers={"Origin": "http://shop.example"})
    assert posted.headers["Access-Control-Expose-Headers"] == "Retry-After"
    other = client.options("/events", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert "Access-Control-Allow-Origin" not in other.headers


def test_a_credentialed_json_beacon_is_allowed_and_no_cookie_is_read(keyed, monkeypatch):
    """sendBeacon(url, Blob application/json): a preflight, then a POST with the site's cookies."""
    import flask
    read = []
    monkeypatch.setattr(flask.Request, "cookies", property(lambda self: read.append(self.path) or {}))
    client = keyed.test_client()
    origin = {"Origin": "http://shop.example", "Cookie": "session=secret; ai_user=abc"}
    for path, body in (("/event", {"event_name": "Blob", "api_key": KEY}),
                       ("/events", {"events": [{"event_name": "Blob"}], "api_key": KEY})):
        preflight = client.options(path, headers={**origin, "Access-Control-Request-Method": "POST",
                                                  "Access-Control-Request-Headers": "content-type"})
        assert preflight.headers["Access-Control-Allow-Origin"] == "http://shop.example"
        assert preflight.headers["Access-Control-Allow-Credentials"] == "true"
        posted = client.post(path, json=body, headers=origin)
        assert posted.status_code == 202
        assert posted.headers["Access-Control-Allow-Origin"] == "http://shop.example"
        assert posted.headers["Access-Control-Allow-Credentials"] == "true"
        assert "Set-Cookie" not in posted.headers and "Set-Cookie" not in preflight.headers
    assert read == [], f"no cookie is read: {read}"
    assert len(_events(keyed)) == 2


def test_a_wildcard_origin_never_allows_credentials(tmp_path):
    application = create_app({"TESTING": True, "TELEMETRY_DB": str(tmp_path / "w.db"), "CORS_ORIGINS": "*"})
    try:
        preflight = application.test_client().options("/events", headers={
            "Origin": "http://any.example", "Access-Control-Request-Method": "POST"})
        assert preflight.headers["Access-Control-Allow-Origin"] in ("*", "http://any.example")
        assert "Access-Control-Allow-Credentials" not in preflight.headers, "any site, so no credentials"
    finally:
        monitor_of(application).close()


# -- W3C trace context ------------------------------------------------------------------------------

def _add_call_route(application, url):
    def call_downstream():
        requests.get(f"{url}/stock", timeout=5)
        return "", 204
    application.add_url_rule("/call", view_func=call_downstream)


def test_traceparent_in_and_out_in_local_mode(app, backend):
    url, seen = backend.url, backend.traceparents
    _add_call_route(app, url)
    client = app.test_client()
    header = {"traceparent": f"00-{TRACE}-{PARENT}-01"}
    assert client.post("/event", json={"event_name": "Traced"}, headers=header).status_code == 202
    assert client.get("/call", headers=header).status_code == 204
    assert client.post("/event", json={"event_name": "Untraced"},
                       headers={"traceparent": f"00-{'0' * 32}-{PARENT}-01"}).status_code == 202
    assert monitor_of(app).flush()
    with sqlite3.connect(monitor_of(app).settings.telemetry_db) as conn:
        events = dict(conn.execute("SELECT name, operation_id FROM events"))
        requests_seen = conn.execute("SELECT name, operation_id FROM requests ORDER BY id").fetchall()
        dependency = conn.execute("SELECT operation_id FROM dependencies").fetchone()
    assert events["Traced"] == TRACE
    assert events["Untraced"] != TRACE and len(events["Untraced"]) == 32, "an invalid header is ignored"
    assert requests_seen[0] == ("POST /event", TRACE) and requests_seen[1] == ("GET /call", TRACE)
    assert dependency == (TRACE,)
    version, trace_id, span_id, flags = seen[0].split("-")
    assert (version, trace_id, flags) == ("00", TRACE, "01") and len(span_id) == 16 and span_id != PARENT


@pytest.mark.parametrize("header", [
    f"00-{TRACE}-{PARENT}", f"00-{TRACE.upper()}-{PARENT}-01", f"ff-{TRACE}-{PARENT}-01",
    f"00-{TRACE}-{'0' * 16}-01", f"00-{TRACE}-{PARENT}-01-extra", "garbage"])
def test_invalid_traceparent_is_ignored(app, header):
    app.test_client().post("/event", json={"event_name": "x"}, headers={"traceparent": header})
    assert monitor_of(app).flush()
    with sqlite3.connect(monitor_of(app).settings.telemetry_db) as conn:
        (operation_id,) = conn.execute("SELECT operation_id FROM events").fetchone()
    assert operation_id != TRACE


def test_trace_context_and_client_fields_at_the_azure_wire(tmp_path, backend):
    url, seen = backend.url, backend.traceparents
    fake = FakeIngestion().start()
    application = create_app({"TESTING": True, "APPLICATIONINSIGHTS_CONNECTION_STRING": fake.connection_string,
                              "DASHBOARD_AUTH": "off", "TELEMETRY_STORAGE": str(tmp_path / "outbox"),
                              "EXPORT_INTERVAL": "0.05", "METRICS_EXPORT_INTERVAL": "3600"})
    _add_call_route(application, url)
    try:
        client = application.test_client()
        header = {"traceparent": f"00-{TRACE}-{PARENT}-01"}
        when = datetime.now(timezone.utc) - timedelta(hours=30)
        event_id = str(uuid.uuid4())
        assert client.post("/event", headers=header, json={
            "event_name": "Offline", "event_id": event_id, "timestamp": _iso(when),
            "anonymous_id": "anon-1", "session_id": "sess-1"}).status_code == 202
        assert client.get("/call", headers=header).status_code == 204
        assert monitor_of(application).flush(10)
        fake.wait_for(lambda f: f.of_type("EventData") and len(f.of_type("RequestData")) >= 2
                      and f.of_type("RemoteDependencyData"))
        [event] = fake.of_type("EventData")
        assert event["tags"]["ai.operation.id"] == TRACE
        assert event["tags"]["ai.user.id"] == "anon-1" and event["tags"]["ai.session.id"] == "sess-1"
        assert event["data"]["baseData"]["properties"]["event_id"] == event_id
        assert datetime.fromisoformat(event["time"].replace("Z", "+00:00")) == pytest.approx(when, abs=timedelta(
            milliseconds=1)), "the client's time is the event's time"
        for request in fake.of_type("RequestData"):
            assert request["tags"]["ai.operation.id"] == TRACE
            assert request["tags"]["ai.operation.parentId"] == PARENT
        [dependency] = fake.of_type("RemoteDependencyData")
        assert dependency["tags"]["ai.operation.id"] == TRACE
        assert seen == [f"00-{TRACE}-{dependency['data']['baseData']['id']}-01"], "downstream joins the trace"
    finally:
        monitor_of(application).close()
        fake.stop()


def test_a_cors_preflight_does_not_use_up_the_rate_limit(tmp_path):
    application = create_app({"TESTING": True, "TELEMETRY_DB": str(tmp_path / "p.db"), "CORS_ORIGINS": "http://shop.example",
                              "RATE_LIMIT_ENABLED": "true", "EVENT_RATE_LIMIT": "2 per minute"})
    client = application.test_client()
    try:
        for _ in range(4):
            preflight = client.options("/events", headers={"Origin": "http://shop.example",
                                                           "Access-Control-Request-Method": "POST"})
            assert preflight.status_code == 200
            assert "Retry-After" not in preflight.headers and "X-RateLimit-Limit" not in preflight.headers
        statuses = [client.post("/events", json={"events": [{"event_name": "x"}]}).status_code for _ in range(3)]
        assert statuses == [202, 202, 429]
    finally:
        monitor_of(application).close()
