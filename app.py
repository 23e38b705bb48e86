"""The service: create_app(), a thin factory over the UsageMonitor extension; `app` for gunicorn and flask."""
import logging
import sys

from flask import Flask

import views
from config import ConfigError, check_paths
from usage_monitor import UsageMonitor, monitor_of

__all__ = ["UsageMonitor", "create_app"]


def create_app(test_config=None, *, credential=None):
    """Our own app: settings from test_config, then the environment; every error answers JSON."""
    app = Flask(__name__, instance_relative_config=True)
    if test_config:
        app.config.from_mapping(test_config)
    app.config["DEBUG"] = False  # never from FLASK_DEBUG: the debugger would answer with stack traces
    UsageMonitor(app, credential=credential)
    views.register_json_errors(app)
    app.add_url_rule("/", view_func=views.redirect_to_dashboard)
    return app


def __getattr__(name):
    """`app:app` for gunicorn and `flask --app app`: the entry point, built on first access, not at import."""
    if name != "app":
        raise AttributeError(name)
    try:
        application = create_app()
        check_paths(monitor_of(application).settings)  # a service fails at start; create_app() alone degrades
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        raise SystemExit(3) from None  # 3: a gunicorn worker's boot error, which stops the master (2 would restart it)
    level = monitor_of(application).settings.log_level
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    globals()["app"] = application
    return application
