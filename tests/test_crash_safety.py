"""202 means kept: `kill -9` of gunicorn's master and workers mid-stream loses no accepted event, in both modes.

Each round starts the production command (gunicorn -c gunicorn.conf.py app:app, 2 workers), posts
from 8 clients (single events and /events batches), kills every process of the server with SIGKILL
while they post, and starts the server again on the same files. Then every event_id that was
answered 202 must be there: stored once in the local store, or received by the (fake) ingestion
endpoint in Azure mode, where a resent copy is allowed (the usage queries count an event_id once).
"""
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
import requests

from fake_ingestion import FakeIngestion

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUNICORN = os.path.join(os.path.dirname(sys.executable), "gunicorn")
ROUNDS = 5
CLIENTS = 8


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve(db, port, log, fake=None):
    """gunicorn with 2 workers on `db` (Azure mode towards `fake` if given), in a session of its own."""
    env = dict(os.environ, HOST="127.0.0.1", PORT=str(port), WEB_CONCURRENCY="2", TELEMETRY_DB=str(db),
               RATE_LIMIT_ENABLED="false", LOG_LEVEL="WARNING")
    env.pop("APPLICATIONINSIGHTS_CONNECTION_STRING", None)
    if fake is not None:
        env.update(APPLICATIONINSIGHTS_CONNECTION_STRING=fake.connection_string, DASHBOARD_TOKEN="t" * 32,
                   TELEMETRY_STORAGE=str(db.parent / "outbox"), EXPORT_INTERVAL="0.5", EXPORT_RETRY_INTERVAL="0.5")
    proc = subprocess.Popen([GUNICORN, "-c", "gunicorn.conf.py", "app:app"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"gunicorn exited with {proc.returncode}"
        try:
            if requests.get(f"http://127.0.0.1:{port}/livez", timeout=1).status_code == 200:
                return proc
        except requests.RequestException:
            time.sleep(0.05)
    raise AssertionError("gunicorn did not answer /livez within 30 s")


def _stop(proc):
    """SIGTERM and wait (a graceful stop writes what is queued)."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


class Clients:
    """CLIENTS threads posting until told to stop; `accepted` holds every event_id answered 202."""

    def __init__(self, base):
        self.base, self.accepted, self.lock, self.stop = base, [], threading.Lock(), threading.Event()
        self.threads = [threading.Thread(target=self._post, args=(n,), daemon=True) for n in range(CLIENTS)]

    def _post(self, n):
        session = requests.Session()
        i = 0
        while not self.stop.is_set():
            i += 1
            try:
                if i % 5 == 0:
                    batch = {"events": [{"event_name": "Batched", "details": {"client": str(n)}} for _ in range(5)]}
                    resp = session.post(f"{self.base}/events", json=batch, timeout=5)
                    ids = [e for e in resp.json().get("event_ids", []) if e] if resp.status_code == 202 else []
                else:
                    resp = session.post(f"{self.base}/event", json={"event_name": "Posted"}, timeout=5)
                    ids = [resp.json()["event_id"]] if resp.status_code == 202 else []
            except (requests.RequestException, ValueError):
                time.sleep(0.01)  # the server is gone: an answer never came, nothing was acknowledged
                continue
            with self.lock:
                self.accepted.extend(ids)

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for thread in self.threads:
            thread.join(10)


def _stored(db):
    with sqlite3.connect(db) as conn:
        return dict(conn.execute("SELECT event_id, COUNT(*) FROM events GROUP BY event_id").fetchall())


@pytest.mark.parametrize("round_", range(ROUNDS))
@pytest.mark.parametrize("mode", ["local", "azure"])
def test_kill_9_of_every_process_mid_stream_loses_no_accepted_event(tmp_path, mode, round_):
    db, port = tmp_path / "t.db", _free_port()
    fake = FakeIngestion().start() if mode == "azure" else None
    try:
        with open(tmp_path / "gunicorn.log", "w") as log:
            server = _serve(db, port, log, fake)
            with Clients(f"http://127.0.0.1:{port}") as clients:
                deadline = time.monotonic() + 10
                while len(clients.accepted) < 1500 and time.monotonic() < deadline:
                    time.sleep(0.02)
                os.killpg(server.pid, signal.SIGKILL)  # the master and both workers, mid-stream
                server.wait(10)
                time.sleep(0.2)
            accepted = list(clients.accepted)
            assert len(accepted) >= 500, f"only {len(accepted)} events were accepted before the kill"
            assert len(set(accepted)) == len(accepted)
            server = _serve(db, port, log, fake)  # the restart takes over what the dead processes journaled
            if fake is not None:
                fake.wait_for(lambda f: set(accepted) <= f.event_ids(), timeout=60)
            _stop(server)
        if fake is None:
            stored = _stored(db)
            missing = [e for e in accepted if e not in stored]
            assert all(stored[e] == 1 for e in accepted if e in stored), "an accepted event was stored twice"
            leftovers = [p for p in os.listdir(tmp_path) if ".journal." in p or ".pending.jsonl" in p]
        else:
            received = fake.event_ids()
            missing = [e for e in accepted if e not in received]
            leftovers = os.listdir(tmp_path / "outbox" / "journal")
        print(f"{mode} round {round_}: {len(accepted)} accepted before the kill, {len(missing)} missing")
        assert not missing, f"{len(missing)} of {len(accepted)} events answered 202 are missing after kill -9"
        assert not leftovers, f"the journals are removed once what they hold is safe: {leftovers}"
    finally:
        if fake is not None:
            fake.stop()
