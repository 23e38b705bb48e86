"""Local dashboard at scale: GET /dashboard/usage?days=30 over 1,000,000 events in 30 days.

Bulk-loads a fresh SQLite store through LocalStore.load_rows (plain INSERTs; the rollup triggers fire as for the writer):
events (skewed custom names, logins, CRUD), requests and dependencies spread over 30 days; then
times GET /dashboard/usage?days=30 through the app (local mode): the first call (cold) and the
median of the others (warm). Prints one JSON line.

--cardinality: every event has its own name (1,000,000 distinct names), requests go to 100,000
routes and dependencies to 100,000 targets; the dashboard is timed before the writer's
maintenance pass (LocalStore.prune(): retention, then compaction of closed days), the pass is
timed, and the dashboard is timed again.
"""
import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.pop("APPLICATIONINSIGHTS_CONNECTION_STRING", None)

from local_store import LocalStore  # noqa: E402
from local_store.rows import utc_day  # noqa: E402

DAY = 86400
CUSTOM = [f"Custom{i:02d}" for i in range(20)]
ROUTES = ["POST /event", "GET /dashboard/usage", "GET /items/<int:id>", "POST /items", "GET /reports",
          "POST /reports/export", "GET /users/<id>", "POST /login", "GET /search", "<unmatched>"]
TARGETS = [("HTTP", "api.example.com"), ("HTTP", "auth.example.com:443"), ("SQL", "db.internal:5432")]
ACTIONS = ["create", "read", "update", "delete"]
ENTITIES = ["invoice", "customer", "order", "product", "report", "user"]


def load(path, events, requests, dependencies, users=2000, cardinality=False, seed=1):
    """Fill a fresh store, time-ordered rows as the writer produces them; returns seconds taken."""
    store = LocalStore(path)
    store.create_schema()
    rnd = random.Random(seed)
    start = time.time() - 30 * DAY
    user_ids = [f"user-{i:05d}" for i in range(users)]
    t0 = time.perf_counter()

    def insert(kind, count, row):
        for first in range(0, count, 20_000):
            rows = [row(i, start + (i + rnd.random()) * 30 * DAY / count) for i in range(first, min(count, first + 20_000))]
            store.load_rows(kind, rows)

    def event(i, ts):
        kind = rnd.random()
        if cardinality:
            name, user, action, entity = f"Event{i:07d}", "", None, None
        elif kind < 0.7:
            name, user, action, entity = rnd.choices(CUSTOM, [1 / (j + 1) for j in range(len(CUSTOM))])[0], "", None, None
        elif kind < 0.8:
            name, user, action, entity = "UserLogin", rnd.choice(user_ids), None, None
        else:
            name, user, action, entity = "CrudActivity", rnd.choice(user_ids), rnd.choice(ACTIONS), rnd.choice(ENTITIES)
        event_id = str(uuid.UUID(int=rnd.getrandbits(128), version=4))
        return (event_id, ts, utc_day(ts), name, user, action, entity, "", '{"format":"pdf"}', "", "", 0)

    def request(i, ts):
        route = f"GET /r/{rnd.randrange(100_000):05d}" if cardinality else rnd.choice(ROUTES)
        status = 500 if rnd.random() < 0.01 else 200
        return (ts, utc_day(ts), route, status, int(status < 500), rnd.lognormvariate(math.log(3.0), 0.8),
                "", uuid.UUID(int=rnd.getrandbits(128)).hex)

    def dependency(i, ts):
        typ, target = ("HTTP", f"host{rnd.randrange(100_000):05d}.example") if cardinality else rnd.choice(TARGETS)
        ok = rnd.random() > 0.02
        return (ts, utc_day(ts), typ, target, "GET /v1/thing", "200" if ok else "503", int(ok),
                rnd.lognormvariate(math.log(20.0), 0.7), "")

    insert("event", events, event)
    insert("request", requests, request)
    insert("dependency", dependencies, dependency)
    return round(time.perf_counter() - t0, 1)


def time_dashboard(path, repeat):
    """Cold (first call in this app) and warm (median of the rest) ms of GET /dashboard/usage?days=30."""
    from app import create_app
    from telemetry import monitor_of
    app = create_app({"TELEMETRY_DB": path, "LOG_LEVEL": "WARNING", "RATE_LIMIT_ENABLED": "false"})
    monitor_of(app).start()
    client, times = app.test_client(), []
    for _ in range(repeat):
        t = time.perf_counter()
        resp = client.get("/dashboard/usage?days=30")
        times.append((time.perf_counter() - t) * 1000)
        assert resp.status_code == 200, resp.get_data(as_text=True)[:500]
    monitor_of(app).close()
    return {"cold_ms": round(times[0], 1), "warm_ms": round(statistics.median(times[1:]), 1), "calls": repeat}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--dependencies", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--cardinality", action="store_true", help="distinct names everywhere (see above)")
    args = parser.parse_args()
    result = {"events": args.events, "requests": args.requests, "dependencies": args.dependencies,
              "cardinality": args.cardinality}
    with tempfile.TemporaryDirectory(prefix="bench-dashboard-") as tmp:
        path = os.path.join(tmp, "store.db")
        result["load_s"] = load(path, args.events, args.requests, args.dependencies, cardinality=args.cardinality)
        result["db_mb"] = round(os.path.getsize(path) / 2 ** 20, 1)
        if args.cardinality:
            result["before_maintenance"] = time_dashboard(path, args.repeat)
            store = LocalStore(path)
            store.start()
            t = time.perf_counter()
            store.prune(timeout=3600)
            result["maintenance_s"] = round(time.perf_counter() - t, 1)
            store.close()
        result["dashboard"] = time_dashboard(path, args.repeat)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
