"""gunicorn settings for production: `gunicorn -c gunicorn.conf.py app:app`."""
import os

bind = f"{os.environ.get('HOST', '0.0.0.0')}:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "gthread"
threads = int(os.environ.get("GUNICORN_THREADS", "4"))
timeout = 30
graceful_timeout = 30
accesslog = os.environ.get("GUNICORN_ACCESS_LOG") or None
# One listening socket per worker: the kernel spreads new connections instead of the first
# worker to wake taking a whole burst of keep-alive connections (measured in bench/NOTES.md).
reuse_port = True


def post_worker_init(worker):
    """Start this worker's telemetry (exporters, threads) after fork, before its first request."""
    worker.wsgi.extensions["telemetry"].start()


def worker_exit(server, worker):
    """On SIGTERM: send what is queued if ingestion answers, store the rest, within SHUTDOWN_GRACE."""
    app = getattr(worker, "wsgi", None)
    if app is not None:
        app.extensions["telemetry"].close()
