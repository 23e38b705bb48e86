"""gunicorn settings for production: `gunicorn -c gunicorn.conf.py app:app`, or any `module:app` with a UsageMonitor."""
import logging
import os
import socket
import sys

import config as _config

# A bad HOST, PORT, WEB_CONCURRENCY or GUNICORN_THREADS stops gunicorn here, in the master, with one line.
try:
    _server = _config.server_settings()
except _config.ConfigError as exc:
    sys.exit(f"configuration error: {exc}")

# 127.0.0.1 by default: production puts nginx in front (deploy/nginx.conf); HOST=0.0.0.0 in a container.
bind = _server["bind"]
workers = _server["workers"]
worker_class = "gthread"
threads = _server["threads"]
timeout = 30
graceful_timeout = 30
accesslog = os.environ.get("GUNICORN_ACCESS_LOG") or None
# One listening socket per worker: the kernel spreads new connections instead of the first
# worker to wake taking a whole burst of keep-alive connections (measured in bench/NOTES.md).
reuse_port = True


def on_starting(server):
    """In the master, before any worker: check every setting and the address, else stop with one line.

    A worker that failed instead would be started again forever; this stops gunicorn with exit status 1.
    """
    try:
        settings = _config.load_settings(_instance_path(server.app))
        _config.check_paths(settings)
        for address in server.cfg.address:
            _check_listen(address, server.cfg.reuse_port)
    except _config.ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr, flush=True)
        if server.pidfile is not None:
            server.pidfile.unlink()
        sys.exit(1)


def _instance_path(wsgi_app):
    """The instance folder Flask gives the app's module (`app` of `app:app`), found without importing it."""
    from flask.sansio.scaffold import find_package
    module = (getattr(wsgi_app, "app_uri", None) or "app:app").partition(":")[0]
    prefix, package_path = find_package(module)
    return os.path.join(package_path, "instance") if prefix is None else os.path.join(prefix, "var", f"{module}-instance")


def _check_listen(address, reuse_port):
    """ConfigError naming HOST and PORT unless a worker will be able to listen on (host, port) as gunicorn does."""
    if not isinstance(address, tuple):  # a unix socket or an inherited file descriptor
        return
    host, port = address
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port and hasattr(socket, "SO_REUSEPORT"):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(sockaddr)
    except OSError as exc:
        raise _config.ConfigError(f"HOST={host} PORT={port}: cannot listen there ({exc.strerror or exc})") from None


def _monitor(worker):
    """The UsageMonitor of the worker's app, or None (with a warning) when the app has none."""
    from telemetry import monitor_of
    app = getattr(worker, "wsgi", None)
    monitor = monitor_of(app) if hasattr(app, "extensions") else None
    if monitor is None:
        logging.getLogger("gunicorn.error").warning("%r has no UsageMonitor: telemetry starts on first use", app)
    return monitor


def post_worker_init(worker):
    """Start this worker's telemetry (exporters, threads) after fork, before its first request."""
    monitor = _monitor(worker)
    if monitor is None:
        return
    try:
        monitor.start()
    except _config.ConfigError as exc:  # exit status 3, gunicorn's boot error, stops the master
        print(f"configuration error: {exc}", file=sys.stderr, flush=True)
        sys.exit(3)
    if worker.age == 1:  # the first worker speaks for the server, once
        import security
        for line in security.startup_warnings(monitor.settings, worker.cfg.workers):
            logging.getLogger("gunicorn.error").warning(line)


def worker_exit(server, worker):
    """On SIGTERM: send what is queued if ingestion answers, store the rest, within SHUTDOWN_GRACE."""
    monitor = _monitor(worker)
    if monitor is not None:
        monitor.close()
