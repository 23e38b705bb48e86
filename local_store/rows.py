"""How records become table rows: each kind's INSERT parameters, multi-row INSERTs, and UTC days."""
import json
import logging
import sqlite3
from datetime import datetime, timezone

from local_store.schema import INSERT, RECORD_KINDS

log = logging.getLogger(__name__)

# Rows per INSERT statement: every statement releases and re-takes the GIL once (around
# sqlite3_step); under a busy request thread each re-take can wait a whole switch interval
# (5 ms), so one statement per row (executemany) starves the writer, and fewer, larger
# statements keep up better. The bound is the library's own limit on parameters (999 in SQLite
# before 3.32, 32766 since; the connection says which), and at most _MAX_ROWS rows a statement.
_OLDEST_MAX_PARAMS = 999
_MAX_ROWS = 512
_multi_sql = {}


def max_params(conn):
    """The most parameters one statement may bind on `conn` (SQLite's limit, where Python can read it)."""
    try:
        return min(conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER), 32766)
    except AttributeError:  # pragma: no cover - Python < 3.11
        return _OLDEST_MAX_PARAMS


def _insert_sql(kind, rows):
    """The INSERT of `kind` with `rows` VALUES tuples (cached)."""
    sql = _multi_sql.get((kind, rows))
    if sql is None:
        single = INSERT[kind]
        head, _, tail = single.partition(" VALUES ")
        values, _, conflict = tail.partition(")")
        sql = _multi_sql[(kind, rows)] = f"{head} VALUES " + ",".join([values + ")"] * rows) + conflict
    return sql


def insert_many(conn, kind, params, limit=_OLDEST_MAX_PARAMS):
    """INSERT every row of `params` (tuples in COLUMNS[kind] order) in as few statements as `limit`
    parameters a statement (see max_params) allow."""
    per = max(1, min(_MAX_ROWS, limit // len(params[0])))
    for start in range(0, len(params), per):
        chunk = params[start:start + per]
        conn.execute(_insert_sql(kind, len(chunk)), [value for row in chunk for value in row])


DAY_SECONDS = 86400
_days = {}


def utc_day(ts):
    """The UTC date of an epoch timestamp, as YYYY-MM-DD (memoised per day: it is on every row)."""
    key = int(ts // DAY_SECONDS)
    day = _days.get(key)
    if day is None:
        if len(_days) > 4096:
            _days.clear()
        day = _days[key] = datetime.fromtimestamp(key * DAY_SECONDS, timezone.utc).strftime("%Y-%m-%d")
    return day


_quote = json.encoder.encode_basestring_ascii
_encoder = json.JSONEncoder(separators=(",", ":"))


def _without_event_id(props):
    """The properties without `event_id`, which has its own column: stored once per row, not twice."""
    if "event_id" not in props:
        return props
    return {k: v for k, v in props.items() if k != "event_id"}


def properties_json(props):
    """json.dumps(props, separators=(",", ":")), byte for byte, faster for the usual all-string dict."""
    try:
        return "{" + ",".join([_quote(k) + ":" + _quote(v) for k, v in props.items()]) + "}"
    except TypeError:  # a value that is not a string
        return _encoder.encode(props)


_formatter = logging.Formatter()


def _trace_row(record):
    """The `traces` row of one LogRecord: Application Insights' severity, message, properties, exception."""
    dims = getattr(record, "custom_dimensions", None)  # string properties (UsageMonitor.track_trace)
    props = dims if isinstance(dims, dict) else {}
    exception = _formatter.formatException(record.exc_info) if record.exc_info else None
    return (record.created, utc_day(record.created), max(0, (record.levelno - 1) // 10), record.levelname,
            record.name, _message(record), properties_json(props), exception,
            getattr(record, "operation_id", "") or None)


def _message(record):
    """The formatted message; the raw one when its arguments do not fit (a bad record is still stored)."""
    try:
        return record.getMessage()
    except (TypeError, ValueError):
        return str(record.msg)

def iso_utc(ts):
    """An epoch timestamp as YYYY-MM-DDTHH:MM:SSZ."""
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def midnight(day):
    """The epoch timestamp of the UTC midnight that starts `day` (YYYY-MM-DD)."""
    return datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=timezone.utc).timestamp()


def encode(held):
    """(rows by insert kind, row count, records dropped) of queue items: records, event rows (encoded by
    the request thread, see event_row), and rows from a pending file.

    A record that cannot be encoded is dropped (and logged) without costing the others.
    """
    groups = {kind: [] for kind in RECORD_KINDS if kind != "event"}
    rows, dropped = {}, 0
    events = rows["event"] = []
    for items in held:
        for kind, payload in items:
            group = groups.get(kind)
            if group is not None:
                group.append(payload)
            elif kind == "event":
                events.append(payload)
            elif kind == "rows":
                for key, params in payload.items():
                    rows.setdefault(key, []).extend(params)
    for kind, records in groups.items():
        if records:
            encoded, bad = _encode_kind(kind, records)
            dropped += bad
            if encoded:
                rows.setdefault(kind, []).extend(encoded)
    if not events:
        del rows["event"]
    return rows, sum(len(params) for params in rows.values()), dropped


def _encode_kind(kind, records):
    try:
        return record_rows(kind, records), 0
    except Exception:  # a malformed record must not stop the writer nor cost the others
        good, bad = [], 0
        for rec in records:
            try:
                good.extend(record_rows(kind, [rec]))
            except Exception:
                bad += 1
        log.error("local store could not encode %d %s record(s); dropped them", bad, kind)
        return good, bad


def event_row(rec):
    """The INSERT parameters of one EventRecord (COLUMNS["event"] order)."""
    props = rec.properties
    crud = rec.name == "CrudActivity"
    return (rec.event_id, rec.timestamp, utc_day(rec.timestamp), rec.name, rec.user_id or "",
            props.get("action") if crud else None, props.get("entity") if crud else None,
            rec.operation_id, properties_json(_without_event_id(props)), rec.anonymous_id, rec.session_id,
            int(rec.client_event_id))


def record_rows(kind, records):
    """The INSERT parameters of records of one kind."""
    if kind == "event":
        return [event_row(rec) for rec in records]
    if kind == "request":
        return [(rec.timestamp, utc_day(rec.timestamp), rec.name, rec.status, int(rec.success),
                 rec.duration_ms, rec.user_id or "", rec.operation_id) for rec in records]
    if kind == "trace":
        return [_trace_row(rec) for rec in records]
    return [(rec.timestamp, utc_day(rec.timestamp), rec.type, rec.target, rec.name, rec.result_code,
             int(rec.success), rec.duration_ms, rec.operation_id) for rec in records]
