"""The `opencensus` scenario: the original design done plainly with OpenCensus.

opencensus-ext-flask's FlaskMiddleware traces every request (sampling rate 1.0) to an
AzureExporter; every POST /event logs one custom event through opencensus-ext-azure's
AzureEventHandler. Runs in bench/.venv-opencensus (Flask 2.3); exports to the fake ingestion.
"""
import logging
import os
import uuid

from flask import Flask, jsonify, request
from opencensus.ext.azure.log_exporter import AzureEventHandler
from opencensus.ext.azure.trace_exporter import AzureExporter
from opencensus.ext.flask.flask_middleware import FlaskMiddleware
from opencensus.trace.samplers import ProbabilitySampler

CONNECTION_STRING = os.environ["APPLICATIONINSIGHTS_CONNECTION_STRING"]
STORAGE = os.environ["BENCH_STORAGE"]

app = Flask(__name__)
FlaskMiddleware(app, exporter=AzureExporter(connection_string=CONNECTION_STRING,
                                            storage_path=os.path.join(STORAGE, "traces")),
                sampler=ProbabilitySampler(rate=1.0))
events = logging.getLogger("bench.events")
events.setLevel(logging.INFO)
events.propagate = False
events.addHandler(AzureEventHandler(connection_string=CONNECTION_STRING, storage_path=os.path.join(STORAGE, "events")))


@app.post("/event")
def event():
    body = request.get_json()
    events.info(body["event_name"], extra={"custom_dimensions": body.get("details", {})})
    return jsonify(status="accepted", event_id=str(uuid.uuid4())), 202
