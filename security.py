"""Safe by default: dashboard token, event API keys, CORS allow-list, rate limits, redaction, headers."""
import functools
import hmac
import logging
import re
import threading
import time
import urllib.parse

from flask import request
from flask_cors import CORS
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from werkzeug.middleware.proxy_fix import ProxyFix

from telemetry import stringify

REDACTED = "[REDACTED]"
log = logging.getLogger("usage_monitor.service")
# Each call to a Redis limit store: connect and read timeouts, and no client-side retries (redis-py
# retries 3 times with back-off by default), so a down or hung store costs a request at most this.
STORE_TIMEOUT = 0.5
_REDIS_SCHEMES = ("redis", "rediss", "redis+unix")


class Unauthorized(Exception):
    """A missing or wrong credential; answered 401 with a WWW-Authenticate challenge."""

    def __init__(self, message, challenge):
        super().__init__(message)
        self.message, self.challenge = message, challenge


def init_app(app, settings):
    """Install proxy handling, CORS and the rate limiter; returns (limiter, {name: rate-limit check})."""
    if settings.trusted_proxies:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.trusted_proxies, x_proto=settings.trusted_proxies)
    if settings.cors_origins:
        # Each route's own methods only. The event routes allow credentials for listed origins: a
        # beacon always carries them, and one with an application/json Blob is preflighted, so the
        # browser drops it without this header. They read no cookie. Never with "*" (any origin).
        origins = list(settings.cors_origins)
        beacons = {"origins": origins, "methods": ["POST"], "supports_credentials": "*" not in origins}
        CORS(app, resources={r"/event": beacons, r"/events": beacons,
                             r"/dashboard/*": {"origins": origins, "methods": ["GET"]}},
             allow_headers=["Content-Type", "Authorization", "X-Api-Key", "traceparent"],
             expose_headers=["Retry-After"], max_age=600)
    # The store down: flask-limiter counts in this worker's memory meanwhile and rechecks the store;
    # swallow_errors covers the requests that were already talking to the store when it failed.
    limiter = Limiter(get_remote_address, app=app, storage_uri=settings.rate_limit_storage_uri,
                      storage_options=_storage_options(settings.rate_limit_storage_uri),
                      in_memory_fallback_enabled=True, swallow_errors=True,
                      enabled=settings.rate_limit_enabled, headers_enabled=True, default_limits=[])
    store = LimitStore(limiter, settings.rate_limit_storage_uri)
    checks = {}
    if limiter.enabled:  # off: no check at all on the request path
        checks = {"event": store.guard(limiter.limit(settings.event_rate_limit)(_event_limit)),
                  "dashboard": store.guard(limiter.limit(settings.dashboard_rate_limit)(_dashboard_limit))}
    return limiter, checks, store


def _storage_options(uri):
    """Connect and read timeouts and no retries for a Redis store; other stores keep their defaults."""
    if urllib.parse.urlsplit(uri).scheme not in _REDIS_SCHEMES:
        return {}
    from redis.backoff import NoBackoff
    from redis.retry import Retry
    return {"socket_timeout": STORE_TIMEOUT, "socket_connect_timeout": STORE_TIMEOUT,
            "retry": Retry(NoBackoff(), 0)}


def public_uri(uri):
    """The store's URI without its user and password, fit for logs and /healthz."""
    parts = urllib.parse.urlsplit(uri)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    try:
        netloc += f":{parts.port}" if parts.port else ""
    except ValueError:
        pass
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class _LimiterNoise(logging.Filter):
    """Drops flask-limiter's own lines about the store being down or back: LimitStore logs each outage once.

    That includes the traceback of a request that was already talking to the store when another
    thread switched to memory (flask-limiter swallows the store's error and lets that request through).
    """

    def filter(self, record):
        message = record.getMessage()
        if message.startswith("Rate limit storage unreachable") or message == "Rate limit storage recovered":
            return False
        error = record.exc_info[1] if record.exc_info else None
        return not (message.endswith("Swallowing error") and isinstance(error, _store_errors()))


@functools.lru_cache(maxsize=1)
def _store_errors():
    """The exceptions of an unreachable or failing store (redis-py's own, and the socket's)."""
    try:
        from redis.exceptions import RedisError
    except ImportError:
        return (OSError,)
    return (RedisError, OSError)


_limiter_noise = _LimiterNoise()


class LimitStore:
    """The shared rate-limit store as one worker sees it: down (limits counted in memory) or up.

    flask-limiter (4.1.x) keeps its fallback state in `Limiter._storage_dead`; this reads it after
    each check, and /healthz pings the store so that an outage is seen, and its end too, without
    traffic. One warning line per outage and one line when it ends, per worker.
    """

    def __init__(self, limiter, uri):
        self.limiter = limiter
        self.name = public_uri(uri)
        self.shared = bool(limiter.enabled) and urllib.parse.urlsplit(uri).scheme != "memory"
        self.down_since = None
        self._lock = threading.Lock()
        flask_limiter_log = logging.getLogger("flask-limiter")
        if _limiter_noise not in flask_limiter_log.filters:
            flask_limiter_log.addFilter(_limiter_noise)

    def guard(self, check):
        """The rate-limit check `check`, followed by a look at the store's state."""
        if not self.shared:
            return check

        def guarded():
            try:
                check()
            finally:
                self._observe(self.limiter._storage_dead, "a rate-limit check failed")
        return guarded

    def problem(self):
        """A sentence for /healthz when the store does not answer a ping now, else None."""
        if not self.shared:
            return None
        alive = self.limiter.storage.check()
        if alive and self.limiter._storage_dead:
            self.limiter._storage_dead = False  # back: shared limits again from the next request
        elif not alive and not self.limiter._storage_dead:
            self.limiter._storage_dead = True  # down: the next requests count in memory at once
        self._observe(not alive, "it does not answer a ping")
        if alive:
            return None
        since = self.down_since or time.monotonic()
        return (f"rate-limit store {self.name} unreachable for {time.monotonic() - since:.0f} s; "
                "limits are counted per worker in memory")

    def _observe(self, down, cause):
        """Log the start or the end of an outage, once each."""
        if down == (self.down_since is not None):
            return
        with self._lock:
            if down and self.down_since is None:
                self.down_since = time.monotonic()
                log.warning("rate-limit store %s unreachable (%s): limits are counted per worker in memory until "
                            "it answers", self.name, cause)
            elif not down and self.down_since is not None:
                log.warning("rate-limit store %s answers again after %.1f s: limits are shared again", self.name,
                            time.monotonic() - self.down_since)
                self.down_since = None


def startup_warnings(settings, workers):
    """The lines an operator must see once at start: a trusted proxy hop, limits counted per worker."""
    lines = []
    if settings.trusted_proxies:
        lines.append(f"TRUSTED_PROXIES={settings.trusted_proxies}: the client address (rate limits) is taken from "
                     f"the last {settings.trusted_proxies} X-Forwarded-For entries; right only behind exactly that "
                     "many proxies that set the header (deploy/nginx.conf), otherwise any client picks its address")
    if settings.rate_limit_enabled and settings.rate_limit_storage_uri.startswith("memory://") and workers > 1:
        lines.append(f"RATE_LIMIT_STORAGE_URI=memory:// counts per worker: with {workers} workers a limit lets up to "
                     f"{workers} times as many requests through; use a shared store such as redis://127.0.0.1:6379/0")
    return lines


def _event_limit():
    """The callable EVENT_RATE_LIMIT is declared on; calling its limiter wrapper checks the request."""


def _dashboard_limit():
    """The callable DASHBOARD_RATE_LIMIT is declared on."""


def security_headers(response):
    """Headers every response of ours carries."""
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers.setdefault("Cache-Control", "no-store")
    return response


def _matches(given, expected):
    """Constant-time comparison of two secrets."""
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode("utf-8", "surrogateescape"))


def require_dashboard_token(settings):
    """Check `Authorization: Bearer <DASHBOARD_TOKEN>` when a token is configured."""
    if not settings.dashboard_token:
        return
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not _matches(token.strip(), settings.dashboard_token):
        raise Unauthorized("A valid bearer token is required (Authorization: Bearer …)",
                           'Bearer realm="dashboard"')


def require_event_api_key(settings, body_key=None):
    """Check the key against EVENT_API_KEYS when keys are configured: `X-Api-Key`, else the body's `api_key`.

    Beacons cannot set headers, so the body may carry the key; the header wins when both are there.
    """
    if not settings.event_api_keys:
        return
    given = request.headers.get("X-Api-Key") or body_key or ""
    # Compare with every key so the time does not reveal which one matched.
    if not sum(_matches(given, key) for key in settings.event_api_keys):
        raise Unauthorized("A valid API key is required (X-Api-Key header or api_key in the body)",
                           'ApiKey header="X-Api-Key"')


def redact_strings(properties, redact_keys):
    """The properties as strings (telemetry.stringify), with the value of every key that contains a
    redaction word (case-insensitive) replaced."""
    pattern = _redaction_pattern(redact_keys)
    if pattern is None:
        return {key: value if value.__class__ is str else stringify(value) for key, value in properties.items()}
    hidden = _redaction_decisions(redact_keys)  # keys repeat from call to call: each is matched once
    out = {}
    for key, value in properties.items():
        redacted = hidden.get(key)
        if redacted is None:
            if len(hidden) >= _DECISIONS_MAX:
                hidden.clear()
            redacted = hidden[key] = pattern.search(key.lower()) is not None
        out[key] = REDACTED if redacted else value if value.__class__ is str else stringify(value)
    return out


_DECISIONS_MAX = 4096


@functools.lru_cache(maxsize=16)
def _redaction_decisions(redact_keys):
    """The remembered {key: redacted?} of one list of redaction words."""
    return {}


@functools.lru_cache(maxsize=16)
def _redaction_pattern(redact_keys):
    """One compiled alternation of the (lower-case) redaction words, or None."""
    return re.compile("|".join(re.escape(word) for word in redact_keys)) if redact_keys else None


_SQL_LITERAL = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"")


def redact_statement(statement, redact_keys):
    """A database statement with every quoted literal replaced when it names a redaction word
    (`... WHERE password = 'x'`); placeholders (`?`, `%s`) carry no values and are kept."""
    pattern = _redaction_pattern(redact_keys)
    if pattern is None or not statement or pattern.search(statement.lower()) is None:
        return statement
    return _SQL_LITERAL.sub(f"'{REDACTED}'", statement)
