"""Fail loudly at start: every bad setting stops gunicorn, `flask run` and `make run` with one line naming it."""
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

import config
from app import create_app
from telemetry import monitor_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
GUID = "11111111-2222-3333-4444-555555555555"
CONN = "APPLICATIONINSIGHTS_CONNECTION_STRING"
AZURE = {CONN: f"InstrumentationKey={GUID}", "DASHBOARD_TOKEN": "t0ken-s3cret",
         "LOG_ANALYTICS_WORKSPACE_ID": "99999999-8888-7777-6666-555555555555"}
SECRETS = (GUID, "t0ken-s3cret", "pa55word")


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(tmp_path, updates):
    """The environment of a service started in tmp_path: local mode on 127.0.0.1, a free port, then `updates`."""
    env = {k: v for k, v in os.environ.items() if k not in (CONN, "LOG_ANALYTICS_WORKSPACE_ID", "DASHBOARD_TOKEN")}
    env.update(HOST="127.0.0.1", PORT=str(_free_port()), TELEMETRY_DB=str(tmp_path / "telemetry.db"),
               TELEMETRY_STORAGE=str(tmp_path / "outbox"), DASHBOARD_AUTH="on", WEB_CONCURRENCY="2")
    env.update(updates)
    return env


def _one_error_line(output, var):
    """The output holds exactly one `configuration error` line, naming var; no traceback, no secret."""
    lines = [line for line in output.splitlines() if "configuration error" in line]
    assert len(lines) == 1, output
    assert var in lines[0], output
    assert "Traceback" not in output, output
    for secret in SECRETS:
        assert secret not in output, output
    return lines[0]


def _tmp_file(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    return str(blocker)


def _tmp_folder(tmp_path):
    folder = tmp_path / "a-folder"
    folder.mkdir()
    return str(folder)


# (name of the setting the line must name, {variable: value}); a callable value is made from tmp_path.
BAD = [
    ("LOCAL_RETENTION_DAYS", {"LOCAL_RETENTION_DAYS": "-1"}),
    ("EVENT_RATE_LIMIT", {"EVENT_RATE_LIMIT": "lots"}),
    (CONN, {CONN: "InstrumentationKey=pa55word"}),
    (CONN, {CONN: "   "}),
    ("LOG_ANALYTICS_WORKSPACE_ID", {"LOG_ANALYTICS_WORKSPACE_ID": "not-a-guid"}),
    ("DASHBOARD_TOKEN", {CONN: AZURE[CONN]}),
    ("RATE_LIMIT_STORAGE_URI", {"RATE_LIMIT_STORAGE_URI": "bogus://x"}),
    ("RATE_LIMIT_STORAGE_URI", {"RATE_LIMIT_STORAGE_URI": "redis://:pa55word@127.0.0.1:port/0"}),
    ("WEB_CONCURRENCY", {"WEB_CONCURRENCY": "0"}),
    ("GUNICORN_THREADS", {"GUNICORN_THREADS": "four"}),
    ("PORT", {"PORT": "abc"}),
    ("PORT", {"PORT": "70000"}),
    ("HOST", {"HOST": "192.0.2.1"}),  # TEST-NET: not an address of this machine
    ("TELEMETRY_DB", {"TELEMETRY_DB": _tmp_folder}),
    ("TELEMETRY_DB", {"TELEMETRY_DB": lambda tmp_path: os.path.join(_tmp_file(tmp_path), "t.db")}),
    ("TELEMETRY_STORAGE", dict(AZURE, TELEMETRY_STORAGE=_tmp_file)),
]


def _resolve(tmp_path, updates):
    return {var: value(tmp_path) if callable(value) else value for var, value in updates.items()}


def _gunicorn(env, timeout=30):
    """Run `gunicorn -c gunicorn.conf.py app:app` as production does; (exit status, stdout and stderr)."""
    try:
        result = subprocess.run([os.path.join(BIN, "gunicorn"), "-c", "gunicorn.conf.py", "app:app"], cwd=ROOT,
                                env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"gunicorn still running after {timeout} s: {exc.stderr}") from None
    return result.returncode, result.stdout + result.stderr


@pytest.mark.parametrize("var, updates", BAD, ids=[f"{var}-{i}" for i, (var, _) in enumerate(BAD)])
def test_gunicorn_stops_in_the_master_with_one_line(tmp_path, var, updates):
    status, output = _gunicorn(_env(tmp_path, _resolve(tmp_path, updates)))
    assert status != 0, output
    _one_error_line(output, var)
    assert "Booting worker" not in output, "checked before any worker starts, so none is started again"


def test_gunicorn_stops_when_the_port_is_taken(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status, output = _gunicorn(_env(tmp_path, {"PORT": str(port)}))
    assert status != 0, output
    line = _one_error_line(output, f"PORT={port}")
    assert "HOST=127.0.0.1" in line
    assert "Booting worker" not in output


def test_gunicorn_refuses_a_word_for_web_concurrency_before_reading_its_config(tmp_path):
    # gunicorn itself reads WEB_CONCURRENCY as its default worker count when it is imported, before
    # gunicorn.conf.py: it exits at once with its own traceback (not one line), and never starts a worker.
    status, output = _gunicorn(_env(tmp_path, {"WEB_CONCURRENCY": "abc"}))
    assert status != 0, output
    assert "Booting worker" not in output


def test_the_systemd_units_pre_start_check_names_a_word_for_web_concurrency(tmp_path):
    """deploy/usage-monitor.service runs this line before gunicorn: one line naming the variable, exit 1."""
    unit = open(os.path.join(ROOT, "deploy", "usage-monitor.service"), encoding="utf-8").read()
    [line] = [l.partition("=")[2] for l in unit.splitlines() if l.startswith("ExecStartPre=")]
    args = line.split()[1:]  # the unit's own python: this test's
    assert args[0] == "config.py" and "WEB_CONCURRENCY" in args
    result = subprocess.run([sys.executable] + args, cwd=ROOT, env=_env(tmp_path, {"WEB_CONCURRENCY": "abc"}),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "WEB_CONCURRENCY" in result.stderr, result.stderr
    ok = subprocess.run([sys.executable] + args, cwd=ROOT, env=_env(tmp_path, {"WEB_CONCURRENCY": "2"}),
                        capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0 and ok.stderr == "", ok.stderr


def test_gunicorn_starts_with_good_settings(tmp_path):
    env = _env(tmp_path, {"WEB_CONCURRENCY": "1"})
    proc = subprocess.Popen([os.path.join(BIN, "gunicorn"), "-c", "gunicorn.conf.py", "app:app"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "gunicorn did not listen"
            try:
                socket.create_connection(("127.0.0.1", int(env["PORT"])), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.1)
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=30)
    assert "configuration error" not in stderr


# -- flask run and make run ------------------------------------------------------

FLASK_BAD = [BAD[0], BAD[3], BAD[5], BAD[6], BAD[13], BAD[15]]


@pytest.mark.parametrize("var, updates", FLASK_BAD, ids=[f"{var}-{i}" for i, (var, _) in enumerate(FLASK_BAD)])
def test_flask_run_exits_with_one_line(tmp_path, var, updates):
    env = _env(tmp_path, _resolve(tmp_path, updates))
    result = subprocess.run([os.path.join(BIN, "flask"), "--app", "app", "run", "--port", env["PORT"]], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0, result.stderr
    assert len(result.stderr.splitlines()) == 1 and result.stdout == "", result.stderr
    _one_error_line(result.stderr, var)


@pytest.fixture
def venv():
    """The VENV for make: the virtualenv running these tests, already installed (make installs nothing)."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    if not os.path.exists(os.path.join(sys.prefix, ".installed")):
        pytest.skip(f"{sys.prefix} is not a virtualenv that make installed")
    return sys.prefix


@pytest.mark.parametrize("var, updates", [("PORT", {"PORT": "abc"}), ("PORT", {"PORT": "99999"}),
                                          ("LOCAL_RETENTION_DAYS", {"LOCAL_RETENTION_DAYS": "0"})])
def test_make_run_exits_with_one_line(tmp_path, venv, var, updates):
    result = subprocess.run(["make", "--no-print-directory", "run", f"VENV={venv}"], cwd=ROOT,
                            env=_env(tmp_path, updates), capture_output=True, text=True, timeout=60)
    assert result.returncode != 0, result.stderr
    _one_error_line(result.stderr, var)  # besides it: make's own "*** [run] Error" line


# -- the checks themselves ---------------------------------------------------------

@pytest.mark.parametrize("value", ["", "   ", "\t"])
def test_a_set_but_blank_connection_string_is_an_error(tmp_path, monkeypatch, value):
    monkeypatch.setenv(CONN, value)
    with pytest.raises(config.ConfigError) as info:
        create_app({"TESTING": True, "TELEMETRY_DB": str(tmp_path / "t.db")})
    assert CONN in str(info.value) and "blank" in str(info.value)


def test_an_unset_connection_string_is_local_mode(tmp_path, monkeypatch):
    monkeypatch.delenv(CONN, raising=False)
    application = create_app({"TESTING": True, "TELEMETRY_DB": str(tmp_path / "t.db")})
    assert monitor_of(application).settings.mode == "local"


@pytest.mark.parametrize("uri", ["memory://", "redis://127.0.0.1:6379/0", "rediss://:pa55word@redis:6380/1",
                                 "redis+unix:///run/redis.sock", "redis+sentinel://127.0.0.1:26379/primary"])
def test_limit_store_uris_the_limits_library_serves_are_accepted(uri):
    config._require_limit_store("RATE_LIMIT_STORAGE_URI", uri)


@pytest.mark.parametrize("uri, words", [
    ("bogus://x", "redis://"), ("", "memory://"), ("async+redis://127.0.0.1", "scheme"),
    ("redis://:pa55word@127.0.0.1:port/0", "port"),
    ("memcached://127.0.0.1:11211", "pymemcache"),  # limits knows the scheme; its client is not installed
])
def test_bad_limit_store_uris_name_the_variable_never_the_uri(uri, words):
    with pytest.raises(config.ConfigError) as info:
        config._require_limit_store("RATE_LIMIT_STORAGE_URI", uri)
    message = str(info.value)
    assert message.startswith("RATE_LIMIT_STORAGE_URI") and words in message
    assert "pa55word" not in message and "127.0.0.1:11211" not in message


def test_checking_the_limit_store_connects_nowhere_and_starts_nothing(monkeypatch):
    import threading

    def refuse(*args, **kwargs):
        raise AssertionError("the check connected")
    monkeypatch.setattr(socket, "create_connection", refuse)
    before = threading.active_count()
    config._require_limit_store("RATE_LIMIT_STORAGE_URI", "redis://127.0.0.1:1/0")
    assert threading.active_count() == before


@pytest.mark.parametrize("env, expected", [
    ({}, {"bind": "127.0.0.1:8000", "workers": 2, "threads": 4}),
    ({"HOST": "0.0.0.0", "PORT": " 8080 ", "WEB_CONCURRENCY": "3", "GUNICORN_THREADS": "8"},
     {"bind": "0.0.0.0:8080", "workers": 3, "threads": 8}),
    ({"HOST": "::1"}, {"bind": "[::1]:8000", "workers": 2, "threads": 4}),
])
def test_server_settings(env, expected):
    assert config.server_settings(env) == expected


@pytest.mark.parametrize("var, value", [
    ("PORT", "abc"), ("PORT", "0"), ("PORT", "65536"), ("PORT", ""), ("WEB_CONCURRENCY", "abc"),
    ("WEB_CONCURRENCY", "0"), ("WEB_CONCURRENCY", "1.5"), ("GUNICORN_THREADS", "-1"), ("GUNICORN_THREADS", "x"),
    ("HOST", ""), ("HOST", "  "), ("HOST", "a host"), ("HOST", "http://x"),
])
def test_bad_server_settings_name_their_variable(var, value):
    with pytest.raises(config.ConfigError) as info:
        config.server_settings({var: value})
    assert str(info.value).startswith(var)


def _settings(**values):
    return config.Settings(**values)


def test_check_paths_accepts_a_new_file_in_a_new_folder(tmp_path):
    config.check_paths(_settings(telemetry_db=str(tmp_path / "new" / "deeper" / "t.db")))
    assert not (tmp_path / "new").exists(), "checking creates nothing"


@pytest.mark.parametrize("make, words", [
    (_tmp_folder, "it is a folder"),
    (lambda tmp_path: os.path.join(_tmp_file(tmp_path), "t.db"), "is a file, not a folder"),
    (lambda tmp_path: os.path.join(_tmp_file(tmp_path), "sub", "t.db"), "is a file, not a folder"),
])
def test_check_paths_names_telemetry_db(tmp_path, make, words):
    path = make(tmp_path)
    with pytest.raises(config.ConfigError) as info:
        config.check_paths(_settings(telemetry_db=path))
    assert str(info.value).startswith(f"TELEMETRY_DB={path} cannot be opened or created") and words in str(info.value)


def test_check_paths_names_telemetry_storage_in_azure_mode(tmp_path):
    blocker = _tmp_file(tmp_path)
    settings = _settings(applicationinsights_connection_string=AZURE[CONN], telemetry_storage=blocker,
                         telemetry_db=_tmp_folder(tmp_path))  # TELEMETRY_DB is not used in Azure mode
    with pytest.raises(config.ConfigError) as info:
        config.check_paths(settings)
    assert str(info.value).startswith(f"TELEMETRY_STORAGE={blocker}") and "it is a file" in str(info.value)


def test_create_app_alone_still_degrades_when_the_database_cannot_be_opened(tmp_path):
    # An app that embeds UsageMonitor keeps running (events answer 503); the service's entry points refuse to start.
    application = create_app({"TESTING": True, "TELEMETRY_DB": _tmp_folder(tmp_path)})
    try:
        assert application.test_client().post("/event", json={"event_name": "x"}).status_code == 503
    finally:
        monitor_of(application).close()
