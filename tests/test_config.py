"""Configuration errors name the variable and never its secret; importing `app` builds nothing."""
import json
import os
import subprocess
import sys

import pytest

import config
from app import create_app
from telemetry import monitor_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUID = "8f3c2a1e-5b7d-4c9e-a0f1-23456789abcd"
CONN = "APPLICATIONINSIGHTS_CONNECTION_STRING"


def _create(tmp_path, **overrides):
    settings = {"TESTING": True, "TELEMETRY_DB": str(tmp_path / "telemetry.db")}
    settings.update(overrides)
    return create_app(settings)


@pytest.mark.parametrize("value, secret", [
    ("garbage", "garbage"),
    ("InstrumentationKey=not-a-guid", "not-a-guid"),
    (f"InstrumentationKey={GUID};IngestionEndpoint=ftp://x", GUID),
    (f"InstrumentationKey={GUID};IngestionEndpoint=ftp://x", "ftp://x"),
    ("IngestionEndpoint=https://dc.example.com", "dc.example.com"),
    ("InstrumentationKey=", "InstrumentationKey="),
    (f"={GUID}", GUID),
    (";;;", ";;;"),
], ids=["garbage", "key-not-guid", "ftp-endpoint", "ftp-endpoint-value", "no-key",
        "empty-key", "empty-name", "only-separators"])
def test_malformed_connection_string_is_a_config_error(tmp_path, value, secret):
    with pytest.raises(config.ConfigError) as info:
        _create(tmp_path, **{CONN: value})
    message = str(info.value)
    assert CONN in message
    assert secret not in message
    assert value not in message
    assert secret not in repr(info.value)


def test_malformed_connection_string_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(CONN, "InstrumentationKey=not-a-guid")
    with pytest.raises(config.ConfigError) as info:
        _create(tmp_path)
    assert CONN in str(info.value) and "not-a-guid" not in str(info.value)


def test_valid_connection_string_selects_azure_mode_without_leaking(tmp_path):
    value = f"InstrumentationKey={GUID.upper()};IngestionEndpoint=https://127.0.0.1:9/"
    application = _create(tmp_path, **{CONN: value})
    try:
        settings = monitor_of(application).settings
        assert settings.mode == "azure"
        assert settings.instrumentation_key == GUID
        assert settings.ingestion_endpoint == "https://127.0.0.1:9"
        assert GUID not in repr(settings).lower()
        response = application.test_client().get("/healthz")
        assert response.status_code == 200
        body = response.get_data(as_text=True)
        assert response.get_json()["mode"] == "azure"
        assert GUID not in body.lower() and "InstrumentationKey" not in body and "127.0.0.1:9" not in body
    finally:
        monitor_of(application).close()


@pytest.mark.parametrize("value", ["2", "abc", "-0.1", "1.01", "nan", "inf"])
def test_bad_trace_sampling_rate_names_the_variable(tmp_path, value):
    with pytest.raises(config.ConfigError) as info:
        _create(tmp_path, TRACE_SAMPLING_RATE=value)
    assert "TRACE_SAMPLING_RATE" in str(info.value)


@pytest.mark.parametrize("value, expected", [("0", 0.0), ("1", 1.0), (" 0.25 ", 0.25)])
def test_trace_sampling_rate_bounds_are_inclusive(tmp_path, value, expected):
    application = _create(tmp_path, TRACE_SAMPLING_RATE=value)
    assert monitor_of(application).settings.trace_sampling_rate == expected


@pytest.mark.parametrize("var, value", [
    ("MAX_EVENT_BYTES", "1023"), ("MAX_EVENT_BYTES", "lots"), ("USAGE_TOP", "0"),
    ("LOCAL_BATCH_SIZE", "1.5"), ("APPLICATIONINSIGHTS_STATSBEAT_ENABLED", "maybe"),
    ("LOG_ANALYTICS_WORKSPACE_ID", "not-a-guid"),
])
def test_other_bad_settings_name_their_variable(tmp_path, var, value):
    with pytest.raises(config.ConfigError) as info:
        _create(tmp_path, **{var: value})
    assert var in str(info.value)


# -- the module-level `app` ---------------------------------------------------

def _run_python(code, env_updates=None):
    env = dict(os.environ)
    env.update(env_updates or {})
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("var, value", [
    (CONN, "garbage"),
    (CONN, "InstrumentationKey=not-a-guid"),
    (CONN, f"InstrumentationKey={GUID};IngestionEndpoint=ftp://x"),
    ("TRACE_SAMPLING_RATE", "2"),
    ("TRACE_SAMPLING_RATE", "abc"),
])
def test_module_app_with_bad_env_exits_3_with_one_line(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    result = _run_python("import app; app.app")
    assert result.returncode == 3, result.stderr  # gunicorn: a worker boot error, which stops the master
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert var in lines[0]
    if var == CONN:
        assert value not in result.stderr
        assert GUID not in result.stderr and "not-a-guid" not in result.stderr
    assert result.stdout == ""


def test_import_alone_succeeds_even_with_bad_env(monkeypatch):
    monkeypatch.setenv(CONN, "garbage")
    result = _run_python("import app; print('app' in vars(app))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_import_starts_no_threads():
    result = _run_python("import app, threading; print(threading.active_count())")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1"


def test_module_app_is_built_once_in_local_mode(tmp_path):
    code = ("import app, threading; a = app.app; b = app.app; "
            "print(a is b, a.extensions['usage_monitor'].settings.mode, threading.active_count())")
    result = _run_python(code, {"TELEMETRY_DB": str(tmp_path / "t.db")})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "local", "1"]


def test_unknown_module_attribute_is_attribute_error():
    result = _run_python("import app\ntry:\n    app.nothing\nexcept AttributeError:\n    print('ok')")
    assert result.stdout.strip() == "ok", result.stderr


# -- /healthz -----------------------------------------------------------------

def _walk(value):
    """Every key and scalar value of a JSON document, as strings."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
            yield from _walk(item)
    elif isinstance(value, list):
        for item in value:
            yield from _walk(item)
    else:
        yield str(value)


def test_healthz_in_local_mode(app, client):
    response = client.get("/healthz")
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "ok"
    assert body["mode"] == "local"
    assert body["usage_source"] == "local"
    for text in _walk(body):
        lowered = text.lower()
        assert "connection" not in lowered and "instrumentation" not in lowered and "ingestion" not in lowered
    # /healthz is not itself recorded, and it starts nothing.
    assert body["telemetry"] == {"started": False, "record_failures": {}}


def test_healthz_reports_the_store_once_started(app, client):
    assert client.post("/event", json={"event_name": "x"}).status_code == 202
    assert monitor_of(app).flush() is True
    telemetry = client.get("/healthz").get_json()["telemetry"]
    assert telemetry["started"] is True and telemetry["writer_alive"] is True
    assert telemetry["written"] == 2 and telemetry["write_errors"] == 0  # the event and its request
    assert json.dumps(telemetry).count("telemetry.db") == 0
