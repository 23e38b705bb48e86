"""Azure source of the usage dashboard: Application Insights data read from a Log Analytics workspace.

One KQL query (one round trip) returns every dashboard section as neutral "section rows"
(see ``COLUMNS``); another module turns them into the dashboard JSON.

Design notes
------------
* Cache: results are cached per ``(span in whole hours, UTC date of end)`` for ``cache_ttl``
  seconds (monotonic clock).  Callers pass ``end=now, start=now - N days``, so "now" moves on
  every call but the key stays put; two windows of the same length ending on the same UTC day
  are treated as the same report for at most ``cache_ttl`` seconds.  (The app's window,
  midnight ``days - 1`` days ago until now, changes key once an hour: one extra query per hour.)
* Single flight: on a miss, one caller (the leader) runs the query; concurrent callers for the
  same key wait for the leader's rows or error instead of sending their own query.
* Errors are not cached: the next call after a failure queries again.  The exceptions are
  holds: after a 429 or a 503, calls within its Retry-After (``_DEFAULT_THROTTLE_HOLD`` seconds
  when it gave none; capped at ``_MAX_THROTTLE_HOLD``) fail fast with the same 503 instead of
  hammering the workspace, and after a partial result calls within ``_PARTIAL_HOLD`` seconds get
  the same 502.  Cached rows are still served meanwhile.  Holds use the injectable clock.
* Partial results (HTTP 200 with an "error" object beside "tables") are rejected with 502 naming
  the upstream's error code and message: a partial usage report would silently undercount, which
  is worse than an explicit error.
* Retries: azure-core retries POSTs only on 500/503/504 and on any status carrying
  Retry-After, sleeping for the whole Retry-After.  A web request should not sleep through a
  throttle, so the client's retry policy here never retries a 4xx (429 included), does at most
  ``retry_total`` (default 2) retries of 500/503/504, and sleeps at most
  ``_MAX_RETRY_WAIT`` seconds in all between the attempts of one query (a retry whose wait
  would not fit is not made).
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any, Callable, Mapping

from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.core.pipeline.policies import RetryPolicy
from azure.monitor.query import LogsQueryClient, LogsQueryPartialResult, LogsQueryStatus

__all__ = [
    "COLUMNS",
    "SECTIONS",
    "LogAnalyticsUsageSource",
    "UsageQueryError",
    "usage_query",
]

log = logging.getLogger(__name__)

#: Result columns of ``usage_query`` (name, Kusto type), in order.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("section", "string"),
    ("day", "string"),
    ("name", "string"),
    ("type", "string"),
    ("target", "string"),
    ("action", "string"),
    ("count", "long"),
    ("failed", "long"),
    ("users", "long"),
    ("avg_ms", "real"),
    ("p50_ms", "real"),
    ("p95_ms", "real"),
    ("p99_ms", "real"),
)

#: Section names that ``usage_query`` can return.
SECTIONS: tuple[str, ...] = (
    "req_summary",
    "req_daily",
    "req_top",
    "dep_summary",
    "dep_daily",
    "dep_top",
    "evt_summary",
    "evt_daily",
    "evt_top",
    "login_summary",
    "active_summary",
    "active_daily",
    "anonymous_summary",
    "session_summary",
    "crud",
)

_MAX_TOP = 1000
_DEFAULT_RETRY = {"retry_total": 2, "retry_backoff_factor": 0.5, "retry_backoff_max": 4}
_MAX_RETRY_WAIT = 3.0  # seconds one query may sleep in all between its attempts (Retry-After or back-off)
_MAX_THROTTLE_HOLD = 60.0  # seconds we keep failing fast after a 429 or 503
_DEFAULT_THROTTLE_HOLD = 30  # seconds held after a 429 or 503 that gave no Retry-After
_PARTIAL_HOLD = 10  # seconds a partial result is answered again without querying
_MAX_UPSTREAM_TEXT = 300  # characters of an upstream error message we pass on
_READ_GRACE = 5.0  # seconds of HTTP read timeout beyond the server-side query timeout
# Per-call error_map for the generated client: without it, an error response whose body is not
# JSON (e.g. a gateway's HTML 502/503 page) fails in response.json() with a bare ValueError and
# loses its HTTP status.  With it, every 4xx/5xx raises HttpResponseError(response=...) first.
_ERROR_MAP = {status: HttpResponseError for status in range(400, 600)}

# The query template.  Only server-formatted values are substituted: {start}/{end} are
# datetime(...) literals built by _kql_datetime, {top} is a validated int and {scope} is empty
# or a filter on a validated instrumentation key (_scope_filter).
# Evt keeps one row per event_id (the first copy): a batch re-sent after a crash, a client's retry
# or two tabs sending the same event are counted once, as the local store counts them.  It keeps
# only the columns the sections read and is materialized: nine sections read it, and Kusto would
# otherwise evaluate the de-duplication once per reference.
_QUERY_TEMPLATE = """\
let Req = AppRequests
    | where TimeGenerated between ({start} .. {end}){scope};
let Dep = AppDependencies
    | where TimeGenerated between ({start} .. {end}){scope};
let Evt = materialize(AppEvents
    | where TimeGenerated between ({start} .. {end}){scope}
    | summarize arg_min(TimeGenerated, Name, ItemCount, UserAuthenticatedId, UserId, SessionId, Properties)
        by EventId = tostring(Properties.event_id));
union
(Req
    | summarize n = sum(ItemCount), f = sumif(ItemCount, Success == false),
        w = sum(DurationMs * ItemCount), (p50, p95, p99) = percentilesw(DurationMs, ItemCount, 50, 95, 99)
    | project section = "req_summary", day = "", name = "", type = "", target = "", action = "",
        ['count'] = n, failed = f, users = 0, avg_ms = iff(n > 0, w / n, real(null)),
        p50_ms = p50, p95_ms = p95, p99_ms = p99),
(Req
    | summarize n = sum(ItemCount), f = sumif(ItemCount, Success == false), w = sum(DurationMs * ItemCount),
        p95 = percentilew(DurationMs, ItemCount, 95) by d = startofday(TimeGenerated)
    | project section = "req_daily", day = format_datetime(d, 'yyyy-MM-dd'), name = "", type = "", target = "",
        action = "", ['count'] = n, failed = f, users = 0, avg_ms = iff(n > 0, w / n, real(null)),
        p50_ms = real(null), p95_ms = p95, p99_ms = real(null)),
(Req
    | summarize n = sum(ItemCount), f = sumif(ItemCount, Success == false),
        p95 = percentilew(DurationMs, ItemCount, 95) by Name
    | sort by n desc, Name asc
    | take {top}
    | project section = "req_top", day = "", name = Name, type = "", target = "", action = "",
        ['count'] = n, failed = f, users = 0, avg_ms = real(null),
        p50_ms = real(null), p95_ms = p95, p99_ms = real(null)),
(Dep
    | summarize n = sum(ItemCount), f = sumif(ItemCount, Success == false), w = sum(DurationMs * ItemCount)
    | project section = "dep_summary", day = "", name = "", type = "", target = "", action = "",
        ['count'] = n, failed = f, users = 0, avg_ms = iff(n > 0, w / n, real(null)),
        p50_ms = real(null), p95_ms = real(null), p99_ms = real(null)),
(Dep
    | summarize n = sum(ItemCount), f = sumif(ItemCount, Success == false),
        p95 = percentilew(DurationMs, ItemCount, 95) by d = startofday(TimeGenerated)
    | project section = "dep_daily", day = format_datetime(d, 'yyyy-MM-dd'), name = "", type = "", target = "",
        action = "", ['count'] = n, failed = f, users = 0, avg_ms = real(null),
        p50_ms = real(null), p95_ms = p95, p99_ms = real(null)),
(Dep
    | summarize n = sum(ItemCount), f = sumif(ItemCount, Success == false),
        w = sum(DurationMs * ItemCount), p95 = percentilew(DurationMs, ItemCount, 95) by DependencyType, Target
    | sort by n desc, DependencyType asc, Target asc
    | take {top}
    | project section = "dep_top", day = "", name = "", type = DependencyType, target = Target, action = "",
        ['count'] = n, failed = f, users = 0, avg_ms = iff(n > 0, w / n, real(null)),
        p50_ms = real(null), p95_ms = p95, p99_ms = real(null)),
(Evt
    | summarize n = sum(ItemCount)
    | project section = "evt_summary", day = "", name = "", type = "", target = "", action = "",
        ['count'] = n, failed = 0, users = 0, avg_ms = real(null),
        p50_ms = real(null), p95_ms = real(null), p99_ms = real(null)),
(Evt
    | summarize n = sum(ItemCount) by d = startofday(TimeGenerated)
    | project section = "evt_daily", day = format_datetime(d, 'yyyy-MM-dd'), name = "", type = "", target = "",
        action = "", ['count'] = n, failed = 0, users = 0, avg_ms = real(null),
        p50_ms = real(null), p95_ms = real(null), p99_ms = real(null)),
(Evt
    | summarize n = sum(ItemCount), u = dcountif(UserAuthenticatedId, isnotempty(UserAuthenticatedId)) by Name
    | sort by n desc, Name asc
    | take {top}
    | project section = "evt_top", day = "", name = Name, type = "", target = "", action = "",
        ['count'] = n, failed = 0, users = u, avg_ms = real(null),
        p50_ms = real(null), p95_ms = real(null), p99_ms = real(null)),
(Evt
    | where Name == "UserLogin"
    | summarize n = sum(ItemCount), u = dcountif(UserAuthenticatedId, isnotempty(UserAuthenticatedId))
    | project section = "login_summary", day = "", name = "", type = "", target = "", action = "",
        ['count'] = n, failed = 0, users = u, avg_ms = real(null),
        p50_ms = real(null), p95_ms = real(null), p99_ms = real(null)),
(Evt
    | summarize u = dcountif(UserAuthenticatedId, isnotempty(UserAuthenticatedId))
    | project section = "active_summary", day = "", name = "", type = "", target = "", action = "",
        ['count'] = 0, failed = 0, users = u, avg_ms = real(null),
        p50_ms = real(null), p95_ms = real(null), p99_ms = real(null)),
(Evt
    | summarize u = dcountif(UserAuthenticatedId, isnotempty(UserAuthenticatedId)) by d = startofday(TimeGenerated)
    | project section = "active_daily", day = format_datetime(d, 'yyyy-MM-dd'), name = "", type = "", target = "",
        action = "", ['count'] = 0, failed = 0, users = u, avg_ms = real(null),
        p50_ms = real(null), p95_ms = real(null), p99_ms = real(null)),
(Evt
    | summarize u = dcountif(UserId, isnotempty(UserId))
    | project section = "anonymous_summary", day = "", name = "", type = "", target = "", action = "",
        ['count'] = 0, failed = 0, users = u, avg_ms = real(null),
        p50_ms = real(null), p95_ms = real(null), p99_ms = real(null)),
(Evt
    | summarize u = dcountif(SessionId, isnotempty(SessionId))
    | project section = "session_summary", day = "", name = "", type = "", target = "", action = "",
        ['count'] = 0, failed = 0, users = u, avg_ms = real(null),
        p50_ms = real(null), p95_ms = real(null), p99_ms = real(null)),
(Evt
    | where Name == "CrudActivity"
    | summarize n = sum(ItemCount) by entity = tostring(Properties.entity), act = tolower(tostring(Properties.action))
    | project section = "crud", day = "", name = entity, type = "", target = "", action = act,
        ['count'] = n, failed = 0, users = 0, avg_ms = real(null),
        p50_ms = real(null), p95_ms = real(null), p99_ms = real(null))
| project section, day, name, type, target, action, ['count'], failed, users, avg_ms, p50_ms, p95_ms, p99_ms
| sort by section asc, day asc, ['count'] desc, name asc, type asc, target asc, action asc
"""


def _as_utc(value: datetime, what: str) -> datetime:
    """Return an aware UTC datetime; naive datetimes are taken to be UTC already."""
    if not isinstance(value, datetime):
        raise TypeError(f"{what} must be a datetime, not {type(value).__name__}")
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def _window(start: datetime, end: datetime) -> tuple[datetime, datetime]:
    """Validate a query window and return it in UTC."""
    start_utc, end_utc = _as_utc(start, "start"), _as_utc(end, "end")
    if end_utc <= start_utc:
        raise ValueError("end must be later than start")
    return start_utc, end_utc


def _kql_datetime(value: datetime) -> str:
    """Format an aware UTC datetime as a KQL datetime literal."""
    return f"datetime({value.strftime('%Y-%m-%dT%H:%M:%S.%f')}Z)"


def _check_top(top: int) -> int:
    """Validate the number of rows of the top-N sections."""
    if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= _MAX_TOP:
        raise ValueError(f"top must be an int between 1 and {_MAX_TOP}")
    return top


def _scope_filter(ikey: str | None) -> str:
    """The KQL filter that keeps one Application Insights resource's rows (by its IKey), or '' for none."""
    if ikey is None:
        return ""
    try:
        key = str(uuid.UUID(ikey))
    except (TypeError, ValueError, AttributeError):
        raise ValueError("ikey must be an instrumentation key (a GUID)") from None
    return f'\n    | where IKey =~ "{key}"'


def usage_query(start: datetime, end: datetime, top: int = 10, ikey: str | None = None) -> str:
    """Return the KQL text of the single usage query over [start, end] (see COLUMNS and SECTIONS),
    scoped to the rows of instrumentation key ``ikey`` unless it is None (the whole workspace)."""
    start_utc, end_utc = _window(start, end)
    return _QUERY_TEMPLATE.format(
        start=_kql_datetime(start_utc), end=_kql_datetime(end_utc), top=_check_top(top),
        scope=_scope_filter(ikey),
    )


class UsageQueryError(Exception):
    """A usage query that failed upstream; ``status`` is the HTTP status the route should answer."""

    def __init__(self, message: str, status: int = 502, retry_after: int | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return f"UsageQueryError(status={self.status}, retry_after={self.retry_after}, message={self.message!r})"

    def _copy(self) -> "UsageQueryError":
        """Return a fresh instance (raising one instance from several threads tangles tracebacks)."""
        return UsageQueryError(self.message, self.status, self.retry_after)


class _DashboardRetryPolicy(RetryPolicy):
    """azure-core RetryPolicy that retries only 5xx, sleeping at most _MAX_RETRY_WAIT seconds in all per query."""

    def is_retry(self, settings, response):  # noqa: D102 - see class docstring
        # The base policy retries *any* status carrying Retry-After (429, even 400), sleeping the
        # full delay each time; a dashboard request answers 503 + Retry-After instead.
        if response.http_response.status_code < 500:
            return False
        if self._wait(settings, response) > _MAX_RETRY_WAIT - settings.get("waited", 0.0):
            return False
        return super().is_retry(settings, response)

    def _wait(self, settings, response=None, after_increment=False):
        """The sleep before the next attempt: the Retry-After, else the back-off."""
        retry_after = self.get_retry_after(response) if response is not None else None
        if retry_after:
            return retry_after
        if after_increment:
            return self.get_backoff_time(settings)
        return self.get_backoff_time({**settings, "history": [*settings["history"], None]})

    def sleep(self, settings, transport, response=None):  # noqa: D102 - see class docstring
        wait = min(self._wait(settings, response, after_increment=True),
                   max(0.0, _MAX_RETRY_WAIT - settings.get("waited", 0.0)))
        settings["waited"] = settings.get("waited", 0.0) + wait
        if wait > 0:
            transport.sleep(wait)


def _retry_after_seconds(headers: Mapping[str, str] | None) -> int | None:
    """Read Retry-After (seconds or HTTP date) or the retry-after-ms variants, in whole seconds."""
    if not headers:
        return None
    for name, scale in (("retry-after-ms", 0.001), ("x-ms-retry-after-ms", 0.001), ("retry-after", 1.0)):
        raw = headers.get(name)
        if not raw:
            continue
        try:
            seconds = float(raw) * scale
        except ValueError:
            try:
                when = parsedate_to_datetime(raw)
            except (TypeError, ValueError, IndexError):
                continue
            if when.tzinfo is None:
                when = when.replace(tzinfo=timezone.utc)
            seconds = (when - datetime.now(timezone.utc)).total_seconds()
        if math.isfinite(seconds):
            return max(0, math.ceil(seconds))
    return None


def _error_code(err: HttpResponseError) -> str:
    """Return the service's short error code (e.g. 'BadArgumentError'), or '' when absent."""
    for source in (getattr(err, "error", None), getattr(err, "model", None)):
        code = getattr(source, "code", None)
        if isinstance(code, str) and code.isprintable() and len(code) <= 100:
            return code
    return ""


def _from_http_error(err: HttpResponseError) -> UsageQueryError:
    """Map an azure-core HttpResponseError to a UsageQueryError with a safe message."""
    status = err.status_code
    if status is None:
        # No HTTP response: typically the credential could not get a token.
        if isinstance(err, ClientAuthenticationError):
            return UsageQueryError("Could not authenticate to Log Analytics", 502)
        return UsageQueryError("Log Analytics query failed", 502)
    code = _error_code(err)
    detail = f"HTTP {status}" + (f", {code}" if code else "")
    response = getattr(err, "response", None)
    retry_after = _retry_after_seconds(getattr(response, "headers", None))
    if status in (429, 503) and retry_after is None:
        retry_after = _DEFAULT_THROTTLE_HOLD  # held that long (see _hold_seconds): the client waits as much
    if status == 429:
        return UsageQueryError(f"Log Analytics is throttling queries ({detail})", 503, retry_after)
    if status >= 500 or status == 408:
        return UsageQueryError(f"Log Analytics is unavailable ({detail})", 503, retry_after)
    return UsageQueryError(f"Log Analytics query failed ({detail})", 502)


def _hold_seconds(exc: BaseException) -> float | None:
    """How long calls fail fast with ``exc`` after it: a 429 or 503 upstream, or a partial result."""
    if not isinstance(exc, UsageQueryError) or not exc.retry_after:
        return None
    cause = exc.__cause__
    if isinstance(cause, HttpResponseError) and cause.status_code in (429, 503):
        return min(float(exc.retry_after), _MAX_THROTTLE_HOLD)
    if isinstance(cause, _PartialResult):
        return float(_PARTIAL_HOLD)
    return None


class _PartialResult(Exception):
    """The cause of a UsageQueryError for a partial result (what to hold)."""


def _upstream_text(value: Any, workspace_id: str) -> str:
    """An upstream error code or message fit to pass on: printable, short, without the workspace id."""
    text = " ".join(str(value or "").split())
    text = "".join(ch for ch in text if ch.isprintable()).replace(workspace_id, "<workspace>")
    return text[:_MAX_UPSTREAM_TEXT]


def _partial_error(error: Any, workspace_id: str) -> UsageQueryError:
    """The 502 of a partial result, naming the upstream's error code and message and its first detail's."""
    parts = [f"{_upstream_text(getattr(error, 'code', ''), workspace_id)}: "
             f"{_upstream_text(getattr(error, 'message', ''), workspace_id)}"]
    details = getattr(error, "details", None) or []
    if details and isinstance(details[0], Mapping):
        inner = details[0]
        while isinstance(inner.get("innererror"), Mapping):
            inner = inner["innererror"]
        parts.append(f"{_upstream_text(details[0].get('code'), workspace_id)}: "
                     f"{_upstream_text(inner.get('message'), workspace_id)}")
    return UsageQueryError(f"Log Analytics returned a partial result ({'; '.join(parts)})", 502, _PARTIAL_HOLD)


def _convert(value: Any, kql_type: str) -> Any:
    """Convert one JSON cell to int/float/str per its Kusto type; nulls (and NaN/inf) become None."""
    if value is None:
        return None
    if kql_type == "long":
        if isinstance(value, bool):
            raise TypeError("boolean in a long column")
        return int(value)
    if kql_type == "real":
        number = float(value)
        return number if math.isfinite(number) else None
    return str(value)


def _table_rows(result: Any) -> list[dict[str, Any]]:
    """Turn a successful LogsQueryResult into section-row dicts keyed by COLUMNS."""
    tables = list(result.tables or [])
    if not tables:
        raise UsageQueryError("Log Analytics returned no result table", 502)
    table = tables[0]
    index = {name: i for i, name in enumerate(table.columns)}
    missing = [name for name, _ in COLUMNS if name not in index]
    if missing:
        raise UsageQueryError("Log Analytics returned an unexpected result schema", 502)
    rows = []
    try:
        for row in table.rows:
            cells = list(row)
            rows.append({name: _convert(cells[index[name]], kql_type) for name, kql_type in COLUMNS})
    except (TypeError, ValueError, IndexError, OverflowError) as exc:
        raise UsageQueryError("Log Analytics returned malformed values", 502) from exc
    return rows


@dataclass
class _Entry:
    """A cached result."""

    rows: list[dict[str, Any]]
    expires: float


@dataclass
class _Flight:
    """A query in progress that concurrent callers wait on."""

    done: threading.Event = field(default_factory=threading.Event)
    rows: list[dict[str, Any]] | None = None
    error: BaseException | None = None


def _copy_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return a copy callers may mutate without touching the cache."""
    return [dict(row) for row in rows]


class LogAnalyticsUsageSource:
    """Usage section rows from a Log Analytics workspace, cached and single-flighted."""

    def __init__(
        self,
        workspace_id: str,
        credential: Any,
        *,
        cache_ttl: float = 60.0,
        timeout: float = 30.0,
        top: int = 10,
        ikey: str | None = None,
        endpoint: str | None = None,
        client_kwargs: Mapping[str, Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        """Configure the source; the LogsQueryClient is only created on first use (no network here).

        ``timeout`` is the server-side query timeout (Prefer: wait=N) and, plus a few seconds of
        grace, the HTTP read timeout of each attempt.  ``client_kwargs`` go to LogsQueryClient
        (``retry_*`` keys configure its retry policy; tests use them, and ``transport``).
        ``ikey`` scopes the query to one instrumentation key's rows (None: the whole workspace).
        ``clock`` is the monotonic clock of the cache (injectable for tests).
        """
        if not isinstance(workspace_id, str) or not workspace_id.strip():
            raise ValueError("workspace_id must be a non-empty string")
        if credential is None:
            raise ValueError("credential is required")
        if not cache_ttl >= 0:
            raise ValueError("cache_ttl must be >= 0")
        if not timeout > 0:
            raise ValueError("timeout must be > 0")
        self._workspace_id = workspace_id.strip()
        self._credential = credential
        self._cache_ttl = float(cache_ttl)
        self._timeout = float(timeout)
        self._top = _check_top(top)
        _scope_filter(ikey)  # validated now, not at the first query
        self._ikey = ikey
        self._endpoint = endpoint
        self._client_kwargs = dict(client_kwargs or {})
        self._clock = clock
        self._server_timeout = max(1, min(600, math.ceil(self._timeout)))
        retries = int(self._client_kwargs.get("retry_total", _DEFAULT_RETRY["retry_total"]))
        # Followers give up waiting on a stuck leader after every attempt could have timed out.
        self._wait_limit = (max(retries, 0) + 1) * (self._timeout + _READ_GRACE + 5.0)
        self._lock = threading.Lock()
        self._client: LogsQueryClient | None = None
        self._cache: dict[tuple[int, str], _Entry] = {}
        self._flights: dict[tuple[int, str], _Flight] = {}
        self._held_until = 0.0
        self._held: UsageQueryError | None = None  # the error calls get again until _held_until

    def rows(self, start: datetime, end: datetime) -> list[dict[str, Any]]:
        """Return the section rows for [start, end]; raises UsageQueryError on upstream failure."""
        start_utc, end_utc = _window(start, end)
        key = self._cache_key(start_utc, end_utc)
        with self._lock:
            now = self._clock()
            entry = self._cache.get(key)
            if entry is not None and now < entry.expires:
                return _copy_rows(entry.rows)
            if self._held is not None and now < self._held_until:
                raise UsageQueryError(self._held.message, self._held.status, math.ceil(self._held_until - now))
            flight = self._flights.get(key)
            leader = flight is None
            if leader:
                flight = self._flights[key] = _Flight()
        if leader:
            return self._lead(key, flight, start_utc, end_utc)
        return self._follow(flight)

    def clear_cache(self) -> None:
        """Forget cached results and any hold (queries in flight are unaffected)."""
        with self._lock:
            self._cache.clear()
            self._held_until, self._held = 0.0, None

    def problems(self) -> list[str]:
        """For /healthz: the Logs API throttling (or unavailable) while a hold lasts, else nothing."""
        with self._lock:
            held, remaining = self._held, self._held_until - self._clock()
        if held is None or held.status != 503 or remaining <= 0:
            return []
        return [f"{held.message}; usage queries held for {math.ceil(remaining)} s more"]

    def close(self) -> None:
        """Close the underlying LogsQueryClient, if one was created."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    @staticmethod
    def _cache_key(start: datetime, end: datetime) -> tuple[int, str]:
        """Key a window by its length in whole hours and the UTC date of its end."""
        return round((end - start).total_seconds() / 3600), end.date().isoformat()

    def _lead(self, key, flight: _Flight, start: datetime, end: datetime) -> list[dict[str, Any]]:
        """Run the query for everyone waiting on ``flight`` and publish its outcome."""
        try:
            rows = self._query(start, end)
        except BaseException as exc:
            flight.error = exc
            with self._lock:
                self._flights.pop(key, None)
                hold = _hold_seconds(exc)
                if hold:
                    until = self._clock() + hold
                    if self._held is None or until >= self._held_until:
                        self._held_until, self._held = until, exc
            flight.done.set()
            raise
        flight.rows = rows
        try:
            with self._lock:
                self._flights.pop(key, None)
                if self._cache_ttl > 0:
                    now = self._clock()
                    self._cache = {k: e for k, e in self._cache.items() if now < e.expires}
                    self._cache[key] = _Entry(rows, now + self._cache_ttl)
        finally:
            flight.done.set()
        return _copy_rows(rows)

    def _follow(self, flight: _Flight) -> list[dict[str, Any]]:
        """Wait for the leader's outcome and return (or raise) it."""
        if not flight.done.wait(self._wait_limit):
            raise UsageQueryError("Timed out waiting for the Log Analytics usage query", 503)
        if flight.error is not None:
            if isinstance(flight.error, UsageQueryError):
                raise flight.error._copy()
            if isinstance(flight.error, Exception):
                raise flight.error  # a programming error: let it surface in every caller
            raise UsageQueryError("The usage query was interrupted", 503)
        return _copy_rows(flight.rows or [])

    def _get_client(self) -> LogsQueryClient:
        """Create the LogsQueryClient on first use."""
        with self._lock:
            if self._client is None:
                kwargs = dict(self._client_kwargs)
                if "retry_policy" not in kwargs:
                    retry = dict(_DEFAULT_RETRY)
                    retry.update({k: v for k, v in kwargs.items() if k.startswith("retry_")})
                    kwargs["retry_policy"] = _DashboardRetryPolicy(**retry)
                if self._endpoint:
                    kwargs["endpoint"] = self._endpoint
                self._client = LogsQueryClient(self._credential, **kwargs)
            return self._client

    def _query(self, start: datetime, end: datetime) -> list[dict[str, Any]]:
        """Run the usage query once (with the client's retries) and return its rows."""
        query = usage_query(start, end, self._top, self._ikey)
        client = self._get_client()
        try:
            result = client.query_workspace(
                self._workspace_id,
                query,
                timespan=(start, end),
                server_timeout=self._server_timeout,
                connection_timeout=min(self._timeout, 10.0),
                read_timeout=self._timeout + _READ_GRACE,
                error_map=_ERROR_MAP,
            )
        except HttpResponseError as exc:
            error = _from_http_error(exc)
            log.warning("Usage query failed: %s", error.message)
            raise error from exc
        except (ServiceRequestError, ServiceResponseError) as exc:
            log.warning("Usage query could not reach Log Analytics: %s", type(exc).__name__)
            raise UsageQueryError("Log Analytics is unreachable or timed out", 503) from exc
        except AzureError as exc:
            log.warning("Usage query failed: %s", type(exc).__name__)
            raise UsageQueryError("Log Analytics query failed", 502) from exc
        except ValueError as exc:
            # The SDK parses bodies with response.json(): a non-JSON body surfaces as ValueError.
            log.warning("Usage query got an unreadable response: %s", type(exc).__name__)
            raise UsageQueryError("Log Analytics returned an unreadable response", 502) from exc

        if isinstance(result, LogsQueryPartialResult) or result.status == LogsQueryStatus.PARTIAL:
            # A partial usage report would silently undercount: refuse it.
            error = _partial_error(getattr(result, "partial_error", None), self._workspace_id)
            log.warning("Usage query failed: %s", error.message)
            raise error from _PartialResult()
        if result.status != LogsQueryStatus.SUCCESS:
            raise UsageQueryError("Log Analytics query failed", 502)
        return _table_rows(result)
