"""Local mode: an embedded SQLite store, written in batches by one background writer per process."""
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from datetime import datetime, timezone

from telemetry import mark_internal_thread

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    event_id TEXT PRIMARY KEY, ts REAL NOT NULL, day TEXT NOT NULL, name TEXT NOT NULL,
    user_id TEXT NOT NULL DEFAULT '', action TEXT, entity TEXT, operation_id TEXT,
    properties TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_ts ON events(ts);
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
"""

_INSERT = {
    "event": "INSERT OR IGNORE INTO events (event_id, ts, day, name, user_id, action, entity,"
             " operation_id, properties) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
    "request": "INSERT INTO requests (ts, day, name, status, success, duration_ms, user_id,"
               " operation_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
    "dependency": "INSERT INTO dependencies (ts, day, type, target, name, result_code, success,"
                  " duration_ms, operation_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
}

_STOP = object()


def _day(ts):
    """The UTC date of an epoch timestamp, as YYYY-MM-DD."""
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d")


def connect(path):
    """Open the store with WAL and a busy timeout."""
    conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


class LocalStore:
    """The local sink: queues rows in memory and writes them in batches on a writer thread."""

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

    # -- sink protocol -------------------------------------------------
    def _create_schema(self):
        """Create the database file and its tables if they do not exist yet."""
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        conn = connect(self.path)
        try:
            conn.executescript(_SCHEMA)
        finally:
            conn.close()
        self._schema_ready = True

    def start(self):
        """Create the schema and start this process's writer thread."""
        self._create_schema()
        self._queue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="local-store-writer", daemon=True)
        self._thread.start()

    def track_event(self, rec):
        """Queue one event row."""
        props = rec.properties
        self._queue.put(("event", (
            rec.event_id, rec.timestamp, _day(rec.timestamp), rec.name, rec.user_id or "",
            props.get("action") if rec.name == "CrudActivity" else None,
            props.get("entity") if rec.name == "CrudActivity" else None,
            rec.operation_id, json.dumps(props, separators=(",", ":")))))

    def track_request(self, rec):
        """Queue one request row."""
        self._queue.put(("request", (
            rec.timestamp, _day(rec.timestamp), rec.name, rec.status, int(rec.success),
            rec.duration_ms, rec.user_id or "", rec.operation_id)))

    def track_dependency(self, rec):
        """Queue one dependency row."""
        self._queue.put(("dependency", (
            rec.timestamp, _day(rec.timestamp), rec.type, rec.target, rec.name, rec.result_code,
            int(rec.success), rec.duration_ms, rec.operation_id)))

    def flush(self, timeout=10.0):
        """Wait until every row queued before this call is committed."""
        done = threading.Event()
        self._queue.put(("flush", done))
        return done.wait(timeout)

    def close(self, timeout=10.0):
        """Write what is queued and stop the writer."""
        if self._thread and self._thread.is_alive():
            self._queue.put(("stop", None))
            self._thread.join(timeout)

    def health(self):
        """Counters for /healthz."""
        return {"started": True, "queued": self._queue.qsize(), "written": self.written,
                "write_errors": self.write_errors, "writer_alive": self._thread.is_alive()}

    # -- writer ----------------------------------------------------------
    def _run(self):
        """Writer loop: batch rows until batch_size or flush_interval, then commit once."""
        mark_internal_thread()
        conn = connect(self.path)
        stopping = False
        while not stopping:
            kind, payload = self._queue.get()
            batch = {"event": [], "request": [], "dependency": []}
            waiters = []
            deadline = time.monotonic() + self.flush_interval
            count = 0
            while True:
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
                    kind, payload = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
            if count:
                self._write(conn, batch, count)
            for waiter in waiters:
                waiter.set()
        conn.close()

    def _write(self, conn, batch, count):
        """Commit one batch in a single transaction, retrying while the database is locked."""
        for attempt in range(50):
            try:
                conn.execute("BEGIN IMMEDIATE")
                for kind, rows in batch.items():
                    if rows:
                        conn.executemany(_INSERT[kind], rows)
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
        conn = connect(self.path)
        try:
            return list(_usage_rows(conn, start.timestamp(), end.timestamp(), self.top))
        finally:
            conn.close()


def _row(section, **values):
    """One section row with every column present."""
    row = {"section": section, "day": "", "name": "", "type": "", "target": "", "action": "",
           "count": 0, "failed": 0, "users": 0, "avg_ms": None, "p50_ms": None,
           "p95_ms": None, "p99_ms": None}
    row.update(values)
    return row


def _percentile_sql(p):
    """Nearest-rank percentile over the ranked CTE `r`."""
    return f"MIN(CASE WHEN rn >= {p} * n THEN duration_ms END)"


def _usage_rows(conn, t0, t1, top):
    """Yield the usage section rows from SQL over the three tables."""
    span = (t0, t1)
    ranked = ("WITH r AS (SELECT name, duration_ms, success,"
              " ROW_NUMBER() OVER (PARTITION BY {part} ORDER BY duration_ms) AS rn,"
              " COUNT(*) OVER (PARTITION BY {part}) AS n"
              " FROM requests WHERE ts BETWEEN ? AND ?) ")
    q = (ranked.format(part="1") + "SELECT COUNT(*), COALESCE(SUM(success = 0), 0), AVG(duration_ms), "
         + ", ".join(_percentile_sql(p) for p in (0.50, 0.95, 0.99)) + " FROM r")
    total, failed, avg, p50, p95, p99 = conn.execute(q, span).fetchone()
    yield _row("req_summary", count=total, failed=failed, avg_ms=avg, p50_ms=p50, p95_ms=p95, p99_ms=p99)
    for day, count, failed in conn.execute(
            "SELECT day, COUNT(*), SUM(success = 0) FROM requests WHERE ts BETWEEN ? AND ?"
            " GROUP BY day", span):
        yield _row("req_daily", day=day, count=count, failed=failed)
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
    for entity, action, count in conn.execute(
            "SELECT entity, action, COUNT(*) FROM events WHERE ts BETWEEN ? AND ?"
            " AND name = 'CrudActivity' GROUP BY entity, action", span):
        yield _row("crud", name=entity, action=action, count=count)
