"""A separate process for tests/test_delivery.py: builds an Azure-mode app and posts, flushes, dies or waits.

Usage: python tests/delivery_worker.py '<json spec>'   (cwd: the project root)

spec keys:
  config   dict passed to create_app (TESTING is added)
  post     number of events to POST /event through the test client (default 0)
  flush    call the monitor's flush() after posting (default false)
  start    call the monitor's start() without any traffic (process B of a restart)
  then     "exit": return, so atexit runs UsageMonitor.close; "sigkill": SIGKILL itself;
           "wait": print {"ready": true}, then return (atexit again) when stdin closes or says "exit"

Prints JSON lines on stdout: {"posted": [event ids], "pid": ..., "flushed": ...}, then {"ready": ...}.
Every attempt to resolve or connect to anything but loopback is refused and reported on stderr
as "NONLOCAL <host> <port>", so a test can assert that nothing reached the internet.
"""
import json
import os
import signal
import socket
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", None, ""}


def _report(host, port):
    sys.stderr.write(f"NONLOCAL {host} {port}\n")
    sys.stderr.flush()


def _guard_network():
    """Refuse DNS lookups and connections that are not to loopback or a UNIX socket."""
    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def getaddrinfo(host, port, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else host
        if name not in _LOCAL_HOSTS and not str(name).startswith("127."):
            _report(name, port)
            raise socket.gaierror(socket.EAI_NONAME, "non-local lookup refused by the test guard")
        return real_getaddrinfo(host, port, *args, **kwargs)

    def _check(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            host = address[0]
            if not (host.startswith("127.") or host == "::1"):
                _report(host, address[1])
                raise OSError(101, "non-local connection refused by the test guard")

    def connect(sock, address):
        _check(sock, address)
        return real_connect(sock, address)

    def connect_ex(sock, address):
        _check(sock, address)
        return real_connect_ex(sock, address)

    socket.getaddrinfo = getaddrinfo
    socket.socket.connect = connect
    socket.socket.connect_ex = connect_ex


def _emit(**payload):
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


def main(spec):
    _guard_network()
    from app import create_app
    from telemetry import monitor_of

    app = create_app(dict(spec.get("config", {}), TESTING=True))
    telemetry = monitor_of(app)
    ids = []
    if spec.get("start"):
        telemetry.start()
    client = app.test_client()
    for seq in range(spec.get("post", 0)):
        resp = client.post("/event", json={"event_name": "DeliveryCheck",
                                           "details": {"seq": seq, "origin": "worker"}})
        assert resp.status_code == 202, resp.get_data(as_text=True)
        ids.append(resp.get_json()["event_id"])
    flushed = telemetry.flush(30) if spec.get("flush") else None
    from opencensus.ext.azure.statsbeat import statsbeat
    _emit(posted=ids, pid=os.getpid(), flushed=flushed,
          statsbeat_running=statsbeat._STATSBEAT_EXPORTER is not None,
          health=telemetry.health())
    then = spec.get("then", "exit")
    if then == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)
    if then == "wait":
        _emit(ready=True)
        for line in sys.stdin:
            if line.strip() == "health":
                _emit(health=telemetry.health())
            elif line.strip() == "exit":
                break


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
