"""The `bare` scenario: a plain Flask app with the same POST /event contract and nothing else."""
import uuid

from flask import Flask, jsonify, request

app = Flask(__name__)


@app.post("/event")
def event():
    request.get_json()
    return jsonify(status="accepted", event_id=str(uuid.uuid4())), 202
