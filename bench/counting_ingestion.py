"""A fake Application Insights ingestion endpoint on 127.0.0.1 that counts what it receives.

mode "ok": POST /v2.1/track or /v2/track answers 200 {"itemsReceived": n, "itemsAccepted": n,
"errors": []} and counts the items by baseType. mode "hang": accepts the connection, reads the
request and never answers (until stop()).
"""
import gzip
import json
import re
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


BASE_TYPE = re.compile(rb'"baseType"\s*:\s*"(\w+)"')


class FakeIngestion:
    def __init__(self, mode="ok"):
        self.mode = mode
        self.items = Counter()  # baseType -> items accepted
        self.posts = 0  # requests received (answered or not)
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with fake._lock:
                    fake.posts += 1
                if fake.mode == "hang":
                    fake._stopped.wait()
                    return
                if self.path.split("?")[0] not in ("/v2.1/track", "/v2/track"):
                    return self._reply(404, {"error": "unknown path"})
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                # A JSON array or newline-delimited envelopes: counted by their baseType without parsing
                # them (ingestion is remote in production; parsing here would load the bench's cores).
                items = BASE_TYPE.findall(body)
                with fake._lock:
                    fake.items.update(t.decode() for t in items)
                self._reply(200, {"itemsReceived": len(items), "itemsAccepted": len(items), "errors": []})

            def _reply(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def connection_string(self):
        return ("InstrumentationKey=00000000-0000-0000-0000-000000000000;"
                f"IngestionEndpoint=http://127.0.0.1:{self.port}/")

    def counts(self):
        with self._lock:
            return dict(self.items, posts=self.posts, total=sum(self.items.values()))

    def stop(self):
        self._stopped.set()
        self._server.shutdown()
        self._server.server_close()
