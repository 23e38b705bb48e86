"""Cost of the OpenTelemetry bridge per SQLAlchemy query, in µs: the same queries inside a request
of a local-mode app, without any instrumentation and with UsageMonitor(instrument=("sqlalchemy",));
and, instrumented, outside any app context (the span is dropped at its start: the instrumentation's own cost).

Each variant runs in its own process (instrumentation wraps SQLAlchemy process-wide); the result is the
median of --repeat runs of --queries `SELECT 1` on an in-memory SQLite engine, and one JSON line.
    .venv/bin/python bench/otel_bridge_cost.py [--queries 20000] [--repeat 5]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.pop("APPLICATIONINSIGHTS_CONNECTION_STRING", None)


def measure(instrument, queries, repeat, in_request=True):
    """Median µs per query of `repeat` runs inside one request of a local-mode app (or outside any app)."""
    import sqlalchemy
    from flask import Flask

    import request_tracking
    from app import UsageMonitor
    from telemetry import monitor_of

    app = Flask(__name__)
    app.config.update({"TELEMETRY_DB": os.path.join(tempfile.mkdtemp(), "t.db"), "LOG_LEVEL": "WARNING",
                       "LOCAL_QUEUE_CAPACITY": str(queries * repeat + 1000)})
    UsageMonitor(app, routes=False, instrument=instrument)
    engine = sqlalchemy.create_engine("sqlite://")
    statement = sqlalchemy.text("SELECT 1")
    runs = []
    monitor_of(app).start()
    with engine.connect() as conn:
        context = app.test_request_context("/bench")
        if in_request:
            context.push()
            request_tracking.start_request()
        for _ in range(repeat):
            started = time.perf_counter()
            for _ in range(queries):
                conn.execute(statement).scalar()
            runs.append((time.perf_counter() - started) / queries * 1e6)
        if in_request:
            context.pop()
    assert monitor_of(app).flush(60)
    monitor_of(app).close()
    return statistics.median(runs)


VARIANTS = ("off", "sqlalchemy", "sqlalchemy_outside_app")


def main():
    """Run each variant in a child process and print one JSON line."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--queries", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--variant", choices=VARIANTS)
    args = parser.parse_args()
    if args.variant:
        print(measure(() if args.variant == "off" else ("sqlalchemy",), args.queries, args.repeat,
                      in_request=args.variant != "sqlalchemy_outside_app"))
        return
    out = {}
    for variant in VARIANTS:
        child = subprocess.run([sys.executable, __file__, "--variant", variant, "--queries", str(args.queries),
                                "--repeat", str(args.repeat)], capture_output=True, text=True, check=True,
                               timeout=600)
        out[variant] = float(child.stdout.strip().splitlines()[-1])
    print(json.dumps({"bench": "otel_bridge_cost", "queries": args.queries, "repeat": args.repeat,
                      "us_per_query_without_instrumentation": round(out["off"], 2),
                      "us_per_query_with_sqlalchemy_bridge": round(out["sqlalchemy"], 2),
                      "us_per_query_instrumented_outside_any_app": round(out["sqlalchemy_outside_app"], 2),
                      "bridge_cost_us_per_query": round(out["sqlalchemy"] - out["off"], 2)}))


if __name__ == "__main__":
    main()
