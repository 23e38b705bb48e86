"""gunicorn settings for production: `gunicorn -c gunicorn.conf.py app:app`, or any `module:app` with a UsageMonitor."""
import logging
import os

# 127.0.0.1 by default: production puts nginx in front (deploy/nginx.conf); HOST=0.0.0.0 in a container.
bind = f"{os.environ.get('HOST', '127.0.0.1')}:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "gthread"
threads = int(os.environ.get("GUNICORN_THREADS", "4"))
timeout = 30
graceful_timeout = 30
accesslog = os.environ.get("GUNICORN_ACCESS_LOG") or None
# One listening socket per worker: the kernel spreads new connections instead of the first
# worker to wake taking a whole burst of keep-alive connections (measured in bench/NOTES.md).
reuse_port = True


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
    monitor.start()
    if worker.age == 1:  # the first worker speaks for the server, once
        import security
        for line in security.startup_warnings(monitor.settings, worker.cfg.workers):
            logging.getLogger("gunicorn.error").warning(line)


def worker_exit(server, worker):
    """On SIGTERM: send what is queued if ingestion answers, store the rest, within SHUTDOWN_GRACE."""
    monitor = _monitor(worker)
    if monitor is not None:
        monitor.close()
