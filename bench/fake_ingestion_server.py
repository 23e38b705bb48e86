"""The tests' fake Application Insights ingestion endpoint as a process of its own, for benchmarks.

    python bench/fake_ingestion_server.py --mode ok|hang [--port 0] [--hang-seconds 600] [--stats-file f]

Listens on 127.0.0.1 only, prints `listening <port>` once ready, and serves until SIGTERM/SIGINT.
Accepted envelopes are counted (by base type) and then forgotten, so memory stays flat; the
counts go to --stats-file (JSON, rewritten every 0.2 s) and to stdout at exit.
"""
import argparse
import json
import os
import signal
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from fake_ingestion import FakeIngestion  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("ok", "hang"), default="ok")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--hang-seconds", type=float, default=600.0)
    parser.add_argument("--stats-file")
    args = parser.parse_args()

    fake = FakeIngestion(port=args.port)
    fake.mode = args.mode
    fake.hang_seconds = args.hang_seconds
    fake.start()
    counts = {"envelopes": 0, "posts": 0}
    stop = threading.Event()

    def drain():
        """Count and forget accepted envelopes; write the counts."""
        with fake._cond:
            items, fake.envelopes = fake.envelopes, []
            counts["posts"] += len(fake.attempts)
            fake.attempts.clear()
        for item in items:
            kind = item.get("data", {}).get("baseType", "?")
            counts[kind] = counts.get(kind, 0) + 1
        counts["envelopes"] += len(items)
        if args.stats_file:
            tmp = args.stats_file + ".tmp"
            with open(tmp, "w") as fh:
                json.dump(dict(counts, mode=fake.mode, time=time.time()), fh)
            os.replace(tmp, args.stats_file)

    def loop():
        while not stop.wait(0.2):
            drain()

    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    signal.signal(signal.SIGINT, lambda *a: stop.set())
    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    print(f"listening {fake.port}", flush=True)
    while not stop.wait(0.5):
        pass
    fake.stop()
    drain()
    print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    main()
