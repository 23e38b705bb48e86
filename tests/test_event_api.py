"""POST /event at the wire: the accepted contract, the stored row, and every refusal (JSON, nothing stored)."""
import json
import sqlite3
import uuid

import pytest

from app import create_app
from telemetry import monitor_of


# -- helpers ---------------------------------------------------------------

def _query(app, sql, params=()):
    """Flush the app's store, then read it with a plain sqlite3 connection."""
    assert monitor_of(app).flush() is True
    conn = sqlite3.connect(monitor_of(app).settings.telemetry_db)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def _events(app):
    """Every stored event as dicts, properties decoded."""
    rows = _query(app, "SELECT event_id, name, user_id, action, entity, operation_id, properties FROM events")
    keys = ("event_id", "name", "user_id", "action", "entity", "operation_id", "properties")
    out = [dict(zip(keys, row)) for row in rows]
    for row in out:
        row["properties"] = json.loads(row["properties"])
    return out


def _assert_clean(response):
    """No stack trace and no HTML error page, whatever the status."""
    text = response.get_data(as_text=True)
    assert "Traceback" not in text
    assert "<html" not in text.lower()


def _assert_error(response, status, names=None):
    """The single JSON error body; `names` must appear in its message or its field."""
    _assert_clean(response)
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert list(body) == ["error"]
    err = body["error"]
    assert isinstance(err["code"], str) and err["code"]
    assert isinstance(err["message"], str) and err["message"]
    if names is not None:
        assert names in err["message"] or names in err.get("field", ""), err
    return err


def _post(client, body):
    return client.post("/event", json=body)


# -- accepted --------------------------------------------------------------

def test_accepts_event_and_stores_it(app, client):
    response = _post(client, {"event_name": "ReportExported", "details": {"format": "pdf", "pages": 3}})

    _assert_clean(response)
    assert response.status_code == 202
    body = response.get_json()
    assert set(body) == {"status", "event_id"}
    assert body["status"] == "accepted"
    event_id = body["event_id"]
    parsed = uuid.UUID(event_id)
    assert parsed.version == 4 and str(parsed) == event_id

    (row,) = _events(app)
    assert row["event_id"] == event_id
    assert row["name"] == "ReportExported"
    assert row["user_id"] == ""
    assert row["action"] is None and row["entity"] is None
    assert row["properties"] == {"format": "pdf", "pages": "3"}, "event_id has its own column, stored once"
    # The event carries the operation id of the request that posted it.
    ((request_op,),) = _query(app, "SELECT operation_id FROM requests WHERE name = 'POST /event'")
    assert request_op and row["operation_id"] == request_op


def test_each_event_gets_its_own_id(app, client):
    ids = [_post(client, {"event_name": "Clicked"}).get_json()["event_id"] for _ in range(3)]
    assert len(set(ids)) == 3
    assert sorted(r["event_id"] for r in _events(app)) == sorted(ids)


def test_details_are_optional(app, client):
    response = _post(client, {"event_name": "Ping"})
    assert response.status_code == 202
    (row,) = _events(app)
    assert row["properties"] == {} and row["event_id"] == response.get_json()["event_id"]


def test_property_values_are_stringified_with_json_spelling(app, client):
    details = {"yes": True, "no": False, "nothing": None, "ratio": 1.5, "zero": 0, "neg": -2,
               "big": 12345678901234567890, "text_true": "true", "accent": "d\u00e9j\u00e0 vu"}
    response = _post(client, {"event_name": "Typed", "details": details})
    assert response.status_code == 202

    (row,) = _events(app)
    props = row["properties"]
    assert row["event_id"] == response.get_json()["event_id"]
    assert props == {"yes": "true", "no": "false", "nothing": "null", "ratio": "1.5", "zero": "0",
                     "neg": "-2", "big": "12345678901234567890", "text_true": "true",
                     "accent": "d\u00e9j\u00e0 vu"}
    assert all(isinstance(v, str) for v in props.values())


def test_limits_are_inclusive(app, client):
    name, key, value = "n" * 512, "k" * 150, "v" * 8192
    response = _post(client, {"event_name": name, "details": {key: value}})
    assert response.status_code == 202, response.get_json()
    (row,) = _events(app)
    assert row["name"] == name
    assert row["properties"][key] == value


# -- refused, nothing stored ------------------------------------------------

BAD_BODIES = [
    pytest.param({"details": {"a": "b"}}, "event_name", id="missing-name"),
    pytest.param({"event_name": ""}, "event_name", id="empty-name"),
    pytest.param({"event_name": "   "}, "event_name", id="blank-name"),
    pytest.param({"event_name": "\t\n"}, "event_name", id="whitespace-name"),
    pytest.param({"event_name": "n" * 513}, "event_name", id="name-513"),
    pytest.param({"event_name": 123}, "event_name", id="name-int"),
    pytest.param({"event_name": None}, "event_name", id="name-null"),
    pytest.param({"event_name": ["x"]}, "event_name", id="name-list"),
    pytest.param({"event_name": "UserLogin"}, "event_name", id="reserved-UserLogin"),
    pytest.param({"event_name": "CrudActivity", "details": {"action": "create"}}, "event_name",
                 id="reserved-CrudActivity"),
    pytest.param({"event_name": "x", "details": [1, 2]}, "details", id="details-list"),
    pytest.param({"event_name": "x", "details": "pdf"}, "details", id="details-string"),
    pytest.param({"event_name": "x", "details": None}, "details", id="details-null"),
    pytest.param({"event_name": "x", "details": {"a": {"b": 1}}}, "details.a", id="nested-dict"),
    pytest.param({"event_name": "x", "details": {"ok": "1", "a": [1]}}, "details.a", id="nested-list"),
    pytest.param({"event_name": "x", "details": {"k" * 151: "v"}}, "details", id="key-151"),
    pytest.param({"event_name": "x", "details": {"": "v"}}, "details", id="key-empty"),
    pytest.param({"event_name": "x", "details": {"v": "x" * 8193}}, "details.v", id="value-8193"),
    pytest.param({"event_name": "x", "details": {"event_id": "mine"}}, "details", id="reserved-key"),
    pytest.param({"event_name": "x", "user_id": "alice"}, "user_id", id="unknown-field"),
]


@pytest.mark.parametrize("body, field", BAD_BODIES)
def test_invalid_event_is_refused_and_not_stored(app, client, body, field):
    response = _post(client, body)
    err = _assert_error(response, 422, field)
    assert err["code"] == "validation_error"
    assert _events(app) == []


@pytest.mark.parametrize("raw", [
    '{"event_name":"x","details":{"n":NaN}}',
    '{"event_name":"x","details":{"n":Infinity}}',
    '{"event_name":"x","details":{"n":-Infinity}}',
], ids=["nan", "inf", "-inf"])
def test_non_json_constants_are_refused(app, client, raw):
    response = client.post("/event", data=raw, content_type="application/json")
    _assert_error(response, 400, "body")
    assert _events(app) == []


def test_overflowing_number_is_refused(app, client):
    response = client.post("/event", data='{"event_name":"x","details":{"n":1e999}}',
                           content_type="application/json")
    err = _assert_error(response, 422, "details.n")
    assert "finite" in err["message"]
    assert _events(app) == []


@pytest.mark.parametrize("raw", ['{"event_name": "x"', "not json", "", "{'event_name': 'x'}"],
                         ids=["truncated", "text", "empty", "single-quotes"])
def test_non_json_body_is_400(app, client, raw):
    response = client.post("/event", data=raw, content_type="application/json")
    err = _assert_error(response, 400, "body")
    assert err["code"] == "invalid_json"
    assert _events(app) == []


@pytest.mark.parametrize("raw", ['[{"event_name": "x"}]', '"x"', "42"], ids=["array", "string", "number"])
def test_json_that_is_not_an_object_is_400(app, client, raw):
    response = client.post("/event", data=raw, content_type="application/json")
    err = _assert_error(response, 400, "body")
    assert err["code"] == "invalid_body"
    assert _events(app) == []


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "multipart/form-data", None])
def test_wrong_content_type_is_415(app, client, content_type):
    response = client.post("/event", data='{"event_name": "x"}', content_type=content_type)
    err = _assert_error(response, 415, "Content-Type")
    assert err["code"] == "unsupported_media_type"
    assert _events(app) == []


def test_json_content_type_with_charset_is_accepted(app, client):
    response = client.post("/event", data='{"event_name": "x"}', content_type="application/json; charset=utf-8")
    assert response.status_code == 202
    assert len(_events(app)) == 1


@pytest.fixture
def small_app(tmp_path):
    """An app whose MAX_EVENT_BYTES is 2048."""
    application = create_app({"TESTING": True, "TELEMETRY_DB": str(tmp_path / "small.db"),
                              "LOCAL_FLUSH_INTERVAL": "0.01", "MAX_EVENT_BYTES": "2048"})
    yield application
    monitor_of(application).close()


def _body_of_size(size):
    """A valid event body of exactly `size` bytes."""
    skeleton = '{"event_name":"Big","details":{"pad":"%s"}}'
    raw = skeleton % ("p" * (size - len(skeleton % "")))
    assert len(raw.encode()) == size
    return raw


def test_body_over_max_event_bytes_is_413_json(small_app):
    client = small_app.test_client()
    response = client.post("/event", data=_body_of_size(2049), content_type="application/json")
    err = _assert_error(response, 413)
    assert err["code"] == "request_entity_too_large"
    assert _events(small_app) == []


def test_body_at_max_event_bytes_is_accepted(small_app):
    client = small_app.test_client()
    response = client.post("/event", data=_body_of_size(2048), content_type="application/json")
    assert response.status_code == 202, response.get_data(as_text=True)
    assert len(_events(small_app)) == 1


# -- routing errors ---------------------------------------------------------

@pytest.mark.parametrize("path", ["/nope", "/event/extra", "/dashboards"])
def test_unknown_route_is_404_json(client, path):
    err = _assert_error(client.get(path), 404)
    assert err["code"] == "not_found"


@pytest.mark.parametrize("method", ["DELETE", "GET", "PUT", "PATCH"])
def test_wrong_method_on_event_is_405_json_with_allow(app, client, method):
    response = client.open("/event", method=method, json={"event_name": "x"})
    err = _assert_error(response, 405)
    assert err["code"] == "method_not_allowed"
    allowed = {m.strip() for m in response.headers["Allow"].split(",")}
    assert "POST" in allowed and method not in allowed
    assert _events(app) == []


def test_broken_telemetry_store_does_not_change_the_response(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    application = create_app({"TELEMETRY_DB": str(blocker / "telemetry.db")})
    response = application.test_client().get("/nope")
    _assert_error(response, 404)


def test_too_long_value_message_names_the_limit(client):
    response = _post(client, {"event_name": "x", "details": {"v": "x" * 8193}})
    err = _assert_error(response, 422, "details.v")
    assert "8192" in err["message"]
