"""Server-side audit events (usage_tracking) and logging_utils.log_event, checked in the real store."""
import json
import sqlite3
import uuid

import pytest

from logging_utils import log_event
from usage_tracking import log_crud_activity, log_user_login
from telemetry import monitor_of


def _events(app):
    """Flush the store and return every event row as a dict, properties decoded."""
    telemetry = monitor_of(app)
    if not telemetry.flush():
        raise AssertionError("store did not flush")
    conn = sqlite3.connect(monitor_of(app).settings.telemetry_db)
    try:
        exists = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'events'").fetchone()
        rows = conn.execute("SELECT event_id, name, user_id, action, entity, properties FROM events"
                            " ORDER BY ts").fetchall() if exists else []
    finally:
        conn.close()
    keys = ("event_id", "name", "user_id", "action", "entity", "properties")
    out = [dict(zip(keys, row)) for row in rows]
    for row in out:
        row["properties"] = json.loads(row["properties"])
    return out


def _is_uuid4(text):
    parsed = uuid.UUID(text)
    return parsed.version == 4 and str(parsed) == text


def test_login_and_crud_are_stored(app):
    with app.test_request_context():
        login_id = log_user_login("alice")
        crud_id = log_crud_activity("Create", "alice", "invoice")
    assert _is_uuid4(login_id) and _is_uuid4(crud_id) and login_id != crud_id

    login, crud = _events(app)
    assert login == {"event_id": login_id, "name": "UserLogin", "user_id": "alice", "action": None,
                     "entity": None, "properties": {"user_id": "alice"}}
    assert crud == {"event_id": crud_id, "name": "CrudActivity", "user_id": "alice", "action": "create",
                    "entity": "invoice",
                    "properties": {"action": "create", "entity": "invoice", "user_id": "alice"}}


def test_trackers_work_in_a_plain_app_context(app):
    with app.app_context():
        event_id = log_crud_activity("delete", "bob", "customer")
    (row,) = _events(app)
    assert row["event_id"] == event_id
    assert (row["name"], row["user_id"], row["action"], row["entity"]) == ("CrudActivity", "bob", "delete",
                                                                           "customer")


@pytest.mark.parametrize("given, stored", [("create", "create"), ("READ", "read"), (" Update ", "update"),
                                           ("delete", "delete")])
def test_every_crud_action_is_normalised(app, given, stored):
    with app.app_context():
        log_crud_activity(given, "u1", "order")
    (row,) = _events(app)
    assert row["action"] == stored and row["properties"]["action"] == stored


def test_user_and_entity_are_stripped(app):
    with app.app_context():
        log_user_login("  carol ")
        log_crud_activity("read", " carol", "report  ")
    login, crud = _events(app)
    assert login["user_id"] == "carol" and login["properties"]["user_id"] == "carol"
    assert crud["user_id"] == "carol" and crud["entity"] == "report"


@pytest.mark.parametrize("call, argument", [
    pytest.param(lambda: log_crud_activity("purge", "alice", "invoice"), "action", id="action-purge"),
    pytest.param(lambda: log_crud_activity(None, "alice", "invoice"), "action", id="action-none"),
    pytest.param(lambda: log_crud_activity("", "alice", "invoice"), "action", id="action-empty"),
    pytest.param(lambda: log_crud_activity(1, "alice", "invoice"), "action", id="action-int"),
    pytest.param(lambda: log_crud_activity("create", "", "invoice"), "user_id", id="crud-user-empty"),
    pytest.param(lambda: log_crud_activity("create", "   ", "invoice"), "user_id", id="crud-user-blank"),
    pytest.param(lambda: log_crud_activity("create", None, "invoice"), "user_id", id="crud-user-none"),
    pytest.param(lambda: log_crud_activity("create", "alice", ""), "entity", id="entity-empty"),
    pytest.param(lambda: log_crud_activity("create", "alice", None), "entity", id="entity-none"),
    pytest.param(lambda: log_crud_activity("create", "alice", "e" * 151), "entity", id="entity-151"),
    pytest.param(lambda: log_user_login(""), "user_id", id="login-user-empty"),
    pytest.param(lambda: log_user_login(None), "user_id", id="login-user-none"),
    pytest.param(lambda: log_user_login(True), "user_id", id="login-user-bool"),
    pytest.param(lambda: log_user_login(4.2), "user_id", id="login-user-float"),
    pytest.param(lambda: log_crud_activity("create", False, "invoice"), "user_id", id="crud-user-bool"),
    pytest.param(lambda: log_user_login("u" * 257), "user_id", id="login-user-257"),
])
def test_bad_arguments_raise_value_error_naming_them(app, call, argument):
    with app.test_request_context():
        with pytest.raises(ValueError) as info:
            call()
    assert argument in str(info.value)
    assert _events(app) == []


def test_length_limits_are_inclusive(app):
    with app.app_context():
        log_user_login("u" * 256)
        log_crud_activity("read", "alice", "e" * 150)
    login, crud = _events(app)
    assert login["user_id"] == "u" * 256
    assert crud["entity"] == "e" * 150


@pytest.mark.parametrize("call", [
    lambda: log_user_login("alice"),
    lambda: log_crud_activity("create", "alice", "invoice"),
    lambda: log_event("Exported", {"format": "pdf"}),
], ids=["login", "crud", "log_event"])
def test_outside_an_app_context_raises_runtime_error(call):
    with pytest.raises(RuntimeError):
        call()


def test_log_event_returns_id_and_stores_stringified_details(app):
    with app.test_request_context():
        event_id = log_event("ReportExported", {"format": "pdf", "pages": 3, "draft": False, "note": None})
        bare_id = log_event("Heartbeat")
    assert _is_uuid4(event_id) and _is_uuid4(bare_id)
    first, second = _events(app)
    assert first["event_id"] == event_id and first["name"] == "ReportExported" and first["user_id"] == ""
    assert first["properties"] == {"format": "pdf", "pages": "3", "draft": "false", "note": "null"}
    assert second["properties"] == {} and second["event_id"] == bare_id


@pytest.mark.parametrize("kwargs, field", [
    pytest.param({"event_name": ""}, "event_name", id="empty"),
    pytest.param({"event_name": "   "}, "event_name", id="blank"),
    pytest.param({"event_name": "n" * 513}, "event_name", id="name-513"),
    pytest.param({"event_name": 123}, "event_name", id="name-int"),
    pytest.param({"event_name": None}, "event_name", id="name-none"),
    pytest.param({"event_name": "x", "details": ["a"]}, "details", id="details-list"),
    pytest.param({"event_name": "x", "details": "pdf"}, "details", id="details-string"),
    pytest.param({"event_name": "x", "details": {"a": {"b": 1}}}, "details.a", id="nested-dict"),
    pytest.param({"event_name": "x", "details": {"a": [1]}}, "details.a", id="nested-list"),
    pytest.param({"event_name": "x", "details": {"k" * 151: "v"}}, "details", id="key-151"),
    pytest.param({"event_name": "x", "details": {"": "v"}}, "details", id="key-empty"),
    pytest.param({"event_name": "x", "details": {"v": "x" * 8193}}, "details.v", id="value-8193"),
    pytest.param({"event_name": "x", "details": {"event_id": "mine"}}, "details", id="reserved-key"),
    pytest.param({"event_name": "x", "details": {"n": float("nan")}}, "details", id="nan"),
    pytest.param({"event_name": "x", "details": {"n": float("inf")}}, "details", id="inf"),
])
def test_log_event_validates_like_the_api(app, kwargs, field):
    with app.app_context():
        with pytest.raises(ValueError) as info:
            log_event(**kwargs)
    assert str(info.value).startswith(field), str(info.value)
    assert _events(app) == []


def test_log_event_limits_are_inclusive(app):
    with app.app_context():
        event_id = log_event("n" * 512, {"k" * 150: "v" * 8192})
    (row,) = _events(app)
    assert row["event_id"] == event_id and row["name"] == "n" * 512
    assert row["properties"]["k" * 150] == "v" * 8192
