"""CPU cost of one request inside the app (no gunicorn, no network): bare endpoint vs POST /event.

Calls the WSGI app directly from one thread, local mode with the real LocalStore writer, in
interleaved blocks; reports the best block's µs per request for each path and their difference
(what /event adds to the shared request path). Each configuration runs in a fresh process, so
the experiments of bench/experiments.py (process-wide patches) can be compared:

    .venv/bin/python bench/wsgi_micro.py [--configs "" no_limiter fast_record json_decoder all]
"""
import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
from experiments import RECOMMENDED  # noqa: E402

BODY = b'{"event_name": "ReportExported", "details": {"format": "pdf", "pages": 3}}'


def bench_bare():
    """Does nothing: the ceiling (as bench/wsgi.py registers it for the HTTP scenarios)."""
    return "", 204


def child(blocks, per_block):
    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    for var, value in {"RATE_LIMIT_ENABLED": "false", "LOG_LEVEL": "WARNING",
                       "DASHBOARD_AUTH": "false"}.items():
        os.environ[var] = value
    os.environ.pop("APPLICATIONINSIGHTS_CONNECTION_STRING", None)
    import experiments
    applied = experiments.apply()
    from werkzeug.test import EnvironBuilder
    from app import create_app
    from telemetry import monitor_of
    app = create_app({"TELEMETRY_DB": os.path.join(tempfile.mkdtemp(prefix="bench-micro-"), "m.db")})
    app.add_url_rule("/bench/bare", view_func=bench_bare, methods=["GET", "POST"])
    monitor_of(app).start()

    def start_response(status, headers, exc_info=None):
        return None

    def block(path, n):
        base = EnvironBuilder(path=path, method="POST", data=BODY, content_type="application/json").get_environ()
        t = time.perf_counter()
        for _ in range(n):
            env = dict(base)
            env["wsgi.input"] = io.BytesIO(BODY)
            b"".join(app(env, start_response))
        return (time.perf_counter() - t) / n * 1e6

    block("/bench/bare", 300)
    block("/event", 300)
    best = {"/bench/bare": [], "/event": []}
    for _ in range(blocks):
        for path in best:
            best[path].append(block(path, per_block))
    monitor_of(app).close()
    bare, event = min(best["/bench/bare"]), min(best["/event"])
    print(json.dumps({"experiments": applied, "bare_us": round(bare, 1), "event_us": round(event, 1),
                      "event_minus_bare_us": round(event - bare, 1), "ratio_bare_over_event": round(bare / event, 3)}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="*",
                        default=["", "no_limiter", "fast_record", "json_decoder", "all"])
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--per-block", type=int, default=2000)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.blocks, args.per_block)
    # Every configuration runs args.passes times, in alternating order, each in a fresh process;
    # the best (lowest) figures are kept: this machine has slow spells of several seconds.
    best = {}
    order = list(args.configs)
    for pass_ in range(args.passes):
        for config in (order if pass_ % 2 == 0 else order[::-1]):
            names = RECOMMENDED if config == "all" else config
            env = dict(os.environ, BENCH_EXPERIMENTS=names)
            out = subprocess.run([sys.executable, __file__, "--child", "--blocks", str(args.blocks),
                                  "--per-block", str(args.per_block)], env=env, capture_output=True, text=True,
                                 cwd=ROOT)
            line = [l for l in out.stdout.splitlines() if l.startswith("{")]
            if not line:
                raise SystemExit(out.stderr[-2000:])
            r = json.loads(line[-1])
            if config not in best or r["event_us"] + r["bare_us"] < best[config]["event_us"] + best[config]["bare_us"]:
                best[config] = r
    for config in order:
        print(json.dumps(best[config]), flush=True)


if __name__ == "__main__":
    main()
