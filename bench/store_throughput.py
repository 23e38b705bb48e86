"""Local store throughput: log_event into LocalStore in one process, batched writes.

Measures N calls of logging_utils.log_event inside an app context (validation, record,
queue) plus the writer thread's batched INSERTs, until flush() confirms every row is
committed; then counts the rows in SQLite. Prints one JSON line.

    .venv/bin/python bench/store_throughput.py [--events 200000] [--profile out.txt]
"""
import argparse
import json
import os
import sqlite3
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.pop("APPLICATIONINSIGHTS_CONNECTION_STRING", None)

sys.path.insert(0, os.path.join(ROOT, "bench"))
import experiments  # noqa: E402

APPLIED = experiments.apply()  # BENCH_EXPERIMENTS: measured recommendations (none by default)

from app import create_app  # noqa: E402
from logging_utils import log_event  # noqa: E402
import local_store  # noqa: E402
import telemetry  # noqa: E402
from telemetry import monitor_of  # noqa: E402


def run(events, db, batch_size, profile=None):
    # The queue must hold the whole burst: this measures throughput, not the 503 of a full queue.
    app = create_app({"TELEMETRY_DB": db, "LOCAL_BATCH_SIZE": str(batch_size), "LOG_LEVEL": "WARNING",
                      "LOCAL_QUEUE_CAPACITY": str(max(100_000, events + 1_000))})
    telemetry = monitor_of(app)
    details = {"format": "pdf", "pages": 3, "ok": True}
    with app.app_context():
        telemetry.start()  # schema + writer thread, outside the timed part (as post_worker_init does)
        log_event("Warmup", details)
        assert telemetry.flush(60)
        profiler = None
        if profile:
            from pyinstrument import Profiler
            profiler = Profiler(interval=0.0005)
            profiler.start()
        t0 = time.perf_counter()
        for i in range(events):
            log_event("ReportExported", details)
        t_calls = time.perf_counter() - t0
        assert telemetry.flush(120), "flush timed out"
        t_total = time.perf_counter() - t0
        if profiler:
            profiler.stop()
            with open(profile, "w") as fh:
                fh.write(profiler.output_text(unicode=False, color=False, show_all=False))
    telemetry.close()
    conn = sqlite3.connect(db)
    try:
        (rows,) = conn.execute("SELECT COUNT(*) FROM events WHERE name = 'ReportExported'").fetchone()
    finally:
        conn.close()
    return {"events": events, "rows": rows, "seconds": round(t_total, 3),
            "events_per_s": round(events / t_total), "calls_per_s": round(events / t_calls),
            "batch_size": batch_size}


def run_store_only(events, db, batch_size):
    """The store alone: pre-built EventRecords through LocalStore.track_event and its writer."""
    store = local_store.LocalStore(db, batch_size=batch_size)
    store.start()
    props = {"format": "pdf", "pages": "3", "ok": "true"}
    records = []
    for _ in range(events):
        rec = telemetry.EventRecord(name="ReportExported", properties=dict(props))
        rec.properties["event_id"] = rec.event_id
        records.append(rec)
    t0 = time.perf_counter()
    for rec in records:
        store.track_event(rec)
    assert store.flush(120)
    seconds = time.perf_counter() - t0
    store.close()
    conn = sqlite3.connect(db)
    try:
        (rows,) = conn.execute("SELECT COUNT(*) FROM events").fetchone()
    finally:
        conn.close()
    return {"events": events, "rows": rows, "seconds": round(seconds, 3), "events_per_s": round(events / seconds),
            "calls_per_s": None, "batch_size": batch_size}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=500, help="LOCAL_BATCH_SIZE (production default 500)")
    parser.add_argument("--profile", help="write a pyinstrument text profile here")
    parser.add_argument("--repeat", type=int, default=3, help="runs; the median is reported")
    parser.add_argument("--store-only", action="store_true",
                        help="LocalStore alone (pre-built records, no log_event): the store's own capacity")
    args = parser.parse_args()
    results = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
            db = os.path.join(tmp, "store.db")
            results.append(run_store_only(args.events, db, args.batch_size) if args.store_only
                           else run(args.events, db, args.batch_size, args.profile))
    results.sort(key=lambda r: r["events_per_s"])
    best = dict(results[len(results) // 2])
    best["runs_events_per_s"] = [r["events_per_s"] for r in results]
    best["ok"] = all(r["rows"] == r["events"] for r in results)
    best["experiments"] = APPLIED
    best["mode"] = "store only" if args.store_only else "log_event"
    print(json.dumps(best))


if __name__ == "__main__":
    main()
