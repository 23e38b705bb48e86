"""Shared fixtures: a local-mode app on a temporary SQLite store, its client and CLI runner."""
import os
import sys

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
