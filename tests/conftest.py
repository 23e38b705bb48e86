"""Shared fixtures: a local-mode app on a temporary SQLite store, its client and CLI runner."""
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from app import create_app  # noqa: E402
from telemetry import monitor_of

# No test may reach Microsoft's statsbeat endpoint or pick up a developer's settings.
os.environ["APPLICATIONINSIGHTS_STATSBEAT_DISABLED_ALL"] = "true"
for _var in ("APPLICATIONINSIGHTS_CONNECTION_STRING", "LOG_ANALYTICS_WORKSPACE_ID", "TELEMETRY_DB",
             "DASHBOARD_TOKEN", "EVENT_API_KEYS", "CORS_ORIGINS"):
    os.environ.pop(_var, None)
# Security rules are proven in test_security.py, which turns them back on; elsewhere they would
# only get in the way of counting (Azure mode refuses to start without DASHBOARD_TOKEN).
os.environ["DASHBOARD_AUTH"] = "off"
os.environ["RATE_LIMIT_ENABLED"] = "false"


@pytest.fixture
def app(tmp_path):
    """A local-mode app writing to a fresh SQLite file."""
    application = create_app({"TESTING": True, "TELEMETRY_DB": str(tmp_path / "telemetry.db"),
                              "LOCAL_FLUSH_INTERVAL": "0.01"})
    yield application
    monitor_of(application).close()


@pytest.fixture
def client(app):
    """Flask's test client for the app."""
    return app.test_client()


@pytest.fixture
def runner(app):
    """Flask's CLI runner for the app."""
    return app.test_cli_runner()


class Backend:
    """A service on 127.0.0.1 that the app calls out to: paths under /boom answer 500, any other 200.

    It remembers the traceparent header of every call.
    """

    def __init__(self):
        seen = self.traceparents = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                seen.append(self.headers.get("traceparent"))
                self.send_response(500 if self.path.startswith("/boom") else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.netloc = f"127.0.0.1:{self._server.server_address[1]}"
        self.url = f"http://{self.netloc}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self):
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def backend():
    """A local service for outgoing `requests` calls (dependencies)."""
    server = Backend()
    yield server
    server.close()


@pytest.fixture(scope="module")
def driver():
    """One headless Chromium per test module (Debian's chromium and chromium-driver, via selenium)."""
    from browser_harness import start_chromium
    try:
        browser = start_chromium()
    except RuntimeError as exc:
        pytest.skip(f"no usable Chromium: {exc}")
    yield browser
    browser.quit()
