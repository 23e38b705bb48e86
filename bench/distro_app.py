"""The `distro` scenario: Azure Monitor OpenTelemetry Distro (azure-monitor-opentelemetry 1.8.11).

configure_azure_monitor() instruments Flask (a request span per request) and attaches its log
handler to the "bench.events" logger; every POST /event sends one custom event through it.
Runs in bench/.venv-distro; the connection string points at bench/run.py's fake ingestion.
"""
import logging
import os
import uuid

from azure.monitor.opentelemetry import configure_azure_monitor

configure_azure_monitor(connection_string=os.environ["APPLICATIONINSIGHTS_CONNECTION_STRING"],
                        logger_name="bench.events", enable_live_metrics=False,
                        storage_directory=os.environ["BENCH_STORAGE"])

from flask import Flask, jsonify, request  # noqa: E402  (after the Flask instrumentation is installed)

events = logging.getLogger("bench.events")
events.setLevel(logging.INFO)
events.propagate = False
app = Flask(__name__)


@app.post("/event")
def event():
    body = request.get_json()
    name = body["event_name"]
    events.info(name, extra={"microsoft.custom_event.name": name, **body.get("details", {})})
    return jsonify(status="accepted", event_id=str(uuid.uuid4())), 202
