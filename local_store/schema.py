"""The store's schema: raw tables, the rollups their triggers keep, migrations, and the INSERTs of each kind.

* Raw tables ``events``, ``requests``, ``dependencies`` and ``traces`` hold one row per item and
  stay the source of truth. Their only indexes are ordered by time (``ts``), so an insert touches
  the right-hand edge of each B-tree: the cost of a row does not grow with the size of the table.
  (Version 1 made ``event_id`` the primary key: a random UUID index costs one random page per
  row, 130 µs per event at a million rows. Events are now unique by ``(ts, event_id)``: a record
  sent twice carries the same timestamp, so it is still stored once; a client-made id is stored
  once whatever its time, through ``client_event_ids``.)
* Daily rollups are kept by SQLite triggers in the same transaction as the raw insert, so every
  writer -- the store's writer thread, a script, a test inserting rows by hand -- keeps them
  exact: counts, failures, duration sums and latest timestamp per day and name (or dependency
  target), per-day totals, CRUD counts per day, distinct users (anonymous visitors, sessions) per
  day, each one's latest active day, and per-day latency histograms (see ``queries``).
* Rows updated or deleted behind the triggers' back remove the ``rollups`` marker of
  ``store_meta``: the dashboard then reads the raw tables until the next start-up rebuilds them.
* A row added to a day that maintenance compacted (see ``maintenance``) re-opens that day.
"""
import sqlite3

SCHEMA_VERSION = 5  # 5: dependency latency histograms (dep_hist, dep_hist_all)
BUCKETS_PER_OCTAVE = 16

# The key of the row that sums the names outside a compacted day's top list (see maintenance).
OTHER = "(other)"

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
CREATE TABLE IF NOT EXISTS dep_hist (
    day TEXT NOT NULL, type TEXT NOT NULL, target TEXT NOT NULL, bucket INTEGER NOT NULL, n INTEGER NOT NULL,
    min_ms REAL NOT NULL, max_ms REAL NOT NULL, PRIMARY KEY (day, type, target, bucket)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dep_hist_all (
    day TEXT NOT NULL, bucket INTEGER NOT NULL, n INTEGER NOT NULL,
    min_ms REAL NOT NULL, max_ms REAL NOT NULL, PRIMARY KEY (day, bucket)) WITHOUT ROWID;
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

# Per-day top lists of closed days (see maintenance.compact_day); compacted_days names the days they cover.
TOP_TABLES = ("ev_day_top", "req_day_top", "dep_day_top")
COMPACTED_TABLES = ("compacted_days",) + TOP_TABLES

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
DISTINCT_IDS = (("anonymous", "anonymous_id"), ("session", "session_id"))
_ID_TRIGGERS = "".join(f"""
CREATE TRIGGER IF NOT EXISTS events_rollup_{kind} AFTER INSERT ON events WHEN NEW.{column} <> '' BEGIN
  INSERT OR IGNORE INTO ev_{kind}_day (day, id) VALUES (NEW.day, NEW.{column});
  INSERT INTO ev_{kind}_last (id, last_day) VALUES (NEW.{column}, NEW.day)
    ON CONFLICT (id) DO UPDATE SET last_day = excluded.last_day WHERE excluded.last_day > ev_{kind}_last.last_day;
END;
""" for kind, column in DISTINCT_IDS)

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
TOTAL_TABLES = ("ev_day_total", "req_day_total", "dep_day_total")

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
  INSERT INTO dep_hist (day, type, target, bucket, n, min_ms, max_ms)
    VALUES (NEW.day, NEW.type, NEW.target, {bucket}, 1, NEW.duration_ms, NEW.duration_ms)
    ON CONFLICT (day, type, target, bucket) DO UPDATE SET n = n + 1,
      min_ms = min(min_ms, excluded.min_ms), max_ms = max(max_ms, excluded.max_ms);
  INSERT INTO dep_hist_all (day, bucket, n, min_ms, max_ms)
    VALUES (NEW.day, {bucket}, 1, NEW.duration_ms, NEW.duration_ms)
    ON CONFLICT (day, bucket) DO UPDATE SET n = n + 1,
      min_ms = min(min_ms, excluded.min_ms), max_ms = max(max_ms, excluded.max_ms);
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
    + "".join(f"  DELETE FROM {top} WHERE day = NEW.day;\n" for top in TOP_TABLES)
    + "END;\n"
    for table in ("ev_day", "req_day", "dep_day") for op in ("INSERT", "UPDATE"))

_SEED = ("INSERT OR IGNORE INTO hist_bounds (lo, bucket) VALUES "
         + ", ".join(f"({lo!r}, {i})" for i, lo in enumerate(_BOUNDS)) + ";\n"
         # A store whose raw tables are empty has rollups that match them (the triggers exist now).
         "INSERT OR IGNORE INTO store_meta (key, value) SELECT 'rollups', 'complete'"
         " WHERE NOT EXISTS (SELECT 1 FROM events) AND NOT EXISTS (SELECT 1 FROM requests)"
         " AND NOT EXISTS (SELECT 1 FROM dependencies);\n")

# The whole schema, idempotent: executescript(SCHEMA) on an empty file gives a complete store.
SCHEMA = _TABLES + _TRIGGERS + _SEED

_ROLLUP_TABLES = COMPACTED_TABLES + TOTAL_TABLES + (
                  "ev_day", "ev_user_day", "ev_day_users", "ev_name_user_day", "ev_user_last", "ev_name_user_last",
                  "ev_anonymous_day", "ev_anonymous_last", "ev_session_day", "ev_session_last", "crud_day",
                  "req_day", "req_hist", "req_hist_all", "dep_day", "dep_hist", "dep_hist_all")

_ID_REBUILD = "".join(f"""
INSERT INTO ev_{kind}_day (day, id) SELECT DISTINCT day, {column} FROM events WHERE {column} <> '';
INSERT INTO ev_{kind}_last (id, last_day) SELECT {column}, MAX(day) FROM events WHERE {column} <> '' GROUP BY {column};
""" for kind, column in DISTINCT_IDS)
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
INSERT INTO dep_hist (day, type, target, bucket, n, min_ms, max_ms)
  SELECT day, type, target, b, COUNT(*), MIN(duration_ms), MAX(duration_ms)
  FROM (SELECT day, type, target, duration_ms, {bucket} AS b FROM dependencies) GROUP BY day, type, target, b;
INSERT INTO dep_hist_all (day, bucket, n, min_ms, max_ms)
  SELECT day, b, COUNT(*), MIN(duration_ms), MAX(duration_ms)
  FROM (SELECT day, duration_ms, {bucket} AS b FROM dependencies) GROUP BY day, b;
""".format(bucket=_BUCKET_OF.format(x="duration_ms")) + _TOTALS_FILL + """
INSERT OR REPLACE INTO store_meta (key, value) VALUES ('rollups', 'complete');
"""

_V1_EVENT_COLUMNS = "event_id, ts, day, name, user_id, action, entity, operation_id, properties"
_EVENT_COLUMNS = _V1_EVENT_COLUMNS + ", anonymous_id, session_id, client_id"
_ADDED_EVENT_COLUMNS = (  # version 4
    ("anonymous_id", "TEXT NOT NULL DEFAULT ''"), ("session_id", "TEXT NOT NULL DEFAULT ''"),
    ("client_id", "INTEGER NOT NULL DEFAULT 0"))
INSERT = {
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
COLUMNS = {kind: tuple(c.strip() for c in sql[sql.index("(") + 1:sql.index(")")].split(","))
           for kind, sql in INSERT.items()}
COLUMN_DEFAULTS = {"user_id": "", "anonymous_id": "", "session_id": "", "client_id": 0}
# Rows from a pending file or copied from a corrupt one: a row that breaks a constraint is skipped
# (OR IGNORE), never the whole batch; an event already stored is skipped too.
INSERT.update({f"ignore {kind}": "INSERT OR IGNORE" + sql[len("INSERT"):].partition(" ON CONFLICT")[0]
               for kind, sql in list(INSERT.items())})

RECORD_KINDS = ("event", "request", "dependency", "trace")
TABLE_OF = {"event": "events", "request": "requests", "dependency": "dependencies", "trace": "traces"}


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
