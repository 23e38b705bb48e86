"""Local dashboard at scale: 1,000,000 events (plus requests and dependencies) over 30 days.

Bulk-loads a fresh SQLite store through plain SQL INSERTs (the rollup triggers fire as they
would for the writer), then times, for the 30-day window the dashboard uses:
  * LocalStore.rows() -- cold: the first call in a fresh process; warm: median of repeated calls;
  * GET /dashboard/usage through the Flask app (create_app, local mode) -- cold and warm;
  * the raw-table queries (what version 1 ran on every call), for comparison;
and checks that the rollups give the same rows as the raw tables (percentiles within the
documented bucket accuracy). Prints one JSON document.

    .venv/bin/python bench/dashboard_scale.py [--events 1000000] [--requests 1000000] [--db path]

--cardinality: every event has its own name (1,000,000 distinct names), requests go to 100,000
distinct routes and dependencies to 100,000 distinct targets. The dashboard is timed before the
closed days are compacted (store and the previous version's query code, "old"), then the
writer's maintenance pass (LocalStore.prune(): retention, then compaction) is run and timed, then
the dashboard is timed again (store and http).
"""
import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import local_store  # noqa: E402

DAY = 86400
CUSTOM = [f"Custom{i:02d}" for i in range(20)]
ROUTES = ["POST /event", "GET /dashboard/usage", "GET /items/<int:id>", "POST /items", "PUT /items/<int:id>",
          "DELETE /items/<int:id>", "GET /reports", "POST /reports/export", "GET /users/<id>", "POST /login",
          "GET /search", "<unmatched>"]
TARGETS = [("HTTP", "api.example.com"), ("HTTP", "auth.example.com:443"), ("HTTP", "storage.example.net"),
           ("SQL", "db.internal:5432"), ("HTTP", "payments.example.org")]
ACTIONS = ["create", "read", "update", "delete"]
ENTITIES = ["invoice", "customer", "order", "product", "report", "user", "team", "project"]


# The last commit whose local store had no per-day top lists: "old_code" times its queries on the same file.
BASELINE = "bd1e11c"


def _zipf_choice(rnd, items, s=1.1):
    """A skewed choice: the first items are the most frequent."""
    weights = [1.0 / (i + 1) ** s for i in range(len(items))]
    return rnd.choices(items, weights=weights)[0]


def load(path, events, requests, dependencies, users, seed=1, cardinality=False):
    """Fill a fresh store; returns load statistics."""
    store = local_store.LocalStore(path)
    store._create_schema()
    conn = local_store.connect(path)
    rnd = random.Random(seed)
    now = time.time()
    start = now - 30 * DAY
    custom_w = [1.0 / (i + 1) ** 1.1 for i in range(len(CUSTOM))]
    route_w = [1.0 / (i + 1) ** 0.9 for i in range(len(ROUTES))]
    user_ids = [f"user-{i:05d}" for i in range(users)]
    t0 = time.perf_counter()
    batch = 20_000

    def insert(kind, rows):
        conn.execute("BEGIN IMMEDIATE")
        local_store._insert_many(conn, kind, rows)
        conn.execute("COMMIT")

    # Rows are time-ordered, as the writer produces them.
    for first in range(0, events, batch):
        n = min(batch, events - first)
        rows = []
        for i in range(first, first + n):
            ts = start + (i + rnd.random()) * (30 * DAY / events)
            kind = rnd.random()
            if cardinality:
                name, user, action, entity = f"Event{i:07d}", "", None, None
            elif kind < 0.70:
                name, user, action, entity = rnd.choices(CUSTOM, custom_w)[0], "", None, None
            elif kind < 0.80:
                name, user, action, entity = "UserLogin", rnd.choice(user_ids), None, None
            else:
                name, user = "CrudActivity", rnd.choice(user_ids)
                action, entity = rnd.choice(ACTIONS), _zipf_choice(rnd, ENTITIES)
            event_id = str(uuid.UUID(int=rnd.getrandbits(128), version=4))
            rows.append((event_id, ts, local_store._day(ts), name, user, action, entity, "",
                         '{"format":"pdf","event_id":"%s"}' % event_id, "", "", 0))
        insert("event", rows)
    t_events = time.perf_counter() - t0
    t1 = time.perf_counter()
    for first in range(0, requests, batch):
        n = min(batch, requests - first)
        rows = []
        for i in range(first, first + n):
            ts = start + (i + rnd.random()) * (30 * DAY / requests)
            route = f"GET /r/{rnd.randrange(100_000):05d}" if cardinality else rnd.choices(ROUTES, route_w)[0]
            duration = rnd.lognormvariate(math.log(3.0), 0.8) * (20 if rnd.random() < 0.01 else 1)
            status = 500 if rnd.random() < 0.01 else (404 if route == "<unmatched>" else 200)
            rows.append((ts, local_store._day(ts), route, status, int(status < 500), duration, "",
                         uuid.UUID(int=rnd.getrandbits(128)).hex))
        insert("request", rows)
    t_requests = time.perf_counter() - t1
    t2 = time.perf_counter()
    rows = []
    for i in range(dependencies):
        ts = start + (i + rnd.random()) * (30 * DAY / dependencies)
        typ, target = ("HTTP", f"host{rnd.randrange(100_000):05d}.example") if cardinality else _zipf_choice(rnd, TARGETS)
        ok = rnd.random() > 0.02
        rows.append((ts, local_store._day(ts), typ, target, "GET /v1/thing", "200" if ok else "503", int(ok),
                     rnd.lognormvariate(math.log(20.0), 0.7), ""))
        if len(rows) == batch:
            insert("dependency", rows)
            rows = []
    if rows:
        insert("dependency", rows)
    t_deps = time.perf_counter() - t2
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    sizes = {t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
             for t in ("events", "requests", "dependencies") + local_store._ROLLUP_TABLES}
    conn.close()
    return {"load_seconds": {"events": round(t_events, 1), "requests": round(t_requests, 1),
                             "dependencies": round(t_deps, 1)},
            "rows_per_s_with_triggers": round((events + requests + dependencies) / (t_events + t_requests + t_deps)),
            "table_rows": sizes, "db_mb": round(os.path.getsize(path) / 2 ** 20, 1)}


_CHILD = r"""
import json, os, sys, time, statistics
sys.path.insert(0, {root!r})
os.environ.pop("APPLICATIONINSIGHTS_CONNECTION_STRING", None)
mode, path, repeat = sys.argv[1], sys.argv[2], int(sys.argv[3])
from monitoring_utils import usage_window
import local_store
start, end = usage_window(30)
times = []
if mode == "old":  # the rollup queries before the per-day top lists (BASELINE's local_store.py), on this file
    import importlib.util
    spec = importlib.util.spec_from_file_location("old_local_store", sys.argv[4])
    old = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)
    for _ in range(repeat):
        conn = old.connect(path)
        t = time.perf_counter()
        conn.execute("BEGIN")
        rows = list(old._usage_rows(conn, start.timestamp(), end.timestamp(), 10))
        conn.execute("ROLLBACK")
        times.append(time.perf_counter() - t)
        conn.close()
elif mode == "store":
    store = local_store.LocalStore(path)
    store._create_schema()  # as the app does at worker start, before any dashboard call
    for _ in range(repeat):
        t = time.perf_counter(); rows = store.rows(start, end); times.append(time.perf_counter() - t)
elif mode == "raw":
    for _ in range(repeat):
        conn = local_store.connect(path)
        t = time.perf_counter()
        rows = list(local_store._raw_usage_rows(conn, start.timestamp(), end.timestamp(), 10))
        times.append(time.perf_counter() - t)
        conn.close()
else:
    from app import create_app
    from telemetry import monitor_of
    app = create_app({{"TELEMETRY_DB": path, "LOG_LEVEL": "WARNING", "RATE_LIMIT_ENABLED": "false",
                      "LOCAL_FLUSH_INTERVAL": "0.2"}})
    monitor_of(app).start()
    client = app.test_client()
    for _ in range(repeat):
        t = time.perf_counter(); resp = client.get("/dashboard/usage?days=30"); times.append(time.perf_counter() - t)
        assert resp.status_code == 200, resp.get_data(as_text=True)
    monitor_of(app).close()
print(json.dumps(times))
"""


def _timed(mode, path, repeat, *extra):
    """Times (seconds) of `repeat` calls in a fresh process: the first is cold."""
    out = subprocess.run([sys.executable, "-c", _CHILD.format(root=ROOT), mode, path, str(repeat), *extra],
                         check=True, capture_output=True, text=True, timeout=900).stdout
    return json.loads(out.strip().splitlines()[-1])


def _ms(seconds):
    return round(seconds * 1000, 1)


def compare(path, approximate_tops=False):
    """Rollup rows against raw rows for the dashboard's 30-day window: counts exact, percentile error."""
    from monitoring_utils import usage_window
    start, end = usage_window(30)
    conn = local_store.connect(path)
    t0, t1 = start.timestamp(), end.timestamp()
    mode = local_store._rollups_cover(conn, t0, t1)
    assert mode, "the rollups should answer the dashboard's window"
    d0, d1 = local_store._day(t0), local_store._day(t1)
    fast = list(local_store._rollup_usage_rows(conn, d0, d1, 10, mode))
    # the other way of counting distinct users must agree too
    other = list(local_store._rollup_usage_rows(conn, d0, d1, 10, "days" if mode == "last" else "last"))
    raw = list(local_store._raw_usage_rows(conn, t0, t1, 10))
    conn.close()

    def key(row):
        return (row["section"], row["day"], str(row["name"]), row["type"], row["target"], str(row["action"]))

    fast, other, raw = sorted(fast, key=key), sorted(other, key=key), sorted(raw, key=key)

    def counts(rows):
        return [(key(r), r["count"], r["failed"], r["users"]) for r in rows]

    counts_equal = counts(fast) == counts(raw) == counts(other)
    if approximate_tops:  # cardinality: totals exact; top lists merged from the per-day top K
        def totals(rows):
            return [c for c in counts(rows) if not c[0][0].endswith("_top")]

        tops = {s: ([r["name"] or r["target"] for r in fast if r["section"] == s],
                    [r["name"] or r["target"] for r in raw if r["section"] == s]) for s in ("evt_top", "req_top", "dep_top")}
        return {"totals_equal": totals(fast) == totals(raw) == totals(other),
                "other_in_top_lists": any(local_store.OTHER in a for a, _ in tops.values()),
                "top_lists_equal_raw": {s: a == b for s, (a, b) in tops.items()}}
    worst, exact, total = 0.0, 0, 0
    for a, b in zip(fast, raw):
        for f in ("p50_ms", "p95_ms", "p99_ms"):
            if b[f] is not None:
                total += 1
                exact += a[f] == b[f]
                worst = max(worst, abs(a[f] - b[f]) / b[f])
        if b["avg_ms"] is not None:
            assert math.isclose(a["avg_ms"], b["avg_ms"], rel_tol=1e-9)
    return {"counts_equal": counts_equal, "percentiles_compared": total, "percentiles_exact": exact,
            "percentile_worst_relative_error": round(worst, 5)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--dependencies", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=2_000)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--db", help="reuse (or create) this file instead of a temporary one")
    parser.add_argument("--no-raw", action="store_true", help="skip timing the raw-table queries")
    parser.add_argument("--raw-repeat", type=int, default=1, help="calls of the raw-table queries (12+ s each)")
    parser.add_argument("--cardinality", action="store_true",
                        help="1M distinct event names, 100k distinct routes and targets (see the module doc)")
    args = parser.parse_args()
    if args.cardinality:
        return cardinality(args)
    tmp = None
    path = args.db
    if path is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-dashboard-")
        path = os.path.join(tmp.name, "scale.db")
    result = {"events": args.events, "requests": args.requests, "dependencies": args.dependencies,
              "users": args.users}
    if not os.path.exists(path):
        result["load"] = load(path, args.events, args.requests, args.dependencies, args.users)
    for mode in ("store", "http") + (() if args.no_raw else ("raw",)):
        repeat = args.raw_repeat if mode == "raw" else args.repeat
        times = _timed(mode, path, repeat)
        warm = times[1:] or [None]
        result[mode] = {"cold_ms": _ms(times[0]), "warm_ms": _ms(statistics.median(warm)) if times[1:] else None,
                        "warm_max_ms": _ms(max(warm)) if times[1:] else None, "calls": len(times)}
    result["check"] = compare(path)
    print(json.dumps(result))
    if tmp:
        tmp.cleanup()



def cardinality(args):
    """The --cardinality scenario: dashboard times before and after the closed days are compacted."""
    tmp = None
    path = args.db
    if path is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-cardinality-")
        path = os.path.join(tmp.name, "cardinality.db")
    result = {"scenario": "cardinality", "events": args.events, "requests": args.requests,
              "dependencies": args.dependencies, "top_k": local_store.TOP_K}
    if not os.path.exists(path):
        result["load"] = load(path, args.events, args.requests, args.dependencies, args.users, cardinality=True)
    old = os.path.join(os.path.dirname(path), "old_local_store.py")
    with open(old, "w") as f:
        f.write(subprocess.run(["git", "-C", ROOT, "show", f"{BASELINE}:local_store.py"], check=True,
                               capture_output=True, text=True).stdout)

    def timed(mode, *extra):
        times = _timed(mode, path, args.repeat, *extra)
        return {"cold_ms": _ms(times[0]), "warm_ms": _ms(statistics.median(times[1:])),
                "warm_max_ms": _ms(max(times[1:])), "calls": len(times)}

    conn = local_store.connect(path)
    compacted = conn.execute("SELECT COUNT(*) FROM compacted_days").fetchone()[0]
    conn.close()
    if not compacted:
        result["before_compaction"] = {"old_code": timed("old", old), "store": timed("store")}
    store = local_store.LocalStore(path)
    store.start()
    t = time.perf_counter()
    store.prune(timeout=3600)  # the writer's maintenance pass: retention, then compaction
    result["maintenance_s"] = round(time.perf_counter() - t, 1)
    store.close()
    conn = local_store.connect(path)
    result["compacted_days"] = conn.execute("SELECT COUNT(*) FROM compacted_days").fetchone()[0]
    result["top_rows"] = {t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in local_store._TOP_TABLES}
    conn.close()
    result["after_compaction"] = {"old_code": timed("old", old), "store": timed("store"), "http": timed("http")}
    result["check"] = compare(path, approximate_tops=True)
    print(json.dumps(result))
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
