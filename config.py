"""Configuration: each setting from the app's config, else the environment, else `.env`; validated once."""
import importlib.util
import os
import re
import urllib.parse
import uuid
from dataclasses import dataclass, field, fields, replace

from dotenv import dotenv_values


class ConfigError(ValueError):
    """An invalid setting; the message names the variable and never its secret value."""


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class Settings:
    """The service's settings; field names are the environment variables, lower-cased."""

    applicationinsights_connection_string: str = ""
    log_analytics_workspace_id: str = ""
    telemetry_db: str = ""
    telemetry_storage: str = ""
    applicationinsights_statsbeat_enabled: bool = False
    usage_cache_ttl: float = 60.0
    usage_query_timeout: float = 30.0
    usage_top: int = 10
    usage_ikey: str = ""  # whose telemetry the Azure queries count; default: the connection string's key
    max_event_bytes: int = 64 * 1024
    max_batch_events: int = 100
    max_batch_bytes: int = 512 * 1024
    trace_sampling: str = "adaptive"
    trace_sampling_rate: float = 1.0
    trace_sampling_target: float = 5.0
    trace_sampling_interval: float = 15.0
    export_interval: float = 5.0
    export_batch_size: int = 100
    export_queue_capacity: int = 8192
    export_overflow_capacity: int = 100000
    export_timeout: float = 10.0
    export_retry_interval: float = 10.0
    shutdown_grace: float = 5.0
    telemetry_storage_max_mb: float = 50.0
    metrics_export_interval: float = 60.0
    local_batch_size: int = 500
    local_flush_interval: float = 0.2
    local_queue_capacity: int = 100000
    local_retention_days: int = 90
    local_max_mb: float = 1024.0
    local_min_free_mb: float = 64.0
    local_reserve_mb: float = 8.0
    log_level: str = "INFO"
    dashboard_token: str = field(default="", repr=False)
    dashboard_auth: bool = True
    event_api_keys: tuple = field(default=(), repr=False)
    cors_origins: tuple = ()
    rate_limit_enabled: bool = True
    rate_limit_storage_uri: str = field(default="memory://", repr=False)
    event_rate_limit: str = "600 per minute"
    dashboard_rate_limit: str = "60 per minute"
    redact_keys: tuple = ("password", "passwd", "pwd", "secret", "token", "authorization", "cookie",
                          "session", "api_key", "apikey", "credential", "private_key")
    trusted_proxies: int = 0
    trace_log_level: str = "INFO"
    otel_instrument: tuple = ()  # OpenTelemetry instrumentations whose spans become dependencies (otel_bridge)
    health_ingestion_grace: float = 300.0
    health_min_free_mb: float = 100.0
    # Parsed from the connection string; not read from the environment.
    instrumentation_key: str = field(default="", repr=False)
    ingestion_endpoint: str = field(default="", repr=False)

    @property
    def mode(self):
        """'azure' when a connection string is set, else 'local'."""
        return "azure" if self.applicationinsights_connection_string else "local"

    def __repr__(self):
        return f"Settings(mode={self.mode!r}, telemetry_db={self.telemetry_db!r})"


_BOUNDS = {
    "usage_cache_ttl": (0, 86400),
    "usage_query_timeout": (1, 600),
    "usage_top": (1, 100),
    "max_event_bytes": (1024, 1024 * 1024),
    "max_batch_events": (1, 1000),
    "max_batch_bytes": (1024, 8 * 1024 * 1024),
    "trace_sampling_rate": (0, 1),
    "trace_sampling_target": (0.01, 100000),
    "trace_sampling_interval": (0.01, 3600),
    "export_interval": (0.01, 3600),
    "export_batch_size": (1, 1000),
    "export_queue_capacity": (1, 1000000),
    "export_overflow_capacity": (0, 10000000),
    "export_timeout": (0.1, 300),
    "export_retry_interval": (0.05, 20),
    "shutdown_grace": (0.1, 60),
    "telemetry_storage_max_mb": (0.01, 100000),
    "metrics_export_interval": (0.01, 3600),
    "local_batch_size": (1, 100000),
    "local_flush_interval": (0.001, 60),
    "local_queue_capacity": (100, 10000000),
    "local_retention_days": (1, 3650),
    "local_max_mb": (1, 10000000),
    "local_min_free_mb": (0, 1000000),
    "local_reserve_mb": (0, 1024),
    "trusted_proxies": (0, 10),
    "health_ingestion_grace": (1, 86400),
    "health_min_free_mb": (0, 1000000),
}
_DERIVED = {"instrumentation_key", "ingestion_endpoint"}


def load_settings(instance_path, config=None, environ=None):
    """Build Settings from `.env`, the environment and `config` (the app's config), in rising priority."""
    env = {k.upper(): v for k, v in dotenv_values(".env").items() if v is not None}
    env.update(os.environ if environ is None else environ)
    values = {}
    for f in fields(Settings):
        if f.name in _DERIVED:
            continue
        raw = env.get(f.name.upper())
        if config is not None and config.get(f.name.upper()) is not None:
            raw = config[f.name.upper()]
        if raw is None:
            continue
        if f.name == "applicationinsights_connection_string" and not str(raw).strip():
            raise ConfigError("APPLICATIONINSIGHTS_CONNECTION_STRING is set but blank: unset it for local mode")
        values[f.name] = _convert(f.name, f.type, raw)
    settings = Settings(**values)
    if not settings.telemetry_db:
        settings = replace(settings, telemetry_db=os.path.join(instance_path, "telemetry.db"))
    if not settings.telemetry_storage:
        settings = replace(settings, telemetry_storage=os.path.join(instance_path, "outbox"))
    if settings.applicationinsights_connection_string:
        ikey, endpoint = parse_connection_string(settings.applicationinsights_connection_string)
        settings = replace(settings, instrumentation_key=ikey, ingestion_endpoint=endpoint,
                           usage_ikey=(settings.usage_ikey or ikey).lower())
    if settings.usage_ikey:
        _require_uuid("USAGE_IKEY", settings.usage_ikey)
    settings = replace(settings, log_level=_require_level("LOG_LEVEL", settings.log_level),
                       trace_log_level=_require_level("TRACE_LOG_LEVEL", settings.trace_log_level))
    settings = replace(settings, redact_keys=tuple(k.lower() for k in settings.redact_keys))
    if settings.trace_sampling.lower() not in ("adaptive", "fixed"):
        raise ConfigError(f"TRACE_SAMPLING must be adaptive or fixed, got {settings.trace_sampling!r}")
    settings = replace(settings, trace_sampling=settings.trace_sampling.lower())
    settings = replace(settings, trace_sampling_rate=_require_whole_fraction(
        "TRACE_SAMPLING_RATE", settings.trace_sampling_rate))
    for var in ("event_rate_limit", "dashboard_rate_limit"):
        _require_limit(var.upper(), getattr(settings, var))
    _require_limit_store("RATE_LIMIT_STORAGE_URI", settings.rate_limit_storage_uri)
    if settings.mode == "azure" and settings.dashboard_auth and not settings.dashboard_token:
        raise ConfigError("DASHBOARD_TOKEN must be set in Azure mode (or DASHBOARD_AUTH=off to leave "
                          "/dashboard/usage open on purpose)")
    if settings.log_analytics_workspace_id:
        _require_uuid("LOG_ANALYTICS_WORKSPACE_ID", settings.log_analytics_workspace_id)
    return settings


def _convert(name, typ, raw):
    """Convert one raw value to the field's type and check its bounds."""
    var = name.upper()
    if isinstance(raw, str):
        raw = raw.strip()
    conv = typ
    if typ is bool:
        return parse_bool(var, raw)
    if typ is tuple:
        items = raw.split(",") if isinstance(raw, str) else list(raw)
        return tuple(i.strip() for i in items if str(i).strip())
    try:
        value = conv(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{var} must be {conv.__name__}, got {raw!r}") from None
    lo_hi = _BOUNDS.get(name)
    if lo_hi and not lo_hi[0] <= value <= lo_hi[1]:
        raise ConfigError(f"{var} must be between {lo_hi[0]} and {lo_hi[1]}, got {raw!r}")
    return value


def parse_bool(var, raw):
    """Parse a boolean environment value, naming the variable when it is not one."""
    text = str(raw).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(f"{var} must be true or false, got {raw!r}")


_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _require_level(var, value):
    """The logging level name, upper-cased, or ConfigError naming the variable."""
    if value.upper() not in _LEVELS:
        raise ConfigError(f"{var} must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {value!r}")
    return value.upper()


def _require_limit(var, value):
    """Raise ConfigError unless value is a rate-limit string such as '600 per minute'."""
    from limits import parse_many
    try:
        parse_many(value)
    except ValueError:
        raise ConfigError(f"{var} must be a rate limit such as '600 per minute', got {value!r}") from None


def _require_limit_store(var, uri):
    """Raise ConfigError unless the `limits` library has a storage for the URI's scheme and its client is installed.

    Nothing is constructed or connected: the message names the scheme, never the URI (it may hold a password).
    """
    from limits.storage import SCHEMES
    parsed = urllib.parse.urlparse(uri)
    storage = SCHEMES.get(parsed.scheme)
    if storage is None or parsed.scheme.startswith("async+"):
        known = ", ".join(f"{scheme}://" for scheme in sorted(SCHEMES) if not scheme.startswith("async+"))
        raise ConfigError(f"{var} must be a storage URI whose scheme the limits library supports ({known}), "
                          "such as redis://127.0.0.1:6379/0")
    try:
        parsed.port
    except ValueError:
        raise ConfigError(f"{var} has a port that is not a number from 0 to 65535") from None
    needed = [name for name in storage.DEPENDENCIES if name in parsed.scheme] or list(storage.DEPENDENCIES)[:1]
    for name in needed:
        if importlib.util.find_spec(name) is None:
            raise ConfigError(f"{var} uses {parsed.scheme}://, which needs the Python package {name} (pip install {name})")


def _require_whole_fraction(var, value):
    """1/N for a whole N when value is within 0.02 % of it (sampleRate 100/N, all Application Insights supports), 0 as is."""
    n = round(1 / value) if value > 0 else 0
    if value and not abs(value * n - 1) <= 2e-4:
        raise ConfigError(f"{var} must be 1/N for a whole N (1, 0.5, 0.3333, 0.25, 0.2, ...) or 0, got {value!r}")
    return 1 / n if n else 0.0


def _require_uuid(var, value):
    """Raise ConfigError unless value is a GUID."""
    try:
        uuid.UUID(value)
    except ValueError:
        raise ConfigError(f"{var} must be a GUID") from None


_ENDPOINT = re.compile(r"^https?://[^\s/;]+/?$")


def parse_connection_string(conn):
    """Return (instrumentation key, ingestion endpoint) or raise ConfigError naming the variable."""
    var = "APPLICATIONINSIGHTS_CONNECTION_STRING"
    parts = {}
    for pair in filter(None, (p.strip() for p in conn.split(";"))):
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{var} is malformed: expected Key=Value pairs separated by ';'")
        parts[key.strip().lower()] = value.strip()
    ikey = parts.get("instrumentationkey", "")
    if not ikey:
        raise ConfigError(f"{var} has no InstrumentationKey")
    try:
        uuid.UUID(ikey)
    except ValueError:
        raise ConfigError(f"{var} has an InstrumentationKey that is not a GUID") from None
    endpoint = parts.get("ingestionendpoint") or "https://dc.services.visualstudio.com"
    if not _ENDPOINT.match(endpoint):
        raise ConfigError(f"{var} has an IngestionEndpoint that is not an http(s) URL")
    return ikey.lower(), endpoint.rstrip("/")


def check_paths(settings):
    """Raise ConfigError naming TELEMETRY_DB (local mode) or TELEMETRY_STORAGE (Azure mode) when it cannot be used.

    It only looks (nothing is created), so an entry point can check before the service makes the file or folder.
    """
    if settings.mode == "local":
        var, path, reason = "TELEMETRY_DB", settings.telemetry_db, _unusable(settings.telemetry_db, folder=False)
    else:
        var, path, reason = ("TELEMETRY_STORAGE", settings.telemetry_storage,
                             _unusable(settings.telemetry_storage, folder=True))
    if reason:
        raise ConfigError(f"{var}={path} cannot be opened or created: {reason}")


def _unusable(path, folder):
    """Why `path` (a file, or a folder when `folder`) cannot be created and written, or None when it can."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        if os.path.isdir(path) != folder:
            return "it is a folder" if os.path.isdir(path) else "it is a file, not a folder"
        if not os.access(path, os.R_OK | os.W_OK | (os.X_OK if folder else 0)):
            return "it is not writable"
        if folder:
            return None
    probe = os.path.dirname(path)  # the folder that holds it, or the nearest one that exists
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return f"{probe} is a file, not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"the folder {probe} is not writable"
    return None


# gunicorn.conf.py's own settings: variable -> (default, lowest, highest).
_SERVER = {"PORT": (8000, 1, 65535), "WEB_CONCURRENCY": (2, 1, 256), "GUNICORN_THREADS": (4, 1, 1000)}


def _whole_number(var, raw, lo, hi):
    """raw as a whole number from lo to hi, or ConfigError naming the variable."""
    try:
        value = int(raw.strip())
    except ValueError:
        value = None
    if value is None or not lo <= value <= hi:
        raise ConfigError(f"{var} must be a whole number from {lo} to {hi}, got {raw!r}")
    return value


def server_settings(environ=None):
    """gunicorn's bind, workers and threads from HOST, PORT, WEB_CONCURRENCY and GUNICORN_THREADS, else ConfigError."""
    env = os.environ if environ is None else environ
    values = {var: _whole_number(var, env.get(var, str(default)), lo, hi)
              for var, (default, lo, hi) in _SERVER.items()}
    host = env.get("HOST", "127.0.0.1").strip()
    if not host or any(c.isspace() or c in "/[]" for c in host):
        raise ConfigError(f"HOST must be an address or host name such as 127.0.0.1 or 0.0.0.0, got {host!r}")
    address = f"[{host}]" if ":" in host else host  # an IPv6 address
    return {"bind": f"{address}:{values['PORT']}", "workers": values["WEB_CONCURRENCY"],
            "threads": values["GUNICORN_THREADS"]}


if __name__ == "__main__":  # `python config.py PORT`: make run checks its PORT as gunicorn.conf.py does
    import sys
    try:
        server_settings({var: os.environ[var] for var in sys.argv[1:] if var in os.environ})
    except ConfigError as exc:
        sys.exit(f"configuration error: {exc}")
