"""`make bench`: every benchmark in one run, then bench/RESULTS.md (and bench/results.json).

  1. HTTP scenarios (a)-(e) under gunicorn + wrk            bench/http_bench.py
  2. local store throughput through log_event               bench/store_throughput.py
  3. /dashboard/usage over 1,000,000 events (30 days)       bench/dashboard_scale.py
  4. memory during a 60 s ingestion outage at 1,000 ev/s    bench/outage_memory.py
  5. single flight of Log Analytics queries                 pytest (tests/test_log_analytics.py,
                                                            tests/test_single_flight_app.py)

Everything listens on and talks to 127.0.0.1 only. `--quick` shortens every run (a smoke test
of the harness; its figures are not the reference ones).
"""
import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import BENCH, ROOT, VENV_BIN, ensure_wrk, machine  # noqa: E402
from pyspy_top import summarise  # noqa: E402

PY = sys.executable
SINGLE_FLIGHT_TESTS = [
    "tests/test_log_analytics.py::test_single_flight_concurrent_miss_makes_one_call",
    "tests/test_log_analytics.py::test_single_flight_shares_errors_and_does_not_cache_them",
    "tests/test_single_flight_app.py",
]


def _json_of(args, timeout):
    """Run a bench script; its last stdout line is JSON."""
    started = time.monotonic()
    proc = subprocess.run([PY] + args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    sys.stdout.write(proc.stderr[-2000:] if os.environ.get("BENCH_VERBOSE") else "")
    data = json.loads([l for l in proc.stdout.splitlines() if l.startswith("{")][-1])
    data["_seconds"] = round(time.monotonic() - started, 1)
    return data


def _http(args, *extra, rounds=None):
    out = os.path.join(BENCH, ".http.json")
    cmd = [os.path.join(BENCH, "http_bench.py"), "--duration", str(args.duration), "--warmup", str(args.warmup),
           "--rounds", str(rounds or args.rounds), "--out", out] + list(extra)
    proc = subprocess.run([PY] + cmd, cwd=ROOT, timeout=1800)
    if proc.returncode:
        raise RuntimeError("http_bench failed")
    with open(out) as fh:
        data = json.load(fh)
    os.remove(out)
    return data


def http(args):
    return _http(args, "--profile", "b,c")


def split(args):
    """How wrk's keep-alive connections split between the workers, with and without --reuse-port."""
    return _http(args, "--split-study")


def http_experiments(args):
    """The same scenarios with the recommended changes applied (bench/experiments.py), one round each."""
    from experiments import RECOMMENDED
    return {"recommended": _http(args, "--only", "a,b,a_azure,c", "--experiments", RECOMMENDED, rounds=1)}


def store(args):
    from experiments import RECOMMENDED
    events = "20000" if args.quick else "100000"
    script = os.path.join(BENCH, "store_throughput.py")
    data = _json_of([script, "--events", events, "--repeat", "3"], 900)
    data["store_only"] = _json_of([script, "--events", events, "--repeat", "2", "--store-only"], 900)
    if args.experiments:
        os.environ["BENCH_EXPERIMENTS"] = RECOMMENDED
        try:
            data["recommended"] = _json_of([script, "--events", events, "--repeat", "2"], 900)
        finally:
            del os.environ["BENCH_EXPERIMENTS"]
    if data["events_per_s"] < 50_000:
        raw = os.path.join(BENCH, ".store-pyspy.txt")
        subprocess.run([os.path.join(VENV_BIN, "py-spy"), "record", "--format", "raw", "-o", raw, "--rate", "250",
                        "--gil", "--", PY, os.path.join(BENCH, "store_throughput.py"), "--events",
                        str(int(events) // 2), "--repeat", "1"], cwd=ROOT, capture_output=True, timeout=600)
        if os.path.exists(raw):
            total, own, incl = summarise(raw, 25, focus=("run (store_throughput.py)", "LocalStore._run"))
            data["profile"] = {"samples": total, "own": own, "total": incl,
                               "mode": "py-spy --gil, the timed loop and the writer thread"}
            os.remove(raw)
    return data


def micro(args):
    """µs per request inside the app (no gunicorn): bare vs /event, with each recommended change."""
    configs = ["", "all"] if args.experiments else [""]
    proc = subprocess.run([PY, os.path.join(BENCH, "wsgi_micro.py"), "--configs"] + configs +
                          ["--blocks", "3", "--passes", "1" if args.quick else "2",
                           "--per-block", "500" if args.quick else "1000"], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    return [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]


def dashboard(args):
    cmd = [os.path.join(BENCH, "dashboard_scale.py"), "--repeat", "20"]
    if args.quick:
        cmd += ["--events", "100000", "--requests", "100000", "--dependencies", "10000"]
    return _json_of(cmd, 1200)


def cardinality(args):
    """The dashboard with 1,000,000 distinct event names and 100,000 routes and targets (issue 11)."""
    cmd = [os.path.join(BENCH, "dashboard_scale.py"), "--cardinality", "--repeat", "8"]
    if args.quick:
        cmd += ["--events", "100000", "--requests", "100000", "--dependencies", "10000"]
    return _json_of(cmd, 1200)


def outage(args):
    return _json_of([os.path.join(BENCH, "outage_memory.py"), "--seconds", "15" if args.quick else "60",
                     "--profile-at", "5" if args.quick else "40"], 900)


def single_flight(args):
    proc = subprocess.run([PY, "-m", "pytest", "-q"] + SINGLE_FLIGHT_TESTS, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    return {"tests": SINGLE_FLIGHT_TESTS, "passed": proc.returncode == 0,
            "summary": (proc.stdout.strip().splitlines() or [""])[-1]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=8, help="seconds per measured wrk run")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="short runs: checks the harness, not the figures")
    parser.add_argument("--experiments", action="store_true",
                        help="also measure HTTP with bench/experiments.py's patches (recommendations not yet applied)")
    parser.add_argument("--skip", default="", help="comma-separated: http,split,http_experiments,micro,store,dashboard,cardinality,outage,"
                        "single_flight")
    parser.add_argument("--results", default=os.path.join(BENCH, "results.json"))
    parser.add_argument("--markdown", default=os.path.join(BENCH, "RESULTS.md"))
    args = parser.parse_args()
    if args.quick:
        args.duration, args.warmup, args.rounds = 3, 1, 1
    ensure_wrk()
    results = {"machine": machine(), "command": "make bench  (" + " ".join([os.path.relpath(PY, ROOT)] + sys.argv) + ")",
               "quick": args.quick}
    skip = set(filter(None, args.skip.split(",")))
    parts = [("http", http), ("split", split)]
    if args.experiments:
        parts.append(("http_experiments", http_experiments))
    parts += [("micro", micro), ("store", store), ("dashboard", dashboard), ("cardinality", cardinality),
              ("outage", outage),
              ("single_flight", single_flight)]
    for name, func in parts:
        if name in skip:
            continue
        print(f"== {name}", flush=True)
        started = time.monotonic()
        try:
            results[name] = func(args)
        except Exception as exc:  # one failing part must not lose the others' figures
            results[name] = {"error": str(exc)[-4000:]}
            print(f"   {name} failed: {str(exc)[-500:]}", flush=True)
        print(f"   {name} done in {time.monotonic() - started:.0f} s", flush=True)
    with open(args.results, "w") as fh:
        json.dump(results, fh, indent=1, default=str)
    from report import write_markdown
    write_markdown(results, args.markdown)
    print(f"written {os.path.relpath(args.markdown, ROOT)} and {os.path.relpath(args.results, ROOT)}")


if __name__ == "__main__":
    main()
