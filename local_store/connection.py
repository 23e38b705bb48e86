"""Opening the database file, and what SQLite's errors and the file's identity say about it."""
import contextlib
import os
import sqlite3
import time
from datetime import datetime, timezone

# The class of every connection the store opens. A seam for fault injection: a test may put here
# a sqlite3.Connection subclass whose execute() fails on demand (tests/fault_sqlite.py). Production
# never changes it.
connection_factory = sqlite3.Connection


def sqlite_connect(*args, **kwargs):
    """sqlite3.connect as the standard library has it, even when an OpenTelemetry sqlite3
    instrumentation wrapped it: the store's own SQL is never a dependency of the host's requests."""
    connect_ = sqlite3.connect
    return getattr(connect_, "__wrapped__", connect_)(*args, **kwargs)


def connect(path, timeout=30.0):
    """Open the store with WAL and a busy timeout.

    Switching a new file to WAL needs it to itself, and SQLite answers "database is locked" at
    once, without its busy handler, when another process (the other gunicorn worker starting at
    the same moment) holds it: retry that for up to `timeout` seconds instead of failing the
    worker's boot. A file already in WAL mode is not switched again.
    """
    conn = sqlite_connect(path, timeout=timeout, isolation_level=None, check_same_thread=False,
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


@contextlib.contextmanager
def write_transaction(path):
    """A connection inside BEGIN IMMEDIATE: committed on success, rolled back on any error."""
    conn = connect(path)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            rollback(conn)
            raise
    finally:
        conn.close()


# What each kind of failure is called in logs and /healthz.
REASONS = {"corrupt": "database corrupt", "full": "disk full", "busy": "database locked",
           "io": "disk I/O error", "readonly": "database read-only", "cantopen": "cannot open the database file",
           "schema": "tables missing", "replaced": "database file replaced or deleted", "other": "database error"}


def classify(exc):
    """One of the REASONS keys for a sqlite3 error (by its SQLite error name, else by its message)."""
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


def file_identity(path):
    """(device, inode) of the file at `path`, or None when there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def rollback(conn):
    """Roll back the open transaction, if any, ignoring a failure to do so."""
    try:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    except sqlite3.Error:
        pass


def close_quietly(conn):
    """Close `conn` (when there is one), ignoring a failure to do so."""
    if conn is not None:
        try:
            conn.close()
        except sqlite3.Error:
            pass


def checkpoint(conn):
    """Move the write-ahead log into the database and truncate it: on a full disk, the space it held.

    SQLite checkpoints on its own only once the log reaches 1000 pages; until then a disk too full
    for the log to grow stays full however much room the log would give back.
    """
    if conn is not None:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def remove_stale_sidecars(path):
    """Remove the -wal/-shm/-journal of a database file that no longer exists.

    A new file at the same path would otherwise pick up the old write-ahead log and shared memory.
    """
    for suffix in ("-wal", "-shm", "-journal"):
        with contextlib.suppress(OSError):
            os.remove(path + suffix)


def move_aside(path, found):
    """Move the database at `path` (with its -wal/-shm) to <path>.corrupt-<UTC time>; return that name.

    Nothing is moved when the file at `path` is no longer the one `found` (another process replaced it).
    """
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target, n = f"{path}.corrupt-{stamp}", 1
    while os.path.exists(target):
        target, n = f"{path}.corrupt-{stamp}-{n}", n + 1
    if found is not None and file_identity(path) == found:
        os.replace(path, target)
        for suffix in ("-wal", "-shm"):
            if os.path.exists(path + suffix):
                os.replace(path + suffix, target + suffix)
    return target


def diagnose(path, exc):
    """Why the database at `path` cannot be opened, made specific where SQLite or the OS is vague."""
    folder = os.path.dirname(os.path.abspath(path))
    reason = f"{exc.strerror}: {exc.filename}" if isinstance(exc, OSError) and exc.strerror else str(exc)
    parent = folder
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent) if os.path.dirname(parent) != parent else ""
    if parent and not os.path.isdir(parent):
        return f"{parent} is a file, not a folder"
    if os.path.isdir(path):
        return f"{reason} (it is a folder)"
    if not os.access(folder, os.W_OK):
        return f"{reason} (the folder {folder} is not writable)"
    if os.path.exists(path) and not os.access(path, os.W_OK):
        return f"{reason} (the file is not writable)"
    return reason
