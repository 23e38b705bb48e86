"""The production setup of deploy/: nginx in front of gunicorn (2 workers), rate limits in Redis, all on 127.0.0.1.

Shows that slow and idle clients do not delay a normal one, and that a limit holds across workers.
"""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUNICORN = os.path.join(os.path.dirname(sys.executable), "gunicorn")


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_port(port, proc, what, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{what} exited with {proc.returncode}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"{what} did not listen on {port}")


def _stop(proc, timeout=30):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _require(binary):
    path = shutil.which(binary) or next((p for p in (f"/usr/sbin/{binary}", f"/usr/bin/{binary}")
                                          if os.access(p, os.X_OK)), None)
    if path is None:
        pytest.fail(f"{binary} is not installed: `make install` installs it (apt-get, as root)")
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Redis, gunicorn (2 workers, limits in Redis, TRUSTED_PROXIES=1) and nginx with deploy/nginx.conf."""
    tmp = tmp_path_factory.mktemp("production")
    procs = []
    redis_port, app_port, nginx_port = _free_port(), _free_port(), _free_port()
    redis = subprocess.Popen([_require("redis-server"), "--port", str(redis_port), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no", "--daemonize", "no"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.append(redis)
    _wait_port(redis_port, redis, "redis-server")

    access_log = tmp / "access.log"
    env = dict(os.environ, HOST="127.0.0.1", PORT=str(app_port), WEB_CONCURRENCY="2",
               TELEMETRY_DB=str(tmp / "telemetry.db"), RATE_LIMIT_ENABLED="true", TRUSTED_PROXIES="1",
               RATE_LIMIT_STORAGE_URI=f"redis://127.0.0.1:{redis_port}/0", EVENT_RATE_LIMIT="20 per minute",
               GUNICORN_ACCESS_LOG=str(access_log), GUNICORN_CMD_ARGS='--access-logformat "%(p)s %(s)s %(U)s"')
    gunicorn_err = open(tmp / "gunicorn.stderr", "w")
    gunicorn = subprocess.Popen([GUNICORN, "-c", "gunicorn.conf.py", "app:app"], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=gunicorn_err)
    procs.append(gunicorn)
    _wait_port(app_port, gunicorn, "gunicorn")

    site = open(os.path.join(ROOT, "deploy", "nginx.conf")).read()
    site = site.replace("listen 80;", f"listen 127.0.0.1:{nginx_port};").replace(
        "server 127.0.0.1:8000;", f"server 127.0.0.1:{app_port};")
    assert f"127.0.0.1:{nginx_port}" in site and f"127.0.0.1:{app_port}" in site, "deploy/nginx.conf changed shape"
    temp_paths = "".join(f"{name}_temp_path {tmp}/{name};\n" for name in
                         ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (tmp / "nginx.conf").write_text(
        ("user root;\n" if os.geteuid() == 0 else "")
        + f"daemon off;\nworker_processes 1;\npid {tmp}/nginx.pid;\nerror_log {tmp}/nginx-error.log;\n"
        + "events { worker_connections 1024; }\n"
        + f"http {{\naccess_log off;\n{temp_paths}{site}\n}}\n")
    nginx = subprocess.Popen([_require("nginx"), "-p", str(tmp), "-c", str(tmp / "nginx.conf"), "-e",
                              str(tmp / "nginx-error.log")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.append(nginx)
    _wait_port(nginx_port, nginx, "nginx")
    yield {"nginx": f"http://127.0.0.1:{nginx_port}", "app": f"http://127.0.0.1:{app_port}",
           "access_log": access_log, "stderr": tmp / "gunicorn.stderr", "nginx_port": nginx_port}
    for proc in reversed(procs):
        _stop(proc)
    gunicorn_err.close()


def _post_event(base):
    request = urllib.request.Request(f"{base}/event", data=b'{"event_name": "Limited"}', method="POST",
                                     headers={"Content-Type": "application/json", "Connection": "close"})
    try:
        return urllib.request.urlopen(request, timeout=10).status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_a_limit_holds_across_workers_and_through_the_proxy(stack):
    statuses = [_post_event(stack["app"]) for _ in range(80)]  # a new connection each: both workers serve
    assert statuses.count(202) == 20 and statuses.count(429) == 60, statuses
    assert _post_event(stack["nginx"]) == 429, "through nginx the client is the same address, already limited"
    lines = [line.split() for line in stack["access_log"].read_text().splitlines() if "/event" in line]
    pids = {pid for pid, status, _ in lines if status in ("202", "429")}
    assert len(pids) == 2, f"both workers must have answered: {pids}"
    stderr = stack["stderr"].read_text()
    assert len(re.findall(r"TRUSTED_PROXIES=1: ", stderr)) == 1, "one warning line at start, naming what is trusted"
    assert "memory://" not in stderr, "limits in Redis: no per-worker warning"


def _slow_header(port, stop):
    """A client that sends its request headers one byte at a time."""
    sock = socket.create_connection(("127.0.0.1", port))
    try:
        sock.sendall(b"POST /event HTTP/1.1\r\nHost: slow\r\n")
        while not stop.wait(0.5):
            sock.sendall(b"X")
    except OSError:
        pass
    finally:
        sock.close()


def test_slow_and_idle_clients_do_not_delay_a_normal_one(stack):
    stop = threading.Event()
    slow = [threading.Thread(target=_slow_header, args=(stack["nginx_port"], stop), daemon=True) for _ in range(50)]
    idle = [socket.create_connection(("127.0.0.1", stack["nginx_port"])) for _ in range(50)]
    for thread in slow:
        thread.start()
    try:
        time.sleep(1.0)  # every slow and idle connection is open and holding on
        worst = 0.0
        for _ in range(10):
            started = time.monotonic()
            with urllib.request.urlopen(f"{stack['nginx']}/healthz", timeout=10) as response:
                assert response.status == 200
            worst = max(worst, time.monotonic() - started)
            time.sleep(0.1)
        assert worst < 1.0, f"a normal client waited {worst:.2f} s"
    finally:
        stop.set()
        for sock in idle:
            sock.close()
        for thread in slow:
            thread.join(5)
