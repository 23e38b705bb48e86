"""Delivery that loses nothing: write-ahead storage, retries without new traffic, overflow to disk.

opencensus-ext-azure 1.1.15 (frozen) drops telemetry on timeouts and refused connections when
statsbeat is off, never retries in-process, drops on a full queue and logs dropped envelopes in
full. `ReliableExporterMixin` replaces its transmit and export paths; `Courier` is the one
background thread per process that re-sends stored batches and writes overflow to disk.
"""
import collections
import json
import logging
import os
import queue
import threading
import time
from datetime import datetime, timezone

import requests
from opencensus.ext.azure.common.transport import TransportStatusCode

import opencensus_adapter
from telemetry import mark_internal_thread

# Never exported: a delivery warning sent through the exporters would feed back into them.
log = logging.getLogger("azure_monitor.delivery")

RETRYABLE_STATUS = frozenset({401, 403, 408, 429, 500, 502, 503, 504})
# One offline storage folder per exporter, under TELEMETRY_STORAGE.
STORAGE_FOLDERS = ("events", "traces", "requests", "metrics")
_BLOB_TIME = "%Y-%m-%dT%H%M%S.%f"  # opencensus' LocalFileStorage names a batch <UTC time>-<random>.blob
SUCCESS, RETRY, DROP = TransportStatusCode.SUCCESS, TransportStatusCode.RETRY, TransportStatusCode.DROP


class DeliveryStats:
    """Thread-safe counters reported by /healthz, and the last delivery error of this process."""

    FIELDS = ("sent", "stored", "resent", "retries", "rejected", "dropped_storage_full", "overflowed")

    def __init__(self, clock=time.monotonic):
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(self.FIELDS, 0)
        self._full = set()
        self._last_error = None
        self._clock = clock
        self._failing_since = None  # when ingestion started failing (this outage), by `clock`

    def add(self, name, n=1):
        """Add n to one counter."""
        with self._lock:
            self._counts[name] += n

    def snapshot(self):
        """A copy of the counters."""
        with self._lock:
            return dict(self._counts, storage_full=bool(self._full), full_folders=sorted(self._full),
                        last_error=self._last_error, failing_for_s=self._failing_for())

    def _failing_for(self):
        """Seconds since ingestion started failing, or None while it accepts (caller holds the lock)."""
        return None if self._failing_since is None else round(self._clock() - self._failing_since, 1)

    def note_error(self, folder, reason):
        """Remember why delivery last failed: "<UTC time> <folder>: <reason>" (a reason, never data)."""
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        with self._lock:
            self._last_error = f"{now} {folder}: {reason}"

    def note_unavailable(self):
        """Ingestion could not be reached or asked us to retry: the outage starts now unless it already has."""
        with self._lock:
            if self._failing_since is None:
                self._failing_since = self._clock()

    def note_accepted(self):
        """Ingestion accepted a batch: any outage is over."""
        with self._lock:
            self._failing_since = None

    def mark_full(self, folder, full):
        """Record whether one storage folder is full; True when this call changed it."""
        with self._lock:
            changed = (folder in self._full) != full
            (self._full.add if full else self._full.discard)(folder)
            return changed


class ReliableExporterMixin:
    """Mixed in front of an OpenCensus exporter or handler class.

    Every batch is written to storage before it is sent (write-ahead) and deleted only when the
    ingestion endpoint accepted it, so a hang, a crash or a SIGTERM mid-send loses nothing.
    While the endpoint fails, batches go straight to storage and the Courier probes it every
    retry interval (or after Retry-After).
    """

    def __init__(self, stats, retry_interval, overflow_capacity, **options):
        """Set up delivery state before the SDK class builds itself (and starts its worker)."""
        self._stats = stats
        self._retry_interval = retry_interval
        self._overflow = collections.deque()
        self._overflow_capacity = overflow_capacity
        self._retry_at = 0.0
        self._send_lock = threading.Lock()
        self.last_failure = ""  # why ingestion last refused or could not be reached (no data, no endpoint)
        self._held = set()  # paths of batches this process leased until its next retry
        self._http = threading.local()  # one keep-alive session per sending thread
        # Items handed on (sent or stored), and whether any left out of queue order (an overflow):
        # the sink's journal of accepted events is released by these.
        self.settled = 0
        self.out_of_order = False
        super().__init__(**options)
        opencensus_adapter.use_outbox(self)

    # -- queueing ----------------------------------------------------------
    def enqueue(self, item):
        """Queue an item without blocking; a full queue overflows to memory, then to disk."""
        try:
            opencensus_adapter.put_nowait(self, item)
        except queue.Full:
            self.out_of_order = True
            if len(self._overflow) >= self._overflow_capacity:
                self._store(self._to_envelopes([item]))
                self.settled += 1
            else:
                self._overflow.append(item)
            self._stats.add("overflowed")

    def spill_overflow(self):
        """Write overflowed items to storage in batches (called by the Courier)."""
        while self._overflow:
            batch = []
            while self._overflow and len(batch) < self.max_batch_size:
                batch.append(self._overflow.popleft())
            self._store(self._to_envelopes(batch))
            self.settled += len(batch)

    def spill_queue(self):
        """Move everything still queued to storage (shutdown); markers are released."""
        items = opencensus_adapter.take_queued(self)
        for start in range(0, len(items), self.max_batch_size):
            self._store(self._to_envelopes(items[start:start + self.max_batch_size]))
            self.settled += len(items[start:start + self.max_batch_size])
        self.spill_overflow()
        return len(items)

    # -- sending -----------------------------------------------------------
    def _to_envelopes(self, items):
        """Convert queued items (log records or spans) to envelopes with processors applied."""
        raise NotImplementedError

    def deliver_batch(self, batch, event=None):
        """Deliver one batch taken from the queue by the SDK's worker, then release its flush marker."""
        try:
            self._deliver(self._to_envelopes(batch))
            self.settled += len(batch)
        finally:
            if event:
                event.set()

    def _deliver(self, envelopes):
        """Write-ahead store, then send unless the endpoint is backing off.

        Each envelope is serialised once: the same JSON lines are the stored batch and the POST body.
        """
        if not envelopes:
            return
        lines = serialise(envelopes)
        if self.backing_off():
            self._store_lines(lines)
            return
        blob = self.storage.put_lines(lines, lease_period=self.options.timeout + 5)
        result = self._post(lines)
        if result is SUCCESS:
            self._stats.add("sent", len(lines))
        if result is RETRY:
            if blob is None:  # the write-ahead copy failed (storage full): try once more, counted
                self._store_lines(lines)
            else:
                self._hold(blob)
                self._stats.add("stored", len(lines))
        elif blob is not None:
            blob.delete()

    def _store(self, envelopes):
        """Put envelopes in storage; a full storage is logged once and counted."""
        return self._store_lines(serialise(envelopes)) if envelopes else None

    def _store_lines(self, lines):
        """Put serialised envelopes in storage as one batch; a full storage is logged once and counted."""
        if not lines:
            return None
        blob = self.storage.put_lines(lines)
        if blob is None:
            self._stats.add("dropped_storage_full", len(lines))
            if self._stats.mark_full(os.path.basename(self.storage.path), True):
                log.error("telemetry storage %s is full (TELEMETRY_STORAGE_MAX_MB); "
                          "dropping new telemetry until it drains", self.storage.path)
        else:
            self._stats.add("stored", len(lines))
            self._stats.mark_full(os.path.basename(self.storage.path), False)
        return blob

    def backing_off(self):
        """True while the endpoint recently failed and the retry time has not come."""
        return time.monotonic() < self._retry_at

    def resend_stored(self):
        """Send stored batches oldest first; stop at the first failure. Returns batches sent."""
        sent = 0
        with self._send_lock:
            for blob in self._stored_blobs():
                if self.backing_off():
                    break
                result, _ = self._resend_blob(blob)
                if result is RETRY:
                    break
                if result is SUCCESS:
                    sent += 1
        return sent

    def drain_stored(self, deadline, progress=None):
        """Send every stored batch now, oldest first, even while backing off; stop at the first failure.

        For `flask telemetry drain`: the same send path as the Courier's (`_resend_blob`), under
        the same lock, so this process never sends a batch twice; other processes are kept off
        each batch by its lease. `progress(1)` is called after each batch. Returns (batches
        sent, items sent, None) or, when ingestion did not accept a batch (it stays stored) or
        `deadline` (monotonic) passed, (batches, items, reason).
        """
        batches = items = 0
        if not self._send_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            return batches, items, "timed out waiting for the send in progress"
        try:
            # Batches this process leased until its next retry are nobody else's: take them too.
            held = [opencensus_adapter.stored_blob(path) for path in list(self._held)]
            blobs = sorted(held + self._stored_blobs(), key=lambda b: os.path.basename(b.fullpath))
            for blob in blobs:
                if time.monotonic() >= deadline:
                    return batches, items, "timed out"
                self._held.discard(blob.fullpath)
                result, n = self._resend_blob(blob)
                if progress is not None:
                    progress(1)
                if result is RETRY:
                    return batches, items, self.last_failure or "ingestion did not accept the batch"
                if result is SUCCESS:
                    batches, items = batches + 1, items + n
        finally:
            self._send_lock.release()
        return batches, items, None

    def _hold(self, blob):
        """Lease a batch ingestion did not take until the next retry, and remember it as ours."""
        if blob.lease(self._retry_interval) is not None:
            if len(self._held) >= 1024:  # leases expire and are taken back by any process: forget those
                self._held = {path for path in self._held if os.path.exists(path)}
            self._held.add(blob.fullpath)

    def _stored_blobs(self):
        """The stored batches not leased by another sender, oldest first (expired leases are taken back)."""
        try:
            return list(self.storage.gets())
        except FileNotFoundError:  # the folder was removed under us: recreate it
            os.makedirs(self.storage.path, exist_ok=True)
            return []

    def _resend_blob(self, blob):
        """Send one stored batch under a lease: (result, items). RETRY keeps it stored (leased for
        the retry interval); SUCCESS and DROP delete it; (None, 0) when another sender took it."""
        if not blob.lease(self.options.timeout + 5):
            return None, 0
        lines = opencensus_adapter.read_lines(blob)
        if not lines:
            blob.delete()
            return None, 0
        result = self._post(lines)
        if result is RETRY:
            self._hold(blob)
            return RETRY, len(lines)
        blob.delete()
        if result is SUCCESS:
            self._stats.add("resent", len(lines))
        return result, len(lines)

    def _session(self):
        """This thread's keep-alive session; proxy and CA settings come from the environment once, at its start."""
        session = getattr(self._http, "session", None)
        if session is None:
            session = requests.Session()
            env = session.merge_environment_settings(self.options.endpoint, {}, None, None, None)
            session.trust_env = False  # not re-read (every variable of os.environ scanned) on each POST
            session.proxies.update(env["proxies"] or {})
            session.verify, session.cert = env["verify"], env["cert"]
            self._http.session = session
        return session

    def _post(self, lines):
        """POST one batch of serialised envelopes; SUCCESS, RETRY (back off, keep it) or DROP. Never raises."""
        try:
            response = self._session().post(
                url=self.options.endpoint + "/v2.1/track",
                data=("[" + ",".join(lines) + "]").encode("utf-8"),
                headers={"Accept": "application/json", "Content-Type": "application/json; charset=utf-8"},
                timeout=self.options.timeout,
                allow_redirects=False,
            )
        except requests.RequestException as exc:
            return self._retry_later(_describe(exc), None)
        except Exception as exc:  # never lose a batch to an unexpected error: log it, keep the batch
            log.exception("unexpected error while sending telemetry")
            return self._retry_later(type(exc).__name__, None)
        status = response.status_code
        if status == 200:
            self._retry_at = 0.0
            self._stats.note_accepted()
            return SUCCESS
        if status == 206:
            self._stats.note_accepted()
            return self._partial(lines, response)
        if status in RETRYABLE_STATUS:
            return self._retry_later(f"HTTP {status}", _retry_after(response))
        self._stats.add("rejected", len(lines))
        self._stats.note_error(self.folder(), f"HTTP {status}: {len(lines)} items refused and dropped")
        log.error("ingestion refused a batch of %d items with HTTP %d; dropped", len(lines), status)
        return DROP

    def _retry_later(self, reason, retry_after):
        """Back off for the retry interval, or for Retry-After when the server gave one."""
        delay = retry_after if retry_after is not None else self._retry_interval
        self._retry_at = time.monotonic() + delay
        self.last_failure = reason + (f", Retry-After {retry_after:g} s" if retry_after is not None else "")
        self._stats.add("retries")
        self._stats.note_unavailable()
        self._stats.note_error(self.folder(), self.last_failure)
        log.warning("ingestion unavailable (%s); stored, next try in %.1f s", reason, delay)
        return RETRY

    def folder(self):
        """The name of this exporter's storage folder (events, traces, requests or metrics)."""
        return os.path.basename(self.storage.path)

    def _partial(self, lines, response):
        """206: store the retryable items, drop the rest with one line (count and error, no data)."""
        try:
            errors = response.json()["errors"]
            retry = [lines[e["index"]] for e in errors if e["statusCode"] in RETRYABLE_STATUS]
            rejected = [e for e in errors if e["statusCode"] not in RETRYABLE_STATUS]
        except (ValueError, KeyError, IndexError, TypeError):
            return self._retry_later("unreadable 206 response", None)
        self._retry_at = 0.0
        self._stats.add("sent", len(lines) - len(errors))
        if rejected:
            self._stats.add("rejected", len(rejected))
            first = rejected[0]
            self._stats.note_error(self.folder(), f"HTTP 206: {len(rejected)} of {len(lines)} items "
                                   f"refused ({first.get('statusCode')}) and dropped")
            log.error("ingestion rejected %d of %d items (first: %s %s); dropped", len(rejected),
                      len(lines), first.get("statusCode"), str(first.get("message", ""))[:200])
        if retry:
            self._store_lines(retry)
        return DROP  # the batch itself is settled: what must be retried is stored on its own


_ENCODER = json.JSONEncoder(default=str)  # anything the JSON types cannot hold is sent as its str()


def serialise(envelopes):
    """Each envelope as one line of JSON: a stored batch's lines, and (joined) the POST body."""
    encode = _ENCODER.encode
    return [encode(envelope) for envelope in envelopes]


def _describe(exc):
    """Why a POST failed, in a few words: the kind of failure and the exception's class, never its text
    (which names the endpoint)."""
    name = type(exc).__name__
    if isinstance(exc, requests.Timeout):
        return f"timed out ({name})"
    if isinstance(exc, requests.ConnectionError):  # its text carries urllib3's "[Errno 111] Connection refused"
        return f"connection {'refused' if 'refused' in str(exc).lower() else 'failed'} ({name})"
    return name


def _retry_after(response):
    """Seconds from a Retry-After header, or None."""
    value = response.headers.get("Retry-After")
    try:
        return max(0.0, min(float(value), 3600.0)) if value is not None else None
    except ValueError:
        return None


def outbox_summary(root, max_bytes, folders=STORAGE_FOLDERS, now=None):
    """What is stored on disk under `root`, per folder, read from the files alone (any process may call it).

    Each folder: `files` (stored batches, `*.blob`, leased ones included), `leased` (being sent or
    waiting for a retry), `bytes` (every file, as the SDK counts them against `max_bytes`),
    `oldest_age_s` (seconds since the oldest batch was written; None when empty) and `full`.
    """
    now = time.time() if now is None else now
    out = {}
    for folder in folders:
        path = os.path.join(root, folder)
        files = leased = size = 0
        oldest = None
        try:
            names = os.listdir(path)
        except FileNotFoundError:
            names = []
        for name in names:
            full_path = os.path.join(path, name)
            try:
                size += os.path.getsize(full_path)
            except OSError:  # sent and deleted while we looked
                continue
            if name.endswith(".tmp") or ".blob" not in name:
                continue
            files += 1
            leased += name.endswith(".lock")
            written = _blob_time(name, full_path)
            if written is not None:
                oldest = written if oldest is None else min(oldest, written)
        out[folder] = {"files": files, "leased": leased, "bytes": size,
                       "oldest_age_s": None if oldest is None else round(max(0.0, now - oldest), 1),
                       "full": size >= max_bytes}
    return out


def _blob_time(name, path):
    """When a batch file was written: the time in its name, else its modification time (None if gone)."""
    stamp = name.split("@", 1)[0].rsplit("-", 1)[0]
    try:
        return datetime.strptime(stamp, _BLOB_TIME).replace(tzinfo=timezone.utc).timestamp()
    except ValueError:
        try:
            return os.path.getmtime(path)
        except OSError:
            return None


class Courier:
    """One thread per process: spills overflow to disk and re-sends stored batches."""

    def __init__(self, exporters, retry_interval):
        self.exporters = exporters
        self.retry_interval = retry_interval
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="telemetry-courier", daemon=True)

    def start(self):
        """Start the thread."""
        self._thread.start()

    def wake(self):
        """Run a round now (tests and flush)."""
        self._wake.set()

    def run_once(self):
        """One round over every exporter."""
        for exporter in self.exporters:
            exporter.spill_overflow()
            if not exporter.backing_off():
                exporter.resend_stored()

    def _run(self):
        """Round every retry interval (sooner when woken) until stopped."""
        mark_internal_thread()
        from opencensus.trace import execution_context
        execution_context.set_is_exporter(True)
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:  # a bug here must not kill the only retry thread
                log.exception("telemetry courier round failed")
            self._wake.wait(self.retry_interval)
            self._wake.clear()

    def stop(self, timeout=5.0):
        """Stop the thread (a round in progress finishes)."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
