"""Local mode, "accepted means stored": the real app on a real SQLite file meets real faults.

Each test posts events through POST /event and proves that every event_id answered 202 is in
the store after recovery, that the others were answered 503 (with Retry-After), and that the
queue never held more than LOCAL_QUEUE_CAPACITY records. Faults: a corrupt page, a file
replaced by garbage, a deleted file, a full disk (a 2 MB tmpfs as root, and everywhere an
injected "database or disk is full" through local_store's connection seam), an unwritable
folder, a writer stuck at shutdown; then retention and the size cap under a controlled clock.
"""
import contextlib
import glob
import json
import logging
import os
import sqlite3
import subprocess
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest

import local_store
from app import create_app
from config import ConfigError
from fault_sqlite import SqliteFaults
from local_store import LocalStore
from local_store.connection import connect
from local_store.queries import raw_usage_rows, rollup_usage_rows, rollups_cover
from local_store.rows import utc_day
from telemetry import DependencyRecord, EventRecord, RequestRecord, monitor_of

DAY = 86400


# -- helpers ---------------------------------------------------------------

class Clock:
    """The store's injectable clock: time.time() until a test moves it."""

    def __init__(self):
        self.offset = 0.0

    def __call__(self):
        return time.time() + self.offset


@pytest.fixture
def apps():
    """make(path, **config): the real app on `path`, its store built from the app's settings."""
    made = []

    def make(db, clock=None, **config):
        settings = {"TESTING": True, "TELEMETRY_DB": str(db), "LOCAL_FLUSH_INTERVAL": "0.01"}
        settings.update(config)
        application = create_app(settings)
        monitor = monitor_of(application)
        # The LOCAL_* settings and an injectable clock: the store built from the app's own settings.
        monitor.sink = monitor.source = LocalStore.from_settings(monitor.settings, clock=clock or time.time)
        made.append(application)
        return application

    yield make
    for application in made:
        monitor_of(application).close(timeout=2)


@pytest.fixture
def faults(monkeypatch):
    injected = SqliteFaults().install(monkeypatch)
    yield injected
    injected.heal()


def store_of(app):
    return monitor_of(app).sink


class Poster:
    """POSTs events, remembering which were accepted and checking the queue bound after each."""

    def __init__(self, app):
        self.app = app
        self.client = app.test_client()
        self.accepted = []
        self.refused = 0
        self.max_queued = 0

    def post(self, count, name="Fault", size=0):
        accepted_now = refused_now = 0
        for i in range(count):
            body = {"event_name": name, "details": {"i": i, "pad": "x" * size}}
            response = self.client.post("/event", json=body)
            if response.status_code == 202:
                self.accepted.append(response.get_json()["event_id"])
                accepted_now += 1
            else:
                assert response.status_code == 503, response.get_data(as_text=True)
                assert response.headers.get("Retry-After")
                assert response.get_json()["error"]["code"] == "storage_unavailable"
                self.refused += 1
                refused_now += 1
            self.check_bound()
        return accepted_now, refused_now

    def check_bound(self):
        store = store_of(self.app)
        queued = store.queued
        self.max_queued = max(self.max_queued, queued)
        assert queued <= store.queue_capacity


def stored_ids(path):
    """The event ids in the file at `path` (read-only: never creates it)."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.OperationalError:
        return set()
    try:
        return {row[0] for row in conn.execute("SELECT event_id FROM events")}
    except sqlite3.OperationalError:  # between a file moved aside and the new one
        return set()
    finally:
        conn.close()


def wait_until(predicate, timeout=10.0, message="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {message}")


def error_lines(caplog, text):
    return [r for r in caplog.records if r.levelno >= logging.ERROR and text in r.getMessage()]


def _usage(client, days=1):
    response = client.get(f"/dashboard/usage?days={days}")
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


# -- the queue and the writer's failures -------------------------------------------------

def test_a_full_disk_refuses_events_until_it_recovers_and_loses_none(apps, faults, tmp_path, caplog):
    app = apps(tmp_path / "t.db", LOCAL_QUEUE_CAPACITY="200")
    store, poster = store_of(app), Poster(app)
    poster.post(20, "Before")
    assert store.flush()
    faults.fail("database or disk is full")
    poster.post(10, "During")
    wait_until(lambda: store.health()["failing"], message="the writer to report the failure")
    accepted, refused = poster.post(300, "During")
    assert accepted == 0 and refused == 300  # events are refused while the writer fails
    health = store.health()
    assert health["failing"] is True and health["queue_capacity"] == 200
    assert "database or disk is full" in health["last_error"]
    problems = store.problems()
    assert any(p.startswith("local store writer failing") and "disk full" in p for p in problems), problems
    assert any("queue" in p and "% full" in p for p in problems), problems  # requests filled it
    body = app.test_client().get("/healthz")
    assert body.status_code == 503 and body.get_json()["status"] == "degraded"
    assert poster.max_queued == 200  # requests are queued while there is room, never more
    assert monitor_of(app).failures["request"] > 0

    faults.heal()
    assert store.flush(10)
    assert store.health()["failing"] is False and store.problems() == []
    assert app.test_client().get("/healthz").status_code == 200, "healthy again after the disk recovered"
    accepted, refused = poster.post(20, "After")
    assert (accepted, refused) == (20, 0)
    assert store.flush()
    assert set(poster.accepted) <= stored_ids(tmp_path / "t.db")
    assert len(error_lines(caplog, "cannot write to")) == 1  # one line when it starts failing


def test_a_full_tmpfs_disk(apps, tmp_path):
    """As root: the database on a 2 MB tmpfs, filled up; events are refused, then stored once space is freed."""
    if os.geteuid() != 0:
        pytest.skip("mounting a 2 MB tmpfs needs root (the injected full-disk test runs everywhere)")
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() or mounted.returncode}")
    app = None
    try:
        app = apps(small / "t.db", LOCAL_QUEUE_CAPACITY="5000", HEALTH_MIN_FREE_MB="0", LOCAL_MIN_FREE_MB="0")
        store, poster = store_of(app), Poster(app)
        poster.post(5, "Before")
        assert store.flush()
        with contextlib.closing(sqlite3.connect(small / "t.db")) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the log holds no reusable room
        (small / "filler").write_bytes(b"\0" * 1024 * 1024)  # room to free later
        with open(small / "top-up", "wb") as fh:  # and every other free block
            with contextlib.suppress(OSError):
                while True:
                    fh.write(b"\0" * 65536)
                    fh.flush()
        for _ in range(300):
            poster.post(1, "Full")
            if store.health()["failing"]:
                break
        wait_until(lambda: store.health()["failing"], message="the writer to fail on the full disk")
        assert "full" in store.health()["last_error"]
        _, refused = poster.post(20, "Full")
        assert refused == 20
        assert app.test_client().get("/healthz").status_code == 503
        os.remove(small / "filler")
        assert store.flush(15)
        poster.post(5, "After")
        assert store.flush()
        assert store.health()["failing"] is False
        assert app.test_client().get("/healthz").status_code == 200
        assert set(poster.accepted) <= stored_ids(small / "t.db")
    finally:
        if app is not None:
            monitor_of(app).close(timeout=5)
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_a_stuck_writer_fills_the_queue_then_events_are_refused_as_queue_full(apps, faults, tmp_path):
    app = apps(tmp_path / "t.db", LOCAL_QUEUE_CAPACITY="100")
    store, poster = store_of(app), Poster(app)
    poster.post(3)
    assert store.flush()
    faults.hang(("COMMIT",))  # a commit that does not come back: not an error, so nothing says "failing"
    accepted, refused = poster.post(120)
    assert refused > 0 and accepted >= 40  # one event and one request record per POST, 100 at most
    assert poster.max_queued == 100
    response = poster.client.post("/event", json={"event_name": "Late"})
    assert response.status_code == 503 and response.headers["Retry-After"]
    with pytest.raises(local_store.StorageUnavailable, match="queue full"):
        store.track_event(EventRecord(name="Direct", properties={}))
    assert any(p.startswith("local store queue 100 % full") for p in store.problems())
    faults.heal()
    assert store.flush(10)
    assert set(poster.accepted) <= stored_ids(tmp_path / "t.db")


# -- the file: corrupt, replaced, deleted ----------------------------------------------------

def _corrupt_page_of(path, table):
    """Overwrite the first page of `table` with garbage, in place, after a checkpoint (the writer then reads it)."""
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        try:
            (pageno,) = conn.execute("SELECT pageno FROM dbstat WHERE name = ? ORDER BY pageno LIMIT 1",
                                     (table,)).fetchone()
        except sqlite3.OperationalError:
            pytest.skip("this SQLite has no dbstat table")
        (page_size,) = conn.execute("PRAGMA page_size").fetchone()
    finally:
        conn.close()
    with open(path, "r+b") as fh:
        fh.seek((pageno - 1) * page_size)
        fh.write(os.urandom(page_size))


def test_a_corrupt_page_mid_run_moves_the_file_aside_and_keeps_every_accepted_event(apps, tmp_path, caplog):
    db = tmp_path / "t.db"
    app = apps(db)
    store, poster = store_of(app), Poster(app)
    poster.post(60, "Before", size=300)
    assert store.flush()
    _corrupt_page_of(db, "ev_day")  # a rollup page every event updates
    poster.post(40, "After")
    wait_until(lambda: store.quarantined, message="the corrupt file to be moved aside")
    poster.post(20, "Later")
    # The rows of the corrupt file that can still be read are copied back in the background.
    wait_until(lambda: set(poster.accepted) <= stored_ids(db), message="every accepted event in the new store")
    moved = glob.glob(str(db) + ".corrupt-*")
    assert [p for p in moved if not p.endswith(("-wal", "-shm"))] == store.quarantined
    lines = error_lines(caplog, "is corrupt")
    assert len(lines) == 1 and str(db) in lines[0].getMessage()
    assert store.health()["failing"] is False
    wait_until(lambda: not store.maintaining, message="the copy to finish")
    events = _usage(poster.client)["events"]
    assert events["total"] == len(poster.accepted) and poster.refused == 0
    assert poster.client.get("/healthz").status_code == 200, "healthy on the new file"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_a_corrupt_page_seen_by_a_dashboard_read_answers_503_then_the_file_is_replaced(apps, tmp_path, caplog):
    db = tmp_path / "t.db"
    app = apps(db)
    store, poster = store_of(app), Poster(app)
    poster.post(30, "Before")
    assert store.flush()
    _corrupt_page_of(db, "req_hist_all")  # read by the dashboard (latency percentiles)
    response = poster.client.get("/dashboard/usage?days=1")
    if response.status_code == 503:  # the read met the page before the writer did
        assert response.headers["Retry-After"] and "being recovered" in response.get_json()["error"]["message"]
    else:
        assert response.status_code == 200
    wait_until(lambda: store.quarantined, message="the corrupt file to be moved aside")
    wait_until(lambda: set(poster.accepted) <= stored_ids(db), message="the events copied back")
    assert store.flush()
    assert _usage(poster.client)["events"]["total"] == 30
    assert len(error_lines(caplog, "is corrupt")) == 1


def test_a_file_replaced_by_garbage_is_moved_aside_and_new_events_are_stored(apps, tmp_path, caplog):
    db = tmp_path / "t.db"
    app = apps(db)
    store, poster = store_of(app), Poster(app)
    poster.post(10, "Before")
    assert store.flush()
    garbage = tmp_path / "garbage"
    garbage.write_bytes(os.urandom(64 * 1024))
    os.replace(garbage, db)  # what the old file held went with it
    before = len(poster.accepted)
    poster.post(30, "After")
    assert store.flush(10)
    after = poster.accepted[before:]
    assert len(after) + poster.refused == 30
    assert set(after) <= stored_ids(db)
    assert len(store.quarantined) == 1 and os.path.exists(store.quarantined[0])
    assert open(store.quarantined[0], "rb").read(16) != b"SQLite format 3\0"
    assert len(error_lines(caplog, "is corrupt")) == 1
    assert _usage(poster.client)["events"]["total"] == len(after)


def test_the_file_deleted_mid_run_is_recreated_and_the_dashboard_answers(apps, tmp_path):
    db = tmp_path / "t.db"
    app = apps(db)
    store, poster = store_of(app), Poster(app)
    poster.post(10, "Before")
    assert store.flush()
    os.remove(db)  # its -wal and -shm stay behind
    doc = _usage(poster.client)  # 200, not 500 "no such table"
    assert doc["events"]["total"] == 0
    before = len(poster.accepted)
    poster.post(25, "After")
    assert store.flush()
    after = poster.accepted[before:]
    assert len(after) == 25 and set(after) <= stored_ids(db)
    assert _usage(poster.client)["events"]["total"] == 25
    assert store.health()["reopened"] >= 1
    assert poster.client.get("/healthz").status_code == 200, "healthy on the recreated file"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_the_file_deleted_between_two_commits_loses_no_accepted_event(apps, tmp_path):
    """No read in between: the writer notices after its next commit and writes that batch again."""
    db = tmp_path / "t.db"
    app = apps(db)
    store, poster = store_of(app), Poster(app)
    poster.post(5, "Before")
    assert store.flush()
    os.remove(db)
    before = len(poster.accepted)
    poster.post(15, "After")
    assert store.flush()
    assert set(poster.accepted[before:]) <= stored_ids(db)


# -- start-up --------------------------------------------------------------

def test_a_file_where_the_folder_should_be_is_one_clear_error(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    store = LocalStore(str(blocker / "telemetry.db"))
    with pytest.raises(ConfigError) as info:
        store.start()
    message = str(info.value)
    assert "TELEMETRY_DB" in message and str(blocker / "telemetry.db") in message and f"{blocker} is a file" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_an_unwritable_folder_at_start_is_one_clear_error_and_events_get_503(tmp_path, caplog):
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() == 0:  # root ignores permissions: a read-only mount
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                                 capture_output=True, text=True)
        if mounted.returncode != 0:
            pytest.skip(f"as root, a read-only folder needs a read-only mount: {mounted.stderr.strip()}")
        cleanup = ["umount", "-l", str(folder)]
    else:
        folder.chmod(0o555)
        cleanup = None
    try:
        db = folder / "telemetry.db"
        with pytest.raises(ConfigError) as info:
            LocalStore(str(db)).start()
        message = str(info.value)
        assert "TELEMETRY_DB" in message and str(db) in message
        assert "not writable" in message or "read-only" in message.lower()
        application = create_app({"TESTING": True, "TELEMETRY_DB": str(db)})
        response = application.test_client().post("/event", json={"event_name": "x"})
        assert response.status_code == 503 and response.headers.get("Retry-After")
        logged = [r.getMessage() for r in caplog.records if "TELEMETRY_DB" in r.getMessage()]
        assert logged and "Traceback" not in logged[0]
    finally:
        if cleanup:
            subprocess.run(cleanup, check=False)
        else:
            folder.chmod(0o755)


def test_a_corrupt_file_at_start_is_moved_aside_not_fatal(apps, tmp_path, caplog):
    db = tmp_path / "t.db"
    db.write_bytes(b"this is not a database" * 500)
    app = apps(db)
    poster = Poster(app)
    poster.post(5)
    assert store_of(app).flush()
    assert set(poster.accepted) <= stored_ids(db)
    moved = store_of(app).quarantined
    assert len(moved) == 1 and open(moved[0], "rb").read(22) == b"this is not a database"
    assert len(error_lines(caplog, "is corrupt")) == 1


# -- shutdown --------------------------------------------------------------

@pytest.mark.parametrize("fault", ["failing", "hanging"])
def test_shutdown_with_a_stuck_writer_saves_what_it_could_not_write_and_the_next_start_imports_it(
        apps, faults, tmp_path, fault):
    db = tmp_path / "t.db"
    app = apps(db, LOCAL_QUEUE_CAPACITY="1000")
    store, poster = store_of(app), Poster(app)
    poster.post(5, "Before")
    assert store.flush()
    if fault == "failing":
        faults.fail("disk I/O error")
    else:
        faults.hang(("COMMIT",))
    poster.post(30, "Stuck")
    stuck = poster.accepted[5:]
    assert stuck  # accepted before the writer reported the failure (or all of them, when it hangs)
    assert not store.flush(0.2)
    started = time.monotonic()
    store.close(timeout=1.0)
    assert time.monotonic() - started < 1.2
    pending = db.with_name("t.db.pending.jsonl")
    lines = [json.loads(line) for line in pending.read_text().splitlines()]
    assert {line["kind"] for line in lines} >= {"event", "request"}
    saved = {line["row"]["event_id"] for line in lines if line["kind"] == "event"}
    assert saved == set(stuck)
    assert store.health()["saved"] == len(lines)

    faults.heal()
    again = LocalStore.from_settings(monitor_of(app).settings)
    again.start()
    try:
        assert again.flush()
        assert set(poster.accepted) <= stored_ids(db)
        assert not os.path.exists(pending) and not glob.glob(str(pending) + ".*")
        assert again.health()["imported"] == len(lines)
        with contextlib.closing(sqlite3.connect(db)) as conn:
            (count,) = conn.execute("SELECT COUNT(*) FROM events WHERE name = 'Stuck'").fetchone()
        assert count == len(stuck)  # stored once
    finally:
        again.close()


def test_when_even_the_pending_file_cannot_be_written_one_line_gives_the_count(apps, faults, tmp_path, caplog):
    db = tmp_path / "t.db"
    app = apps(db)
    store, poster = store_of(app), Poster(app)
    faults.fail("disk I/O error")
    poster.post(10)
    os.mkdir(db.with_name("t.db.pending.jsonl"))  # a folder where the file should go
    store.close(timeout=0.5)
    lines = [r.getMessage() for r in caplog.records if "lost" in r.getMessage()]
    assert len(lines) == 1 and f"lost {store.lost} records" in lines[0] and store.lost > 0


# -- retention and size --------------------------------------------------------------------

def _fill_days(store, days, per_day=4, pad=0):
    """Events (users, anonymous ids, sessions, CRUD), requests, dependencies and traces on each of `days`."""
    now = time.time()
    for day in days:
        midnight = datetime.combine(day, datetime.min.time(), timezone.utc).timestamp()
        base = midnight + min(DAY / 2, (now - midnight) / 2)  # today's rows: before now
        for i in range(per_day):
            ts = base + i * 0.001
            store.track_event(EventRecord(name=f"E{i % 3}", properties={"pad": "x" * pad}, user_id=f"u{i % 5}",
                                          timestamp=ts, anonymous_id=f"a{day.toordinal() % 7}",
                                          session_id=f"s{day.toordinal()}-{i % 2}"))
            store.track_event(EventRecord(name="CrudActivity", properties={"action": "create", "entity": "inv"},
                                          user_id=f"u{i % 2}", timestamp=ts, client_event_id=True))
            store.track_request(RequestRecord("GET", f"/r{i % 2}", "/", 500 if i == 1 else 200, float(2 ** (i % 6)), ts,
                                              uuid.uuid4().hex, "0" * 16, user_id=f"u{i % 5}"))
            store.track_dependency(DependencyRecord("HTTP", "api.example", "GET /", "", "200", i != 2, 3.0, ts))
            record = logging.LogRecord("usage_monitor", logging.WARNING, __file__, 1, "trace %d", (i,), None)
            record.created = ts
            store.track_trace(record)
    assert store.flush(20)


def _tables(db):
    with contextlib.closing(sqlite3.connect(db)) as conn:
        raw = {t: conn.execute(f"SELECT MIN(day), COUNT(*) FROM {t}").fetchone()
               for t in ("events", "requests", "dependencies", "traces")}
        rollup_days = {t: conn.execute(f"SELECT MIN(day) FROM {t}").fetchone()[0]
                       for t in ("ev_day", "ev_user_day", "ev_day_users", "ev_name_user_day", "ev_anonymous_day",
                                 "ev_session_day", "crud_day", "req_day", "req_hist", "req_hist_all", "dep_day")}
        last_days = {t: conn.execute(f"SELECT MIN(last_day) FROM {t}").fetchone()[0]
                     for t in ("ev_user_last", "ev_name_user_last", "ev_anonymous_last", "ev_session_last")}
        marker = conn.execute("SELECT value FROM store_meta WHERE key = 'rollups'").fetchone()
    return raw, rollup_days, last_days, marker


def _assert_rollups_equal_raw(db, first_days):
    """For windows starting on each of `first_days` and ending now: the rollups' figures == the raw rows'."""
    conn = connect(str(db))
    try:
        conn.execute("BEGIN")  # one snapshot for both paths
        now = time.time()
        for first in first_days:
            t0 = datetime.combine(first, datetime.min.time(), timezone.utc).timestamp()
            assert rollups_cover(conn, t0, now) is not None
            raw = sorted(raw_usage_rows(conn, t0, now, 10), key=repr)
            for users in ("last", "days"):
                rolled = sorted(rollup_usage_rows(conn, utc_day(t0), utc_day(now), 10,
                                                               users), key=repr)
                assert _rounded(rolled) == _rounded(raw), (first, users)
                for r, w in zip(rolled, raw):  # percentiles: within the histogram's documented bound
                    for k in ("p50_ms", "p95_ms", "p99_ms"):
                        if w[k] is None or r[k] is None:
                            assert r[k] == w[k], (first, users, k)
                        else:
                            assert abs(r[k] - w[k]) <= 0.044 * w[k] + 1e-9, (first, users, k, r[k], w[k])
    finally:
        conn.close()


def _rounded(rows):
    """Rows with floats rounded; percentiles left out (the rollups' are exact to 4.4 %, see local_store.queries)."""
    return [{k: round(v, 6) if isinstance(v, float) else v for k, v in r.items() if k[0] != "p"} for r in rows]


def test_retention_prunes_old_days_hourly_and_keeps_the_rest_exact(apps, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="local_store")
    db, clock = tmp_path / "t.db", Clock()
    app = apps(db, clock=clock, LOCAL_RETENTION_DAYS="30")
    client = app.test_client()
    store = store_of(app)
    monitor_of(app).start()
    wait_until(lambda: store.last_prune is not None, message="the first retention pass at start")
    today = datetime.now(timezone.utc).date()
    days = [today - timedelta(days=n) for n in (45, 40, 31, 30, 29, 20, 3, 0)]
    _fill_days(store, days)
    before = {n: _usage(client, n) for n in (7, 30)}
    first_pass = store.last_prune
    clock.offset = 3601  # an hour later by the store's clock: the writer prunes on its own
    wait_until(lambda: store.last_prune is not first_pass, message="the hourly retention pass")
    cutoff = utc_day(clock() - 30 * DAY)
    assert store.last_prune["reason"] == "retention" and store.last_prune["before"] == cutoff
    assert store.last_prune["rows"]["events"] == 2 * 4 * sum(d.isoformat() < cutoff for d in days)
    raw, rollup_days, last_days, marker = _tables(db)
    assert all(first >= cutoff for first, _ in raw.values()), raw
    assert all(first >= cutoff for first in rollup_days.values()), rollup_days
    assert all(first >= cutoff for first in last_days.values()), last_days
    assert marker == ("complete",)  # the rollups still answer the dashboard
    for n, doc in before.items():  # windows inside the retention: unchanged
        after = _usage(client, n)
        for section in ("requests", "dependencies", "events", "users", "crud"):
            if section == "requests":  # this read's own GETs were recorded meanwhile
                continue
            assert after[section] == doc[section], (n, section)
    _assert_rollups_equal_raw(db, [today - timedelta(days=n) for n in (89, 45, 31, 30, 29, 7, 0)])
    assert any("LOCAL_RETENTION_DAYS=30" in r.getMessage() for r in caplog.records)
    health = store.health()
    assert health["retention_days"] == 30 and health["last_prune"] == store.last_prune


def test_the_size_cap_prunes_the_oldest_days_first_with_one_line(apps, tmp_path, caplog):
    db = tmp_path / "t.db"
    app = apps(db, LOCAL_MAX_MB="1")
    store = store_of(app)
    client = app.test_client()
    monitor_of(app).start()
    today = datetime.now(timezone.utc).date()
    store.prune()  # the start-up pass is over: the next size check is the one below
    days = [today - timedelta(days=n) for n in range(5, -1, -1)]
    _fill_days(store, days, per_day=100, pad=1500)  # about 2 MB over six days
    assert store.used_mb() > 1
    caplog.clear()
    store.prune()
    assert store.last_prune["reason"] == "size"
    assert store.used_mb() <= 1
    raw, rollup_days, _, marker = _tables(db)
    kept = raw["events"][0]
    assert days[0].isoformat() < kept <= today.isoformat()
    assert all(first is None or first >= kept for first in rollup_days.values())
    assert marker == ("complete",)
    lines = [r.getMessage() for r in caplog.records if "LOCAL_MAX_MB" in r.getMessage()]
    assert len(lines) == 1 and days[0].isoformat() in lines[0], lines
    assert store.health()["max_mb"] == 1 and store.health()["db_mb"] > 0
    assert store.flush()
    remaining = {d.isoformat() for d in days if d.isoformat() >= kept}
    daily = _usage(client, 7)["events"]["daily"]
    assert [e["count"] for e in daily] == [200 if e["date"] in remaining else 0 for e in daily]
    _assert_rollups_equal_raw(db, [today - timedelta(days=n) for n in (6, 3, 1, 0)])


# -- settings --------------------------------------------------------------

@pytest.mark.parametrize("var, value", [("LOCAL_QUEUE_CAPACITY", "99"), ("LOCAL_QUEUE_CAPACITY", "10000001"),
                                        ("LOCAL_RETENTION_DAYS", "0"), ("LOCAL_RETENTION_DAYS", "3651"),
                                        ("LOCAL_MAX_MB", "0")])
def test_local_settings_out_of_bounds_name_the_variable(tmp_path, var, value):
    with pytest.raises(ConfigError) as info:
        create_app({"TESTING": True, "TELEMETRY_DB": str(tmp_path / "t.db"), var: value})
    assert var in str(info.value)


def test_the_app_passes_the_local_settings_to_its_store(tmp_path):
    application = create_app({"TESTING": True, "TELEMETRY_DB": str(tmp_path / "t.db"),
                              "LOCAL_QUEUE_CAPACITY": "12345", "LOCAL_RETENTION_DAYS": "7", "LOCAL_MAX_MB": "64"})
    store = monitor_of(application).sink
    assert (store.queue_capacity, store.retention_days, store.max_mb) == (12345, 7, 64)


def test_threads_recording_at_once_never_overfill_the_queue(faults, tmp_path):
    store = LocalStore(str(tmp_path / "t.db"), queue_capacity=500)
    store.start()
    try:
        faults.hang(("COMMIT",))
        store.track_request(RequestRecord("GET", "/", "/", 200, 1.0, time.time(), "op", "0" * 16))
        taken = []

        def record():
            n = 0
            for _ in range(400):
                with contextlib.suppress(local_store.StorageUnavailable):
                    store.track_request(RequestRecord("GET", "/", "/", 200, 1.0, time.time(), "op", "0" * 16))
                    n += 1
            taken.append(n)

        threads = [threading.Thread(target=record) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert store.queued <= 500
        faults.heal()
        assert store.flush()
        with contextlib.closing(sqlite3.connect(tmp_path / "t.db")) as conn:
            assert conn.execute("SELECT COUNT(*) FROM requests").fetchone()[0] == 1 + sum(taken)
    finally:
        store.close()
