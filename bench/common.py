"""Helpers shared by the benchmark scripts: the service under gunicorn, the fake ingestion, wrk."""
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
VENV_BIN = os.path.dirname(sys.executable)
IKEY = "11111111-2222-3333-4444-555555555555"

# Settings that keep the service's own guards (added by other changes) out of the figures.
# Unknown variables are ignored by config.py, so these are harmless when a setting does not exist.
NEUTRAL_ENV = {
    "RATE_LIMIT_ENABLED": "false",
    "EVENT_RATE_LIMIT": "1000000 per second",
    "DASHBOARD_RATE_LIMIT": "1000000 per second",
    "DASHBOARD_AUTH": "false",
    "DASHBOARD_TOKEN": "",
    "EVENT_API_KEYS": "",
    "LOG_LEVEL": "WARNING",
    "APPLICATIONINSIGHTS_STATSBEAT_ENABLED": "false",
    "APPLICATIONINSIGHTS_STATSBEAT_DISABLED_ALL": "true",
}


def reuse_port_in_config():
    """True when gunicorn.conf.py sets reuse_port = True."""
    with open(os.path.join(ROOT, "gunicorn.conf.py")) as fh:
        return any(line.replace(" ", "").startswith("reuse_port=True") for line in fh)


def free_port():
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_get(url, timeout=5.0):
    """(status, body) of a GET, or (None, error text)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError as exc:
        return None, str(exc)


def connection_string(port):
    """Azure mode pointed at the fake ingestion on 127.0.0.1:port."""
    return f"InstrumentationKey={IKEY};IngestionEndpoint=http://127.0.0.1:{port}/"


class Service:
    """The app under gunicorn with the production config (gunicorn.conf.py), on 127.0.0.1."""

    def __init__(self, env, log_path, app="bench.wsgi:app", reuse_port=None):
        """reuse_port: None = gunicorn.conf.py as deployed; True/False force SO_REUSEPORT on/off."""
        self.port = free_port()
        if reuse_port is None and os.environ.get("BENCH_REUSE_PORT"):
            reuse_port = os.environ["BENCH_REUSE_PORT"] != "0"
        self.reuse_port = reuse_port  # None: gunicorn.conf.py exactly as deployed
        self.env = dict(os.environ)
        for var in ("APPLICATIONINSIGHTS_CONNECTION_STRING", "LOG_ANALYTICS_WORKSPACE_ID"):
            self.env.pop(var, None)
        self.env.update(NEUTRAL_ENV)
        self.env.update(env)
        self.env.update(HOST="127.0.0.1", PORT=str(self.port), PYTHONPATH=ROOT)
        self.log_path = log_path
        self.app = app
        self.proc = None

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout=60):
        """Start gunicorn and wait until every worker answers /healthz."""
        self._log = open(self.log_path, "ab")
        # reuse_port: each worker listens on its own SO_REUSEPORT socket and the kernel spreads new
        # connections over them; without it the worker that wakes first accepts most of wrk's
        # keep-alive connections (see RESULTS.md, section 1a). None: gunicorn.conf.py as deployed.
        conf = ["-c", "gunicorn.conf.py"]
        if self.reuse_port is True:
            conf.append("--reuse-port")
        elif self.reuse_port is False:
            conf = ["-c", os.path.join("bench", "gunicorn_no_reuse_port.conf.py")]
        self.proc = subprocess.Popen([os.path.join(VENV_BIN, "gunicorn")] + conf + [self.app],
                                     cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        workers = int(self.env.get("WEB_CONCURRENCY", "2"))
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.proc.returncode}; see {self.log_path}")
            status, _ = http_get(self.url + "/healthz", timeout=2)
            if status == 200 and len(self.workers()) >= workers:
                # a few more probes so that both workers have served once
                for _ in range(8):
                    http_get(self.url + "/healthz", timeout=2)
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"gunicorn did not become ready; see {self.log_path}")

    def workers(self):
        """psutil.Process of each worker."""
        try:
            return psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return []

    def processes(self):
        """Master and workers."""
        try:
            master = psutil.Process(self.proc.pid)
            return [master] + master.children()
        except psutil.NoSuchProcess:
            return []

    def health(self):
        """One worker's /healthz document (None when it does not answer)."""
        status, body = http_get(self.url + "/healthz", timeout=5)
        return json.loads(body) if status == 200 else None

    def stop(self, timeout=45):
        """SIGTERM (graceful: workers flush or store telemetry), then SIGKILL if needed."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if getattr(self, "_log", None):
            self._log.close()


class FakeIngestionProcess:
    """bench/fake_ingestion_server.py in its own process (ok or hang)."""

    def __init__(self, mode, port=0, stats_file=None, log_path=None):
        self.mode, self.port, self.stats_file, self.log_path = mode, port, stats_file, log_path
        self.proc = None

    def start(self):
        args = [sys.executable, os.path.join(BENCH, "fake_ingestion_server.py"), "--mode", self.mode,
                "--port", str(self.port)]
        if self.stats_file:
            args += ["--stats-file", self.stats_file]
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("listening"):
            raise RuntimeError(f"fake ingestion did not start: {line!r}")
        self.port = int(line.split()[1])
        return self

    def stats(self):
        """The last counts written to the stats file."""
        try:
            with open(self.stats_file) as fh:
                return json.load(fh)
        except (OSError, ValueError, TypeError):
            return {}

    def cpu_seconds(self):
        try:
            t = psutil.Process(self.proc.pid).cpu_times()
            return t.user + t.system
        except psutil.NoSuchProcess:
            return 0.0

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                out, _ = self.proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                out, _ = self.proc.communicate()
            return out


def ensure_wrk():
    """Path of wrk; installs Debian's package when missing and we are root."""
    path = shutil.which("wrk")
    if path:
        return path
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("wrk is missing: apt-get install -y wrk", flush=True)
        subprocess.run(["apt-get", "update", "-qq"], check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True)
        path = shutil.which("wrk")
    if not path:
        raise SystemExit("wrk is required (Debian/Ubuntu: apt-get install wrk)")
    return path


def wrk_version(wrk):
    out = subprocess.run([wrk, "--version"], capture_output=True, text=True).stdout
    return out.splitlines()[0].strip() if out else "wrk"


def children_cpu():
    """CPU seconds of this process's finished children (wrk runs as one)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cpu_of(processes):
    """Total CPU seconds of live processes."""
    total = 0.0
    for proc in processes:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def start_wrk(wrk, url, duration, threads, connections, method="POST", path=None, timeout="10s"):
    """Start wrk with bench/post_event.lua; finish_wrk() waits for it and parses its summary."""
    env = dict(os.environ, BENCH_METHOD=method)
    if path:
        env["BENCH_PATH"] = path
    args = [wrk, f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--timeout", timeout,
            "-s", os.path.join(BENCH, "post_event.lua"), url]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish_wrk(proc, timeout=120):
    """The JSON summary of a wrk started by start_wrk, plus derived figures."""
    stdout, stderr = proc.communicate(timeout=timeout)
    line = next((l for l in stdout.splitlines() if l.startswith("BENCH_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed: {stdout}\n{stderr}")
    result = json.loads(line[len("BENCH_JSON "):])
    seconds = result["duration_us"] / 1e6
    result["rps"] = result["requests"] / seconds if seconds else 0.0
    result["p50_ms"] = result["latency_us"]["p50"] / 1000.0
    result["p99_ms"] = result["latency_us"]["p99"] / 1000.0
    result["non_2xx"] = result["errors"]["status"]
    result["socket_errors"] = sum(v for k, v in result["errors"].items() if k != "status")
    return result


def run_wrk(wrk, url, duration, threads, connections, method="POST", path=None, timeout="10s"):
    """Run wrk once and return its summary."""
    return finish_wrk(start_wrk(wrk, url, duration, threads, connections, method, path, timeout),
                      timeout=duration + 60)


def connections_per_worker(svc):
    """ESTABLISHED client connections each worker holds on the service's port."""
    out = []
    for worker in svc.workers():
        try:
            out.append(sum(1 for c in worker.net_connections("tcp")
                           if c.status == "ESTABLISHED" and c.laddr and c.laddr.port == svc.port))
        except psutil.Error:
            out.append(0)
    return out


def machine():
    """Date, uname, cores, CPU model, memory and Python of this machine."""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((l.split(":", 1)[1].strip() for l in fh if l.startswith("model name")), "")
    except OSError:
        pass
    return {
        "date": subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip(),
        "uname": subprocess.run(["uname", "-a"], capture_output=True, text=True).stdout.strip(),
        "nproc": subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip(),
        "cpu": cpu,
        "memory_gib": round(psutil.virtual_memory().total / 2 ** 30, 1),
        "python": sys.version.split()[0],
    }


def dir_usage(path):
    """(files, bytes) under a directory tree."""
    files = size = 0
    for dirpath, _, names in os.walk(path):
        for name in names:
            try:
                size += os.path.getsize(os.path.join(dirpath, name))
                files += 1
            except OSError:
                pass
    return files, size
