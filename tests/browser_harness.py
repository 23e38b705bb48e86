"""Harness of the real-browser tests (test_browser.py): headless Chromium, the service, a page on another origin.

Everything listens on 127.0.0.1 and Chromium resolves no other host name. The service is the real
app (create_app) served by werkzeug; `Wire` sits in front of it as a fake at the wire: it records
what the browser sent (content type, traceparent, event ids, status) and can answer the next POST
/events itself (503, 429) the way the service would, CORS headers included, or take the whole
service down (`down`: 503 to every request, /usage.js too). `PageServer` serves the test page, and
/snippet: the README's snippet (set by the test).
"""
import json
import os
import shutil
import sqlite3
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO

from werkzeug.serving import make_server

from app import create_app
from telemetry import monitor_of

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
CHROMEDRIVER_CANDIDATES = ("/usr/bin/chromedriver",)


def _first(candidates, name):
    return next((p for p in candidates if os.access(p, os.X_OK)), None) or shutil.which(name)


def start_chromium():
    """A headless Chromium driven by selenium; raises RuntimeError naming what is missing or failed."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as exc:  # pragma: no cover - requirements-dev.txt pins it
        raise RuntimeError(f"selenium is not installed ({exc}); run `make install`") from None
    binary = _first(CHROMIUM_CANDIDATES, "chromium")
    driver_path = _first(CHROMEDRIVER_CANDIDATES, "chromedriver")
    if not binary or not driver_path:
        raise RuntimeError("chromium and chromium-driver are not installed (Debian: apt-get install chromium "
                           "chromium-driver; `make install` does it as root)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-default-apps", "--disable-domain-reliability", "--metrics-recording-only",
                "--disable-client-side-phishing-detection", "--window-size=800,600",
                # No host name resolves: nothing but the 127.0.0.1 servers of the test can be reached.
                "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        # An explicit driver path: selenium's own driver download (Selenium Manager) never runs.
        driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    except Exception as exc:
        raise RuntimeError(f"chromium did not start: {type(exc).__name__}: {str(exc).strip()[:500]}") from None
    driver.set_page_load_timeout(15)
    driver.set_script_timeout(15)
    return driver


def console(driver):
    """The browser console lines since the last call (to explain a failure)."""
    try:
        return "\n".join(entry["message"] for entry in driver.get_log("browser"))
    except Exception as exc:  # pragma: no cover - diagnostics only
        return f"(no console log: {exc})"


def wait_for(predicate, timeout=10.0, interval=0.05, message="condition"):
    """Poll `predicate` until it returns a truthy value; AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


class Wire:
    """WSGI middleware in front of the app: records POST /event(s) and answers injected faults."""

    def __init__(self, app, origin):
        self.app, self.origin = app, origin
        self.requests = []       # one dict per POST /event or /events
        self.faults = []         # (status, retry_after) answered to the next POST /events, in order
        self.delays = []         # seconds the next POST /events wait (body read) before the app answers
        self.down = False        # True: every request (usage.js too) is answered 503, Retry-After: 1
        self.lock = threading.Lock()

    def __call__(self, environ, start_response):
        path, method = environ.get("PATH_INFO", ""), environ.get("REQUEST_METHOD")
        if method != "POST" or path not in ("/event", "/events"):
            return self._refuse(start_response, 503, 1) if self.down else self.app(environ, start_response)
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        environ["wsgi.input"], environ["CONTENT_LENGTH"] = BytesIO(body), str(len(body))
        try:
            document = json.loads(body)
        except ValueError:
            document = {}
        items = document.get("events", [document]) if isinstance(document, dict) else []
        record = {"path": path, "time": time.monotonic(), "content_type": environ.get("CONTENT_TYPE", ""),
                  "traceparent": environ.get("HTTP_TRACEPARENT"), "header_key": environ.get("HTTP_X_API_KEY"),
                  "body_key": document.get("api_key") if isinstance(document, dict) else None,
                  "event_ids": [i.get("event_id") for i in items if isinstance(i, dict)], "status": None}
        with self.lock:
            fault = (503, 1) if self.down else self.faults.pop(0) if path == "/events" and self.faults else None
            delay = self.delays.pop(0) if path == "/events" and self.delays and not fault else 0
            self.requests.append(record)
        time.sleep(delay)
        if fault:
            record["status"], record["faulted"] = fault[0], True
            return self._refuse(start_response, *fault)

        def recording_start_response(status, headers, exc_info=None):
            record["status"] = int(status.split()[0])
            record["retry_after"] = dict(headers).get("Retry-After")
            return start_response(status, headers, exc_info)

        return self.app(environ, recording_start_response)

    def _refuse(self, start_response, status, retry_after):
        reason = {429: "TOO MANY REQUESTS", 503: "SERVICE UNAVAILABLE"}.get(status, "ERROR")
        payload = json.dumps({"error": {"code": "injected", "message": f"injected {status}"}}).encode()
        start_response(f"{status} {reason}", [
            ("Content-Type", "application/json"), ("Content-Length", str(len(payload))),
            ("Retry-After", str(retry_after)), ("Access-Control-Allow-Origin", self.origin),
            ("Access-Control-Expose-Headers", "Retry-After"), ("Vary", "Origin")])
        return [payload]

    def posts(self, path="/events", faulted=None):
        with self.lock:
            return [r for r in self.requests if r["path"] == path
                    and (faulted is None or bool(r.get("faulted")) == faulted)]


class ServiceThread:
    """The real service (create_app, local mode) behind `Wire`, served by werkzeug on 127.0.0.1."""

    def __init__(self, db_path, origin, api_key, **settings):
        config = {"TESTING": True, "TELEMETRY_DB": str(db_path), "LOCAL_FLUSH_INTERVAL": "0.01",
                  "CORS_ORIGINS": origin, "EVENT_API_KEYS": api_key, "RATE_LIMIT_ENABLED": "false"}
        config.update(settings)
        self.app = create_app(config)
        self.wire = Wire(self.app.wsgi_app, origin)
        self.app.wsgi_app = self.wire
        self.server = make_server("127.0.0.1", 0, self.app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="browser-test-service", daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        monitor_of(self.app).close()

    def events(self, name=None):
        """The stored events (after a flush of the store), as dicts."""
        monitor = monitor_of(self.app)
        assert monitor.flush(), "the local store did not flush"
        with sqlite3.connect(monitor.settings.telemetry_db) as conn:
            conn.row_factory = sqlite3.Row
            sql, args = "SELECT * FROM events", ()
            if name is not None:
                sql, args = sql + " WHERE name = ?", (name,)
            try:
                return [dict(r) for r in conn.execute(sql + " ORDER BY ts, rowid", args)]
            except sqlite3.OperationalError:  # the store has not created its tables yet
                return []


# window.dropped: what the client's onDrop reported; window.errors: what was thrown into the page.
# ?locks=0 takes the Web Locks API away (the client's fallback, as in an insecure context).
HEAD = """<!doctype html>
<html><head><meta charset="utf-8"><title>usage.js test page</title><link rel="icon" href="data:,">
<script>window.dropped = []; window.errors = []; window.onerror = function (m) {{ errors.push(String(m)); }};
{no_locks}</script>
"""
PAGE = HEAD + """<script src="{service}/usage.js"></script>
<script>Usage.init(Object.assign({{endpoint: {service_json}, apiKey: {key_json}, debug: true,
                                   onDrop: function (n) {{ dropped.push(n); }}}}, {options}));</script>
</head><body><h1>usage.js test page</h1></body></html>
"""
# /snippet: the page carries `snippet` (the README's, pointed at the service) instead.
SNIPPET_PAGE = HEAD + """{snippet}
</head><body><h1>usage.js snippet page</h1></body></html>
"""
NO_LOCKS = "delete Navigator.prototype.locks;"
OTHER = "<!doctype html><html><head><meta charset=\"utf-8\"><title>other</title><link rel=\"icon\" href=\"data:,\"></head><body>other</body></html>"


class PageServer:
    """The web page, on its own origin (another port): /page?o=<init options JSON> loads usage.js."""

    def __init__(self, service_url, api_key):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                url = urllib.parse.urlsplit(self.path)
                query = urllib.parse.parse_qs(url.query)
                no_locks = NO_LOCKS if query.get("locks") == ["0"] else ""
                if url.path == "/page" or url.path.startswith("/spa/"):
                    options = json.loads(query.get("o", ["{}"])[0])
                    html = PAGE.format(service=outer.service_url, service_json=_js(outer.service_url),
                                       key_json=_js(api_key), options=_js(options), no_locks=no_locks)
                elif url.path == "/snippet" and outer.snippet:
                    html = SNIPPET_PAGE.format(snippet=outer.snippet, no_locks=no_locks)
                elif url.path == "/other":
                    html = OTHER
                else:
                    self.send_error(404)
                    return
                data = html.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.service_url = service_url
        self.snippet = None  # the HTML of /snippet's <head>, set by the test
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.origin = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, name="browser-test-page", daemon=True).start()

    def url(self, path="/page", locks=True, **options):
        return f"{self.origin}{path}?o={urllib.parse.quote(json.dumps(options))}" + ("" if locks else "&locks=0")

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _js(value):
    """A JSON literal safe inside a <script> element."""
    return json.dumps(value).replace("</", "<\\/")
