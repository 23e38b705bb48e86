"""LocalStore: the local sink and usage source; its lifecycle, its queue's front door, its health and its reads."""
import contextlib
import errno
import logging
import os
import sqlite3
import threading
import time

from config import ConfigError, Settings
from journal import claim_orphans
from local_store import pending
from local_store.connection import (classify, connect, diagnose, file_identity, rollback, sqlite_connect,
                                    write_transaction)
from local_store.maintenance import used_mb
from local_store.queries import usage_rows
from local_store.rows import encode, event_row, insert_many, max_params
from local_store.schema import SCHEMA, migrate
from local_store.record_queue import StorageUnavailable
from local_store.space import Space
from local_store.writer import ReadGate, Writer

log = logging.getLogger(__name__)

_QUEUE_WARN = 0.8              # problems() reports the queue from this fill level
_MB = 1024 * 1024


class LocalStore:
    """The local sink: queues records in memory (bounded) and writes them in batches on a writer thread.

    The writer (see writer) survives every SQLite error. While it fails, events are refused
    (StorageUnavailable, which POST /event answers with 503); what close() cannot write in time
    is saved next to the database (see pending) and imported by the next start(). Rows older than
    `retention_days`, and the oldest days while the database uses more than `max_mb`, are pruned
    by the writer in short transactions (see maintenance). `rows()` reads the dashboard's figures
    (see queries).
    """

    def __init__(self, path, batch_size=500, flush_interval=0.2, top=10, *, queue_capacity=None,
                 retention_days=None, max_mb=None, shutdown_grace=None, min_free_mb=None, reserve_mb=None,
                 clock=time.time):
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
        self.space = Space(path, defaults.local_min_free_mb if min_free_mb is None else min_free_mb,
                           defaults.local_reserve_mb if reserve_mb is None else reserve_mb)
        self.gate = ReadGate()
        self._w = None
        # What health() reports; the writer and its maintenance update these (they outlive a restart).
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
        self.size_problem = None   # set by the size check while only today's rows are left over LOCAL_MAX_MB
        self.suspect = False       # a reader saw a corrupt page: the writer checks the file
        self._schema_ready = False
        self._schema_identity = None
        self._schema_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings, **overrides):
        """The store of `settings` (TELEMETRY_DB and the LOCAL_* settings); keyword arguments override."""
        kwargs = dict(batch_size=settings.local_batch_size, flush_interval=settings.local_flush_interval,
                      top=settings.usage_top, queue_capacity=settings.local_queue_capacity,
                      retention_days=settings.local_retention_days, max_mb=settings.local_max_mb,
                      shutdown_grace=settings.shutdown_grace, min_free_mb=settings.local_min_free_mb,
                      reserve_mb=settings.local_reserve_mb)
        kwargs.update(overrides)
        return cls(settings.telemetry_db, **kwargs)

    @property
    def pending_path(self):
        """The JSON-lines file close() saves unwritten records to (see pending)."""
        return self.path + ".pending.jsonl"

    def _pending_claim(self, segment):
        """The pending claim of this process that a journal segment becomes (the writer imports it at start)."""
        return f"{self.pending_path}.{os.getpid()}.{os.path.basename(segment).replace('.', '-')}"

    def create_schema(self):
        """Create (or migrate) the database file, its tables, rollups and triggers, without starting the writer."""
        with self._schema_lock:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            with write_transaction(self.path) as conn:
                migrate(conn)
            self.schema_opened(file_identity(self.path))

    def schema_opened(self, identity):
        """Note that the file with this (device, inode) has the current schema."""
        self._schema_identity, self._schema_ready = identity, True

    def load_rows(self, kind, rows):
        """Bulk-load raw rows of `kind` (tuples in schema.COLUMNS[kind] order) in one transaction, creating the
        store when needed. For scripts and benchmarks: it bypasses the queue, and the rollup triggers fire
        as for the writer."""
        if not self._schema_ready:
            self.create_schema()
        with write_transaction(self.path) as conn:
            insert_many(conn, kind, rows, max_params(conn))

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self):
        """Open or create the database, claim records an earlier shutdown saved, start the writer.

        Raises config.ConfigError naming TELEMETRY_DB when the file cannot be opened or created; a
        corrupt file is moved aside and a new one started; a full disk or a locked file is retried
        by the writer (events are refused meanwhile).
        """
        w = Writer(self)
        self._schema_ready = False  # a forked worker checks the file again
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        except OSError as exc:
            raise self._config_error(exc) from None
        for attempt in (1, 2):
            try:
                w.open()
                break
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    w.note_failure("full", exc)
                    break
                raise self._config_error(exc) from None
            except sqlite3.Error as exc:
                kind = classify(exc)
                if kind == "corrupt" and attempt == 1 and w.quarantine(exc):
                    continue
                if kind in ("full", "busy", "io"):
                    w.note_failure(kind, exc)  # the writer keeps trying
                    break
                raise self._config_error(exc) from None
        claim_orphans(self.path + ".journal", self._pending_claim)
        w.claims = pending.claim(self.pending_path)
        self._w = w
        w.start_thread()

    def _config_error(self, exc):
        return ConfigError(f"TELEMETRY_DB={self.path} cannot be opened or created: {diagnose(self.path, exc)}")

    def close(self, timeout=None):
        """Write what is queued within `timeout` seconds (default: shutdown_grace) and stop the writer.

        What could not be written in time -- the batch in hand and the rest of the queue -- is
        appended to `<db>.pending.jsonl`, which the next start() imports.
        """
        w = self._w
        if w is None or w.closed:
            return
        leftovers, stuck = w.stop(self.shutdown_grace if timeout is None else max(0.0, timeout))
        rows, count, dropped = encode(leftovers)
        self.write_errors += dropped
        if count and stuck:
            log.warning("local store: the writer was stuck in a commit at shutdown; its batch is saved as well "
                        "(events are stored once, other rows may count twice)")
        if not count or self._save_pending(rows, count):
            pending.remove(w.claims)
            w.queue.journal.discard()
        else:  # the accepted events are in the journal: the next start imports them from there
            w.queue.journal.hand_over(self._pending_claim)

    def _save_pending(self, rows, count):
        """Save rows to the pending file (on a full disk, in the reserve's room); ONE error line when even that fails."""
        try:
            try:
                pending.save(self.pending_path, rows)
            except OSError as exc:
                if exc.errno != errno.ENOSPC or not self.space.release():
                    raise
                pending.save(self.pending_path, rows)
        except (OSError, TypeError, ValueError) as exc:
            events = len(rows.get("event", ()))
            self.lost += count - events
            log.error("local store lost %d records (requests, dependencies, traces) at shutdown: they could not be written to %s nor saved to %s (%s)%s",
                      count - events, self.path, self.pending_path, exc,
                      f"; the {events} events among them are kept in its journal for the next start" if events else "")
            return False
        self.saved += count
        log.warning("local store saved %d records it could not write in time to %s; the next start imports them",
                    count, self.pending_path)
        return True

    # -- the sink protocol: the request path only queues the record; rows are built on the writer thread
    def track_event(self, rec):
        """Queue one event; StorageUnavailable when the queue is full or the writer is failing."""
        w = self._w
        if w.failing:
            raise StorageUnavailable(f"the local store cannot write ({w.reason}); events are refused until it "
                                     "recovers")
        low = self.space.low()
        if low:
            raise StorageUnavailable(low)
        w.queue.put_event(event_row(rec))

    def track_request(self, rec):
        """Queue one request (also while the writer is failing, as long as there is room)."""
        self._w.queue.put("request", rec)

    def track_dependency(self, rec):
        """Queue one dependency."""
        self._w.queue.put("dependency", rec)

    def track_trace(self, record):
        """Queue one log record of the trace logger (a `traces` row)."""
        self._w.queue.put("trace", record)

    def flush(self, timeout=10.0):
        """Wait until every row queued before this call is committed (False when that took too long)."""
        w = self._w
        if w is None:
            return True
        if w.thread is None or not w.thread.is_alive():
            return not w.held and not w.queue.items
        done = threading.Event()
        w.queue.control(("flush", done))
        return done.wait(timeout)

    def prune(self, timeout=60.0):
        """Run the retention and size pruning now (on the writer) and wait for it; returns last_prune."""
        w = self._w
        if w is None or not w.running:
            raise StorageUnavailable("the local store is not running")
        done = threading.Event()
        w.queue.control(("prune", done))
        done.wait(timeout)
        return self.last_prune

    # -- state ---------------------------------------------------------------------------------
    @property
    def queued(self):
        """Records queued and not yet taken by the writer."""
        return len(self._w.queue) if self._w is not None else 0

    @property
    def maintaining(self):
        """True while a maintenance job (salvage, pruning, compaction) is in progress or requested."""
        return self._w is not None and self._w.maintenance.busy

    def used_mb(self):
        """Megabytes of the database's pages in use (what LOCAL_MAX_MB bounds)."""
        with contextlib.closing(connect(self.path)) as conn:
            return used_mb(conn)

    def health(self):
        """Counters and state for /healthz."""
        w = self._w
        if w is None:
            return {"started": False}
        report = {"started": True, "queued": len(w.queue), "queue_capacity": self.queue_capacity,
                  "written": self.written, "write_errors": self.write_errors,
                  "writer_alive": w.thread is not None and w.thread.is_alive(),
                  "failing": w.failing, "last_error": self.last_error,
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
        if w.failing:
            since = time.monotonic() - (w.failing_since or time.monotonic())
            out.append(f"local store writer failing for {since:.0f} s: {w.reason} ({self.last_error}); "
                       "events are refused")
        queued = len(w.queue)
        if queued >= _QUEUE_WARN * self.queue_capacity:
            out.append(f"local store queue {100 * queued // self.queue_capacity} % full "
                       f"({queued} of {self.queue_capacity})")
        if self.size_problem:
            out.append(self.size_problem)
        low = self.space.low()
        if low:
            out.append(low)
        if w.queue.journal_error:
            out.append(f"local store cannot journal events ({w.queue.journal_error}); events are refused")
        if self.lost:
            out.append(f"local store lost {self.lost} records at shutdown (the pending file could not be written)")
        return out

    def _db_mb(self):
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):
                total += os.path.getsize(self.path + suffix)
        return round(total / _MB, 3)

    # -- usage ---------------------------------------------------------------------------------
    def rows(self, start, end):
        """Usage section rows (the shape monitoring_utils builds from) for [start, end]."""
        t0, t1 = start.timestamp(), end.timestamp()
        for attempt in (1, 2):
            missing = self._prepare_read(force=attempt == 2)
            with self.gate.reading():
                if missing:  # deleted and not recreated yet: an empty store's figures
                    conn = sqlite_connect(":memory:")
                    conn.executescript(SCHEMA)
                else:
                    conn = connect(self.path)
                try:
                    conn.execute("BEGIN")  # one snapshot for every section
                    try:
                        return list(usage_rows(conn, t0, t1, self.top))
                    finally:
                        rollback(conn)
                except sqlite3.DatabaseError as exc:
                    kind = classify(exc)
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
        return self._w is not None and self._w.running

    def _prepare_read(self, force=False):
        """Make sure the file has its tables; True when it is missing and the writer has not recreated it yet.

        While the writer runs, only the writer creates the file (it first closes its connection to
        the old one, which removes the old -wal and -shm).
        """
        if self._writer_running():
            if file_identity(self.path) != self._schema_identity:
                self._w.queue.control(("check", None))
                deadline = time.monotonic() + 2.0
                while time.monotonic() < deadline and (file_identity(self.path) is None
                                                       or file_identity(self.path) != self._schema_identity):
                    time.sleep(0.01)
            if file_identity(self.path) is None:
                return True
            if force:
                self.create_schema()
            return False
        if force or not self._schema_ready or file_identity(self.path) != self._schema_identity:
            self.create_schema()
        return False

    def _report_corrupt(self):
        """A read saw a corrupt page: the writer checks the file and moves it aside."""
        self.suspect = True
        if self._writer_running():
            self._w.queue.control(("check", None))
