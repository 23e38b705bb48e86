"""Local store throughput: `log_event` calls per second in one process, end to end.

Times N calls of logging_utils.log_event inside an app context (local mode) until the writer
thread has committed them all (flush), checks the row count, and prints one JSON line with the
median of --repeat runs.   .venv/bin/python bench/store_throughput.py [--events 100000]
"""
import argparse
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.pop("APPLICATIONINSIGHTS_CONNECTION_STRING", None)

from app import create_app  # noqa: E402
from logging_utils import log_event  # noqa: E402
from telemetry import monitor_of  # noqa: E402


def run(events, db):
    # the queue holds the whole burst: this measures throughput, not the 503 of a full queue
    app = create_app({"TELEMETRY_DB": db, "LOG_LEVEL": "WARNING", "LOCAL_QUEUE_CAPACITY": str(events + 1000)})
    monitor = monitor_of(app)
    details = {"format": "pdf", "pages": 3, "ok": True}
    with app.app_context():
        monitor.start()  # schema and writer thread outside the timed part, as post_worker_init does
        log_event("Warmup", details)
        assert monitor.flush(60)
        t0 = time.perf_counter()
        for _ in range(events):
            log_event("ReportExported", details)
        assert monitor.flush(300), "flush timed out"
        seconds = time.perf_counter() - t0
    monitor.close()
    conn = sqlite3.connect(db)
    (rows,) = conn.execute("SELECT COUNT(*) FROM events WHERE name = 'ReportExported'").fetchone()
    conn.close()
    assert rows == events, f"{rows} rows for {events} events"
    return events / seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    runs = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
            runs.append(round(run(args.events, os.path.join(tmp, "store.db"))))
    print(json.dumps({"events": args.events, "events_per_s": statistics.median(runs), "runs": runs}))


if __name__ == "__main__":
    main()
