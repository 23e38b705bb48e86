"""Memory during an ingestion outage: Azure mode under gunicorn, 1,000 events/s for 60 s, endpoint down.

The ingestion endpoint (127.0.0.1, a port nobody listens on: connections are refused) is down
for the whole load; RSS of the gunicorn master and workers and the size of TELEMETRY_STORAGE
are sampled every second. Then the fake ingestion comes up on that port and the time until it
has received every accepted event (and the storage is empty) is measured. Prints JSON.

    .venv/bin/python bench/outage_memory.py [--rate 1000] [--seconds 60]
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import VENV_BIN, FakeIngestionProcess, Service, connection_string, dir_usage, free_port  # noqa: E402
from pyspy_top import summarise  # noqa: E402

BODY = json.dumps({"event_name": "OutageEvent", "details": {"format": "pdf", "pages": 3}}).encode()


def _request_bytes(port):
    return (f"POST /event HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(BODY)}\r\n\r\n").encode() + BODY


def _read_response(sock, buf):
    """Read one HTTP/1.1 response with Content-Length; returns (status, leftover bytes)."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        rest += chunk
    return status, rest[length:]


def paced_load(port, rate, seconds, threads=8):
    """POST /event at `rate` per second for `seconds` on keep-alive sockets, on a fixed schedule.

    A minimal HTTP/1.1 client (pre-built request bytes) so that the load generator takes little
    of the CPU it shares with the service.
    """
    counts = {"sent": 0, "accepted": 0, "failed": 0, "late_max_s": 0.0}
    lock = threading.Lock()
    per_thread = rate / threads
    start = time.monotonic() + 0.5
    request = _request_bytes(port)

    def connect():
        return socket.create_connection(("127.0.0.1", port), timeout=30)

    def worker():
        sock = connect()
        buf = b""
        sent = accepted = failed = 0
        late = 0.0
        for i in range(int(per_thread * seconds)):
            due = start + i / per_thread
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            else:
                late = max(late, now - due)
            try:
                sock.sendall(request)
                status, buf = _read_response(sock, buf)
                sent += 1
                accepted += status == 202
                failed += status != 202
            except OSError:
                failed += 1
                sock.close()
                sock, buf = connect(), b""
        sock.close()
        with lock:
            counts["sent"] += sent
            counts["accepted"] += accepted
            counts["failed"] += failed
            counts["late_max_s"] = max(counts["late_max_s"], round(late, 3))

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    return pool, counts


class Sampler:
    """RSS of the service's processes and the storage size, every second."""

    def __init__(self, svc, storage):
        self.svc, self.storage = svc, storage
        self.samples = []
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self, phase):
        self.phase = phase
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            rss = {}
            for proc in self.svc.processes():
                try:
                    rss[proc.pid] = proc.memory_info().rss
                except Exception:  # noqa: BLE001 - a process that just exited
                    pass
            files, size = dir_usage(self.storage)
            self.samples.append({"t": round(time.monotonic() - self._t0, 1), "phase": self.phase,
                                 "rss_mb": round(sum(rss.values()) / 2 ** 20, 1),
                                 "rss_by_pid_mb": {str(k): round(v / 2 ** 20, 1) for k, v in rss.items()},
                                 "storage_files": files, "storage_mb": round(size / 2 ** 20, 2)})
            self._stop.wait(1.0)

    def stop(self):
        self._stop.set()
        self._thread.join(5)


def profile_workers(svc, work, seconds):
    """py-spy (--gil, --nonblocking) on both workers for `seconds`; the top entries."""
    spies = []
    for i, worker in enumerate(svc.workers()):
        out = os.path.join(work, f"pyspy-outage-{i}.txt")
        spies.append((out, subprocess.Popen(
            [os.path.join(VENV_BIN, "py-spy"), "record", "--pid", str(worker.pid), "--duration", str(seconds),
             "--rate", "200", "--format", "raw", "--nonblocking", "--gil", "-o", out],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
    merged = os.path.join(work, "pyspy-outage.txt")
    with open(merged, "w") as fh:
        for out, proc in spies:
            proc.wait(seconds + 30)
            if os.path.exists(out):
                with open(out) as part:
                    fh.write(part.read())
    total, own, incl = summarise(merged, 25)
    return {"samples": total, "own": own, "total": incl, "mode": "py-spy --gil, both workers, during the outage"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--drain-timeout", type=int, default=180)
    parser.add_argument("--profile-at", type=float, default=0,
                        help="seconds into the outage to profile the workers for --profile-seconds (0: no)")
    parser.add_argument("--profile-seconds", type=int, default=8)
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="bench-outage-")
    storage = os.path.join(work, "outbox")
    port = free_port()  # nobody listens: every connection is refused
    svc = Service({"APPLICATIONINSIGHTS_CONNECTION_STRING": connection_string(port),
                   "TELEMETRY_STORAGE": storage}, os.path.join(work, "gunicorn.log")).start()
    fake = None
    result = {"rate": args.rate, "seconds": args.seconds, "settings": "production defaults (gunicorn.conf.py, "
              "EXPORT_QUEUE_CAPACITY 8192, EXPORT_OVERFLOW_CAPACITY 100000, TELEMETRY_STORAGE_MAX_MB 50, "
              "EXPORT_RETRY_INTERVAL 10 s)"}
    sampler = Sampler(svc, storage).start("baseline")
    try:
        time.sleep(3)
        sampler.phase = "outage"
        t_load = time.monotonic()
        pool, counts = paced_load(svc.port, args.rate, args.seconds)
        if args.profile_at:
            time.sleep(args.profile_at)
            result["profile"] = profile_workers(svc, work, args.profile_seconds)
        for t in pool:
            t.join()
        elapsed = time.monotonic() - t_load - 0.5
        result["load"] = dict(counts, elapsed_s=round(elapsed, 1), achieved_rate=round(counts["sent"] / elapsed, 1))
        time.sleep(1.5)
        result["end_of_outage"] = dict(sampler.samples[-1])
        result["health_end_of_outage"] = (svc.health() or {}).get("telemetry")

        sampler.phase = "drain"
        t_up = time.monotonic()
        fake = FakeIngestionProcess("ok", port=port, stats_file=os.path.join(work, "fake.json")).start()
        first = done = None
        while time.monotonic() - t_up < args.drain_timeout:
            stats = fake.stats()
            events = stats.get("EventData", 0)
            if first is None and stats.get("envelopes", 0):
                first = time.monotonic() - t_up
            files, _ = dir_usage(storage)
            if events >= counts["accepted"] and files == 0:
                done = time.monotonic() - t_up
                break
            time.sleep(0.25)
        result["drain"] = {"first_delivery_s": None if first is None else round(first, 1),
                           "all_events_delivered_s": None if done is None else round(done, 1),
                           "timeout_s": args.drain_timeout, "received": fake.stats()}
        result["health_after_drain"] = (svc.health() or {}).get("telemetry")
    finally:
        sampler.stop()
        svc.stop()
        if fake:
            fake.stop()

    samples = sampler.samples
    baseline = [s for s in samples if s["phase"] == "baseline"]
    outage = [s for s in samples if s["phase"] == "outage"] or samples
    peak = max(samples, key=lambda s: s["rss_mb"])
    per_pid_peak = {}
    for s in samples:
        for pid, mb in s["rss_by_pid_mb"].items():
            per_pid_peak[pid] = max(per_pid_peak.get(pid, 0), mb)
    result.update({
        "rss_baseline_mb": baseline[-1]["rss_mb"] if baseline else None,
        "rss_peak_mb": peak["rss_mb"], "rss_peak_at_s": peak["t"], "rss_peak_phase": peak["phase"],
        "rss_peak_by_process_mb": per_pid_peak,
        "storage_peak_mb": max(s["storage_mb"] for s in samples),
        "storage_peak_files": max(s["storage_files"] for s in samples),
        "rss_end_of_outage_mb": outage[-1]["rss_mb"],
        "series": [{k: s[k] for k in ("t", "phase", "rss_mb", "storage_files", "storage_mb")}
                   for s in samples[::5]],
    })
    print(json.dumps(result))


if __name__ == "__main__":
    main()
