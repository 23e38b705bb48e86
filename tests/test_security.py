"""Safe by default: access rules, rate limits, privacy and hostile input, each proven at the wire."""
import json
import logging
import sqlite3

import pytest

from app import create_app
from config import ConfigError
from fake_ingestion import IKEY, FakeIngestion
from telemetry import monitor_of

TOKEN = "dash-token-0123456789abcdef"
KEYS = "key-one-aaaaaaaa,key-two-bbbbbbbb"


def make_app(tmp_path, **config):
    """A local-mode app with the given settings on a fresh store."""
    return create_app({"TESTING": True, "TELEMETRY_DB": str(tmp_path / "telemetry.db"),
                       "LOCAL_FLUSH_INTERVAL": "0.01", **config})


@pytest.fixture
def secured(tmp_path):
    """An app with a dashboard token, API keys, a CORS allow-list and tight rate limits."""
    app = make_app(tmp_path, DASHBOARD_TOKEN=TOKEN, EVENT_API_KEYS=KEYS, DASHBOARD_AUTH="on",
                   CORS_ORIGINS="https://app.example.com", RATE_LIMIT_ENABLED="true",
                   EVENT_RATE_LIMIT="5 per minute", DASHBOARD_RATE_LIMIT="3 per minute")
    yield app
    monitor_of(app).close()


def _stored(app):
    monitor_of(app).flush()
    with sqlite3.connect(monitor_of(app).settings.telemetry_db) as conn:
        return [dict(zip(("name", "user_id", "properties"), r))
                for r in conn.execute("SELECT name, user_id, properties FROM events")]


# -- access ---------------------------------------------------------------------------------
@pytest.mark.parametrize("header", [None, "Bearer wrong", f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer "])
def test_dashboard_refuses_missing_or_wrong_token(secured, header):
    headers = {"Authorization": header} if header else {}
    resp = secured.test_client().get("/dashboard/usage", headers=headers)
    assert resp.status_code == 401
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert resp.get_json()["error"]["code"] == "unauthorized"
    assert TOKEN not in resp.get_data(as_text=True)


def test_dashboard_accepts_the_token(secured):
    resp = secured.test_client().get("/dashboard/usage", headers={"Authorization": f"Bearer {TOKEN}"})
    assert resp.status_code == 200


def test_azure_mode_without_token_refuses_to_start_unless_auth_is_off(tmp_path):
    conn = f"InstrumentationKey={IKEY};IngestionEndpoint=http://127.0.0.1:9/"
    with pytest.raises(ConfigError) as info:
        create_app({"APPLICATIONINSIGHTS_CONNECTION_STRING": conn, "DASHBOARD_AUTH": "on",
                    "TELEMETRY_STORAGE": str(tmp_path)})
    assert "DASHBOARD_TOKEN" in str(info.value) and IKEY not in str(info.value)
    app = create_app({"APPLICATIONINSIGHTS_CONNECTION_STRING": conn, "DASHBOARD_AUTH": "off",
                      "TELEMETRY_STORAGE": str(tmp_path)})
    assert monitor_of(app).settings.mode == "azure"


def test_make_run_binds_loopback_only():
    with open("Makefile") as handle:
        run = [line for line in handle if "flask --app app run" in line]
    assert run and "--host 127.0.0.1" in run[0] and "--debug" not in run[0]


@pytest.mark.parametrize("key", [None, "", "key-one", "key-one-aaaaaaaax", "KEY-ONE-AAAAAAAA"])
def test_event_requires_a_valid_api_key(secured, key):
    headers = {} if key is None else {"X-Api-Key": key}
    resp = secured.test_client().post("/event", json={"event_name": "E"}, headers=headers)
    assert resp.status_code == 401
    assert resp.headers["WWW-Authenticate"].startswith("ApiKey")
    assert _stored(secured) == []


@pytest.mark.parametrize("key", KEYS.split(","))
def test_event_accepts_each_configured_key(secured, key):
    resp = secured.test_client().post("/event", json={"event_name": "E"}, headers={"X-Api-Key": key})
    assert resp.status_code == 202


def test_cors_allows_only_listed_origins(secured):
    client = secured.test_client()
    ok = client.options("/event", headers={"Origin": "https://app.example.com",
                                           "Access-Control-Request-Method": "POST"})
    assert ok.headers.get("Access-Control-Allow-Origin") == "https://app.example.com"
    evil = client.options("/event", headers={"Origin": "https://evil.example.net",
                                             "Access-Control-Request-Method": "POST"})
    assert "Access-Control-Allow-Origin" not in evil.headers


def test_cors_allows_nothing_by_default(tmp_path):
    app = make_app(tmp_path)
    resp = app.test_client().post("/event", json={"event_name": "E"}, headers={"Origin": "https://app.example.com"})
    assert resp.status_code == 202
    assert "Access-Control-Allow-Origin" not in resp.headers
    monitor_of(app).close()


def test_rate_limit_answers_429_json_with_retry_after(secured):
    client = secured.test_client()
    codes = [client.post("/event", json={"event_name": "E"}, headers={"X-Api-Key": "key-one-aaaaaaaa"}).status_code
             for _ in range(6)]
    assert codes == [202] * 5 + [429]
    resp = client.post("/event", json={"event_name": "E"}, headers={"X-Api-Key": "key-one-aaaaaaaa"})
    assert resp.status_code == 429
    assert int(resp.headers["Retry-After"]) > 0
    assert resp.get_json()["error"]["code"] == "rate_limited"
    # Limits are per client: another address still gets through.
    other = client.post("/event", json={"event_name": "E"}, headers={"X-Api-Key": "key-one-aaaaaaaa"},
                        environ_base={"REMOTE_ADDR": "10.9.8.7"})
    assert other.status_code == 202
    assert len(_stored(secured)) == 6


def test_bad_rate_limit_setting_stops_start_up(tmp_path):
    with pytest.raises(ConfigError, match="EVENT_RATE_LIMIT"):
        make_app(tmp_path, EVENT_RATE_LIMIT="lots")


def test_frontend_user_ids_never_become_authenticated_users(tmp_path):
    app = make_app(tmp_path)
    client = app.test_client()
    client.post("/event", json={"event_name": "Clicked", "details": {"user_id": "mallory"}})
    rows = _stored(app)
    assert rows[0]["user_id"] == "" and json.loads(rows[0]["properties"])["user_id"] == "mallory"
    usage = client.get("/dashboard/usage?days=1").get_json()
    assert usage["users"]["unique_users"] == 0
    monitor_of(app).close()


# -- privacy --------------------------------------------------------------------------------
def test_redaction_applies_before_the_local_store(tmp_path):
    app = make_app(tmp_path)
    app.test_client().post("/event", json={"event_name": "SignUp", "details": {
        "Password": "hunter2", "access_token": "t0k", "X-Session-Id": "s", "plan": "pro"}})
    props = json.loads(_stored(app)[0]["properties"])
    assert props["Password"] == props["access_token"] == props["X-Session-Id"] == "[REDACTED]"
    assert props["plan"] == "pro"
    monitor_of(app).close()


def test_redaction_applies_before_azure_and_is_configurable(tmp_path):
    fake = FakeIngestion().start()
    try:
        app = create_app({"TESTING": True, "APPLICATIONINSIGHTS_CONNECTION_STRING": fake.connection_string,
                          "DASHBOARD_AUTH": "off", "TELEMETRY_STORAGE": str(tmp_path), "EXPORT_INTERVAL": "0.05",
                          "REDACT_KEYS": "iban, Secret"})
        app.test_client().post("/event", json={"event_name": "Paid", "details": {
            "IBAN": "DE00 1234", "client_secret": "x", "password": "kept-now", "amount": 3}})
        assert monitor_of(app).flush(10)
        events = fake.wait_for(lambda f: f.of_type("EventData"))
        props = events[0]["data"]["baseData"]["properties"]
        assert props["IBAN"] == props["client_secret"] == "[REDACTED]"
        assert props["password"] == "kept-now" and props["amount"] == "3"
        monitor_of(app).close()
    finally:
        fake.stop()


def test_secrets_never_reach_healthz_logs_or_errors(tmp_path, caplog):
    fake = FakeIngestion().start()
    caplog.set_level(logging.DEBUG)
    try:
        app = create_app({"TESTING": True, "APPLICATIONINSIGHTS_CONNECTION_STRING": fake.connection_string,
                          "DASHBOARD_TOKEN": TOKEN, "EVENT_API_KEYS": KEYS, "TELEMETRY_STORAGE": str(tmp_path),
                          "EXPORT_INTERVAL": "0.05"})
        client = app.test_client()
        client.post("/event", json={"event_name": "E"}, headers={"X-Api-Key": "wrong"})
        client.post("/event", json={"event_name": "E"}, headers={"X-Api-Key": "key-one-aaaaaaaa"})
        bodies = [client.get("/healthz").get_data(as_text=True),
                  client.get("/dashboard/usage", headers={"Authorization": "Bearer nope"}).get_data(as_text=True),
                  client.get("/openapi.json").get_data(as_text=True), repr(monitor_of(app).settings)]
        fake.mode = "error"
        monitor_of(app).flush(10)
        monitor_of(app).close()
    finally:
        fake.stop()
    text = "\n".join(bodies + [r.getMessage() for r in caplog.records])
    for secret in (TOKEN, "key-one-aaaaaaaa", "key-two-bbbbbbbb", IKEY, fake.connection_string):
        assert secret not in text


# -- hostile input ----------------------------------------------------------------------------
HOSTILE = [
    ("array", b"[1, 2]", "application/json", 400),
    ("string", b'"event"', "application/json", 400),
    ("number", b"42", "application/json", 400),
    ("null", b"null", "application/json", 400),
    ("deep", b'{"event_name": "x", "details": ' + b"[" * 5000 + b"]" * 5000 + b"}", "application/json", 400),
    ("invalid-utf8", b'{"event_name": "\xff\xfe"}', "application/json", 400),
    ("lone-surrogate", b'{"event_name": "\\ud800"}', "application/json", 422),
    ("control-char-name", b'{"event_name": "a\\u0000b"}', "application/json", 422),
    ("control-char-key", b'{"event_name": "a", "details": {"k\\u0007": 1}}', "application/json", 422),
    ("control-char-value", b'{"event_name": "a", "details": {"k": "\\u001b[31m"}}', "application/json", 422),
    ("huge-int", b'{"event_name": "a", "details": {"n": ' + b"9" * 5000 + b"}}", "application/json", 400),
    ("duplicate-keys", b'{"event_name": "a", "event_name": "b"}', "application/json", 400),
    ("empty", b"", "application/json", 400),
    ("form", b"event_name=x", "application/x-www-form-urlencoded", 415),
    ("xml", b"<event/>", "application/xml", 415),
    ("no-content-type", b'{"event_name": "a"}', None, 415),
]


@pytest.mark.parametrize("name,body,content_type,status", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_bodies_get_a_4xx_json_error_and_store_nothing(tmp_path, name, body, content_type, status):
    app = make_app(tmp_path)
    kwargs = {"data": body}
    if content_type:
        kwargs["content_type"] = content_type
    resp = app.test_client().post("/event", **kwargs)
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert set(resp.get_json()) == {"error"}
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert _stored(app) == []
    monitor_of(app).close()


def test_oversized_body_is_413_json(tmp_path):
    app = make_app(tmp_path, MAX_EVENT_BYTES="2048")
    resp = app.test_client().post("/event", json={"event_name": "a", "details": {"k": "x" * 4000}})
    assert resp.status_code == 413 and resp.get_json()["error"]["field"] == "body"
    monitor_of(app).close()


@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE", "GET"])
def test_unknown_methods_on_known_routes_are_405_json(tmp_path, method):
    app = make_app(tmp_path)
    resp = app.test_client().open("/event", method=method)
    assert resp.status_code == 405 and "POST" in resp.headers["Allow"]
    assert resp.get_json()["error"]["code"] == "method_not_allowed"
    monitor_of(app).close()


@pytest.mark.parametrize("days", ["7 or 1=1", "7|take 1", "7;", "-1", "1e1", "０7", "7\n"])
def test_days_never_reaches_kql_as_text(tmp_path, days):
    app = make_app(tmp_path)
    resp = app.test_client().get("/dashboard/usage", query_string={"days": days})
    assert resp.status_code == 400 and resp.get_json()["error"]["field"] == "days"
    monitor_of(app).close()


def test_every_response_is_nosniff_and_debug_is_off(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASK_DEBUG", "1")
    app = make_app(tmp_path)
    client = app.test_client()
    for resp in (client.get("/healthz"), client.get("/nope"), client.post("/event", json={"event_name": "E"}),
                 client.get("/openapi.json")):
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert app.debug is False
    monitor_of(app).close()


def test_openapi_describes_every_route_status_and_error_body(tmp_path):
    app = make_app(tmp_path, DASHBOARD_TOKEN=TOKEN, EVENT_API_KEYS=KEYS)
    doc = app.test_client().get("/openapi.json").get_json()
    assert doc["openapi"].startswith("3.")
    assert set(doc["paths"]) == {"/event", "/events", "/dashboard/usage", "/healthz", "/livez"}
    event = doc["paths"]["/event"]["post"]
    assert set(event["responses"]) == {"202", "400", "401", "413", "415", "422", "429", "503"}
    assert event["security"] == [{"apiKey": []}]
    usage = doc["paths"]["/dashboard/usage"]["get"]
    assert set(usage["responses"]) == {"200", "400", "401", "429", "502", "503"}
    assert usage["parameters"][0]["schema"]["maximum"] == 90
    assert doc["components"]["schemas"]["ErrorResponse"]["properties"]["error"]
    name = doc["components"]["schemas"]["PublicEvent"]["properties"]["event_name"]
    assert name["maxLength"] == 512 and name["not"] == {"enum": ["UserLogin", "CrudActivity"]}
    monitor_of(app).close()
