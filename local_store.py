"""Local mode: an embedded SQLite store, written in batches by one background writer per process.

Layout (schema version 3)

* Raw tables ``events``, ``requests`` and ``dependencies`` hold one row per item and stay the
  source of truth. Their only indexes are ordered by time (``ts``), so an insert touches the
  right-hand edge of each B-tree: the cost of a row does not grow with the size of the table.
  (Version 1 made ``event_id`` the primary key: a random UUID index costs one random page per
  row, 130 µs per event at a million rows. Events are now unique by ``(ts, event_id)``: a
  record sent twice carries the same timestamp, so it is still stored once.)
* Daily rollups are kept by SQLite triggers in the same transaction as the raw insert, so
  every writer -- this store's writer thread, a script, a test inserting rows by hand -- keeps
  them exact: counts, failures, duration sums and latest timestamp per day and name (or
  dependency target), CRUD counts per day, distinct users per day, each user's (and each
  user-and-event-name pair's) latest active day, and per-day latency histograms.
* The dashboard's window is whole UTC days up to now; for such a window every figure comes
  from the rollups (tens of rows per day instead of every raw row). "Now" is the moment the
  query reads: rows another worker committed in the milliseconds between the caller computing
  the window's end and the read are counted (the raw queries of version 1 left them out).
  Any other window, a row dated more than a minute after the end (a clock gone wrong), or a
  store whose raw rows were updated or deleted behind the triggers' back, is answered from
  the raw tables exactly as before (slower) until the next start-up rebuilds them.
* Cardinality: once a day is closed (before today and the OPEN_DAYS - 1 days before it), the
  writer's hourly maintenance pass (and the one at start-up) compacts it: ``ev_day_top``,
  ``req_day_top`` and ``dep_day_top`` keep that day's TOP_K rows by count plus one OTHER row
  with the remainder, and ``compacted_days`` names it. A window's totals and daily series come
  from the per-day totals (``*_day_total``, kept by triggers: exact); its top lists merge the
  closed days' top rows with the live rows of the open (or not yet compacted) days. OTHER never
  appears in a top list, so a name outside every closed day's top K is left out (exact while a
  day has at most TOP_K names, approximate beyond). A row added to a compacted day re-opens it
  (a trigger drops its top rows) until the next pass; pruning removes the compaction with the
  day, and a rebuild drops it all (the next pass redoes it).

Latency percentiles from the rollups: per day (and per request name) a histogram over fixed
log-scale buckets, 16 per doubling (each bucket's upper edge is 2^(1/16) = 1.044 times its
lower edge), keeping the count and the smallest and largest duration in each bucket. The
nearest-rank percentile is located exactly (its bucket and its rank within the bucket); its
value is exact when that bucket holds one distinct duration (or the rank is the bucket's first
or last), else interpolated between the bucket's smallest and largest duration, so it is off
by less than 4.4 % of the value at worst.
"""
import collections
import contextlib
import errno
import glob
import itertools
import json
import logging
import math
import os
import sqlite3
import threading
import time
import urllib.parse
from datetime import datetime, timezone

from config import ConfigError, Settings
from telemetry import mark_internal_thread

log = logging.getLogger(__name__)

SCHEMA_VERSION = 4
BUCKETS_PER_OCTAVE = 16
# Cardinality: each closed day keeps its TOP_K names per dimension (by count) plus one OTHER row
# with the remainder (see _compact_day). Today and the OPEN_DAYS - 1 days before it stay open.
# Late rows (a client timestamp up to 48 hours back) need no open window for exactness: a row
# added to a compacted day re-opens it (the *_reopen_* triggers) until the next pass compacts it
# again. Only today is open: each open day adds all its names to every top-list query (3 open
# days of 33,000 names each cost about 130 ms; 1 day about 30 ms).
TOP_K = 100
OTHER = "(other)"
OPEN_DAYS = 1
_BUCKET_MIN_EXP, _BUCKET_MAX_EXP = -10, 24  # 1/1024 ms .. 2^24 ms (4.7 hours); beyond: the end buckets
_BOUNDS = [-1.0e308] + [2.0 ** (_BUCKET_MIN_EXP + i / BUCKETS_PER_OCTAVE)
                        for i in range((_BUCKET_MAX_EXP - _BUCKET_MIN_EXP) * BUCKETS_PER_OCTAVE + 1)]

_TABLES = """
CREATE TABLE IF NOT EXISTS events (
    event_id TEXT NOT NULL, ts REAL NOT NULL, day TEXT NOT NULL, name TEXT NOT NULL,
    user_id TEXT NOT NULL DEFAULT '', action TEXT, entity TEXT, operation_id TEXT,
    properties TEXT NOT NULL, anonymous_id TEXT NOT NULL DEFAULT '', session_id TEXT NOT NULL DEFAULT '',
    client_id INTEGER NOT NULL DEFAULT 0, UNIQUE (ts, event_id));
CREATE TABLE IF NOT EXISTS client_event_ids (event_id TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY, ts REAL NOT NULL, day TEXT NOT NULL, name TEXT NOT NULL,
    status INTEGER NOT NULL, success INTEGER NOT NULL, duration_ms REAL NOT NULL,
    user_id TEXT NOT NULL DEFAULT '', operation_id TEXT);
CREATE INDEX IF NOT EXISTS requests_ts ON requests(ts);
CREATE TABLE IF NOT EXISTS dependencies (
    id INTEGER PRIMARY KEY, ts REAL NOT NULL, day TEXT NOT NULL, type TEXT NOT NULL,
    target TEXT NOT NULL, name TEXT NOT NULL, result_code TEXT, success INTEGER NOT NULL,
    duration_ms REAL NOT NULL, operation_id TEXT);
CREATE INDEX IF NOT EXISTS dependencies_ts ON dependencies(ts);
CREATE TABLE IF NOT EXISTS traces (
    id INTEGER PRIMARY KEY, ts REAL NOT NULL, day TEXT NOT NULL, severity_level INTEGER NOT NULL,
    level TEXT NOT NULL, logger TEXT NOT NULL, message TEXT NOT NULL, properties TEXT NOT NULL,
    exception TEXT, operation_id TEXT);
CREATE INDEX IF NOT EXISTS traces_ts ON traces(ts);
CREATE TABLE IF NOT EXISTS store_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS hist_bounds (lo REAL PRIMARY KEY, bucket INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ev_day (
    day TEXT NOT NULL, name TEXT NOT NULL, n INTEGER NOT NULL, max_ts REAL NOT NULL,
    PRIMARY KEY (day, name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ev_user_day (
    day TEXT NOT NULL, user_id TEXT NOT NULL, PRIMARY KEY (day, user_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ev_day_users (day TEXT PRIMARY KEY, users INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ev_user_last (user_id TEXT PRIMARY KEY, last_day TEXT NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS ev_user_last_day ON ev_user_last(last_day);
CREATE TABLE IF NOT EXISTS ev_name_user_day (
    name TEXT NOT NULL, day TEXT NOT NULL, user_id TEXT NOT NULL,
    PRIMARY KEY (name, day, user_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ev_name_user_last (
    name TEXT NOT NULL, user_id TEXT NOT NULL, last_day TEXT NOT NULL,
    PRIMARY KEY (name, user_id)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS ev_name_user_last_day ON ev_name_user_last(name, last_day);
CREATE TABLE IF NOT EXISTS ev_anonymous_day (
    day TEXT NOT NULL, id TEXT NOT NULL, PRIMARY KEY (day, id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ev_anonymous_last (id TEXT PRIMARY KEY, last_day TEXT NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS ev_anonymous_last_day ON ev_anonymous_last(last_day);
CREATE TABLE IF NOT EXISTS ev_session_day (
    day TEXT NOT NULL, id TEXT NOT NULL, PRIMARY KEY (day, id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ev_session_last (id TEXT PRIMARY KEY, last_day TEXT NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS ev_session_last_day ON ev_session_last(last_day);
CREATE TABLE IF NOT EXISTS crud_day (
    day TEXT NOT NULL, entity TEXT, action TEXT, n INTEGER NOT NULL, UNIQUE (day, entity, action));
CREATE TABLE IF NOT EXISTS req_day (
    day TEXT NOT NULL, name TEXT NOT NULL, n INTEGER NOT NULL, failed INTEGER NOT NULL,
    sum_ms REAL NOT NULL, max_ts REAL NOT NULL, PRIMARY KEY (day, name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS req_hist (
    name TEXT NOT NULL, day TEXT NOT NULL, bucket INTEGER NOT NULL, n INTEGER NOT NULL,
    min_ms REAL NOT NULL, max_ms REAL NOT NULL, PRIMARY KEY (name, day, bucket)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS req_hist_all (
    day TEXT NOT NULL, bucket INTEGER NOT NULL, n INTEGER NOT NULL,
    min_ms REAL NOT NULL, max_ms REAL NOT NULL, PRIMARY KEY (day, bucket)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dep_day (
    day TEXT NOT NULL, type TEXT NOT NULL, target TEXT NOT NULL, n INTEGER NOT NULL,
    failed INTEGER NOT NULL, sum_ms REAL NOT NULL, max_ts REAL NOT NULL,
    PRIMARY KEY (day, type, target)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ev_day_total (
    day TEXT PRIMARY KEY, n INTEGER NOT NULL, max_ts REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS req_day_total (
    day TEXT PRIMARY KEY, n INTEGER NOT NULL, failed INTEGER NOT NULL, sum_ms REAL NOT NULL,
    max_ts REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dep_day_total (
    day TEXT PRIMARY KEY, n INTEGER NOT NULL, failed INTEGER NOT NULL, sum_ms REAL NOT NULL,
    max_ts REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS compacted_days (day TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ev_day_top (
    day TEXT NOT NULL, name TEXT NOT NULL, n INTEGER NOT NULL, PRIMARY KEY (day, name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS req_day_top (
    day TEXT NOT NULL, name TEXT NOT NULL, n INTEGER NOT NULL, failed INTEGER NOT NULL,
    sum_ms REAL NOT NULL, PRIMARY KEY (day, name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dep_day_top (
    day TEXT NOT NULL, type TEXT NOT NULL, target TEXT NOT NULL, n INTEGER NOT NULL,
    failed INTEGER NOT NULL, sum_ms REAL NOT NULL, PRIMARY KEY (day, type, target)) WITHOUT ROWID;
"""

_BUCKET_OF = "COALESCE((SELECT bucket FROM hist_bounds WHERE lo <= {x} ORDER BY lo DESC LIMIT 1), 0)"

# Per-day top lists of closed days (see _compact_day); compacted_days names the days they cover.
_TOP_TABLES = ("ev_day_top", "req_day_top", "dep_day_top")
_COMPACTED_TABLES = ("compacted_days",) + _TOP_TABLES

# Client-made event ids: a retried send is stored once, whatever its time (RAISE(IGNORE) skips the row).
_CLIENT_IDS = """
CREATE TRIGGER IF NOT EXISTS events_client_once BEFORE INSERT ON events WHEN NEW.client_id = 1 BEGIN
  SELECT RAISE(IGNORE) WHERE EXISTS (SELECT 1 FROM client_event_ids WHERE event_id = NEW.event_id);
END;
CREATE TRIGGER IF NOT EXISTS events_client_seen AFTER INSERT ON events WHEN NEW.client_id = 1 BEGIN
  INSERT OR IGNORE INTO client_event_ids (event_id) VALUES (NEW.event_id);
END;
"""
# Distinct anonymous visitors and sessions: per day, and each one's latest day (as for users).
_DISTINCT_IDS = (("anonymous", "anonymous_id"), ("session", "session_id"))
_ID_TRIGGERS = "".join(f"""
CREATE TRIGGER IF NOT EXISTS events_rollup_{kind} AFTER INSERT ON events WHEN NEW.{column} <> '' BEGIN
  INSERT OR IGNORE INTO ev_{kind}_day (day, id) VALUES (NEW.day, NEW.{column});
  INSERT INTO ev_{kind}_last (id, last_day) VALUES (NEW.{column}, NEW.day)
    ON CONFLICT (id) DO UPDATE SET last_day = excluded.last_day WHERE excluded.last_day > ev_{kind}_last.last_day;
END;
""" for kind, column in _DISTINCT_IDS)

# Per-day totals (summaries, daily series, the latest timestamp of a day): one row a day, so a
# window's figures do not sum every name's row. Triggers of their own (not in *_rollup): a store
# made by the previous version gets them by CREATE TRIGGER IF NOT EXISTS, and migrate() fills the
# tables once (_TOTALS_FILL).
_TOTAL_TRIGGERS = """
CREATE TRIGGER IF NOT EXISTS events_rollup_total AFTER INSERT ON events BEGIN
  INSERT INTO ev_day_total (day, n, max_ts) VALUES (NEW.day, 1, NEW.ts)
    ON CONFLICT (day) DO UPDATE SET n = n + 1, max_ts = max(max_ts, excluded.max_ts);
END;
CREATE TRIGGER IF NOT EXISTS requests_rollup_total AFTER INSERT ON requests BEGIN
  INSERT INTO req_day_total (day, n, failed, sum_ms, max_ts)
    VALUES (NEW.day, 1, NEW.success = 0, NEW.duration_ms, NEW.ts)
    ON CONFLICT (day) DO UPDATE SET n = n + 1, failed = failed + excluded.failed,
      sum_ms = sum_ms + excluded.sum_ms, max_ts = max(max_ts, excluded.max_ts);
END;
CREATE TRIGGER IF NOT EXISTS dependencies_rollup_total AFTER INSERT ON dependencies BEGIN
  INSERT INTO dep_day_total (day, n, failed, sum_ms, max_ts)
    VALUES (NEW.day, 1, NEW.success = 0, NEW.duration_ms, NEW.ts)
    ON CONFLICT (day) DO UPDATE SET n = n + 1, failed = failed + excluded.failed,
      sum_ms = sum_ms + excluded.sum_ms, max_ts = max(max_ts, excluded.max_ts);
END;
"""
_TOTALS_FILL = """
INSERT INTO ev_day_total (day, n, max_ts) SELECT day, SUM(n), MAX(max_ts) FROM ev_day GROUP BY day;
INSERT INTO req_day_total (day, n, failed, sum_ms, max_ts)
  SELECT day, SUM(n), SUM(failed), SUM(sum_ms), MAX(max_ts) FROM req_day GROUP BY day;
INSERT INTO dep_day_total (day, n, failed, sum_ms, max_ts)
  SELECT day, SUM(n), SUM(failed), SUM(sum_ms), MAX(max_ts) FROM dep_day GROUP BY day;
"""
_TOTAL_TABLES = ("ev_day_total", "req_day_total", "dep_day_total")

_TRIGGERS = _CLIENT_IDS + _ID_TRIGGERS + _TOTAL_TRIGGERS + """
CREATE TRIGGER IF NOT EXISTS events_rollup AFTER INSERT ON events BEGIN
  INSERT INTO ev_day (day, name, n, max_ts) VALUES (NEW.day, NEW.name, 1, NEW.ts)
    ON CONFLICT (day, name) DO UPDATE SET n = n + 1, max_ts = max(max_ts, excluded.max_ts);
END;
CREATE TRIGGER IF NOT EXISTS events_rollup_user AFTER INSERT ON events WHEN NEW.user_id <> '' BEGIN
  INSERT OR IGNORE INTO ev_user_day (day, user_id) VALUES (NEW.day, NEW.user_id);
  INSERT OR IGNORE INTO ev_name_user_day (name, day, user_id) VALUES (NEW.name, NEW.day, NEW.user_id);
  INSERT INTO ev_user_last (user_id, last_day) VALUES (NEW.user_id, NEW.day)
    ON CONFLICT (user_id) DO UPDATE SET last_day = excluded.last_day
    WHERE excluded.last_day > ev_user_last.last_day;
  INSERT INTO ev_name_user_last (name, user_id, last_day) VALUES (NEW.name, NEW.user_id, NEW.day)
    ON CONFLICT (name, user_id) DO UPDATE SET last_day = excluded.last_day
    WHERE excluded.last_day > ev_name_user_last.last_day;
END;
CREATE TRIGGER IF NOT EXISTS events_rollup_crud AFTER INSERT ON events WHEN NEW.name = 'CrudActivity' BEGIN
  INSERT INTO crud_day (day, entity, action, n) VALUES (NEW.day, NEW.entity, NEW.action, 1)
    ON CONFLICT (day, entity, action) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER IF NOT EXISTS ev_user_day_rollup AFTER INSERT ON ev_user_day BEGIN
  INSERT INTO ev_day_users (day, users) VALUES (NEW.day, 1)
    ON CONFLICT (day) DO UPDATE SET users = users + 1;
END;
CREATE TRIGGER IF NOT EXISTS requests_rollup AFTER INSERT ON requests BEGIN
  INSERT INTO req_day (day, name, n, failed, sum_ms, max_ts)
    VALUES (NEW.day, NEW.name, 1, NEW.success = 0, NEW.duration_ms, NEW.ts)
    ON CONFLICT (day, name) DO UPDATE SET n = n + 1, failed = failed + excluded.failed,
      sum_ms = sum_ms + excluded.sum_ms, max_ts = max(max_ts, excluded.max_ts);
  INSERT INTO req_hist (name, day, bucket, n, min_ms, max_ms)
    VALUES (NEW.name, NEW.day, {bucket}, 1, NEW.duration_ms, NEW.duration_ms)
    ON CONFLICT (name, day, bucket) DO UPDATE SET n = n + 1,
      min_ms = min(min_ms, excluded.min_ms), max_ms = max(max_ms, excluded.max_ms);
  INSERT INTO req_hist_all (day, bucket, n, min_ms, max_ms)
    VALUES (NEW.day, {bucket}, 1, NEW.duration_ms, NEW.duration_ms)
    ON CONFLICT (day, bucket) DO UPDATE SET n = n + 1,
      min_ms = min(min_ms, excluded.min_ms), max_ms = max(max_ms, excluded.max_ms);
END;
CREATE TRIGGER IF NOT EXISTS dependencies_rollup AFTER INSERT ON dependencies BEGIN
  INSERT INTO dep_day (day, type, target, n, failed, sum_ms, max_ts)
    VALUES (NEW.day, NEW.type, NEW.target, 1, NEW.success = 0, NEW.duration_ms, NEW.ts)
    ON CONFLICT (day, type, target) DO UPDATE SET n = n + 1, failed = failed + excluded.failed,
      sum_ms = sum_ms + excluded.sum_ms, max_ts = max(max_ts, excluded.max_ts);
END;
""".format(bucket=_BUCKET_OF.format(x="NEW.duration_ms")) + "".join(
    # Rows changed or removed behind the insert triggers: the rollups no longer match, so the
    # dashboard reads the raw tables until the next start-up rebuilds them.
    f"CREATE TRIGGER IF NOT EXISTS {table}_{op.lower()}_stale AFTER {op} ON {table} BEGIN\n"
    f"  DELETE FROM store_meta WHERE key = 'rollups';\nEND;\n"
    for table in ("events", "requests", "dependencies") for op in ("UPDATE", "DELETE")) + "".join(
    # A row added to a compacted day (a late row, a script): the day is live again until the next
    # compaction, so its top lists and totals stay exact.
    f"CREATE TRIGGER IF NOT EXISTS {table}_reopen_{op.lower()} AFTER {op} ON {table}"
    f" WHEN EXISTS (SELECT 1 FROM compacted_days WHERE day = NEW.day) BEGIN\n"
    f"  DELETE FROM compacted_days WHERE day = NEW.day;\n"
    + "".join(f"  DELETE FROM {top} WHERE day = NEW.day;\n" for top in _TOP_TABLES)
    + "END;\n"
    for table in ("ev_day", "req_day", "dep_day") for op in ("INSERT", "UPDATE"))

_SEED = ("INSERT OR IGNORE INTO hist_bounds (lo, bucket) VALUES "
         + ", ".join(f"({lo!r}, {i})" for i, lo in enumerate(_BOUNDS)) + ";\n"
         # A store whose raw tables are empty has rollups that match them (the triggers exist now).
         "INSERT OR IGNORE INTO store_meta (key, value) SELECT 'rollups', 'complete'"
         " WHERE NOT EXISTS (SELECT 1 FROM events) AND NOT EXISTS (SELECT 1 FROM requests)"
         " AND NOT EXISTS (SELECT 1 FROM dependencies);\n")

# The whole schema, idempotent: executescript(_SCHEMA) on an empty file gives a complete store.
_SCHEMA = _TABLES + _TRIGGERS + _SEED

_ROLLUP_TABLES = _COMPACTED_TABLES + _TOTAL_TABLES + (
                  "ev_day", "ev_user_day", "ev_day_users", "ev_name_user_day", "ev_user_last", "ev_name_user_last",
                  "ev_anonymous_day", "ev_anonymous_last", "ev_session_day", "ev_session_last", "crud_day",
                  "req_day", "req_hist", "req_hist_all", "dep_day")

_ID_REBUILD = "".join(f"""
INSERT INTO ev_{kind}_day (day, id) SELECT DISTINCT day, {column} FROM events WHERE {column} <> '';
INSERT INTO ev_{kind}_last (id, last_day) SELECT {column}, MAX(day) FROM events WHERE {column} <> '' GROUP BY {column};
""" for kind, column in _DISTINCT_IDS)
_REBUILD = _ID_REBUILD + """
INSERT INTO ev_day (day, name, n, max_ts) SELECT day, name, COUNT(*), MAX(ts) FROM events GROUP BY day, name;
INSERT INTO ev_user_day (day, user_id) SELECT DISTINCT day, user_id FROM events WHERE user_id <> '';
INSERT INTO ev_name_user_day (name, day, user_id)
  SELECT DISTINCT name, day, user_id FROM events WHERE user_id <> '';
INSERT INTO ev_user_last (user_id, last_day)
  SELECT user_id, MAX(day) FROM events WHERE user_id <> '' GROUP BY user_id;
INSERT INTO ev_name_user_last (name, user_id, last_day)
  SELECT name, user_id, MAX(day) FROM events WHERE user_id <> '' GROUP BY name, user_id;
INSERT INTO crud_day (day, entity, action, n)
  SELECT day, entity, action, COUNT(*) FROM events WHERE name = 'CrudActivity' GROUP BY day, entity, action;
INSERT INTO req_day (day, name, n, failed, sum_ms, max_ts)
  SELECT day, name, COUNT(*), SUM(success = 0), SUM(duration_ms), MAX(ts) FROM requests GROUP BY day, name;
INSERT INTO req_hist (name, day, bucket, n, min_ms, max_ms)
  SELECT name, day, b, COUNT(*), MIN(duration_ms), MAX(duration_ms)
  FROM (SELECT name, day, duration_ms, {bucket} AS b FROM requests) GROUP BY name, day, b;
INSERT INTO req_hist_all (day, bucket, n, min_ms, max_ms)
  SELECT day, b, COUNT(*), MIN(duration_ms), MAX(duration_ms)
  FROM (SELECT day, duration_ms, {bucket} AS b FROM requests) GROUP BY day, b;
INSERT INTO dep_day (day, type, target, n, failed, sum_ms, max_ts)
  SELECT day, type, target, COUNT(*), SUM(success = 0), SUM(duration_ms), MAX(ts)
  FROM dependencies GROUP BY day, type, target;
""".format(bucket=_BUCKET_OF.format(x="duration_ms")) + _TOTALS_FILL + """
INSERT OR REPLACE INTO store_meta (key, value) VALUES ('rollups', 'complete');
"""

_V1_EVENT_COLUMNS = "event_id, ts, day, name, user_id, action, entity, operation_id, properties"
_EVENT_COLUMNS = _V1_EVENT_COLUMNS + ", anonymous_id, session_id, client_id"
_ADDED_EVENT_COLUMNS = (  # version 4
    ("anonymous_id", "TEXT NOT NULL DEFAULT ''"), ("session_id", "TEXT NOT NULL DEFAULT ''"),
    ("client_id", "INTEGER NOT NULL DEFAULT 0"))
_INSERT = {
    "event": f"INSERT INTO events ({_EVENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
             " ON CONFLICT (ts, event_id) DO NOTHING",
    "request": "INSERT INTO requests (ts, day, name, status, success, duration_ms, user_id,"
               " operation_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
    "trace": "INSERT INTO traces (ts, day, severity_level, level, logger, message, properties, exception,"
             " operation_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
    "dependency": "INSERT INTO dependencies (ts, day, type, target, name, result_code, success,"
                  " duration_ms, operation_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
}
# Each kind's columns, in the order of its INSERT parameters (the pending file names them).
_COLUMNS = {kind: tuple(c.strip() for c in sql[sql.index("(") + 1:sql.index(")")].split(","))
            for kind, sql in _INSERT.items()}
_COLUMN_DEFAULTS = {"user_id": "", "anonymous_id": "", "session_id": "", "client_id": 0}
# Rows from a pending file or copied from a corrupt one: a row that breaks a constraint is skipped
# (OR IGNORE), never the whole batch; an event already stored is skipped too.
_INSERT.update({f"ignore {kind}": "INSERT OR IGNORE" + sql[len("INSERT"):].partition(" ON CONFLICT")[0]
                for kind, sql in list(_INSERT.items())})

# Rows per INSERT statement: every statement releases and re-takes the GIL once (around
# sqlite3_step); under a busy request thread each re-take can wait a whole switch interval
# (5 ms), so one statement per row (executemany) starves the writer, and fewer, larger
# statements keep up better. The bound is the library's own limit on parameters (999 in SQLite
# before 3.32, 32766 since; the connection says which), and at most _MAX_ROWS rows a statement.
_OLDEST_MAX_PARAMS = 999
_MAX_ROWS = 512
_multi_sql = {}


def _max_params(conn):
    """The most parameters one statement may bind on `conn` (SQLite's limit, where Python can read it)."""
    try:
        return min(conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER), 32766)
    except AttributeError:  # pragma: no cover - Python < 3.11
        return _OLDEST_MAX_PARAMS


def _insert_sql(kind, rows):
    """The INSERT of `kind` with `rows` VALUES tuples (cached)."""
    sql = _multi_sql.get((kind, rows))
    if sql is None:
        single = _INSERT[kind]
        head, _, tail = single.partition(" VALUES ")
        values, _, conflict = tail.partition(")")
        sql = _multi_sql[(kind, rows)] = f"{head} VALUES " + ",".join([values + ")"] * rows) + conflict
    return sql


def _insert_many(conn, kind, params, max_params=_OLDEST_MAX_PARAMS):
    """INSERT every row of `params` with as few statements as `max_params` (see _max_params) allows."""
    per = max(1, min(_MAX_ROWS, max_params // len(params[0])))
    for start in range(0, len(params), per):
        chunk = params[start:start + per]
        conn.execute(_insert_sql(kind, len(chunk)), [value for row in chunk for value in row])


_DAY_SECONDS = 86400
_days = {}


def _day(ts):
    """The UTC date of an epoch timestamp, as YYYY-MM-DD (memoised per day: it is on every row)."""
    key = int(ts // _DAY_SECONDS)
    day = _days.get(key)
    if day is None:
        if len(_days) > 4096:
            _days.clear()
        day = _days[key] = datetime.fromtimestamp(key * _DAY_SECONDS, timezone.utc).strftime("%Y-%m-%d")
    return day


_quote = json.encoder.encode_basestring_ascii
_encoder = json.JSONEncoder(separators=(",", ":"))


def _without_event_id(props):
    """The properties without `event_id`, which has its own column: stored once per row, not twice."""
    if "event_id" not in props:
        return props
    return {k: v for k, v in props.items() if k != "event_id"}


def _properties_json(props):
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
    return (record.created, _day(record.created), max(0, (record.levelno - 1) // 10), record.levelname,
            record.name, _message(record), _properties_json(props), exception,
            getattr(record, "operation_id", "") or None)


def _message(record):
    """The formatted message; the raw one when its arguments do not fit (a bad record is still stored)."""
    try:
        return record.getMessage()
    except (TypeError, ValueError):
        return str(record.msg)


# The class of every connection this module opens. A seam for fault injection: a test may put here
# a sqlite3.Connection subclass whose execute() fails on demand (tests/fault_sqlite.py). Production
# never changes it.
connection_factory = sqlite3.Connection


def connect(path, timeout=30.0):
    """Open the store with WAL and a busy timeout.

    Switching a new file to WAL needs it to itself, and SQLite answers "database is locked" at
    once, without its busy handler, when another process (the other gunicorn worker starting at
    the same moment) holds it: retry that for up to `timeout` seconds instead of failing the
    worker's boot. A file already in WAL mode is not switched again.
    """
    conn = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False,
                           factory=connection_factory)
    deadline = time.monotonic() + timeout
    delay = 0.005
    try:
        while True:
            try:
                if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    conn.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.2)
        conn.execute("PRAGMA synchronous=NORMAL")
    except BaseException:
        conn.close()
        raise
    return conn


def _statements(script):
    """Split an SQL script into complete statements (trigger bodies included)."""
    out, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            out.append(current.strip())
            current = ""
    if current.strip():
        out.append(current.strip())
    return out


def _has_v1_events(conn):
    """True when `events` is the version-1 table whose primary key is event_id."""
    columns = conn.execute("PRAGMA table_info(events)").fetchall()
    return any(name == "event_id" and pk for _, name, _, _, _, pk in columns)


def migrate(conn):
    """Bring the store at `conn` to the current schema; inside the caller's write transaction.

    Version 1 files get the new `events` table (rows copied); files of an older version get
    the current triggers; both, and a store whose rollups were invalidated, get every rollup
    rebuilt from the raw rows.
    """
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    old_events = _has_v1_events(conn)
    if old_events:
        conn.execute("ALTER TABLE events RENAME TO events_v1")
        conn.execute("DROP INDEX IF EXISTS events_ts")
    had_totals = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'ev_day_total'").fetchone()
    for statement in _statements(_TABLES):
        conn.execute(statement)
    present = {row[1] for row in conn.execute("PRAGMA table_info(events)")}
    for column, declaration in _ADDED_EVENT_COLUMNS:
        if column not in present:
            conn.execute(f"ALTER TABLE events ADD COLUMN {column} {declaration}")
    if old_events:
        conn.execute(f"INSERT INTO events ({_V1_EVENT_COLUMNS}) SELECT {_V1_EVENT_COLUMNS} FROM events_v1"
                     " ORDER BY ts ON CONFLICT DO NOTHING")
        conn.execute("DROP TABLE events_v1")
    if version < SCHEMA_VERSION:  # triggers of an older version: replace them
        for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
            conn.execute(f'DROP TRIGGER IF EXISTS "{name}"')
    for statement in _statements(_TRIGGERS + _SEED):
        conn.execute(statement)
    if version < SCHEMA_VERSION or conn.execute(
            "SELECT 1 FROM store_meta WHERE key = 'rollups'").fetchone() is None:
        _rebuild(conn)
    elif not had_totals:  # a store of the previous version 4: its per-day totals, once
        for statement in _statements(_TOTALS_FILL):
            conn.execute(statement)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _rebuild(conn):
    """Recompute every rollup from the raw tables (inside the caller's transaction)."""
    for table in _ROLLUP_TABLES:
        conn.execute(f"DELETE FROM {table}")
    for statement in _statements(_REBUILD):
        conn.execute(statement)


@contextlib.contextmanager
def _write_transaction(path):
    """A connection inside BEGIN IMMEDIATE: committed on success, rolled back on any error."""
    conn = connect(path)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
    finally:
        conn.close()


# -- faults and recovery ------------------------------------------------------------------

class StorageUnavailable(Exception):
    """The local store cannot take a record now (queue full, writer failing, store closed); retry later."""


_RECORD_KINDS = ("event", "request", "dependency", "trace")
_TABLE_OF = {"event": "events", "request": "requests", "dependency": "dependencies", "trace": "traces"}
_IDLE_TICK = 1.0               # the writer wakes at least this often when idle
_CHECK_INTERVAL = 2.0          # seconds between checks that TELEMETRY_DB is still the file the writer has open
_BACKOFF_MIN, _BACKOFF_MAX = 0.05, 2.0
_FAILURE_LOG_INTERVAL = 60.0
_PRUNE_INTERVAL = 3600.0       # retention pass, by the store's clock
_SIZE_CHECK_INTERVAL = 60.0    # LOCAL_MAX_MB check, monotonic seconds
_CHUNK = 2000                  # rows per pruning or salvage transaction
_QUEUE_WARN = 0.8              # problems() reports the queue from this fill level
_MB = 1024 * 1024

_REASONS = {"corrupt": "database corrupt", "full": "disk full", "busy": "database locked",
            "io": "disk I/O error", "readonly": "database read-only", "cantopen": "cannot open the database file",
            "schema": "tables missing", "replaced": "database file replaced or deleted", "other": "database error"}


def _classify(exc):
    """One of the _REASONS keys for a sqlite3 error (by its SQLite error name, else by its message)."""
    name = getattr(exc, "sqlite_errorname", None) or ""
    msg = str(exc).lower()
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")) or "malformed" in msg or "not a database" in msg:
        return "corrupt"
    if name.startswith("SQLITE_FULL") or "is full" in msg:
        return "full"
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in msg or "busy" in msg:
        return "busy"
    if name.startswith("SQLITE_IOERR") or "i/o error" in msg:
        return "io"
    if name.startswith("SQLITE_READONLY") or "readonly" in msg:
        return "readonly"
    if name.startswith("SQLITE_CANTOPEN") or "unable to open" in msg:
        return "cantopen"
    if "no such table" in msg:
        return "schema"
    return "other"


def _identity(path):
    """(device, inode) of the file at `path`, or None when there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _rollback(conn):
    """Roll back the open transaction, if any, ignoring a failure to do so."""
    try:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    except sqlite3.Error:
        pass


def _close_quietly(conn):
    if conn is not None:
        try:
            conn.close()
        except sqlite3.Error:
            pass


def _remove_stale_sidecars(path):
    """Remove the -wal/-shm/-journal of a database file that no longer exists.

    A new file at the same path would otherwise pick up the old write-ahead log and shared memory.
    """
    for suffix in ("-wal", "-shm", "-journal"):
        with contextlib.suppress(OSError):
            os.remove(path + suffix)


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _iso(ts):
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _midnight(day):
    return datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=timezone.utc).timestamp()


class _ReadGate:
    """Keeps this process's reads and the writer's switch to another file apart.

    A read connection still open on the old file when the writer opens the new one could, when it
    closes last, delete the new file's -wal and -shm (SQLite removes them by name).
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._switching = False

    @contextlib.contextmanager
    def reading(self):
        with self._cond:
            self._cond.wait_for(lambda: not self._switching, 10.0)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def switching(self):
        with self._cond:
            self._switching = True
            self._cond.wait_for(lambda: self._readers == 0, 10.0)
        try:
            yield
        finally:
            with self._cond:
                self._switching = False
                self._cond.notify_all()


class _Writer:
    """One start()'s writer: its queue, the batch in hand, its connection and its maintenance."""

    def __init__(self, capacity):
        # The queue: a deque bounded by `room` under `lock` (queue.Queue's put_nowait costs three times more).
        # Before the writer waits for `wake` it sets `wake_at`: the queue length at which a put sets `wake`
        # (1 when idle; the rest of a batch while gathering one, so a busy writer is not woken per record).
        self.items = collections.deque()
        self.room = capacity       # 0 once closed
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.wake_at = math.inf
        self.held = []             # lists of queue items taken and not yet committed: the batch in hand
        self.encoded = None        # (rows by insert kind, count) of `held`, built once per batch
        self.claims = []           # pending files whose rows are in `held`
        self.conn = None
        self.identity = None       # (device, inode) of the file `conn` opened
        self.sidecars = {}         # (device, inode) of that file's -wal and -shm
        self.thread = None
        self.stopping = threading.Event()
        self.abort = threading.Event()
        self.stop_deadline = math.inf
        self.closed = False
        self.abandoned = False     # close() took the batch in hand over: never commit it
        self.commit_lock = threading.Lock()
        self.attempts = 0
        self.job = None            # maintenance in progress: a generator, one short transaction per step
        self.job_waiters = []
        self.check_now = False
        self.next_check = 0.0
        self.next_retention = -math.inf      # store clock
        self.next_size_check = 0.0           # monotonic
        self.salvage_new = []      # corrupt files to copy readable rows from (not yet recorded in store_meta)
        self.salvage_scan = True


class LocalStore:
    """The local sink: queues records in memory (bounded) and writes them in batches on a writer thread.

    The writer survives every SQLite error: transient ones (locked, disk full, I/O) are retried
    with backoff while the batch is kept; a database file replaced or deleted while open is
    reopened (created again with its schema); a corrupt one is moved aside, a new one started
    and its readable rows copied back. While the writer fails, events are refused
    (StorageUnavailable, which POST /event answers with 503); what close() cannot write in time
    is saved next to the database and imported by the next start(). Rows older than
    `retention_days`, and the oldest days while the database uses more than `max_mb`, are pruned
    by the writer in short transactions.
    """

    def __init__(self, path, batch_size=500, flush_interval=0.2, top=10, *, queue_capacity=None,
                 retention_days=None, max_mb=None, shutdown_grace=None, clock=time.time):
        defaults = Settings()
        self.path = path
        self.top = top
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.queue_capacity = int(queue_capacity or defaults.local_queue_capacity)
        self.retention_days = int(retention_days or defaults.local_retention_days)
        self.max_mb = float(max_mb or defaults.local_max_mb)
        self.shutdown_grace = float(defaults.shutdown_grace if shutdown_grace is None else shutdown_grace)
        self.clock = clock
        self._w = None
        self.written = 0
        self.write_errors = 0      # records dropped because they could not be encoded
        self.saved = 0             # records saved to the pending file by close()
        self.lost = 0              # records neither written nor saved by close()
        self.imported = 0
        self.salvaged = 0
        self.reopened = 0
        self.quarantined = []      # where corrupt files were moved
        self.last_prune = None
        self.last_error = None
        self._failing = False
        self._failing_since = None
        self._reason = None
        self._next_failure_log = 0.0
        self._size_problem = None
        self._suspect = False      # a reader saw a corrupt page
        self._schema_ready = False
        self._schema_identity = None
        self._schema_lock = threading.Lock()
        self._gate = _ReadGate()

    @classmethod
    def from_settings(cls, settings, **overrides):
        """The store of `settings` (TELEMETRY_DB and the LOCAL_* settings); keyword arguments override."""
        kwargs = dict(batch_size=settings.local_batch_size, flush_interval=settings.local_flush_interval,
                      top=settings.usage_top, queue_capacity=settings.local_queue_capacity,
                      retention_days=settings.local_retention_days, max_mb=settings.local_max_mb,
                      shutdown_grace=settings.shutdown_grace)
        kwargs.update(overrides)
        return cls(settings.telemetry_db, **kwargs)

    # -- schema ----------------------------------------------------------
    def _create_schema(self):
        """Create (or migrate) the database file, its tables, rollups and triggers."""
        with self._schema_lock:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            with _write_transaction(self.path) as conn:
                migrate(conn)
            self._schema_identity = _identity(self.path)
            self._schema_ready = True

    def _config_error(self, reason):
        return ConfigError(f"TELEMETRY_DB={self.path} cannot be opened or created: {reason}")

    def _diagnose(self, exc):
        """The reason, made specific where SQLite or the OS is vague ("unable to open database file")."""
        folder = os.path.dirname(os.path.abspath(self.path))
        reason = f"{exc.strerror}: {exc.filename}" if isinstance(exc, OSError) and exc.strerror else str(exc)
        parent = folder
        while parent and not os.path.exists(parent):
            parent = os.path.dirname(parent) if os.path.dirname(parent) != parent else ""
        if parent and not os.path.isdir(parent):
            return f"{parent} is a file, not a folder"
        if os.path.isdir(self.path):
            return f"{reason} (it is a folder)"
        if not os.access(folder, os.W_OK):
            return f"{reason} (the folder {folder} is not writable)"
        if os.path.exists(self.path) and not os.access(self.path, os.W_OK):
            return f"{reason} (the file is not writable)"
        return reason

    # -- sink protocol -------------------------------------------------
    def start(self):
        """Open or create the database, claim records an earlier shutdown saved, start the writer.

        Raises config.ConfigError naming TELEMETRY_DB when the file cannot be opened or created; a
        corrupt file is moved aside and a new one started; a full disk or a locked file is retried
        by the writer (events are refused meanwhile).
        """
        w = _Writer(self.queue_capacity)
        self._failing, self._failing_since, self._reason = False, None, None
        self._schema_ready = False  # a forked worker checks the file again
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        except OSError as exc:
            raise self._config_error(self._diagnose(exc)) from None
        for attempt in (1, 2):
            try:
                self._open(w)
                break
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    self._note_failure("full", exc)
                    break
                raise self._config_error(self._diagnose(exc)) from None
            except sqlite3.Error as exc:
                kind = _classify(exc)
                if kind == "corrupt" and attempt == 1 and self._quarantine(w, exc):
                    continue
                if kind in ("full", "busy", "io"):
                    self._note_failure(kind, exc)  # the writer keeps trying
                    break
                raise self._config_error(self._diagnose(exc)) from None
        w.claims = self._claim_pending()
        self._w = w
        w.thread = threading.Thread(target=self._run, args=(w,), name="local-store-writer", daemon=True)
        w.thread.start()

    # The request path only queues the record; rows are built on the writer thread.
    def track_event(self, rec):
        """Queue one event; StorageUnavailable when the queue is full or the writer is failing."""
        if self._failing:
            raise StorageUnavailable(f"the local store cannot write ({self._reason}); events are refused until it "
                                     "recovers")
        self._put("event", rec)

    def track_request(self, rec):
        """Queue one request (also while the writer is failing, as long as there is room)."""
        self._put("request", rec)

    def track_dependency(self, rec):
        """Queue one dependency."""
        self._put("dependency", rec)

    def track_trace(self, record):
        """Queue one log record of the trace logger (a `traces` row)."""
        self._put("trace", record)

    def _put(self, kind, record):
        """Queue one record while there is room (waking the writer if it sleeps), else StorageUnavailable."""
        w = self._w
        with w.lock:
            if len(w.items) < w.room:
                w.items.append((kind, record))
                if len(w.items) >= w.wake_at:
                    w.wake.set()
                return
        raise _refusal(w)

    @staticmethod
    def _control(w, item):
        """Queue a control item (flush, stop, prune, check): it never counts against the capacity."""
        with w.lock:
            w.items.append(item)
        w.wake.set()

    def flush(self, timeout=10.0):
        """Wait until every row queued before this call is committed (False when that took too long)."""
        w = self._w
        if w is None:
            return True
        if w.thread is None or not w.thread.is_alive():
            return not w.held and not w.items
        done = threading.Event()
        self._control(w, ("flush", done))
        return done.wait(timeout)

    def prune(self, timeout=60.0):
        """Run the retention and size pruning now (on the writer) and wait for it; returns last_prune."""
        w = self._w
        if not self._writer_running():
            raise StorageUnavailable("the local store is not running")
        done = threading.Event()
        self._control(w, ("prune", done))
        done.wait(timeout)
        return self.last_prune

    def close(self, timeout=None):
        """Write what is queued within `timeout` seconds (default: shutdown_grace) and stop the writer.

        What could not be written in time -- the batch in hand and the rest of the queue -- is
        appended to `<db>.pending.jsonl`, which the next start() imports.
        """
        w = self._w
        if w is None or w.closed:
            return
        timeout = self.shutdown_grace if timeout is None else max(0.0, timeout)
        deadline = time.monotonic() + timeout
        w.closed = True
        w.room = 0
        w.stop_deadline = deadline - min(1.0, timeout * 0.25)  # the rest of the time is for saving
        w.stopping.set()
        self._control(w, ("stop", None))
        w.thread.join(max(0.0, w.stop_deadline - time.monotonic()))
        stuck = w.thread.is_alive()
        locked = True
        if stuck:  # inside SQLite (a lock held elsewhere, a slow disk): take the batch over
            if w.conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    w.conn.interrupt()
            locked = w.commit_lock.acquire(timeout=max(0.0, min(0.5, deadline - time.monotonic())))
        try:
            with w.lock:
                w.abandoned = True
                leftovers = w.held + [list(w.items)]
                w.items.clear()
        finally:
            if stuck and locked:
                w.commit_lock.release()
        w.abort.set()
        rows, count = self._encode(leftovers)
        if count and stuck and not locked:
            log.warning("local store: the writer was stuck in a commit at shutdown; its batch is saved as well "
                        "(events are stored once, other rows may count twice)")
        if not count or self._save_pending(rows, count):
            for claim in w.claims:
                with contextlib.suppress(OSError):
                    os.remove(claim)

    def health(self):
        """Counters and state for /healthz."""
        w = self._w
        if w is None:
            return {"started": False}
        report = {"started": True, "queued": len(w.items), "queue_capacity": self.queue_capacity,
                  "written": self.written, "write_errors": self.write_errors,
                  "writer_alive": w.thread is not None and w.thread.is_alive(),
                  "failing": self._failing, "last_error": self.last_error,
                  "retention_days": self.retention_days, "max_mb": self.max_mb, "db_mb": self._db_mb(),
                  "last_prune": self.last_prune}
        for key in ("saved", "lost", "imported", "salvaged", "reopened"):
            if getattr(self, key):
                report[key] = getattr(self, key)
        if self.quarantined:
            report["quarantined"] = list(self.quarantined)
        return report

    def problems(self, grace_s=None):
        """What is wrong with the store now, in short sentences, for /healthz (empty when all is well).

        `grace_s` (the Azure sink's outage grace) does not apply: while the writer fails, events
        are refused at once.
        """
        w = self._w
        if w is None or w.thread is None or not w.thread.is_alive():
            return ["local store writer is not running"]
        out = []
        if self._failing:
            since = time.monotonic() - (self._failing_since or time.monotonic())
            out.append(f"local store writer failing for {since:.0f} s: {self._reason} ({self.last_error}); "
                       "events are refused")
        queued = len(w.items)
        if queued >= _QUEUE_WARN * self.queue_capacity:
            out.append(f"local store queue {100 * queued // self.queue_capacity} % full "
                       f"({queued} of {self.queue_capacity})")
        if self._size_problem:
            out.append(self._size_problem)
        if self.lost:
            out.append(f"local store lost {self.lost} records at shutdown (the pending file could not be written)")
        return out

    def _db_mb(self):
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):
                total += os.path.getsize(self.path + suffix)
        return round(total / _MB, 3)

    # -- writer ----------------------------------------------------------
    def _run(self, w):
        """The writer thread: one transaction per batch; recovery and maintenance in between."""
        mark_internal_thread()
        try:
            self._load_claims(w)
            self._write_loop(w)
        except BaseException as exc:  # a bug: refuse events rather than accept what nobody will write
            self._note_failure("other", exc)
            self._reason = "writer stopped"
            log.exception("local store writer for %s stopped", self.path)
        finally:
            self._drop_conn(w)

    def _write_loop(self, w):
        waiters = []
        while not w.abandoned:
            if w.stopping.is_set() and time.monotonic() >= w.stop_deadline:
                return  # close() saves what is left
            if not w.held:
                waiters = self._gather(w)
            if w.held:
                delay = self._commit(w)
                if delay is not None:  # not written: the batch stays in hand
                    if delay:
                        w.abort.wait(min(delay, max(0.0, w.stop_deadline - time.monotonic())))
                    continue
            for waiter in waiters:
                waiter.set()
            waiters = []
            if w.stopping.is_set():
                if not w.items:
                    return
                continue
            self._maintain(w)

    def _gather(self, w):
        """Take the next batch into w.held: up to batch_size records, or what came within flush_interval."""
        count, waiters, deadline = 0, [], None
        timeout = 0.0 if w.job is not None or w.job_waiters or w.stopping.is_set() else _IDLE_TICK
        while True:
            remaining = self.batch_size - count
            items = self._take(w, remaining, timeout, 1 if deadline is None else remaining)
            if items:
                for kind, payload in items:
                    if kind in _TABLE_OF:
                        count += 1
                    elif kind == "flush":
                        waiters.append(payload)
                    elif kind == "prune":
                        w.job_waiters.append(payload)
                        w.next_retention, w.next_size_check = -math.inf, 0.0
                    elif kind == "check":
                        w.check_now = True
            elif deadline is None:
                break  # idle
            if deadline is None:
                deadline = time.monotonic() + self.flush_interval
            if waiters or count >= self.batch_size or w.stopping.is_set() or w.check_now or w.job_waiters:
                break
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                break
        return waiters

    @staticmethod
    def _take(w, limit, timeout, enough=1):
        """Move up to `limit` queue items into w.held, first waiting up to `timeout` while fewer than
        `enough` are queued (a control item wakes it at once); return them."""
        dq = w.items
        if len(dq) < enough and timeout > 0 and not w.stopping.is_set():
            w.wake_at = enough
            if len(dq) < enough:  # checked again after `wake_at` is set: a put after this sets `wake`
                w.wake.wait(timeout)
            w.wake_at = math.inf
            w.wake.clear()  # after the wait, so a control item queued before it (which sets `wake`) ends it
        with w.lock:
            n = min(len(dq), max(limit, 1))
            if not n:
                return None
            popleft = dq.popleft
            items = [popleft() for _ in range(n)]
            w.held.append(items)
        return items

    def _commit(self, w):
        """Write the batch in hand in one transaction: None when done, else seconds to wait before retrying."""
        if w.encoded is None:
            w.encoded = self._encode(w.held)
        rows, count = w.encoded
        if not count:
            with w.commit_lock:
                w.held, w.encoded = [], None
            return None
        try:
            conn = w.conn or self._open(w)
            conn.execute("BEGIN IMMEDIATE")
            try:
                max_params = _max_params(conn)
                for kind, params in rows.items():
                    _insert_many(conn, kind, params, max_params)
                with w.commit_lock:
                    if w.abandoned:  # close() saved this batch: never write it as well
                        _rollback(conn)
                        return None
                    conn.execute("COMMIT")
                    replaced = _identity(self.path) != w.identity
                    if not replaced:
                        w.held, w.encoded = [], None
            except BaseException:
                _rollback(conn)
                raise
        except (sqlite3.Error, OSError) as exc:
            return self._recover(w, exc)
        if replaced:  # the file was replaced or deleted: the batch may have gone to the old one
            return self._recover(w, None)
        self.written += count
        w.attempts = 0
        if w.claims:
            self.imported += count
            log.info("local store imported %d records saved at an earlier shutdown", count)
            for claim in w.claims:
                with contextlib.suppress(OSError):
                    os.remove(claim)
            w.claims = []
        if self._failing:
            if self._reason == _REASONS["full"]:
                self._checkpoint(w)
            self._recovered()
        return None

    @staticmethod
    def _checkpoint(w):
        """Move the write-ahead log into the database and truncate it: on a full disk, the space it held.

        SQLite checkpoints on its own only once the log reaches 1000 pages; until then a disk too
        full for the log to grow stays full however much room the log would give back.
        """
        if w.conn is not None:
            with contextlib.suppress(sqlite3.Error):
                w.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _recover(self, w, exc):
        """Classify a failed write and repair what can be; the seconds to wait before the next attempt."""
        w.attempts += 1
        if exc is None:
            kind = "replaced"
        elif isinstance(exc, OSError):
            kind = "full" if exc.errno == errno.ENOSPC else "cantopen"
        else:
            kind = _classify(exc)
        if kind == "corrupt":
            if self._quarantine(w, exc):
                return 0.0
        elif kind == "replaced" or w.conn is not None and _identity(self.path) != w.identity:
            log.warning("local store: %s was replaced or deleted while open; writing to the file at that path now",
                        self.path)
            self.reopened += 1
            self._drop_conn(w)
            if w.attempts <= 3:
                return 0.0
        elif kind == "full":
            self._checkpoint(w)
        elif kind != "busy":
            self._drop_conn(w)  # reopened (and its schema checked) by the next attempt
        self._note_failure(kind if kind in _REASONS else "other", exc or "file replaced")
        return min(_BACKOFF_MIN * 2 ** (w.attempts - 1), _BACKOFF_MAX)

    def _note_failure(self, kind, exc):
        reason = _REASONS[kind]
        self.last_error = str(exc)
        now = time.monotonic()
        self._reason = reason
        if not self._failing:
            self._failing_since = now
            self._failing = True
            self._next_failure_log = now + _FAILURE_LOG_INTERVAL
            log.error("local store cannot write to %s: %s (%s); retrying, events are refused until it recovers",
                      self.path, reason, exc)
        elif now >= self._next_failure_log:
            self._next_failure_log = now + _FAILURE_LOG_INTERVAL
            w = self._w
            log.error("local store still cannot write to %s after %.0f s: %s (%s); %d records queued",
                      self.path, now - self._failing_since, reason, exc, len(w.items) if w else 0)

    def _recovered(self):
        log.warning("local store writes to %s resumed after %.1f s", self.path,
                    time.monotonic() - self._failing_since)
        self._failing, self._failing_since, self._reason = False, None, None

    def _open(self, w):
        """(Re)open the writer's connection, creating the folder, the file and its schema when needed."""
        with self._gate.switching():
            # The -wal and -shm of a file replaced or deleted while open are its own: a new file at
            # the same path would read the old log as its own pages. Those still at the path are
            # removed (once this connection, which holds them, is closed); another worker's are kept.
            current = _identity(self.path)
            stale = [] if current is None or current == w.identity else [
                self.path + suffix for suffix, ident in w.sidecars.items() if _identity(self.path + suffix) == ident]
            self._drop_conn(w)
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            if not os.path.exists(self.path):
                _remove_stale_sidecars(self.path)
            for sidecar in stale:
                with contextlib.suppress(OSError):
                    os.remove(sidecar)
            conn = connect(self.path)
            try:
                conn.execute("BEGIN IMMEDIATE")
                migrate(conn)
                conn.execute("COMMIT")
                identity = _identity(self.path)
                if identity is None:
                    raise sqlite3.OperationalError("unable to open database file (it vanished)")
            except BaseException:
                _rollback(conn)
                _close_quietly(conn)
                raise
            w.conn, w.identity = conn, identity
            w.sidecars = {suffix: _identity(self.path + suffix) for suffix in ("-wal", "-shm")}
            w.salvage_scan = True
            self._schema_identity, self._schema_ready = identity, True
        return conn

    @staticmethod
    def _drop_conn(w):
        """Close the writer's connection (w.identity and w.sidecars stay: they name the file it had open)."""
        conn, w.conn = w.conn, None
        _close_quietly(conn)

    def _quarantine(self, w, exc):
        """Move a corrupt database (with its -wal/-shm) aside as <name>.corrupt-<UTC time>: ONE error line."""
        with self._gate.switching():
            found = _identity(self.path)
            self._drop_conn(w)
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            target, n = f"{self.path}.corrupt-{stamp}", 1
            while os.path.exists(target):
                target, n = f"{self.path}.corrupt-{stamp}-{n}", n + 1
            try:
                if found is not None and _identity(self.path) == found:  # not already replaced by another process
                    os.replace(self.path, target)
                    for suffix in ("-wal", "-shm"):
                        if os.path.exists(self.path + suffix):
                            os.replace(self.path + suffix, target + suffix)
            except OSError as move_exc:
                self._note_failure("corrupt", f"{exc}; cannot move it aside: {move_exc}")
                return False
        self.quarantined.append(target)
        w.salvage_new.append(target)
        log.error("local store: %s is corrupt (%s); moved it aside to %s and started a new store (its readable rows "
                  "are copied back in the background)", self.path, exc, target)
        return True

    def _encode(self, held):
        """(rows by insert kind, count) of queue items: records, and rows imported from a pending file."""
        groups = {kind: [] for kind in _RECORD_KINDS}
        rows = {}
        for items in held:
            for kind, payload in items:
                group = groups.get(kind)
                if group is not None:
                    group.append(payload)
                elif kind == "rows":
                    for key, params in payload.items():
                        rows.setdefault(key, []).extend(params)
        for kind, records in groups.items():
            if records:
                encoded = self._encode_kind(kind, records)
                if encoded:
                    rows.setdefault(kind, []).extend(encoded)
        return rows, sum(len(params) for params in rows.values())

    def _encode_kind(self, kind, records):
        try:
            return self._rows(kind, records)
        except Exception:  # a malformed record must not stop the writer nor cost the others
            good, bad = [], 0
            for rec in records:
                try:
                    good.extend(self._rows(kind, [rec]))
                except Exception:
                    bad += 1
            self.write_errors += bad
            log.error("local store could not encode %d %s record(s); dropped them", bad, kind)
            return good

    @staticmethod
    def _rows(kind, records):
        """The INSERT parameters of one kind of record."""
        if kind == "event":
            rows = []
            for rec in records:
                props = rec.properties
                crud = rec.name == "CrudActivity"
                rows.append((rec.event_id, rec.timestamp, _day(rec.timestamp), rec.name, rec.user_id or "",
                             props.get("action") if crud else None, props.get("entity") if crud else None,
                             rec.operation_id, _properties_json(_without_event_id(props)), rec.anonymous_id,
                             rec.session_id,
                             int(rec.client_event_id)))
            return rows
        if kind == "request":
            return [(rec.timestamp, _day(rec.timestamp), rec.name, rec.status, int(rec.success),
                     rec.duration_ms, rec.user_id or "", rec.operation_id) for rec in records]
        if kind == "trace":
            return [_trace_row(rec) for rec in records]
        return [(rec.timestamp, _day(rec.timestamp), rec.type, rec.target, rec.name, rec.result_code,
                 int(rec.success), rec.duration_ms, rec.operation_id) for rec in records]

    # -- what close() could not write -------------------------------------------------------
    @property
    def pending_path(self):
        """The JSON-lines file close() saves unwritten records to (one {"kind", "row"} object a line)."""
        return self.path + ".pending.jsonl"

    def _save_pending(self, rows, count):
        """Append rows to the pending file; ONE error line with the count when even that fails."""
        path = self.pending_path
        size = None
        try:
            lines = []
            for key, params in rows.items():
                kind = key.split()[-1]  # "ignore event" -> "event"
                columns = _COLUMNS[kind]
                lines.extend(json.dumps({"kind": kind, "row": dict(zip(columns, row))}, separators=(",", ":"))
                             for row in params)
            size = os.path.getsize(path) if os.path.exists(path) else 0
            with open(path, "a", encoding="utf-8") as fh:
                fh.write("\n".join(lines) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        except (OSError, TypeError, ValueError) as exc:
            if size is not None:
                with contextlib.suppress(OSError):
                    os.truncate(path, size)  # no half record for the next start to trip on
            self.lost += count
            log.error("local store lost %d records at shutdown: they could not be written to %s nor saved to %s (%s)",
                      count, self.path, path, exc)
            return False
        self.saved += count
        log.warning("local store saved %d records it could not write in time to %s; the next start imports them",
                    count, path)
        return True

    def _claim_pending(self):
        """Rename the pending file (and claims of dead processes) to this process's claims; return them."""
        base, pid = self.pending_path, os.getpid()
        candidates = [base] if os.path.exists(base) else []
        for path in sorted(glob.glob(glob.escape(base) + ".*.*")):
            owner = path[len(base) + 1:].split(".")[0]
            if owner.isdigit() and (int(owner) == pid or not _pid_alive(int(owner))):
                candidates.append(path)
        claims = []
        for n, path in enumerate(candidates):
            claim = f"{base}.{pid}.{n}"
            while claim in candidates[n + 1:] or (claim != path and os.path.exists(claim)):
                claim += "x"
            try:
                os.replace(path, claim)
            except OSError:  # another worker claimed it first
                continue
            claims.append(claim)
        return claims

    def _load_claims(self, w):
        """Put the rows of the claimed pending files in hand: the writer's first batch."""
        rows, bad = {}, 0
        for claim in w.claims:
            try:
                with open(claim, encoding="utf-8") as fh:
                    for line in fh:
                        if not line.strip():
                            continue
                        try:
                            item = json.loads(line)
                            kind, row = item["kind"], item["row"]
                            columns = _COLUMNS[kind]
                            rows.setdefault(f"ignore {kind}", []).append(
                                tuple(row.get(c, _COLUMN_DEFAULTS.get(c)) for c in columns))
                        except (ValueError, KeyError, TypeError, AttributeError):
                            bad += 1
            except OSError as exc:
                log.error("local store cannot read %s (%s); it is left for the next start", claim, exc)
        if bad:
            log.error("local store skipped %d unreadable line(s) of %s", bad, self.pending_path)
        if rows:
            w.held.append([("rows", rows)])
        elif w.claims:
            for claim in w.claims:
                with contextlib.suppress(OSError):
                    os.remove(claim)
            w.claims = []

    # -- maintenance between batches ---------------------------------------------------------
    def _maintain(self, w):
        """Notice a replaced, deleted or corrupt file; run one step of salvage or pruning."""
        now = time.monotonic()
        if w.check_now or now >= w.next_check:
            w.check_now = False
            w.next_check = now + _CHECK_INTERVAL
            if w.conn is None or _identity(self.path) != w.identity:
                if w.conn is not None:
                    log.warning("local store: %s was replaced or deleted while open; reopening it", self.path)
                    self.reopened += 1
                try:
                    self._open(w)
                except (sqlite3.Error, OSError) as exc:
                    self._recover(w, exc)
                    return
                if self._failing and not w.held:
                    self._recovered()
            if self._suspect:
                self._suspect = False
                self._verify(w)
        if w.conn is None:  # moved aside just now, or not opened yet: start the file at once
            try:
                self._open(w)
            except (sqlite3.Error, OSError) as exc:
                self._recover(w, exc)
                return
            if self._failing and not w.held:
                self._recovered()
        if w.job is None:
            w.job = self._next_job(w)
            if w.job is None:
                for waiter in w.job_waiters:
                    waiter.set()
                w.job_waiters = []
                return
        try:
            next(w.job)
        except StopIteration:
            w.job = None
        except (sqlite3.Error, OSError) as exc:
            w.job = None
            if isinstance(exc, sqlite3.Error) and _classify(exc) == "corrupt":
                self._quarantine(w, exc)
            else:
                log.warning("local store maintenance of %s failed (%s); it is tried again later", self.path, exc)

    def _verify(self, w):
        """A reader saw a corrupt page: check the file with a fresh connection; move it aside if corrupt."""
        try:
            probe = sqlite3.connect(self.path, timeout=5, factory=connection_factory)
            try:
                result = probe.execute("PRAGMA quick_check(1)").fetchone()[0]
            finally:
                probe.close()
        except sqlite3.Error as exc:
            if _classify(exc) != "corrupt":
                return
            result = str(exc)
        if result != "ok":
            self._quarantine(w, sqlite3.DatabaseError(f"quick_check: {result}"))

    def _next_job(self, w):
        """The maintenance due now (a generator), or None."""
        if w.salvage_new or w.salvage_scan:
            job = self._salvage_job(w)
            if job is not None:
                return job
        now = self.clock()
        if now >= w.next_retention:
            w.next_retention = now + _PRUNE_INTERVAL
            return self._retention_job(w, now)
        if time.monotonic() >= w.next_size_check:
            w.next_size_check = time.monotonic() + _SIZE_CHECK_INTERVAL
            used = self._used_mb(w.conn)
            if used > self.max_mb:
                return self._size_job(w, used)
            self._size_problem = None
        return None

    @staticmethod
    def _used_mb(conn):
        """Megabytes of the database's pages in use (the file never shrinks: free pages are reused)."""
        pages, free, size = (conn.execute(f"PRAGMA {p}").fetchone()[0]
                             for p in ("page_count", "freelist_count", "page_size"))
        return (pages - free) * size / _MB

    def _step(self, w, work):
        """One maintenance transaction: work(conn), keeping the rollups' 'complete' marker as it was."""
        conn = w.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            marker = conn.execute("SELECT value FROM store_meta WHERE key = 'rollups'").fetchone()
            result = work(conn)
            # Deleting whole old days (their rollups first) keeps the rollups exact: put back the marker
            # the raw tables' *_delete_stale triggers removed.
            if marker and marker[0] == "complete" and conn.execute(
                    "SELECT 1 FROM store_meta WHERE key = 'rollups'").fetchone() is None:
                conn.execute("INSERT INTO store_meta (key, value) VALUES ('rollups', 'complete')")
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
        return result

    def _retention_job(self, w, now):
        cutoff = _day(now - self.retention_days * _DAY_SECONDS)
        counts = yield from self._prune_before(w, cutoff)
        self.last_prune = {"at": _iso(now), "reason": "retention", "before": cutoff, "rows": counts}
        if any(counts.values()):
            log.info("local store pruned the rows before %s (LOCAL_RETENTION_DAYS=%d): %s", cutoff,
                     self.retention_days, _describe(counts))
        yield from self._compact_job(w, now)

    def _compact_job(self, w, now):
        """Compact every closed day not compacted yet (see _compact_day): one short transaction a day."""
        if w.conn.execute("SELECT value FROM store_meta WHERE key = 'rollups'").fetchone() != ("complete",):
            return  # the dashboard reads the raw rows until a rebuild (which drops the compaction anyway)
        for day in _days_to_compact(w.conn, _day(now - (OPEN_DAYS - 1) * _DAY_SECONDS)):
            self._step(w, lambda conn: _compact_day(conn, day))
            yield

    def _size_job(self, w, used):
        today = _day(self.clock())
        first = last = None
        counts = collections.Counter()
        before = used
        while used > self.max_mb:
            oldest = self._oldest_day(w.conn)
            if oldest is None or oldest >= today:
                self._size_problem = (f"database uses {used:.1f} MB, over LOCAL_MAX_MB={self.max_mb:g}, with only "
                                      "today's rows left")
                log.error("local store: %s", self._size_problem)
                break
            following = _day(_midnight(oldest) + _DAY_SECONDS)
            counts.update((yield from self._prune_before(w, following)))
            first, last = first or oldest, oldest
            used = self._used_mb(w.conn)
        if first:
            self.last_prune = {"at": _iso(self.clock()), "reason": "size", "before": _day(_midnight(last) + _DAY_SECONDS),
                               "rows": dict(counts)}
            log.warning("local store: the database used %.1f MB, over LOCAL_MAX_MB=%g: pruned the oldest day(s) %s "
                        "(%s); %.1f MB used now", before, self.max_mb, first if first == last else f"{first} to {last}",
                        _describe(counts), used)

    @staticmethod
    def _oldest_day(conn):
        days = [conn.execute(f"SELECT MIN(ts) FROM {table}").fetchone()[0] for table in _TABLE_OF.values()]
        oldest = [_day(ts) for ts in days if ts is not None]
        oldest += [d for (d,) in (conn.execute(f"SELECT MIN(day) FROM {t}").fetchone()
                                  for t in ("ev_day", "req_day", "dep_day")) if d is not None]
        return min(oldest) if oldest else None

    def _prune_before(self, w, cutoff):
        """Delete every raw and rollup row of the days before `cutoff` (YYYY-MM-DD), a short transaction a step.

        The rollups of those days go first: once they are gone, deleting the raw rows keeps the
        rollups equal to the raw rows, so the 'complete' marker stays true (the raw tables'
        *_delete_stale triggers remove it; each step puts it back). A last sweep of the rollups
        removes what rows written meanwhile for those days added.
        """
        counts = collections.Counter()
        yield from self._prune_rollups(w, cutoff)
        cutoff_ts = _midnight(cutoff)
        for kind, table in _TABLE_OF.items():
            while True:
                n = self._step(w, lambda conn: _delete_raw_chunk(conn, table, cutoff_ts))
                counts[table] += n
                yield
                if n < _CHUNK:
                    break
        yield from self._prune_rollups(w, cutoff)
        return {table: counts[table] for table in _TABLE_OF.values()}

    def _prune_rollups(self, w, cutoff):
        for table, key, where in _ROLLUP_PRUNE:
            while True:
                n = self._step(w, lambda conn: _delete_chunk(conn, table, key, where, (cutoff,)))
                yield
                if n < _CHUNK:
                    break
        for table, key, column in _ROLLUP_PRUNE_BY_NAME:
            position = self._step(w, lambda conn: _delete_by_name(conn, table, key, column, cutoff, None))
            yield
            while position is not None:
                position = self._step(w, lambda conn: _delete_by_name(conn, table, key, column, cutoff, position))
                yield

    # -- salvage: readable rows of a corrupt file, newest first ---------------------------------
    def _salvage_job(self, w):
        """The salvage to run (recorded in store_meta, so a restart goes on where it stopped), or None."""
        conn = w.conn
        if w.salvage_new:
            with contextlib.suppress(sqlite3.Error):
                self._step(w, lambda c: c.executemany(
                    "INSERT OR IGNORE INTO store_meta (key, value) VALUES (?, ?)",
                    [(f"salvage:{path}", json.dumps({"path": path, "owner": os.getpid()}))
                     for path in w.salvage_new]))
                w.salvage_new = []
        w.salvage_scan = False
        for key, value in conn.execute("SELECT key, value FROM store_meta WHERE key >= 'salvage:' AND key < 'salvage;'"):
            state = json.loads(value)
            owner = state.get("owner")
            if owner not in (None, os.getpid()) and _pid_alive(owner):
                continue  # another worker is copying it
            state["owner"] = os.getpid()
            w.salvage_scan = True  # look again when this one is done
            return self._salvage(w, key, state)
        return None

    def _salvage(self, w, key, state):
        """Copy the rows of a corrupt file newest first, stepping past pages that cannot be read.

        Errors of the corrupt file end the copy (logged); errors of the store propagate, and
        the copy goes on from its recorded position later.
        """
        path = state["path"]
        try:
            source = sqlite3.connect(f"file:{urllib.parse.quote(os.path.abspath(path))}?mode=rw", uri=True,
                                     timeout=5, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            source, state["error"] = None, str(exc)
        try:
            for kind in _RECORD_KINDS if source is not None else ():
                if kind in state.get("done", ()):
                    continue
                sql = (f"SELECT rowid, {', '.join(_COLUMNS[kind])} FROM {_TABLE_OF[kind]} WHERE rowid < ?"
                       " ORDER BY rowid DESC")
                cursor, skip = state.get("cursor", {}).get(kind, 2 ** 63 - 1), 0
                while cursor > 0:
                    rows, unreadable = [], None
                    try:
                        for row in source.execute(sql, (cursor,)):
                            rows.append(row)
                            if len(rows) >= _CHUNK:
                                break
                    except sqlite3.DatabaseError as exc:
                        unreadable = exc
                    if unreadable is not None and not rows and (
                            _classify(unreadable) == "schema" or "not a database" in str(unreadable)):
                        if _classify(unreadable) != "schema":
                            state["error"] = str(unreadable)
                        break  # no such table in this (older) file, or no database at all
                    if rows:
                        cursor, skip = rows[-1][0], 0
                    elif unreadable is not None:  # the next page down cannot be read: step past it
                        state["unreadable"] = state.get("unreadable", 0) + (not skip)
                        skip = skip * 2 or 1
                        cursor -= skip
                        continue
                    else:
                        break  # no row left below the cursor
                    state.setdefault("cursor", {})[kind] = cursor
                    state["rows"] = state.get("rows", 0) + len(rows)
                    self._step(w, _salvage_step(kind, [row[1:] for row in rows], key, state))
                    self.salvaged += len(rows)
                    yield
                if state.get("error"):
                    break
                state.setdefault("done", []).append(kind)
        finally:
            _close_quietly(source)
        self._step(w, lambda conn: conn.execute("DELETE FROM store_meta WHERE key = ?", (key,)))
        if state.get("error"):
            log.warning("local store could not copy the rows of %s (%s); %d rows copied", path, state["error"],
                        state.get("rows", 0))
        else:
            log.warning("local store copied %d readable rows back from %s (%d unreadable ranges skipped)",
                        state.get("rows", 0), path, state.get("unreadable", 0))

    # -- usage -------------------------------------------------------------
    def rows(self, start, end):
        """Usage section rows (the shape monitoring_utils builds from) for [start, end]."""
        t0, t1 = start.timestamp(), end.timestamp()
        for attempt in (1, 2):
            missing = self._prepare_read(force=attempt == 2)
            with self._gate.reading():
                if missing:  # deleted and not recreated yet: an empty store's figures
                    conn = sqlite3.connect(":memory:")
                    conn.executescript(_SCHEMA)
                else:
                    conn = connect(self.path)
                try:
                    conn.execute("BEGIN")  # one snapshot for every section
                    try:
                        return list(_usage_rows(conn, t0, t1, self.top))
                    finally:
                        _rollback(conn)
                except sqlite3.DatabaseError as exc:
                    kind = _classify(exc)
                    if kind == "schema" and attempt == 1:
                        continue
                    if kind == "corrupt":
                        self._report_corrupt()
                        from log_analytics import UsageQueryError
                        raise UsageQueryError("the local store is damaged and is being recovered; try again shortly",
                                              status=503, retry_after=5) from None
                    raise
                finally:
                    conn.close()

    def _writer_running(self):
        w = self._w
        return w is not None and not w.closed and w.thread is not None and w.thread.is_alive()

    def _prepare_read(self, force=False):
        """Make sure the file has its tables; True when it is missing and the writer has not recreated it yet.

        While the writer runs, only the writer creates the file (it first closes its connection to
        the old one, which removes the old -wal and -shm).
        """
        if self._writer_running():
            if _identity(self.path) != self._schema_identity:
                self._control(self._w, ("check", None))
                deadline = time.monotonic() + 2.0
                while time.monotonic() < deadline and (_identity(self.path) is None
                                                       or _identity(self.path) != self._schema_identity):
                    time.sleep(0.01)
            if _identity(self.path) is None:
                return True
            if force:
                self._create_schema()
            return False
        if force or not self._schema_ready or _identity(self.path) != self._schema_identity:
            self._create_schema()
        return False

    def _report_corrupt(self):
        """A read saw a corrupt page: the writer checks the file and moves it aside."""
        self._suspect = True
        if self._writer_running():
            self._control(self._w, ("check", None))


def _refusal(w):
    if w.closed:
        return StorageUnavailable("the local store is closed")
    return StorageUnavailable("the local store cannot take more records (queue full)")


def _salvage_step(kind, params, key, state):
    """The transaction of one salvage step: the rows, and the progress that goes with them."""
    def work(conn):
        if params:
            _insert_many(conn, f"ignore {kind}", params)
        conn.execute("UPDATE store_meta SET value = ? WHERE key = ?", (json.dumps(state), key))
    return work


def _days_to_compact(conn, before):
    """The days before `before` (YYYY-MM-DD) that have rollup rows and are not compacted, oldest first."""
    days = set()
    for table in ("ev_day", "req_day", "dep_day"):
        day = ""
        while True:  # one index seek per day, not a scan of the day's rows
            row = conn.execute(f"SELECT day FROM {table} WHERE day > ? AND day < ? ORDER BY day LIMIT 1",
                               (day, before)).fetchone()
            if row is None:
                break
            day = row[0]
            days.add(day)
    done = {d for (d,) in conn.execute("SELECT day FROM compacted_days WHERE day < ?", (before,))}
    return sorted(days - done)


# (live table, top table, key columns, summed columns, how the OTHER row's key reads)
_COMPACT = (("ev_day", "ev_day_top", ("name",), ("n",), (OTHER,)),
            ("req_day", "req_day_top", ("name",), ("n", "failed", "sum_ms"), (OTHER,)),
            ("dep_day", "dep_day_top", ("type", "target"), ("n", "failed", "sum_ms"), (OTHER, OTHER)))


def _compact_day(conn, day):
    """Write `day`'s top lists (inside the caller's transaction) and mark the day compacted.

    Per dimension: the day's TOP_K rows by count (ties by name), and one OTHER row summing the
    rest, so the day's totals (count, failures, duration sum) are exactly those of its rollups.
    """
    for live, top, key, sums, other in _COMPACT:
        keys, cols = ", ".join(key), ", ".join(sums)
        conn.execute(f"DELETE FROM {top} WHERE day = ?", (day,))
        conn.execute(f"INSERT INTO {top} (day, {keys}, {cols}) SELECT day, {keys}, {cols} FROM {live}"
                     f" WHERE day = ? ORDER BY n DESC, {keys} LIMIT {int(TOP_K)}", (day,))
        rest = conn.execute(f"SELECT {', '.join(f'SUM({c})' for c in sums)} FROM (SELECT {cols} FROM {live}"
                            f" WHERE day = ? ORDER BY n DESC, {keys} LIMIT -1 OFFSET {int(TOP_K)})",
                            (day,)).fetchone()
        if rest[0]:
            marks = ", ".join("?" * (len(key) + len(sums)))
            conn.execute(f"INSERT INTO {top} (day, {keys}, {cols}) VALUES (?, {marks})"
                         f" ON CONFLICT DO UPDATE SET " + ", ".join(f"{c} = {c} + excluded.{c}" for c in sums),
                         (day,) + other + tuple(rest))
    conn.execute("INSERT OR IGNORE INTO compacted_days (day) VALUES (?)", (day,))


def _describe(counts):
    return ", ".join(f"{table} {n}" for table, n in counts.items() if n) or "nothing"


def _delete_chunk(conn, table, key, where, params):
    """Delete up to _CHUNK rows of `table` matching `where`; the number deleted."""
    return conn.execute(f"DELETE FROM {table} WHERE ({key}) IN (SELECT {key} FROM {table} WHERE {where}"
                        f" LIMIT {_CHUNK})", params).rowcount


def _delete_raw_chunk(conn, table, cutoff_ts):
    """Delete about _CHUNK of the oldest rows of a raw table dated before cutoff_ts (by its ts index)."""
    bound = conn.execute(f"SELECT ts FROM {table} WHERE ts < ? ORDER BY ts LIMIT 1 OFFSET {_CHUNK - 1}",
                         (cutoff_ts,)).fetchone()
    where, params = ("ts < ? AND ts <= ?", (cutoff_ts, bound[0])) if bound else ("ts < ?", (cutoff_ts,))
    if table == "events":  # a client's event id may be sent again once its event is gone
        conn.execute(f"DELETE FROM client_event_ids WHERE event_id IN"
                     f" (SELECT event_id FROM events WHERE {where} AND client_id = 1)", params)
    return conn.execute(f"DELETE FROM {table} WHERE {where}", params).rowcount


def _delete_by_name(conn, table, key, column, cutoff, start):
    """Delete the rows of `table` dated before cutoff, name by name from `start`, about _CHUNK rows at most.

    These tables are keyed by name first: one key range per name (the next name is found by a
    seek, not a scan). `start` is (name, inclusive) or None for the first name; returns where the
    next transaction goes on, or None when every name is done.
    """
    deleted = 0
    for _ in range(100):
        if start is None:
            row = conn.execute(f"SELECT MIN(name) FROM {table}").fetchone()
        else:
            row = conn.execute(f"SELECT name FROM {table} WHERE name {'>=' if start[1] else '>'} ?"
                               " ORDER BY name LIMIT 1", (start[0],)).fetchone()
        if row is None or row[0] is None:
            return None
        name = row[0]
        n = _delete_chunk(conn, table, key, f"name = ? AND {column} < ?", (name, cutoff))
        deleted += n
        if n >= _CHUNK:
            return (name, True)  # more of this name in the next transaction
        start = (name, False)
        if deleted >= _CHUNK:
            break
    return start


# Rollup tables keyed (or indexed) by day first: deleted by day; the *_last tables by their last_day index.
_ROLLUP_PRUNE = tuple((table, key, "day < ?") for table, key in (
    ("compacted_days", "day"), ("ev_day_total", "day"), ("req_day_total", "day"), ("dep_day_total", "day"),
    ("ev_day_top", "day, name"), ("req_day_top", "day, name"), ("dep_day_top", "day, type, target"),
    ("ev_day", "day, name"), ("ev_user_day", "day, user_id"), ("ev_day_users", "day"),
    ("ev_anonymous_day", "day, id"), ("ev_session_day", "day, id"), ("crud_day", "rowid"),
    ("req_day", "day, name"), ("req_hist_all", "day, bucket"), ("dep_day", "day, type, target"))) + (
    ("ev_user_last", "user_id", "last_day < ?"), ("ev_anonymous_last", "id", "last_day < ?"),
    ("ev_session_last", "id", "last_day < ?"))
# Rollup tables keyed by name first.
_ROLLUP_PRUNE_BY_NAME = (("ev_name_user_day", "name, day, user_id", "day"), ("req_hist", "name, day, bucket", "day"),
                         ("ev_name_user_last", "name, user_id", "last_day"))


def _row(section, **values):
    """One section row with every column present."""
    row = {"section": section, "day": "", "name": "", "type": "", "target": "", "action": "",
           "count": 0, "failed": 0, "users": 0, "avg_ms": None, "p50_ms": None,
           "p95_ms": None, "p99_ms": None}
    row.update(values)
    return row


# Rows stamped after the window's end but already committed when the dashboard reads: the end
# is "now" as computed a few milliseconds before the read, and the other worker's writer may
# commit rows of those milliseconds in between. They count as "now". A row later than this
# (a clock gone wrong) sends the query to the raw tables, which apply the end exactly.
_NOW_GRACE_S = 60.0


def _usage_rows(conn, t0, t1, top):
    """The usage section rows: from the rollups when they cover the window, else from raw rows."""
    users = _rollups_cover(conn, t0, t1)
    if users:
        return _rollup_usage_rows(conn, _day(t0), _day(t1), top, users)
    return _raw_usage_rows(conn, t0, t1, top)


def _rollups_cover(conn, t0, t1):
    """How the rollups answer [t0, t1]: None (they cannot: use the raw rows), "last" or "days".

    They can when t0 is a midnight (UTC), the rollups are complete and no row of t1's day is
    later than t1 (give or take _NOW_GRACE_S): the window is then whole days. Distinct users
    come from each user's last active day ("last": cheap) unless some event is dated after
    t1's day, then from the per-day user tables ("days").
    """
    if t1 < t0 or t0 % _DAY_SECONDS:
        return None
    d1 = _day(t1)
    complete, later, *latest = conn.execute(
        "SELECT (SELECT value FROM store_meta WHERE key = 'rollups'),"
        " (SELECT 1 FROM ev_day WHERE day > ?1 LIMIT 1),"
        " (SELECT max_ts FROM ev_day_total WHERE day = ?1),"
        " (SELECT max_ts FROM req_day_total WHERE day = ?1),"
        " (SELECT max_ts FROM dep_day_total WHERE day = ?1)", (d1,)).fetchone()
    if complete != "complete" or any(ts is not None and ts > t1 + _NOW_GRACE_S for ts in latest):
        return None
    return "days" if later else "last"


def _avg(total_ms, count):
    return None if not count else total_ms / count


def _percentiles(hist, ps):
    """Nearest-rank percentiles from [(n, min_ms, max_ms)] in bucket order (see the module doc)."""
    total = sum(n for n, _, _ in hist)
    if not total:
        return [None] * len(ps)
    out = []
    for p in ps:
        rank = min(max(math.ceil(p * total), 1), total)  # the smallest rank r with r >= p * n
        below = 0
        for n, lo, hi in hist:
            if below + n >= rank:
                j = rank - below
                if lo == hi or j == 1:
                    value = lo
                elif j == n:
                    value = hi
                else:
                    value = lo + (hi - lo) * (j - 1) / (n - 1)
                out.append(value)
                break
            below += n
    return out


def _window_days(d0, d1):
    """Every day from d0 to d1 (YYYY-MM-DD), inclusive."""
    out, t = [], _midnight(d0)
    while (day := _day(t)) <= d1:
        out.append(day)
        t += _DAY_SECONDS
    return out


def _rollup_usage_rows(conn, d0, d1, top, users="last"):
    """The usage section rows for the whole days [d0, d1] from the rollups (see _rollups_cover).

    Totals and daily series come from the per-day totals; the top lists from the top lists of
    the compacted days (see _compact_day, OTHER rows left out) and the live rows of the others.
    """
    days = (d0, d1)
    compacted = [d for (d,) in conn.execute("SELECT day FROM compacted_days WHERE day BETWEEN ? AND ?", days)]

    def source(live, top_table, cols, skip_other):
        """(FROM clause, parameters) of `cols` of the window's per-day rows: top lists and live rows."""
        if not compacted:
            return f"(SELECT {cols} FROM {live} WHERE day BETWEEN ? AND ?)", days
        done = set(compacted)
        live_days = [d for d in _window_days(d0, d1) if d not in done]
        parts = [f"SELECT {cols} FROM {top_table} WHERE day IN ({', '.join('?' * len(compacted))})"
                 + (f" AND {skip_other} <> '{OTHER}'" if skip_other else "")]
        if live_days:
            parts.append(f"SELECT {cols} FROM {live} WHERE day IN ({', '.join('?' * len(live_days))})")
        return "(" + " UNION ALL ".join(parts) + ")", tuple(compacted) + tuple(live_days)

    total, failed, sum_ms = conn.execute(
        "SELECT COALESCE(SUM(n), 0), COALESCE(SUM(failed), 0), SUM(sum_ms) FROM req_day_total"
        " WHERE day BETWEEN ? AND ?", days).fetchone()
    hist = conn.execute(
        "SELECT SUM(n), MIN(min_ms), MAX(max_ms) FROM req_hist_all WHERE day BETWEEN ? AND ?"
        " GROUP BY bucket ORDER BY bucket", days).fetchall()
    p50, p95, p99 = _percentiles(hist, (0.50, 0.95, 0.99))
    yield _row("req_summary", count=total, failed=failed, avg_ms=_avg(sum_ms, total),
               p50_ms=p50, p95_ms=p95, p99_ms=p99)
    p95_by_day = {day: _percentiles([(n, lo, hi) for _, n, lo, hi in buckets], (0.95,))[0]
                  for day, buckets in itertools.groupby(conn.execute(
                      "SELECT day, n, min_ms, max_ms FROM req_hist_all WHERE day BETWEEN ? AND ?"
                      " ORDER BY day, bucket", days), key=lambda r: r[0])}
    for day, count, failed, sum_ms in conn.execute(
            "SELECT day, n, failed, sum_ms FROM req_day_total WHERE day BETWEEN ? AND ?", days):
        yield _row("req_daily", day=day, count=count, failed=failed, avg_ms=_avg(sum_ms, count),
                   p95_ms=p95_by_day.get(day))
    req, req_p = source("req_day", "req_day_top", "name, n, failed", "name")
    top_ops = conn.execute(
        f"SELECT name, SUM(n), SUM(failed) FROM {req} GROUP BY name ORDER BY SUM(n) DESC, name LIMIT ?",
        req_p + (top,)).fetchall()
    for name, count, failed in top_ops:
        hist = conn.execute(
            "SELECT SUM(n), MIN(min_ms), MAX(max_ms) FROM req_hist WHERE name = ? AND day BETWEEN ? AND ?"
            " GROUP BY bucket ORDER BY bucket", (name,) + days).fetchall()
        yield _row("req_top", name=name, count=count, failed=failed, p95_ms=_percentiles(hist, (0.95,))[0])

    total, failed, sum_ms = conn.execute(
        "SELECT COALESCE(SUM(n), 0), COALESCE(SUM(failed), 0), SUM(sum_ms) FROM dep_day_total"
        " WHERE day BETWEEN ? AND ?", days).fetchone()
    yield _row("dep_summary", count=total, failed=failed, avg_ms=_avg(sum_ms, total))
    for day, count, failed in conn.execute(
            "SELECT day, n, failed FROM dep_day_total WHERE day BETWEEN ? AND ?", days):
        yield _row("dep_daily", day=day, count=count, failed=failed)
    dep, dep_p = source("dep_day", "dep_day_top", "type, target, n, failed, sum_ms", "type")
    for typ, target, count, failed, sum_ms in conn.execute(
            f"SELECT type, target, SUM(n), SUM(failed), SUM(sum_ms) FROM {dep}"
            " GROUP BY type, target ORDER BY SUM(n) DESC, target LIMIT ?", dep_p + (top,)):
        yield _row("dep_top", type=typ, target=target, count=count, failed=failed, avg_ms=_avg(sum_ms, count))

    (total,) = conn.execute("SELECT COALESCE(SUM(n), 0) FROM ev_day_total WHERE day BETWEEN ? AND ?",
                            days).fetchone()
    yield _row("evt_summary", count=total)
    users_by_day = dict(conn.execute(
        "SELECT day, users FROM ev_day_users WHERE day BETWEEN ? AND ?", days).fetchall())
    for day, count in conn.execute("SELECT day, n FROM ev_day_total WHERE day BETWEEN ? AND ?", days):
        yield _row("evt_daily", day=day, count=count)
        yield _row("active_daily", day=day, users=users_by_day.get(day, 0))

    def users_of(name):
        if users == "last":
            return conn.execute("SELECT COUNT(*) FROM ev_name_user_last WHERE name = ? AND last_day >= ?",
                                (name, d0)).fetchone()[0]
        return conn.execute("SELECT COUNT(DISTINCT user_id) FROM ev_name_user_day WHERE name = ?"
                            " AND day BETWEEN ? AND ?", (name,) + days).fetchone()[0]

    ev, ev_p = source("ev_day", "ev_day_top", "name, n", "name")
    for name, count in conn.execute(
            f"SELECT name, SUM(n) FROM {ev} GROUP BY name ORDER BY SUM(n) DESC, name LIMIT ?",
            ev_p + (top,)).fetchall():
        yield _row("evt_top", name=name, count=count, users=users_of(name))
    window = _window_days(d0, d1)  # one seek per day, not a scan of every name of the window
    (count,) = conn.execute(f"SELECT COALESCE(SUM(n), 0) FROM ev_day WHERE name = 'UserLogin'"
                            f" AND day IN ({', '.join('?' * len(window))})", window).fetchone()
    yield _row("login_summary", count=count, users=users_of("UserLogin") if count else 0)
    if users == "last":
        (active,) = conn.execute("SELECT COUNT(*) FROM ev_user_last WHERE last_day >= ?", (d0,)).fetchone()
    else:
        (active,) = conn.execute("SELECT COUNT(DISTINCT user_id) FROM ev_user_day WHERE day BETWEEN ? AND ?",
                                 days).fetchone()
    yield _row("active_summary", users=active)
    for kind, _ in _DISTINCT_IDS:
        if users == "last":
            (count,) = conn.execute(f"SELECT COUNT(*) FROM ev_{kind}_last WHERE last_day >= ?", (d0,)).fetchone()
        else:
            (count,) = conn.execute(f"SELECT COUNT(DISTINCT id) FROM ev_{kind}_day WHERE day BETWEEN ? AND ?",
                                    days).fetchone()
        yield _row(f"{kind}_summary", users=count)
    for entity, action, count in conn.execute(
            "SELECT entity, action, SUM(n) FROM crud_day WHERE day BETWEEN ? AND ?"
            " GROUP BY entity, action", days):
        yield _row("crud", name=entity, action=action, count=count)


def _percentile_sql(p):
    """Nearest-rank percentile over the ranked CTE `r`."""
    return f"MIN(CASE WHEN rn >= {p} * n THEN duration_ms END)"


def _raw_usage_rows(conn, t0, t1, top):
    """Yield the usage section rows from SQL over the three raw tables (any window; exact)."""
    span = (t0, t1)
    ranked = ("WITH r AS (SELECT day, name, duration_ms, success,"
              " ROW_NUMBER() OVER (PARTITION BY {part} ORDER BY duration_ms) AS rn,"
              " COUNT(*) OVER (PARTITION BY {part}) AS n"
              " FROM requests WHERE ts BETWEEN ? AND ?) ")
    q = (ranked.format(part="1") + "SELECT COUNT(*), COALESCE(SUM(success = 0), 0), AVG(duration_ms), "
         + ", ".join(_percentile_sql(p) for p in (0.50, 0.95, 0.99)) + " FROM r")
    total, failed, avg, p50, p95, p99 = conn.execute(q, span).fetchone()
    yield _row("req_summary", count=total, failed=failed, avg_ms=avg, p50_ms=p50, p95_ms=p95, p99_ms=p99)
    q = (ranked.format(part="day") + "SELECT day, COUNT(*), SUM(success = 0), AVG(duration_ms), "
         + _percentile_sql(0.95) + " FROM r GROUP BY day")
    for day, count, failed, avg, p95 in conn.execute(q, span):
        yield _row("req_daily", day=day, count=count, failed=failed, avg_ms=avg, p95_ms=p95)
    q = (ranked.format(part="name") + "SELECT name, COUNT(*), SUM(success = 0), "
         + _percentile_sql(0.95) + " FROM r GROUP BY name ORDER BY COUNT(*) DESC, name LIMIT ?")
    for name, count, failed, p95 in conn.execute(q, span + (top,)):
        yield _row("req_top", name=name, count=count, failed=failed, p95_ms=p95)

    total, failed, avg = conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(success = 0), 0), AVG(duration_ms) FROM dependencies"
        " WHERE ts BETWEEN ? AND ?", span).fetchone()
    yield _row("dep_summary", count=total, failed=failed, avg_ms=avg)
    for day, count, failed in conn.execute(
            "SELECT day, COUNT(*), SUM(success = 0) FROM dependencies WHERE ts BETWEEN ? AND ?"
            " GROUP BY day", span):
        yield _row("dep_daily", day=day, count=count, failed=failed)
    for typ, target, count, failed, avg in conn.execute(
            "SELECT type, target, COUNT(*), SUM(success = 0), AVG(duration_ms) FROM dependencies"
            " WHERE ts BETWEEN ? AND ? GROUP BY type, target ORDER BY COUNT(*) DESC, target"
            " LIMIT ?", span + (top,)):
        yield _row("dep_top", type=typ, target=target, count=count, failed=failed, avg_ms=avg)

    (total,) = conn.execute("SELECT COUNT(*) FROM events WHERE ts BETWEEN ? AND ?", span).fetchone()
    yield _row("evt_summary", count=total)
    for day, count, users in conn.execute(
            "SELECT day, COUNT(*), COUNT(DISTINCT NULLIF(user_id, '')) FROM events"
            " WHERE ts BETWEEN ? AND ? GROUP BY day", span):
        yield _row("evt_daily", day=day, count=count)
        yield _row("active_daily", day=day, users=users)
    for name, count, users in conn.execute(
            "SELECT name, COUNT(*), COUNT(DISTINCT NULLIF(user_id, '')) FROM events"
            " WHERE ts BETWEEN ? AND ? GROUP BY name ORDER BY COUNT(*) DESC, name LIMIT ?",
            span + (top,)):
        yield _row("evt_top", name=name, count=count, users=users)
    count, users = conn.execute(
        "SELECT COUNT(*), COUNT(DISTINCT NULLIF(user_id, '')) FROM events"
        " WHERE ts BETWEEN ? AND ? AND name = 'UserLogin'", span).fetchone()
    yield _row("login_summary", count=count, users=users)
    (users,) = conn.execute(
        "SELECT COUNT(DISTINCT NULLIF(user_id, '')) FROM events WHERE ts BETWEEN ? AND ?",
        span).fetchone()
    yield _row("active_summary", users=users)
    for kind, column in _DISTINCT_IDS:
        (count,) = conn.execute(f"SELECT COUNT(DISTINCT NULLIF({column}, '')) FROM events WHERE ts BETWEEN ? AND ?",
                                span).fetchone()
        yield _row(f"{kind}_summary", users=count)
    for entity, action, count in conn.execute(
            "SELECT entity, action, COUNT(*) FROM events WHERE ts BETWEEN ? AND ?"
            " AND name = 'CrudActivity' GROUP BY entity, action", span):
        yield _row("crud", name=entity, action=action, count=count)
