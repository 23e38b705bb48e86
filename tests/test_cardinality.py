"""Cardinality: closed days keep bounded per-day top lists (TOP_K names plus one OTHER row).

A small TOP_K is patched in and the store's clock is fixed, so the days before today (by that
clock; OPEN_DAYS) are closed and compacted by the writer's maintenance pass (store.prune() runs it).
"""
import math
import time
import uuid
from datetime import datetime, timezone

import pytest

from local_store import LocalStore, maintenance
from local_store.connection import connect
from local_store.maintenance import OPEN_DAYS
from local_store.queries import raw_usage_rows, rollup_usage_rows
from local_store.rows import utc_day
from local_store.schema import COMPACTED_TABLES, INSERT, OTHER, TOP_TABLES, TOTAL_TABLES

DAY = 86400
K = 3


@pytest.fixture(autouse=True)
def small_k(monkeypatch):
    monkeypatch.setattr(maintenance, "TOP_K", K)


class Clock:
    def __init__(self, now):
        self.now = now

    def __call__(self):
        return self.now


@pytest.fixture
def now():
    """Noon yesterday: every row the tests write is in the past."""
    return _midnight_of(time.time()) - DAY / 2


@pytest.fixture
def store(tmp_path, now):
    made = []

    def make(retention_days=None):
        s = LocalStore(str(tmp_path / "t.db"), flush_interval=0.01, clock=Clock(now), retention_days=retention_days)
        s.create_schema()
        made.append(s)
        return s

    yield make
    for s in made:
        s.close(timeout=2)


def _midnight_of(ts):
    return ts - ts % DAY


def _insert(path, events=(), requests=(), dependencies=()):
    """Rows straight into the file (the rollup triggers fire as for the writer): (ts, name, ...)."""
    conn = connect(path)
    try:
        conn.execute("BEGIN IMMEDIATE")
        for ts, name in events:
            conn.execute(INSERT["event"],
                         (str(uuid.uuid4()), ts, utc_day(ts), name, "", None, None, None, "{}", "", "", 0))
        for ts, name, ok, ms in requests:
            conn.execute(INSERT["request"],
                         (ts, utc_day(ts), name, 200 if ok else 500, int(ok), ms, "", None))
        for ts, target, ok, ms in dependencies:
            conn.execute(INSERT["dependency"],
                         (ts, utc_day(ts), "HTTP", target, "GET /x", "200", int(ok), ms, None))
        conn.execute("COMMIT")
    finally:
        conn.close()


def _fill(path, now, days, names_per_day):
    """Per day: names Lead0..Lead2 with large counts, then day-specific tail names with small counts."""
    midnight = _midnight_of(now)
    events, requests, deps = [], [], []
    for back in range(days):
        base = midnight - back * DAY + 3600
        names = [(f"Lead{i}", 40 - 10 * i) for i in range(min(K, names_per_day))]
        names += [(f"Tail{back}-{j}", 5 - j % 5) for j in range(names_per_day - len(names))]
        for name, count in names:
            for i in range(count):
                ts = base + i
                events.append((ts, name))
                requests.append((ts, "GET /" + name, i % 7 != 0, 1.0 + i))
                deps.append((ts, name.lower() + ".example", i % 5 != 0, 2.0 + i))
    _insert(path, events, requests, deps)


def _window(now, days):
    start = datetime.fromtimestamp(_midnight_of(now) - (days - 1) * DAY, timezone.utc)
    return start, datetime.fromtimestamp(now, timezone.utc)


def _raw(path, start, end, top=10):
    conn = connect(path)
    try:
        return list(raw_usage_rows(conn, start.timestamp(), end.timestamp(), top))
    finally:
        conn.close()


def _section(rows, section):
    return [r for r in rows if r["section"] == section]


def _key(r):
    return (r["section"], r["day"], r["name"] or "", r["type"], r["target"], r["action"] or "")


def _totals(rows):
    """Every summary and daily row's counts (the figures that must stay exact)."""
    out = sorted((_key(r), r["count"], r["failed"], r["users"]) for r in rows
                 if r["section"].endswith(("_summary", "_daily")))
    return out


def _avgs(rows):
    return {_key(r): r["avg_ms"] for r in rows if r["section"].endswith(("_summary", "_daily")) and r["avg_ms"]}


def _top(rows, section):
    field = "target" if section == "dep_top" else "name"
    return [(r[field], r["count"], r["failed"]) for r in _section(rows, section)]


def _compacted(path):
    conn = connect(path)
    try:
        return [d for (d,) in conn.execute("SELECT day FROM compacted_days ORDER BY day")]
    finally:
        conn.close()


def _closed_days(now, days):
    midnight = _midnight_of(now)
    return sorted(utc_day(midnight - back * DAY) for back in range(OPEN_DAYS, days))


def _assert_same_totals(fast, raw):
    assert _totals(fast) == _totals(raw)
    slow = _avgs(raw)
    for key, avg in _avgs(fast).items():
        assert math.isclose(avg, slow[key], rel_tol=1e-9), key


def test_few_names_per_day_give_the_exact_lists(store, now):
    s = store()
    _fill(s.path, now, days=8, names_per_day=K)
    s.start()
    s.prune()
    assert _compacted(s.path) == _closed_days(now, 8)
    start, end = _window(now, 8)
    fast, raw = s.rows(start, end), _raw(s.path, start, end)
    _assert_same_totals(fast, raw)
    for section in ("evt_top", "req_top", "dep_top"):
        assert _top(fast, section) == _top(raw, section)
    assert [r["users"] for r in _section(fast, "evt_top")] == [r["users"] for r in _section(raw, "evt_top")]


def test_many_names_keep_exact_totals_and_the_true_leaders(store, now):
    s = store()
    _fill(s.path, now, days=8, names_per_day=12)
    s.start()
    s.prune()
    assert _compacted(s.path) == _closed_days(now, 8)
    conn = connect(s.path)
    try:  # bounded: K names and one OTHER row per closed day and dimension
        for table in TOP_TABLES:
            per_day = conn.execute(f"SELECT MAX(c) FROM (SELECT COUNT(*) AS c FROM {table} GROUP BY day)").fetchone()
            assert per_day == (K + 1,)
    finally:
        conn.close()
    start, end = _window(now, 8)
    fast, raw = s.rows(start, end), _raw(s.path, start, end)
    _assert_same_totals(fast, raw)
    for section in ("evt_top", "req_top", "dep_top"):
        merged, exact = _top(fast, section), _top(raw, section)
        assert merged[:K] == exact[:K]  # the names in every day's top K: exact counts, in order
        assert OTHER not in {name for name, _, _ in merged}
        counts = {name: count for name, count, _ in _top(_raw(s.path, start, end, top=10_000), section)}
        for name, count, _ in merged:  # the long tail is left out on closed days: never over-counted
            assert count <= counts[name]
    # a window of closed days only has no tail names at all
    start, end = datetime.fromtimestamp(_midnight_of(now) - 7 * DAY, timezone.utc), _window(now, 5)[0]
    end = datetime.fromtimestamp(end.timestamp() - 1, timezone.utc)
    conn = connect(s.path)
    try:
        rows = list(rollup_usage_rows(conn, utc_day(start.timestamp()),
                                                   utc_day(end.timestamp()), 10))
    finally:
        conn.close()
    assert [name for name, _, _ in _top(rows, "evt_top")] == ["Lead0", "Lead1", "Lead2"]
    _assert_same_totals(rows, _raw(s.path, start, end))


def test_compaction_follows_retention_and_rebuild(store, now):
    s = store(retention_days=5)
    _fill(s.path, now, days=8, names_per_day=6)
    s.start()
    s.prune()
    cutoff = utc_day(now - 5 * DAY)
    assert _compacted(s.path) == [d for d in _closed_days(now, 8) if d >= cutoff]
    conn = connect(s.path)
    try:
        for table in TOP_TABLES:
            assert conn.execute(f"SELECT COUNT(*) FROM {table} WHERE day < ?", (cutoff,)).fetchone() == (0,)
    finally:
        conn.close()
    start, end = _window(now, 8)
    fast, raw = s.rows(start, end), _raw(s.path, start, end)
    _assert_same_totals(fast, raw)
    assert _top(fast, "evt_top")[:K] == _top(raw, "evt_top")[:K]
    s.close(timeout=2)

    # a rebuild (rollups invalidated behind the triggers' back) drops the compaction ...
    conn = connect(s.path)
    conn.execute("UPDATE events SET name = name WHERE rowid = (SELECT MIN(rowid) FROM events)")
    conn.close()
    s2 = store(retention_days=5)
    assert _compacted(s2.path) == []
    conn = connect(s2.path)
    try:
        for table in TOP_TABLES:
            assert conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone() == (0,)
    finally:
        conn.close()
    # ... and the next maintenance pass (at start-up) redoes it
    s2.start()
    s2.prune()
    assert _compacted(s2.path) == [d for d in _closed_days(now, 8) if d >= cutoff]
    fast = s2.rows(start, end)
    _assert_same_totals(fast, raw)
    assert _top(fast, "evt_top")[:K] == _top(raw, "evt_top")[:K]


def test_late_rows_still_count(store, now):
    s = store()
    _fill(s.path, now, days=6, names_per_day=K)
    s.start()
    s.prune()
    closed = _closed_days(now, 6)
    assert _compacted(s.path) == closed
    midnight = _midnight_of(now)
    yesterday = midnight + 7200                # today, by the store's clock: open, never compacted
    compacted_day = midnight - 4 * DAY + 7200  # a compacted day: re-opened by the late row
    late = [(yesterday, "Late"), (compacted_day, "Late"), (compacted_day + 1, "Late")]
    _insert(s.path, events=late, requests=[(compacted_day, "GET /late", False, 9.0)],
            dependencies=[(compacted_day, "late.example", True, 3.0)])
    assert utc_day(compacted_day) not in _compacted(s.path)
    start, end = _window(now, 6)
    fast, raw = s.rows(start, end), _raw(s.path, start, end)
    _assert_same_totals(fast, raw)
    assert ("Late", 3, 0) in _top(fast, "evt_top")
    for section in ("evt_top", "req_top", "dep_top"):
        assert _top(fast, section) == _top(raw, section)
    s.prune()  # compacted again, with the late rows (now that day's fourth name: in its OTHER row)
    assert _compacted(s.path) == closed
    fast = s.rows(start, end)
    _assert_same_totals(fast, raw)
    for section in ("evt_top", "req_top", "dep_top"):
        assert _top(fast, section)[:K] == _top(raw, section)[:K]


def test_a_store_of_the_previous_version_gets_its_daily_totals(store, now):
    s = store()
    _fill(s.path, now, days=4, names_per_day=5)
    conn = connect(s.path)  # as version 4 left it: no totals, no compaction
    for name in ("events_rollup_total", "requests_rollup_total", "dependencies_rollup_total"):
        conn.execute(f"DROP TRIGGER {name}")
    for table in TOTAL_TABLES + COMPACTED_TABLES:
        conn.execute(f"DROP TABLE {table}")
    conn.close()
    s2 = store()  # migrate() creates the tables and fills the totals once
    start, end = _window(now, 4)
    fast, raw = s2.rows(start, end), _raw(s2.path, start, end)
    _assert_same_totals(fast, raw)
    for section in ("evt_top", "req_top", "dep_top"):
        assert _top(fast, section) == _top(raw, section)
    _insert(s2.path, events=[(now - 60, "New")])  # and the triggers keep them
    fast, raw = s2.rows(start, end), _raw(s2.path, start, end)
    _assert_same_totals(fast, raw)


def test_a_version_4_store_gets_dependency_latency_histograms(store, now):
    s = store()
    _fill(s.path, now, days=3, names_per_day=2)
    conn = connect(s.path)  # as version 4 left it: no dependency histograms
    for table in ("dep_hist", "dep_hist_all"):
        conn.execute(f"DROP TABLE {table}")
    conn.execute("PRAGMA user_version = 4")
    conn.close()
    s2 = store()  # migrate() replaces the triggers and rebuilds every rollup from the raw rows
    start, end = _window(now, 3)
    fast, raw = s2.rows(start, end), _raw(s2.path, start, end)
    for section in ("dep_daily", "dep_top"):
        got = sorted((r["day"], r["target"], r["p95_ms"]) for r in _section(fast, section))
        assert got and all(p95 is not None for *_, p95 in got), section
        assert got == sorted((r["day"], r["target"], r["p95_ms"]) for r in _section(raw, section))
