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

Latency percentiles from the rollups: per day (and per request name) a histogram over fixed
log-scale buckets, 16 per doubling (each bucket's upper edge is 2^(1/16) = 1.044 times its
lower edge), keeping the count and the smallest and largest duration in each bucket. The
nearest-rank percentile is located exactly (its bucket and its rank within the bucket); its
value is exact when that bucket holds one distinct duration (or the rank is the bucket's first
or last), else interpolated between the bucket's smallest and largest duration, so it is off
by less than 4.4 % of the value at worst.
"""
import contextlib
import itertools
import json
import logging
import math
import os
import queue
import sqlite3
import threading
import time
from datetime import datetime, timezone

from telemetry import mark_internal_thread

log = logging.getLogger(__name__)

SCHEMA_VERSION = 4
BUCKETS_PER_OCTAVE = 16
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
"""

_BUCKET_OF = "COALESCE((SELECT bucket FROM hist_bounds WHERE lo <= {x} ORDER BY lo DESC LIMIT 1), 0)"

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

_TRIGGERS = _CLIENT_IDS + _ID_TRIGGERS + """
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
    for table in ("events", "requests", "dependencies") for op in ("UPDATE", "DELETE"))

_SEED = ("INSERT OR IGNORE INTO hist_bounds (lo, bucket) VALUES "
         + ", ".join(f"({lo!r}, {i})" for i, lo in enumerate(_BOUNDS)) + ";\n"
         # A store whose raw tables are empty has rollups that match them (the triggers exist now).
         "INSERT OR IGNORE INTO store_meta (key, value) SELECT 'rollups', 'complete'"
         " WHERE NOT EXISTS (SELECT 1 FROM events) AND NOT EXISTS (SELECT 1 FROM requests)"
         " AND NOT EXISTS (SELECT 1 FROM dependencies);\n")

# The whole schema, idempotent: executescript(_SCHEMA) on an empty file gives a complete store.
_SCHEMA = _TABLES + _TRIGGERS + _SEED

_ROLLUP_TABLES = ("ev_day", "ev_user_day", "ev_day_users", "ev_name_user_day", "ev_user_last", "ev_name_user_last",
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
INSERT OR REPLACE INTO store_meta (key, value) VALUES ('rollups', 'complete');
""".format(bucket=_BUCKET_OF.format(x="duration_ms"))

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

# Rows per INSERT statement: every statement releases and re-takes the GIL once (around
# sqlite3_step); under a busy request thread each re-take can wait a whole switch interval
# (5 ms), so one statement per row (executemany) starves the writer. 999 is SQLite's oldest
# limit on bound parameters.
_MAX_PARAMS = 999
_multi_sql = {}


def _insert_sql(kind, rows):
    """The INSERT of `kind` with `rows` VALUES tuples (cached)."""
    sql = _multi_sql.get((kind, rows))
    if sql is None:
        single = _INSERT[kind]
        head, _, tail = single.partition(" VALUES ")
        values, _, conflict = tail.partition(")")
        sql = _multi_sql[(kind, rows)] = f"{head} VALUES " + ",".join([values + ")"] * rows) + conflict
    return sql


def _insert_many(conn, kind, params):
    """INSERT every row of `params` with as few statements as the parameter limit allows."""
    per = max(1, _MAX_PARAMS // len(params[0]))
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


def connect(path, timeout=30.0):
    """Open the store with WAL and a busy timeout.

    Switching a new file to WAL needs it to itself, and SQLite answers "database is locked" at
    once, without its busy handler, when another process (the other gunicorn worker starting at
    the same moment) holds it: retry that for up to `timeout` seconds instead of failing the
    worker's boot. A file already in WAL mode is not switched again.
    """
    conn = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc) or time.monotonic() > deadline:
                conn.close()
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
    conn.execute("PRAGMA synchronous=NORMAL")
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
            conn.execute("ROLLBACK")
            raise
    finally:
        conn.close()


class LocalStore:
    """The local sink: queues records in memory and writes them in batches on a writer thread."""

    def __init__(self, path, batch_size=500, flush_interval=0.2, top=10):
        self.path = path
        self.top = top
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self._queue = None
        self._thread = None
        self.written = 0
        self.write_errors = 0
        self._schema_ready = False
        self._schema_lock = threading.Lock()

    # -- schema ----------------------------------------------------------
    def _create_schema(self):
        """Create (or migrate) the database file, its tables, rollups and triggers."""
        with self._schema_lock:
            if self._schema_ready:
                return
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            with _write_transaction(self.path) as conn:
                migrate(conn)
            self._schema_ready = True

    # -- sink protocol -------------------------------------------------
    def start(self):
        """Create the schema and start this process's writer thread."""
        self._schema_ready = False  # a forked worker checks the file again
        self._create_schema()
        self._queue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="local-store-writer", daemon=True)
        self._thread.start()

    # The request path only queues the record; rows are built on the writer thread.
    def track_event(self, rec):
        """Queue one event."""
        self._queue.put(("event", rec))

    def track_request(self, rec):
        """Queue one request."""
        self._queue.put(("request", rec))

    def track_dependency(self, rec):
        """Queue one dependency."""
        self._queue.put(("dependency", rec))

    def track_trace(self, record):
        """Queue one log record of the trace logger (a `traces` row)."""
        self._queue.put(("trace", record))

    def flush(self, timeout=10.0):
        """Wait until every row queued before this call is committed."""
        done = threading.Event()
        self._queue.put(("flush", done))
        return done.wait(timeout)

    def close(self, timeout=None):
        """Write what is queued and stop the writer."""
        timeout = 30.0 if timeout is None else timeout
        if self._thread and self._thread.is_alive():
            self._queue.put(("stop", None))
            self._thread.join(timeout)

    def problems(self, grace_s=None):
        """What is wrong with the store now, for /healthz (the writer thread stopped)."""
        return [] if self._thread is not None and self._thread.is_alive() else ["local store writer is not running"]

    def health(self):
        """Counters for /healthz."""
        return {"started": True, "queued": self._queue.qsize(), "written": self.written,
                "write_errors": self.write_errors, "writer_alive": self._thread.is_alive()}

    # -- writer ----------------------------------------------------------
    def _run(self):
        """Writer loop: batch records until batch_size or flush_interval, then commit once."""
        mark_internal_thread()
        conn = connect(self.path)
        get = self._queue.get
        stopping = False
        while not stopping:
            item = get()
            batch = {"event": [], "request": [], "dependency": [], "trace": []}
            waiters = []
            deadline = time.monotonic() + self.flush_interval
            count = 0
            while True:
                kind, payload = item
                if kind == "stop":
                    stopping = True
                elif kind == "flush":
                    waiters.append(payload)
                else:
                    batch[kind].append(payload)
                    count += 1
                if stopping or waiters or count >= self.batch_size:
                    break
                try:
                    item = get(False)
                except queue.Empty:
                    try:
                        item = get(timeout=max(0.0, deadline - time.monotonic()))
                    except queue.Empty:
                        break
            if count:
                self._write(conn, batch, count)
            for waiter in waiters:
                waiter.set()
        conn.close()

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
                             rec.operation_id, _properties_json(props), rec.anonymous_id, rec.session_id,
                             int(rec.client_event_id)))
            return rows
        if kind == "request":
            return [(rec.timestamp, _day(rec.timestamp), rec.name, rec.status, int(rec.success),
                     rec.duration_ms, rec.user_id or "", rec.operation_id) for rec in records]
        if kind == "trace":
            return [_trace_row(rec) for rec in records]
        return [(rec.timestamp, _day(rec.timestamp), rec.type, rec.target, rec.name, rec.result_code,
                 int(rec.success), rec.duration_ms, rec.operation_id) for rec in records]

    def _write(self, conn, batch, count):
        """Commit one batch in a single transaction, retrying while the database is locked."""
        try:
            rows = {kind: self._rows(kind, records) for kind, records in batch.items() if records}
        except Exception:  # a malformed record must not stop the writer
            log.exception("local store could not encode a batch of %d records; dropped", count)
            self.write_errors += count
            return
        for attempt in range(50):
            try:
                conn.execute("BEGIN IMMEDIATE")
                for kind, params in rows.items():
                    _insert_many(conn, kind, params)
                conn.execute("COMMIT")
                self.written += count
                return
            except sqlite3.OperationalError as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                log.warning("local store write failed (attempt %d): %s", attempt + 1, exc)
                time.sleep(min(0.05 * (attempt + 1), 1.0))
        self.write_errors += count
        log.error("local store dropped a batch of %d rows after 50 attempts", count)

    # -- usage -------------------------------------------------------------
    def rows(self, start, end):
        """Usage section rows (the shape monitoring_utils builds from) for [start, end]."""
        if not self._schema_ready:
            self._create_schema()
        t0, t1 = start.timestamp(), end.timestamp()
        conn = connect(self.path)
        try:
            conn.execute("BEGIN")  # one snapshot for every section
            try:
                result = list(_usage_rows(conn, t0, t1, self.top))
            finally:
                conn.execute("COMMIT")
        finally:
            conn.close()
        return result


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
        " (SELECT MAX(max_ts) FROM ev_day WHERE day = ?1),"
        " (SELECT MAX(max_ts) FROM req_day WHERE day = ?1),"
        " (SELECT MAX(max_ts) FROM dep_day WHERE day = ?1)", (d1,)).fetchone()
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


def _rollup_usage_rows(conn, d0, d1, top, users="last"):
    """The usage section rows for the whole days [d0, d1] from the rollups (see _rollups_cover)."""
    days = (d0, d1)
    total, failed, sum_ms = conn.execute(
        "SELECT COALESCE(SUM(n), 0), COALESCE(SUM(failed), 0), SUM(sum_ms) FROM req_day"
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
            "SELECT day, SUM(n), SUM(failed), SUM(sum_ms) FROM req_day WHERE day BETWEEN ? AND ? GROUP BY day", days):
        yield _row("req_daily", day=day, count=count, failed=failed, avg_ms=_avg(sum_ms, count),
                   p95_ms=p95_by_day.get(day))
    top_ops = conn.execute(
        "SELECT name, SUM(n), SUM(failed) FROM req_day WHERE day BETWEEN ? AND ?"
        " GROUP BY name ORDER BY SUM(n) DESC, name LIMIT ?", days + (top,)).fetchall()
    for name, count, failed in top_ops:
        hist = conn.execute(
            "SELECT SUM(n), MIN(min_ms), MAX(max_ms) FROM req_hist WHERE name = ? AND day BETWEEN ? AND ?"
            " GROUP BY bucket ORDER BY bucket", (name,) + days).fetchall()
        yield _row("req_top", name=name, count=count, failed=failed, p95_ms=_percentiles(hist, (0.95,))[0])

    total, failed, sum_ms = conn.execute(
        "SELECT COALESCE(SUM(n), 0), COALESCE(SUM(failed), 0), SUM(sum_ms) FROM dep_day"
        " WHERE day BETWEEN ? AND ?", days).fetchone()
    yield _row("dep_summary", count=total, failed=failed, avg_ms=_avg(sum_ms, total))
    for day, count, failed in conn.execute(
            "SELECT day, SUM(n), SUM(failed) FROM dep_day WHERE day BETWEEN ? AND ? GROUP BY day", days):
        yield _row("dep_daily", day=day, count=count, failed=failed)
    for typ, target, count, failed, sum_ms in conn.execute(
            "SELECT type, target, SUM(n), SUM(failed), SUM(sum_ms) FROM dep_day WHERE day BETWEEN ? AND ?"
            " GROUP BY type, target ORDER BY SUM(n) DESC, target LIMIT ?", days + (top,)):
        yield _row("dep_top", type=typ, target=target, count=count, failed=failed, avg_ms=_avg(sum_ms, count))

    (total,) = conn.execute("SELECT COALESCE(SUM(n), 0) FROM ev_day WHERE day BETWEEN ? AND ?", days).fetchone()
    yield _row("evt_summary", count=total)
    users_by_day = dict(conn.execute(
        "SELECT day, users FROM ev_day_users WHERE day BETWEEN ? AND ?", days).fetchall())
    for day, count in conn.execute(
            "SELECT day, SUM(n) FROM ev_day WHERE day BETWEEN ? AND ? GROUP BY day", days):
        yield _row("evt_daily", day=day, count=count)
        yield _row("active_daily", day=day, users=users_by_day.get(day, 0))

    def users_of(name):
        if users == "last":
            return conn.execute("SELECT COUNT(*) FROM ev_name_user_last WHERE name = ? AND last_day >= ?",
                                (name, d0)).fetchone()[0]
        return conn.execute("SELECT COUNT(DISTINCT user_id) FROM ev_name_user_day WHERE name = ?"
                            " AND day BETWEEN ? AND ?", (name,) + days).fetchone()[0]

    for name, count in conn.execute(
            "SELECT name, SUM(n) FROM ev_day WHERE day BETWEEN ? AND ? GROUP BY name"
            " ORDER BY SUM(n) DESC, name LIMIT ?", days + (top,)).fetchall():
        yield _row("evt_top", name=name, count=count, users=users_of(name))
    (count,) = conn.execute("SELECT COALESCE(SUM(n), 0) FROM ev_day WHERE name = 'UserLogin'"
                            " AND day BETWEEN ? AND ?", days).fetchone()
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
