"""Maintenance between the writer's batches: retention, the size cap, compaction of closed days, and salvage.

Each job is a generator that runs one short transaction per step, so a batch of records never
waits long behind it.

* Retention (LOCAL_RETENTION_DAYS): every hour by the store's clock, rows of the days before the
  cutoff are deleted, their rollups first, in chunks of _CHUNK rows.
* Size cap (LOCAL_MAX_MB): every minute, while the pages in use exceed it, the oldest day goes.
* Cardinality: once a day is closed (before today and the OPEN_DAYS - 1 days before it), it is
  compacted (see compact_day): ``ev_day_top``, ``req_day_top`` and ``dep_day_top`` keep that
  day's TOP_K rows by count plus one OTHER row with the remainder, and ``compacted_days`` names
  it. A row added to a compacted day re-opens it (a trigger drops its top rows) until the next
  pass; pruning removes the compaction with the day, and a rebuild drops it all.
* Salvage: the readable rows of a corrupt file that the writer moved aside are copied back,
  newest first, stepping past unreadable pages; the progress is kept in ``store_meta`` so a
  restart goes on where it stopped.
"""
import collections
import contextlib
import json
import logging
import math
import os
import sqlite3
import time
import urllib.parse

from journal import pid_alive
from local_store import connection
from local_store.connection import classify, close_quietly, rollback
from local_store.rows import DAY_SECONDS, insert_many, iso_utc, midnight, utc_day
from local_store.schema import COLUMNS, OTHER, RECORD_KINDS, TABLE_OF

log = logging.getLogger(__name__)

# Cardinality: each closed day keeps its TOP_K names per dimension (by count) plus one OTHER row
# with the remainder (see compact_day). Today and the OPEN_DAYS - 1 days before it stay open.
# Late rows (a client timestamp up to 48 hours back) need no open window for exactness: a row
# added to a compacted day re-opens it (the *_reopen_* triggers) until the next pass compacts it
# again. Only today is open: each open day adds all its names to every top-list query (3 open
# days of 33,000 names each cost about 130 ms; 1 day about 30 ms).
TOP_K = 100
OPEN_DAYS = 1
_PRUNE_INTERVAL = 3600.0       # retention pass, by the store's clock
_SIZE_CHECK_INTERVAL = 60.0    # LOCAL_MAX_MB check, monotonic seconds
_CHUNK = 2000                  # rows per pruning or salvage transaction
_MB = 1024 * 1024


class Maintenance:
    """The maintenance of one writer: which job runs, which is due, and the jobs themselves."""

    def __init__(self, writer):
        self.writer = writer
        self.store = writer.store
        self.job = None            # maintenance in progress: a generator, one short transaction per step
        self.waiters = []          # prune() calls waiting for the next pass to end
        self.next_retention = -math.inf      # store clock
        self.next_size_check = 0.0           # monotonic
        self.salvage_new = []      # corrupt files to copy readable rows from (not yet recorded in store_meta)
        self.salvage_scan = True

    @property
    def busy(self):
        """True while a job runs or a prune() waits for one."""
        return self.job is not None or bool(self.waiters)

    @property
    def requested(self):
        """True while a prune() waits."""
        return bool(self.waiters)

    def request(self, waiter):
        """Run retention and the size check now; set `waiter` when the pass is over."""
        self.waiters.append(waiter)
        self.next_retention, self.next_size_check = -math.inf, 0.0

    def rescan(self):
        """Look for salvage recorded in the (newly opened) file."""
        self.salvage_scan = True

    def salvage(self, path):
        """Copy the readable rows of the corrupt file at `path` back, in the background."""
        self.salvage_new.append(path)

    def step(self):
        """Run one step of the job in progress, or start the one that is due."""
        if self.job is None:
            self.job = self._next_job()
            if self.job is None:
                for waiter in self.waiters:
                    waiter.set()
                self.waiters = []
                return
        try:
            next(self.job)
        except StopIteration:
            self.job = None
        except (sqlite3.Error, OSError) as exc:
            self.job = None
            if isinstance(exc, sqlite3.Error) and classify(exc) == "corrupt":
                self.writer.quarantine(exc)
            else:
                log.warning("local store maintenance of %s failed (%s); it is tried again later",
                            self.writer.path, exc)

    def verify(self):
        """A reader saw a corrupt page: check the file with a fresh connection; move it aside if corrupt."""
        try:
            probe = connection.sqlite_connect(self.writer.path, timeout=5, factory=connection.connection_factory)
            try:
                result = probe.execute("PRAGMA quick_check(1)").fetchone()[0]
            finally:
                probe.close()
        except sqlite3.Error as exc:
            if classify(exc) != "corrupt":
                return
            result = str(exc)
        if result != "ok":
            self.writer.quarantine(sqlite3.DatabaseError(f"quick_check: {result}"))

    def _next_job(self):
        """The maintenance due now (a generator), or None."""
        if self.salvage_new or self.salvage_scan:
            job = self._salvage_job()
            if job is not None:
                return job
        now = self.store.clock()
        if now >= self.next_retention:
            self.next_retention = now + _PRUNE_INTERVAL
            return self._retention_job(now)
        if time.monotonic() >= self.next_size_check:
            self.next_size_check = time.monotonic() + _SIZE_CHECK_INTERVAL
            self.store.space.keep_reserve()
            used = used_mb(self.writer.conn)
            if used > self.store.max_mb:
                return self._size_job(used)
            self.store.size_problem = None
        return None

    def _step(self, work):
        """One maintenance transaction: work(conn), keeping the rollups' 'complete' marker as it was."""
        conn = self.writer.conn
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
            rollback(conn)
            raise
        return result

    # -- retention, compaction, size --------------------------------------------------------
    def _retention_job(self, now):
        store = self.store
        cutoff = utc_day(now - store.retention_days * DAY_SECONDS)
        counts = yield from self._prune_before(cutoff)
        store.last_prune = {"at": iso_utc(now), "reason": "retention", "before": cutoff, "rows": counts}
        if any(counts.values()):
            log.info("local store pruned the rows before %s (LOCAL_RETENTION_DAYS=%d): %s", cutoff,
                     store.retention_days, _describe(counts))
        yield from self._compact_job(now)

    def _compact_job(self, now):
        """Compact every closed day not compacted yet (see compact_day): one short transaction a day."""
        conn = self.writer.conn
        if conn.execute("SELECT value FROM store_meta WHERE key = 'rollups'").fetchone() != ("complete",):
            return  # the dashboard reads the raw rows until a rebuild (which drops the compaction anyway)
        for day in _days_to_compact(conn, utc_day(now - (OPEN_DAYS - 1) * DAY_SECONDS)):
            self._step(lambda c: compact_day(c, day))
            yield

    def _size_job(self, used):
        store = self.store
        today = utc_day(store.clock())
        first = last = None
        counts = collections.Counter()
        before = used
        while used > store.max_mb:
            oldest = _oldest_day(self.writer.conn)
            if oldest is None or oldest >= today:
                store.size_problem = (f"database uses {used:.1f} MB, over LOCAL_MAX_MB={store.max_mb:g}, with only "
                                      "today's rows left")
                log.error("local store: %s", store.size_problem)
                break
            following = utc_day(midnight(oldest) + DAY_SECONDS)
            counts.update((yield from self._prune_before(following)))
            first, last = first or oldest, oldest
            used = used_mb(self.writer.conn)
        if first:
            store.last_prune = {"at": iso_utc(store.clock()), "reason": "size",
                                "before": utc_day(midnight(last) + DAY_SECONDS), "rows": dict(counts)}
            log.warning("local store: the database used %.1f MB, over LOCAL_MAX_MB=%g: pruned the oldest day(s) %s "
                        "(%s); %.1f MB used now", before, store.max_mb, first if first == last else f"{first} to {last}",
                        _describe(counts), used)

    def _prune_before(self, cutoff):
        """Delete every raw and rollup row of the days before `cutoff` (YYYY-MM-DD), a short transaction a step.

        The rollups of those days go first: once they are gone, deleting the raw rows keeps the
        rollups equal to the raw rows, so the 'complete' marker stays true (the raw tables'
        *_delete_stale triggers remove it; each step puts it back). A last sweep of the rollups
        removes what rows written meanwhile for those days added.
        """
        counts = collections.Counter()
        yield from self._prune_rollups(cutoff)
        cutoff_ts = midnight(cutoff)
        for table in TABLE_OF.values():
            while True:
                n = self._step(lambda conn: _delete_raw_chunk(conn, table, cutoff_ts))
                counts[table] += n
                yield
                if n < _CHUNK:
                    break
        yield from self._prune_rollups(cutoff)
        return {table: counts[table] for table in TABLE_OF.values()}

    def _prune_rollups(self, cutoff):
        for table, key, where in _ROLLUP_PRUNE:
            while True:
                n = self._step(lambda conn: _delete_chunk(conn, table, key, where, (cutoff,)))
                yield
                if n < _CHUNK:
                    break
        for table, key, column in _ROLLUP_PRUNE_BY_NAME:
            position = self._step(lambda conn: _delete_by_name(conn, table, key, column, cutoff, None))
            yield
            while position is not None:
                position = self._step(lambda conn: _delete_by_name(conn, table, key, column, cutoff, position))
                yield

    # -- salvage: readable rows of a corrupt file, newest first ---------------------------------
    def _salvage_job(self):
        """The salvage to run (recorded in store_meta, so a restart goes on where it stopped), or None."""
        conn = self.writer.conn
        if self.salvage_new:
            with contextlib.suppress(sqlite3.Error):
                self._step(lambda c: c.executemany(
                    "INSERT OR IGNORE INTO store_meta (key, value) VALUES (?, ?)",
                    [(f"salvage:{path}", json.dumps({"path": path, "owner": os.getpid()}))
                     for path in self.salvage_new]))
                self.salvage_new = []
        self.salvage_scan = False
        for key, value in conn.execute("SELECT key, value FROM store_meta WHERE key >= 'salvage:' AND key < 'salvage;'"):
            state = json.loads(value)
            owner = state.get("owner")
            if owner not in (None, os.getpid()) and pid_alive(owner):
                continue  # another worker is copying it
            state["owner"] = os.getpid()
            self.salvage_scan = True  # look again when this one is done
            return self._salvage(key, state)
        return None

    def _salvage(self, key, state):
        """Copy the rows of a corrupt file newest first, stepping past pages that cannot be read.

        Errors of the corrupt file end the copy (logged); errors of the store propagate, and
        the copy goes on from its recorded position later.
        """
        path = state["path"]
        try:
            source = connection.sqlite_connect(f"file:{urllib.parse.quote(os.path.abspath(path))}?mode=rw", uri=True,
                                     timeout=5, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            source, state["error"] = None, str(exc)
        try:
            for kind in RECORD_KINDS if source is not None else ():
                if kind in state.get("done", ()):
                    continue
                sql = (f"SELECT rowid, {', '.join(COLUMNS[kind])} FROM {TABLE_OF[kind]} WHERE rowid < ?"
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
                            classify(unreadable) == "schema" or "not a database" in str(unreadable)):
                        if classify(unreadable) != "schema":
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
                    self._step(_salvage_step(kind, [row[1:] for row in rows], key, state))
                    self.store.salvaged += len(rows)
                    yield
                if state.get("error"):
                    break
                state.setdefault("done", []).append(kind)
        finally:
            close_quietly(source)
        self._step(lambda conn: conn.execute("DELETE FROM store_meta WHERE key = ?", (key,)))
        if state.get("error"):
            log.warning("local store could not copy the rows of %s (%s); %d rows copied", path, state["error"],
                        state.get("rows", 0))
        else:
            log.warning("local store copied %d readable rows back from %s (%d unreadable ranges skipped)",
                        state.get("rows", 0), path, state.get("unreadable", 0))


def _salvage_step(kind, params, key, state):
    """The transaction of one salvage step: the rows, and the progress that goes with them."""
    def work(conn):
        if params:
            insert_many(conn, f"ignore {kind}", params)
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


def compact_day(conn, day):
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
    """Rows deleted per table, for one log line."""
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
    ("req_day", "day, name"), ("req_hist_all", "day, bucket"), ("dep_day", "day, type, target"),
    ("dep_hist", "day, type, target, bucket"), ("dep_hist_all", "day, bucket"))) + (
    ("ev_user_last", "user_id", "last_day < ?"), ("ev_anonymous_last", "id", "last_day < ?"),
    ("ev_session_last", "id", "last_day < ?"))
# Rollup tables keyed by name first.
_ROLLUP_PRUNE_BY_NAME = (("ev_name_user_day", "name, day, user_id", "day"), ("req_hist", "name, day, bucket", "day"),
                         ("ev_name_user_last", "name, user_id", "last_day"))


def used_mb(conn):
    """Megabytes of the database's pages in use (the file never shrinks: free pages are reused)."""
    pages, free, size = (conn.execute(f"PRAGMA {p}").fetchone()[0]
                         for p in ("page_count", "freelist_count", "page_size"))
    return (pages - free) * size / _MB


def _oldest_day(conn):
    """The oldest day with a raw or rollup row, or None for an empty store."""
    days = [conn.execute(f"SELECT MIN(ts) FROM {table}").fetchone()[0] for table in TABLE_OF.values()]
    oldest = [utc_day(ts) for ts in days if ts is not None]
    oldest += [d for (d,) in (conn.execute(f"SELECT MIN(day) FROM {t}").fetchone()
                              for t in ("ev_day", "req_day", "dep_day")) if d is not None]
    return min(oldest) if oldest else None
