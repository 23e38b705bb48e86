"""A host application as a developer would write it: a plain Flask app with `UsageMonitor(app)`.

Its routes call every public tracker (with int user ids), make an outgoing `requests` call and log
through `azure_monitor.logger`. `app` (built from the environment, on first access) serves gunicorn.
"""
import requests
from flask import Flask, current_app, jsonify

from app import UsageMonitor
from azure_monitor import logger
from logging_utils import log_event
from usage_tracking import log_crud_activity, log_user_login

BACKEND_URL = "BACKEND_URL"  # the host's own config key: where /fetch calls out to


def create_host(config=None, **monitor_options):
    """The host app; `monitor_options` go to UsageMonitor (routes=False, credential=...)."""
    host = Flask(__name__)
    host.config.update(config or {})
    host.add_url_rule("/login/<int:user_id>", view_func=login, methods=["POST"])
    host.add_url_rule("/items/<int:item_id>", view_func=update_item, methods=["PUT"])
    host.add_url_rule("/fetch", view_func=fetch)
    host.add_url_rule("/log", view_func=log_lines)
    host.add_url_rule("/broken", view_func=broken)
    host.add_url_rule("/export", view_func=export)
    host.add_url_rule("/crash", view_func=crash)
    UsageMonitor(host, **monitor_options)
    return host


def login(user_id):
    """The host's login: records UserLogin with an int id."""
    return jsonify({"event_id": log_user_login(user_id)})


def update_item(item_id):
    """The host's update: records CrudActivity with an int user id and a mixed-case action."""
    return jsonify({"event_id": log_crud_activity("Update", 7, "item"), "item": item_id})


def fetch():
    """An outgoing call to the host's backend: a dependency."""
    status = requests.get(f"{current_app.config[BACKEND_URL]}/ok?sig=secret", timeout=5).status_code
    return jsonify({"backend": status})


def log_lines():
    """Traces at INFO and WARNING, and an exception."""
    logger.info("cache warmed", extra={"custom_dimensions": {"entries": 12, "region": "eu"}})
    logger.warning("disk almost full")
    try:
        1 / 0
    except ZeroDivisionError:
        logger.exception("export failed")
    return jsonify({"logged": 3})


def broken():
    """A host route answering 500 on its own."""
    return jsonify({"error": "backend down"}), 500


def crash():
    """A host route that raises: the host's own 500 page."""
    raise RuntimeError("host bug")


def export():
    """A custom event from the server side."""
    return jsonify({"event_id": log_event("ReportExported", {"format": "pdf"})})


def __getattr__(name):
    """`host_app:app` for gunicorn, built on first access."""
    if name != "app":
        raise AttributeError(name)
    globals()["app"] = application = create_host()
    return application
