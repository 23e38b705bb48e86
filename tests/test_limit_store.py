"""The rate-limit store (a real redis-server on 127.0.0.1) killed, stopped with SIGSTOP, unreachable at start and
restarted: events are still accepted (limits counted per worker in memory), never a 500, /healthz names the store
while it is down, one log line per outage and one when it ends, and a hung store costs a request about a second."""
import logging
import signal
import subprocess
import threading
import time

import pytest
import redis

from app import create_app
from telemetry import monitor_of
from test_production import _free_port, _require, _stop, _wait_port

REQUEST_BOUND = 3.0  # generous: a request costs at most two store calls of security.STORE_TIMEOUT (0.5 s)


class RedisServer:
    """Debian's redis-server on 127.0.0.1 and a fixed port, which it keeps across restarts."""

    def __init__(self, port):
        self.port, self.proc = port, None

    def start(self):
        self.proc = subprocess.Popen([_require("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "no", "--daemonize", "no"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.port, self.proc, "redis-server")

    def kill(self):
        self.proc.kill()
        self.proc.wait(10)

    def pause(self):
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self):
        self.proc.send_signal(signal.SIGCONT)

    def close(self):
        if self.proc is not None:
            self.resume()
            _stop(self.proc, 10)

    def limit_keys(self):
        return redis.Redis(port=self.port, socket_timeout=5).keys("LIMITS*")


@pytest.fixture
def redis_server():
    """A redis-server on a free port (not started yet: `.start()`)."""
    server = RedisServer(_free_port())
    yield server
    server.close()


@pytest.fixture
def make_limited_app(tmp_path):
    """A local-mode app whose rate limits are in the given redis port."""
    apps = []

    def make(port, limit="1000 per minute"):
        application = create_app({"TESTING": True, "TELEMETRY_DB": str(tmp_path / "t.db"),
                                  "RATE_LIMIT_ENABLED": "true", "EVENT_RATE_LIMIT": limit,
                                  "RATE_LIMIT_STORAGE_URI": f"redis://127.0.0.1:{port}/0"})
        apps.append(application)
        return application
    yield make
    for application in apps:
        monitor_of(application).close()


def _post(client):
    started = time.monotonic()
    status = client.post("/event", json={"event_name": "x"}).status_code
    return status, time.monotonic() - started


def _health(client):
    started = time.monotonic()
    response = client.get("/healthz")
    body = response.get_json()
    assert response.status_code == (503 if body["problems"] else 200)
    return [p for p in body["problems"] if p.startswith("rate-limit store")], time.monotonic() - started


def _outage_lines(caplog):
    lines = [r for r in caplog.records if r.name == "usage_monitor.service" and "rate-limit store" in r.getMessage()]
    down = [r for r in lines if "unreachable" in r.getMessage()]
    up = [r for r in lines if "answers again" in r.getMessage()]
    return len(down), len(up)


def _no_tracebacks(caplog):
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []


def test_killed_then_restarted(redis_server, make_limited_app, caplog):
    caplog.set_level(logging.INFO)
    redis_server.start()
    application = make_limited_app(redis_server.port)
    client = application.test_client()
    assert _post(client)[0] == 202 and _health(client)[0] == []
    assert redis_server.limit_keys(), "counted in Redis"
    redis_server.kill()
    statuses = [_post(client)[0] for _ in range(20)]
    assert statuses == [202] * 20, statuses
    assert client.get("/dashboard/usage?days=1").status_code == 200
    problems, _ = _health(client)
    assert len(problems) == 1 and f"redis://127.0.0.1:{redis_server.port}/0 unreachable" in problems[0], problems
    assert "limits are counted per worker in memory" in problems[0]
    assert _outage_lines(caplog) == (1, 0), "one line for the outage, not one per request"
    redis_server.start()
    assert _health(client)[0] == [], "healthy again as soon as the store answers"
    statuses = [_post(client)[0] for _ in range(5)]
    assert statuses == [202] * 5
    assert redis_server.limit_keys(), "counted in Redis again"
    assert _outage_lines(caplog) == (1, 1)
    _no_tracebacks(caplog)


def test_limits_hold_in_memory_while_the_store_is_down(redis_server, make_limited_app):
    redis_server.start()
    application = make_limited_app(redis_server.port, limit="5 per minute")
    client = application.test_client()
    redis_server.kill()
    statuses = [_post(client)[0] for _ in range(8)]
    assert statuses == [202] * 5 + [429] * 3, statuses
    response = client.post("/event", json={"event_name": "x"})
    assert response.status_code == 429 and int(response.headers["Retry-After"]) > 0


def test_a_hung_store_costs_a_request_about_a_second(redis_server, make_limited_app, caplog):
    caplog.set_level(logging.INFO)
    redis_server.start()
    application = make_limited_app(redis_server.port)
    client = application.test_client()
    assert _post(client)[0] == 202
    redis_server.pause()
    results = [_post(client) for _ in range(6)]
    assert [status for status, _ in results] == [202] * 6
    worst = max(elapsed for _, elapsed in results)
    assert worst < REQUEST_BOUND, f"a request waited {worst:.2f} s on a stopped store"
    problems, elapsed = _health(client)
    assert len(problems) == 1 and elapsed < REQUEST_BOUND, (problems, elapsed)
    assert client.get("/dashboard/usage?days=1").status_code == 200
    redis_server.resume()
    assert _health(client)[0] == []
    assert _post(client)[0] == 202
    assert _outage_lines(caplog) == (1, 1)
    _no_tracebacks(caplog)


def test_concurrent_requests_as_the_store_hangs_log_one_line_and_no_traceback(redis_server, make_limited_app,
                                                                              caplog):
    caplog.set_level(logging.INFO)
    redis_server.start()
    application = make_limited_app(redis_server.port)
    assert _post(application.test_client())[0] == 202
    redis_server.pause()
    results = []

    def post_three():
        client = application.test_client()
        results.extend(_post(client) for _ in range(3))

    threads = [threading.Thread(target=post_three) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert [status for status, _ in results] == [202] * 24
    assert max(elapsed for _, elapsed in results) < REQUEST_BOUND
    assert _outage_lines(caplog) == (1, 0)
    _no_tracebacks(caplog)


def test_unreachable_at_start_then_started(redis_server, make_limited_app, caplog):
    caplog.set_level(logging.INFO)
    application = make_limited_app(redis_server.port)  # nothing listens there yet
    client = application.test_client()
    assert len(_health(client)[0]) == 1, "degraded from the start"
    statuses = [_post(client)[0] for _ in range(5)]
    assert statuses == [202] * 5
    redis_server.start()
    assert _health(client)[0] == []
    assert _post(client)[0] == 202 and redis_server.limit_keys()
    assert _outage_lines(caplog) == (1, 1)
    _no_tracebacks(caplog)


def test_a_memory_store_has_no_store_problem(app, client):
    assert monitor_of(app).limit_store.problem() is None
    assert client.get("/healthz").status_code == 200


def test_the_store_is_named_without_its_password(redis_server, tmp_path):
    application = create_app({"TESTING": True, "TELEMETRY_DB": str(tmp_path / "t.db"), "RATE_LIMIT_ENABLED": "true",
                              "RATE_LIMIT_STORAGE_URI": f"redis://:s3cret@127.0.0.1:{redis_server.port}/0"})
    try:
        response = application.test_client().get("/healthz")
        assert response.status_code == 503
        assert f"rate-limit store redis://127.0.0.1:{redis_server.port}/0 unreachable" in response.get_json()[
            "problems"][0]
        assert "s3cret" not in response.get_data(as_text=True)
    finally:
        monitor_of(application).close()
