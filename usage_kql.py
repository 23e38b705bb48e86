"""The usage query in KQL: one round trip that returns every dashboard section as "section rows".

What the Azure source asks Log Analytics (``log_analytics`` is how it asks: retries, holds, cache).
It reads the workspace-based Application Insights tables (AppRequests, AppDependencies, AppEvents),
counts sampled items by ``sum(ItemCount)``, weighs percentiles by it, counts an ``event_id`` once,
and keeps only one application's rows (its instrumentation key). Its text is checked by the Kusto
language service and executed on tables built from real envelopes by duckdb-kql in the tests.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

__all__ = ["COLUMNS", "SECTIONS", "check_top", "scope_filter", "usage_query", "utc_window"]

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


MAX_TOP = 1000

# The query template.  Only server-formatted values are substituted: {start}/{end} are
# datetime(...) literals built by _kql_datetime, {top} is a validated int and {scope} is empty
# or a filter on a validated instrumentation key (scope_filter).
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


def utc_window(start: datetime, end: datetime) -> tuple[datetime, datetime]:
    """Validate a query window and return it in UTC."""
    start_utc, end_utc = _as_utc(start, "start"), _as_utc(end, "end")
    if end_utc <= start_utc:
        raise ValueError("end must be later than start")
    return start_utc, end_utc


def _kql_datetime(value: datetime) -> str:
    """Format an aware UTC datetime as a KQL datetime literal."""
    return f"datetime({value.strftime('%Y-%m-%dT%H:%M:%S.%f')}Z)"


def check_top(top: int) -> int:
    """Validate the number of rows of the top-N sections."""
    if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= MAX_TOP:
        raise ValueError(f"top must be an int between 1 and {MAX_TOP}")
    return top


def scope_filter(ikey: str | None) -> str:
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
    start_utc, end_utc = utc_window(start, end)
    return _QUERY_TEMPLATE.format(
        start=_kql_datetime(start_utc), end=_kql_datetime(end_utc), top=check_top(top),
        scope=scope_filter(ikey),
    )
