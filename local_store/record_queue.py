"""The bounded queue between the request threads and the writer, and the journal each accepted event goes to first."""
import collections
import math
import threading

from journal import Journal, json_line


class StorageUnavailable(Exception):
    """The local store cannot take a record now (queue full, writer failing, store closed); retry later."""


class RecordQueue:
    """A deque bounded by `room` under `lock` (queue.Queue's put_nowait costs three times more).

    Before the writer waits for `wake` it sets `wake_at`: the queue length at which a put sets
    `wake` (1 when idle; the rest of a batch while gathering one, so a busy writer is not woken
    per record). `seq` counts the items ever queued and `taken` those the writer has taken: a
    journal segment closed when `seq` was N may go once the writer has committed N items.
    """

    def __init__(self, capacity, db_path):
        self.items = collections.deque()
        self.room = capacity       # 0 once closed
        self.closed = False
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.wake_at = math.inf
        self.seq = self.taken = 0
        self.journal = Journal(db_path + ".journal")
        self.journal_error = None  # why the last append failed, until one succeeds

    def __len__(self):
        return len(self.items)

    def put(self, kind, record):
        """Queue one record while there is room (waking the writer if it sleeps), else StorageUnavailable."""
        with self.lock:
            if len(self.items) < self.room:
                self.items.append((kind, record))
                self.seq += 1
                if len(self.items) >= self.wake_at:
                    self.wake.set()
                return
        raise self._refusal()

    def put_event(self, row):
        """Journal one event row, then queue it: once this returns, a crash of the process cannot lose it."""
        line = json_line('{"kind":"event","row":', row)  # the pending file's format
        with self.lock:
            if len(self.items) < self.room:
                try:
                    self.journal.append(line, self.seq)
                except OSError as exc:
                    self.journal_error = f"{exc.strerror or exc}"
                    raise StorageUnavailable(f"the local store cannot journal the event ({self.journal_error})") \
                        from None
                self.journal_error = None
                self.items.append(("event", row))
                self.seq += 1
                if len(self.items) >= self.wake_at:
                    self.wake.set()
                return
        raise self._refusal()

    def _refusal(self):
        if self.closed:
            return StorageUnavailable("the local store is closed")
        return StorageUnavailable("the local store cannot take more records (queue full)")

    def control(self, item):
        """Queue a control item (flush, stop, prune, check): it never counts against the capacity."""
        with self.lock:
            self.items.append(item)
            self.seq += 1
        self.wake.set()

    def take(self, into, limit, timeout, enough=1, stopping=None):
        """Move up to `limit` items onto the list `into` (the writer's batch in hand), first waiting up to
        `timeout` while fewer than `enough` are queued (a control item wakes it at once); return them."""
        dq = self.items
        if len(dq) < enough and timeout > 0 and not (stopping and stopping.is_set()):
            self.wake_at = enough
            if len(dq) < enough:  # checked again after `wake_at` is set: a put after this sets `wake`
                self.wake.wait(timeout)
            self.wake_at = math.inf
            self.wake.clear()  # after the wait, so a control item queued before it (which sets `wake`) ends it
        with self.lock:
            n = min(len(dq), max(limit, 1))
            if not n:
                return None
            popleft = dq.popleft
            items = [popleft() for _ in range(n)]
            into.append(items)
            self.taken += n
        return items

    def close(self):
        """Refuse every record from now on."""
        self.closed = True
        self.room = 0

    def rotate_journal(self):
        """Close the journal's open segment, noting how many items were queued before it closed."""
        with self.lock:
            self.journal.rotate(self.seq)
