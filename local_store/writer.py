"""The writer of one LocalStore.start(): its bounded queue, one transaction per batch, and recovery from faults.

The writer survives every SQLite error: transient ones (locked, disk full, I/O) are retried with
backoff while the batch is kept; a database file replaced or deleted while open is reopened
(created again with its schema); a corrupt one is moved aside, a new one started and its readable
rows copied back (see maintenance). While it fails, events are refused (StorageUnavailable).
"""
import contextlib
import errno
import logging
import math
import os
import sqlite3
import threading
import time

from local_store import pending
from local_store.connection import (REASONS, checkpoint, classify, close_quietly, connect, file_identity, move_aside,
                                    remove_stale_sidecars, rollback)
from local_store.maintenance import Maintenance
from local_store.record_queue import RecordQueue
from local_store.rows import encode, insert_many, max_params
from local_store.schema import TABLE_OF, migrate
from telemetry import mark_internal_thread

log = logging.getLogger(__name__)

_IDLE_TICK = 1.0               # the writer wakes at least this often when idle
_CHECK_INTERVAL = 2.0          # seconds between checks that TELEMETRY_DB is still the file the writer has open
_BACKOFF_MIN, _BACKOFF_MAX = 0.05, 2.0
_FAILURE_LOG_INTERVAL = 60.0


class ReadGate:
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
        """Hold off a switch of files while a read runs."""
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
        """Wait for the reads in progress, and hold new ones off, while the writer changes files."""
        with self._cond:
            self._switching = True
            self._cond.wait_for(lambda: self._readers == 0, 10.0)
        try:
            yield
        finally:
            with self._cond:
                self._switching = False
                self._cond.notify_all()


class Writer:
    """One start()'s writer thread: the queue, the batch in hand, its connection, its failures, its maintenance.

    The store's settings and counters stay on `store` (they outlive a restart); the writer updates them.
    """

    def __init__(self, store):
        self.store = store
        self.path = store.path
        self.queue = RecordQueue(store.queue_capacity, store.path)
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
        self.abandoned = False     # close() took the batch in hand over: never commit it
        self.commit_lock = threading.Lock()
        self.attempts = 0
        self.check_now = False
        self.next_check = 0.0
        self.failing = False       # events are refused while True
        self.failing_since = None
        self.reason = None
        self._next_failure_log = 0.0
        self.maintenance = Maintenance(self)
        self.done = 0              # queue items committed (or handled): the journal's segments go by it

    @property
    def closed(self):
        """True once close() has been called."""
        return self.queue.closed

    @property
    def running(self):
        """True while the thread runs and close() has not been called."""
        return not self.closed and self.thread is not None and self.thread.is_alive()

    # -- the thread -------------------------------------------------------------------------
    def start_thread(self):
        """Start the writer thread; its first batch is the rows of the claimed pending files."""
        self.thread = threading.Thread(target=self._run, name="local-store-writer", daemon=True)
        self.thread.start()

    def stop(self, timeout):
        """Stop the thread within `timeout` seconds; return (what it did not write, stuck): the batch in hand and
        the rest of the queue, and whether the thread was stuck in a commit it may still finish."""
        deadline = time.monotonic() + timeout
        self.queue.close()
        self.stop_deadline = deadline - min(1.0, timeout * 0.25)  # the rest of the time is for saving
        self.stopping.set()
        self.queue.control(("stop", None))
        self.thread.join(max(0.0, self.stop_deadline - time.monotonic()))
        stuck = self.thread.is_alive()
        locked = True
        if stuck:  # inside SQLite (a lock held elsewhere, a slow disk): take the batch over
            if self.conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    self.conn.interrupt()
            locked = self.commit_lock.acquire(timeout=max(0.0, min(0.5, deadline - time.monotonic())))
        try:
            with self.queue.lock:
                self.abandoned = True
                leftovers = self.held + [list(self.queue.items)]
                self.queue.items.clear()
        finally:
            if stuck and locked:
                self.commit_lock.release()
        self.abort.set()
        return leftovers, stuck and not locked

    def _run(self):
        """The writer thread: one transaction per batch; recovery and maintenance in between."""
        mark_internal_thread()
        try:
            self._load_claims()
            self._write_loop()
        except BaseException as exc:  # a bug: refuse events rather than accept what nobody will write
            self.note_failure("other", exc)
            self.reason = "writer stopped"
            log.exception("local store writer for %s stopped", self.path)
        finally:
            self.drop_conn()

    def _load_claims(self):
        """Put the rows of the claimed pending files in hand: the writer's first batch."""
        rows = pending.load(self.claims, self.store.pending_path)
        if rows:
            self.held.append([("rows", rows)])
        elif self.claims:
            pending.remove(self.claims)
            self.claims = []

    def _write_loop(self):
        waiters = []
        while not self.abandoned:
            if self.stopping.is_set() and time.monotonic() >= self.stop_deadline:
                return  # close() saves what is left
            if not self.held:
                waiters = self._gather()
            if self.held:
                delay = self._commit()
                if delay is not None:  # not written: the batch stays in hand
                    if delay:
                        self.abort.wait(min(delay, max(0.0, self.stop_deadline - time.monotonic())))
                    continue
            for waiter in waiters:
                waiter.set()
            waiters = []
            if self.stopping.is_set():
                if not self.queue.items:
                    return
                continue
            self._maintain()

    def _gather(self):
        """Take the next batch into `held`: up to batch_size records, or what came within flush_interval."""
        batch_size, flush_interval = self.store.batch_size, self.store.flush_interval
        count, waiters, deadline = 0, [], None
        timeout = 0.0 if self.maintenance.busy or self.stopping.is_set() else _IDLE_TICK
        while True:
            remaining = batch_size - count
            items = self.queue.take(self.held, remaining, timeout, 1 if deadline is None else remaining,
                                    self.stopping)
            if items:
                for kind, payload in items:
                    if kind in TABLE_OF:
                        count += 1
                    elif kind == "flush":
                        waiters.append(payload)
                    elif kind == "prune":
                        self.maintenance.request(payload)
                    elif kind == "check":
                        self.check_now = True
            elif deadline is None:
                break  # idle
            if deadline is None:
                deadline = time.monotonic() + flush_interval
            if waiters or count >= batch_size or self.stopping.is_set() or self.check_now or \
                    self.maintenance.requested:
                break
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                break
        return waiters

    def _commit(self):
        """Write the batch in hand in one transaction: None when done, else seconds to wait before retrying."""
        store = self.store
        if self.encoded is None:
            rows, count, dropped = encode(self.held)
            store.write_errors += dropped
            self.encoded = rows, count
        rows, count = self.encoded
        if not count:
            with self.commit_lock:
                self.held, self.encoded = [], None
            self.done = self.queue.taken
            return None
        try:
            conn = self.conn or self.open()
            conn.execute("BEGIN IMMEDIATE")
            try:
                limit = max_params(conn)
                for kind, params in rows.items():
                    insert_many(conn, kind, params, limit)
                with self.commit_lock:
                    if self.abandoned:  # close() saved this batch: never write it as well
                        rollback(conn)
                        return None
                    conn.execute("COMMIT")
                    replaced = file_identity(self.path) != self.identity
                    if not replaced:
                        self.held, self.encoded = [], None
            except BaseException:
                rollback(conn)
                raise
        except (sqlite3.Error, OSError) as exc:
            return self.recover(exc)
        if replaced:  # the file was replaced or deleted: the batch may have gone to the old one
            return self.recover(None)
        store.written += count
        self.done = self.queue.taken
        self.attempts = 0
        if self.claims:
            store.imported += count
            log.info("local store imported %d records saved at an earlier shutdown", count)
            pending.remove(self.claims)
            self.claims = []
        if self.failing:
            if self.reason == REASONS["full"]:
                checkpoint(self.conn)
            self.recovered()
        return None

    # -- faults and recovery ----------------------------------------------------------------
    def recover(self, exc):
        """Classify a failed write and repair what can be; the seconds to wait before the next attempt."""
        self.attempts += 1
        if exc is None:
            kind = "replaced"
        elif isinstance(exc, OSError):
            kind = "full" if exc.errno == errno.ENOSPC else "cantopen"
        else:
            kind = classify(exc)
        if kind == "corrupt":
            if self.quarantine(exc):
                return 0.0
        elif kind == "replaced" or self.conn is not None and file_identity(self.path) != self.identity:
            log.warning("local store: %s was replaced or deleted while open; writing to the file at that path now",
                        self.path)
            self.store.reopened += 1
            self.drop_conn()
            if self.attempts <= 3:
                return 0.0
        elif kind == "full":
            if self.store.space.release():  # room for what was accepted: try again at once
                return 0.0
            checkpoint(self.conn)
        elif kind != "busy":
            self.drop_conn()  # reopened (and its schema checked) by the next attempt
        self.note_failure(kind if kind in REASONS else "other", exc or "file replaced")
        return min(_BACKOFF_MIN * 2 ** (self.attempts - 1), _BACKOFF_MAX)

    def note_failure(self, kind, exc):
        """Enter (or stay in) the failing state: events are refused; one error line, then one a minute."""
        reason = REASONS[kind]
        self.store.last_error = str(exc)
        now = time.monotonic()
        self.reason = reason
        if not self.failing:
            self.failing_since = now
            self.failing = True
            self._next_failure_log = now + _FAILURE_LOG_INTERVAL
            log.error("local store cannot write to %s: %s (%s); retrying, events are refused until it recovers",
                      self.path, reason, exc)
        elif now >= self._next_failure_log:
            self._next_failure_log = now + _FAILURE_LOG_INTERVAL
            log.error("local store still cannot write to %s after %.0f s: %s (%s); %d records queued",
                      self.path, now - self.failing_since, reason, exc, len(self.queue))

    def recovered(self):
        """Leave the failing state (one line)."""
        log.warning("local store writes to %s resumed after %.1f s", self.path,
                    time.monotonic() - self.failing_since)
        self.failing, self.failing_since, self.reason = False, None, None

    def open(self):
        """(Re)open the writer's connection, creating the folder, the file and its schema when needed."""
        with self.store.gate.switching():
            # The -wal and -shm of a file replaced or deleted while open are its own: a new file at
            # the same path would read the old log as its own pages. Those still at the path are
            # removed (once this connection, which holds them, is closed); another worker's are kept.
            current = file_identity(self.path)
            stale = [] if current is None or current == self.identity else [
                self.path + suffix for suffix, ident in self.sidecars.items()
                if file_identity(self.path + suffix) == ident]
            self.drop_conn()
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            if not os.path.exists(self.path):
                remove_stale_sidecars(self.path)
            for sidecar in stale:
                with contextlib.suppress(OSError):
                    os.remove(sidecar)
            conn = connect(self.path)
            try:
                conn.execute("BEGIN IMMEDIATE")
                migrate(conn)
                conn.execute("COMMIT")
                identity = file_identity(self.path)
                if identity is None:
                    raise sqlite3.OperationalError("unable to open database file (it vanished)")
            except BaseException:
                rollback(conn)
                close_quietly(conn)
                raise
            self.conn, self.identity = conn, identity
            self.sidecars = {suffix: file_identity(self.path + suffix) for suffix in ("-wal", "-shm")}
            self.maintenance.rescan()
            self.store.schema_opened(identity)
        return conn

    def drop_conn(self):
        """Close the writer's connection (`identity` and `sidecars` stay: they name the file it had open)."""
        conn, self.conn = self.conn, None
        close_quietly(conn)

    def quarantine(self, exc):
        """Move a corrupt database (with its -wal/-shm) aside as <name>.corrupt-<UTC time>: ONE error line."""
        with self.store.gate.switching():
            found = file_identity(self.path)
            self.drop_conn()
            try:
                target = move_aside(self.path, found)
            except OSError as move_exc:
                self.note_failure("corrupt", f"{exc}; cannot move it aside: {move_exc}")
                return False
        self.store.quarantined.append(target)
        self.maintenance.salvage(target)
        log.error("local store: %s is corrupt (%s); moved it aside to %s and started a new store (its readable rows "
                  "are copied back in the background)", self.path, exc, target)
        return True

    def _reopen(self):
        """Open the file again; False (the failure noted) when that fails."""
        try:
            self.open()
        except (sqlite3.Error, OSError) as exc:
            self.recover(exc)
            return False
        if self.failing and not self.held:
            self.recovered()
        return True

    def _maintain(self):
        """Notice a replaced, deleted or corrupt file; run one step of salvage or pruning."""
        now = time.monotonic()
        if self.check_now or now >= self.next_check:
            self.check_now = False
            self.next_check = now + _CHECK_INTERVAL
            if self.conn is None or file_identity(self.path) != self.identity:
                if self.conn is not None:
                    log.warning("local store: %s was replaced or deleted while open; reopening it", self.path)
                    self.store.reopened += 1
                if not self._reopen():
                    return
            if self.store.suspect:
                self.store.suspect = False
                self.maintenance.verify()
        journal = self.queue.journal
        if journal.rotation_due():
            self.queue.rotate_journal()
        if journal.closed:
            journal.release(self.done)
        if self.conn is None and not self._reopen():  # moved aside just now, or not opened yet
            return
        self.maintenance.step()
