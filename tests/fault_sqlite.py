"""Fault injection for the local store through its one seam, `local_store.connection.connection_factory`.

`SqliteFaults().install(monkeypatch)` makes every connection local_store opens from then on a
`FaultyConnection`, a real sqlite3.Connection whose execute() -- while a fault is on and for the
statements it names -- raises the sqlite3 error SQLite would raise, or blocks the way a commit
on a stuck disk blocks (until the connection is interrupted, as close() does, or the fault is
healed). Nothing of the store is mocked: its own code meets the failure.
"""
import sqlite3
import threading

from local_store import connection

WRITES = ("INSERT", "BEGIN IMMEDIATE", "COMMIT")


class SqliteFaults:
    """A switchable fault for the statements starting with one of `statements` (case-insensitive)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._error = None
        self._hang = False
        self._statements = ()
        self._interrupted = set()
        self.hits = 0

    def fail(self, message="database or disk is full", error=sqlite3.OperationalError, statements=WRITES):
        """From now on, matching statements raise `error(message)`."""
        with self._cond:
            self._error, self._hang = (error, message), False
            self._statements = tuple(s.upper() for s in statements)

    def hang(self, statements=("COMMIT",)):
        """From now on, matching statements block until the connection is interrupted or heal() is called."""
        with self._cond:
            self._error, self._hang = None, True
            self._statements = tuple(s.upper() for s in statements)
            self._interrupted.clear()

    def heal(self):
        """No more faults; blocked statements go on."""
        with self._cond:
            self._error, self._hang = None, False
            self._cond.notify_all()

    def install(self, monkeypatch):
        monkeypatch.setattr(connection, "connection_factory", self.connection_class())
        return self

    def _check(self, conn, sql):
        text = sql.lstrip().upper()
        with self._cond:
            if not self._statements or not text.startswith(self._statements):
                return
            if self._error is not None:
                self.hits += 1
                error, message = self._error
                raise error(message)
            if self._hang:
                self.hits += 1
                self._cond.wait_for(lambda: not self._hang or id(conn) in self._interrupted)
                if id(conn) in self._interrupted:
                    self._interrupted.discard(id(conn))
                    raise sqlite3.OperationalError("interrupted")

    def _interrupt(self, conn):
        with self._cond:
            self._interrupted.add(id(conn))
            self._cond.notify_all()

    def connection_class(self):
        faults = self

        class FaultyConnection(sqlite3.Connection):
            def execute(self, sql, *args):
                faults._check(self, sql)
                return super().execute(sql, *args)

            def interrupt(self):
                faults._interrupt(self)
                super().interrupt()

        return FaultyConnection
