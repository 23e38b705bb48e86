"""A fake Application Insights ingestion endpoint on 127.0.0.1 for wire-level tests."""
import gzip
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

IKEY = "11111111-2222-3333-4444-555555555555"


class FakeIngestion:
    """Records the envelopes POSTed to /v2.1/track and answers as `mode` says.

    Modes: "ok" (200), "partial" (206; `partial_errors(index, envelope)` returns a status code
    for items it rejects, None to accept), "throttle" (429 with Retry-After), "error" (500),
    "unavailable" (503), "hang" (sleeps `hang_seconds` before answering 200).
    `stop()` makes it refuse connections; `start()` brings it back on the same port.
    With `hang_accepts=False` a hung request is never ingested (the client gave up on it), the
    worst hanging endpoint. `log` holds one dict per attempt: start and end (monotonic), mode,
    status, item count and the set of baseTypes in the batch.
    """

    def __init__(self, port=0):
        self.port = port
        self.mode = "ok"
        self.retry_after = 1
        self.hang_seconds = 5.0
        self.hang_accepts = True
        self.log = []
        self.partial_errors = lambda index, envelope: None
        self.envelopes = []
        self.attempts = []
        self._cond = threading.Condition()
        self._server = None

    @property
    def connection_string(self):
        """A connection string that points the exporters here."""
        return f"InstrumentationKey={IKEY};IngestionEndpoint=http://127.0.0.1:{self.port}/"

    def start(self):
        """Listen on 127.0.0.1 (the same port after a stop)."""
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                fake._handle(self)

            def log_message(self, *args):
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self):
        """Stop listening: connections are refused until start()."""
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _handle(self, req):
        """Answer one POST according to the mode."""
        body = req.rfile.read(int(req.headers.get("Content-Length") or 0))
        if req.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        if req.path != "/v2.1/track":
            return self._reply(req, 404, {"error": "unknown path"})
        items = json.loads(body)
        mode = self.mode
        entry = {"start": time.monotonic(), "end": None, "mode": mode, "status": None, "n": len(items),
                 "types": frozenset(i.get("data", {}).get("baseType") for i in items)}
        with self._cond:
            self.attempts.append((mode, len(items)))
            self.log.append(entry)
        entry["status"] = self._answer(req, mode, items)
        entry["end"] = time.monotonic()

    def _answer(self, req, mode, items):
        """Reply to one batch as `mode` says; returns the status sent."""
        received = {"itemsReceived": len(items), "itemsAccepted": 0, "errors": []}
        if mode == "hang":
            time.sleep(self.hang_seconds)
            if not self.hang_accepts:
                self._reply(req, 503, received)  # nobody is listening any more; nothing was ingested
                return 503
            mode = "ok"
        if mode == "ok":
            self._accept(items)
            self._reply(req, 200, dict(received, itemsAccepted=len(items)))
            return 200
        if mode == "partial":
            errors, accepted = [], []
            for index, item in enumerate(items):
                code = self.partial_errors(index, item)
                if code:
                    errors.append({"index": index, "statusCode": code, "message": f"rejected {code}"})
                else:
                    accepted.append(item)
            self._accept(accepted)
            self._reply(req, 206, dict(received, itemsAccepted=len(accepted), errors=errors))
            return 206
        status = {"throttle": 429, "error": 500, "unavailable": 503}[mode]
        headers = {"Retry-After": str(self.retry_after)} if status == 429 else {}
        self._reply(req, status, received, headers)
        return status

    def _accept(self, items):
        """Keep accepted envelopes and wake waiters."""
        with self._cond:
            self.envelopes.extend(items)
            self._cond.notify_all()

    @staticmethod
    def _reply(req, status, payload, headers=None):
        """Write a JSON reply."""
        data = json.dumps(payload).encode()
        try:
            req.send_response(status)
            for name, value in (headers or {}).items():
                req.send_header(name, value)
            req.send_header("Content-Type", "application/json")
            req.send_header("Content-Length", str(len(data)))
            req.end_headers()
            req.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def of_type(self, base_type):
        """Accepted envelopes whose data.baseType is base_type."""
        with self._cond:
            return [e for e in self.envelopes if e.get("data", {}).get("baseType") == base_type]

    def event_ids(self):
        """The distinct event_id properties of accepted EventData envelopes."""
        return {e["data"]["baseData"]["properties"].get("event_id") for e in self.of_type("EventData")}

    def wait_for(self, predicate, timeout=10.0):
        """Wait until predicate(self) is true; returns its last value."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                result = predicate(self)
                remaining = deadline - time.monotonic()
                if result or remaining <= 0:
                    return result
                self._cond.wait(min(remaining, 0.1))
