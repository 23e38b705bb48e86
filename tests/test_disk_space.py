"""A full disk never loses an accepted event: the watermark refuses before it is full, the reserve makes room.

As root, on a real 8 MB tmpfs: events are refused at LOCAL_MIN_FREE_MB (and /healthz says why), accepted
again once there is room (no restart); then, with accepted events still uncommitted, the disk is filled to
the brim and the service stopped. With a reserve, the pending file is written in its room; without one,
the journal is kept. Either way the next start stores every accepted event, once.
"""
import contextlib
import os
import sqlite3
import subprocess
import time

import pytest

from app import create_app
from telemetry import monitor_of


def _mount(folder, size):
    if os.geteuid() != 0:
        pytest.fail("these tests mount a tmpfs: run them as root (CI does)")
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs: {mounted.stderr.strip() or mounted.returncode}")


def _fill(path, chunk=64 * 1024, limit=None):
    """Grow the file at `path` until the disk is full (or it has grown by `limit` bytes)."""
    grown = 0
    with open(path, "ab") as fh, contextlib.suppress(OSError):
        while limit is None or grown < limit:
            fh.write(b"\0" * chunk)
            fh.flush()
            grown += chunk


def _stored(db):
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return dict(conn.execute("SELECT event_id, COUNT(*) FROM events GROUP BY event_id").fetchall())


def _wait(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.mark.parametrize("reserve_mb", ["1", "0"])
def test_a_disk_filled_to_the_brim_at_shutdown_loses_no_accepted_event(tmp_path, reserve_mb):
    small = tmp_path / "small"
    _mount(small, "8m")
    db = small / "t.db"
    config = {"TESTING": True, "TELEMETRY_DB": str(db), "LOCAL_MIN_FREE_MB": "2", "LOCAL_RESERVE_MB": reserve_mb,
              "HEALTH_MIN_FREE_MB": "0", "RATE_LIMIT_ENABLED": "false"}
    accepted, apps = [], []
    try:
        app = create_app(dict(config, LOCAL_FLUSH_INTERVAL="0.01"))
        apps.append(app)
        client = app.test_client()
        monitor_of(app).start()
        reserve = str(db) + ".reserve"
        if reserve_mb != "0":
            _wait(lambda: os.path.exists(reserve), what="the reserve to be written")

        # 1. Under the watermark: refused with 503 naming it, before the disk is full.
        for _ in range(50):
            resp = client.post("/event", json={"event_name": "Before", "details": {"pad": "x" * 1000}})
            assert resp.status_code == 202, resp.get_json()
            accepted.append(resp.get_json()["event_id"])
        free = os.statvfs(small).f_bavail * os.statvfs(small).f_frsize
        _fill(small / "filler", limit=free - 1536 * 1024)  # 1.5 MB left: under the 2 MB watermark
        time.sleep(0.6)  # the watermark is checked twice a second
        refusal = client.post("/event", json={"event_name": "Refused"})
        assert refusal is not None and refusal.status_code == 503, "the watermark never refused an event"
        assert refusal.headers.get("Retry-After")
        assert "LOCAL_MIN_FREE_MB=2" in refusal.get_json()["error"]["message"]
        health = client.get("/healthz")
        assert health.status_code == 503 and any("LOCAL_MIN_FREE_MB" in p for p in health.get_json()["problems"])

        # 2. Room again: accepted without a restart.
        os.remove(small / "filler")
        time.sleep(0.6)
        resp = client.post("/event", json={"event_name": "Recovered"})
        assert resp.status_code == 202, resp.get_json()
        accepted.append(resp.get_json()["event_id"])
        assert monitor_of(app).flush()
        monitor_of(app).close(timeout=5)

        # 3. Accepted and not yet written (the writer gathers for a minute), then the disk fills to the brim.
        app = create_app(dict(config, LOCAL_FLUSH_INTERVAL="60", LOCAL_BATCH_SIZE="100000"))
        apps.append(app)
        client = app.test_client()
        for _ in range(100):
            resp = client.post("/event", json={"event_name": "Held", "details": {"pad": "y" * 500}})
            assert resp.status_code == 202, resp.get_json()
            accepted.append(resp.get_json()["event_id"])
        _fill(small / "brim")
        monitor_of(app).close(timeout=3)  # the stop, with the disk still full
        kept = [p for p in os.listdir(small) if "journal" in p]
        if reserve_mb != "0":  # the reserve gave the last commit (or the pending file) its room
            assert not os.path.exists(reserve) and not kept, kept
        else:  # no room at all: the journal itself is kept, as a pending claim for the next start
            assert kept and all(p.startswith("t.db.pending.jsonl.") for p in kept), kept
        os.remove(small / "brim")

        # 4. The next start imports what the stop saved (the pending file, or the journal).
        app = create_app(dict(config, LOCAL_FLUSH_INTERVAL="0.01"))
        apps.append(app)
        monitor_of(app).start()
        _wait(lambda: len(_stored(db)) >= len(set(accepted)), what="every accepted event to be stored")
        assert monitor_of(app).flush()
        stored = _stored(db)
        missing = [e for e in accepted if e not in stored]
        assert not missing, f"{len(missing)} of {len(accepted)} accepted events are gone"
        assert all(stored[e] == 1 for e in accepted)
    finally:
        for application in apps:
            monitor_of(application).close(timeout=2)
        subprocess.run(["umount", "-l", str(small)], check=False)
