"""Measured recommendations for code outside bench/: each experiment patches the running process
the way the recommended change would, so its effect can be measured before anyone edits the file.

Nothing here is used by the service; `bench/wsgi.py` and `bench/wsgi_micro.py` apply the experiments
named in BENCH_EXPERIMENTS (comma-separated) before create_app().

  fast_ids       (applied upstream in a2ef68a: telemetry.new_event_id/new_trace_id/new_span_id; now a no-op)
                 request_tracking / telemetry: ids from random.getrandbits instead of uuid.uuid4().
                 os.urandom releases the GIL around its getrandom() call; with 4 request threads and
                 background threads in a worker, taking the GIL back can wait a whole switch interval
                 (5 ms). Three ids per POST /event (operation, span, event). The event id stays a
                 version-4 UUID (random is reseeded after fork).
  no_limiter     (applied upstream in 22acc8e; a no-op now that security has no `limit` decorator)
                 security.limit: no decorator at all when RATE_LIMIT_ENABLED is false (flask-limiter
                 still evaluates a disabled limit on every call).
  fast_record    logging_utils.record_event: stringify without json.dumps for bool/int/None, and the
                 redaction decision memoised per key (keys repeat; the words list is fixed).
  json_decoder   api_spec.parse_json_object: one module-level JSONDecoder(object_pairs_hook=...,
                 parse_constant=...) instead of json.loads(..., hooks), which builds a decoder (and its
                 scanner) on every call.
  no_write_ahead delivery: on the happy path, POST without writing the batch to storage first (store
                 only when the POST fails). NOT a recommendation as is -- it gives up the crash-safety of
                 write-ahead -- but the upper bound of what a cheaper write-ahead (serialise each batch
                 once and write those bytes; keep the storage size instead of walking the folder on
                 every put) can win in Azure mode.
"""
import functools
import json
import os
import random
import uuid

_UUID = uuid.UUID


def _fast_uuid4():
    """A version-4 UUID from the Mersenne Twister (no syscall, no GIL release)."""
    return _UUID(int=random.getrandbits(128), version=4)


def fast_ids():
    uuid.uuid4 = _fast_uuid4


def no_limiter():
    import security
    from telemetry import monitor_of
    original = getattr(security, "limit", None)
    if original is None:  # applied upstream: no limiter check at all on the request path when limits are off
        return

    def limit(app, value):
        if not monitor_of(app).limiter.enabled:
            return lambda view: view
        return original(app, value)

    security.limit = limit


def fast_record():
    import logging_utils
    import security

    _json = json.dumps

    def stringify(value):
        if value.__class__ is str:
            return value
        if value is True:
            return "true"
        if value is False:
            return "false"
        if value is None:
            return "null"
        if value.__class__ is int:
            return int.__repr__(value)
        return _json(value)

    @functools.lru_cache(maxsize=4096)
    def _redacted(key, words):
        lowered = key.lower()
        return any(word in lowered for word in words)

    def redact(properties, redact_keys):
        words = tuple(redact_keys)
        return {k: security.REDACTED if _redacted(k, words) else v for k, v in properties.items()}

    logging_utils.stringify = stringify
    logging_utils.redact = redact
    security.redact = redact


def json_decoder():
    import api_spec

    decoder = json.JSONDecoder(object_pairs_hook=api_spec._unique_keys, parse_constant=api_spec._no_constants)
    real_json = api_spec.json

    class _Json:
        """api_spec's `json` with a reused decoder for the one loads() call it makes."""

        def __getattr__(self, name):
            return getattr(real_json, name)

        @staticmethod
        def loads(data, **kwargs):
            if isinstance(data, (bytes, bytearray)):
                data = data.decode(json.detect_encoding(data), "surrogatepass")
            return decoder.decode(data)

    api_spec.json = _Json()


def no_write_ahead():
    import delivery

    def _deliver(self, envelopes):
        if not envelopes:
            return
        if self.backing_off():
            self._store(envelopes)
            return
        result = self._transmit(envelopes)
        if result is delivery.SUCCESS:
            self._stats.add("sent", len(envelopes))
        elif result is delivery.RETRY:
            self._store(envelopes)

    delivery.ReliableExporterMixin._deliver = _deliver


def null_sink():
    """Diagnostic only: the local store drops every record (what the writer costs the workers)."""
    import local_store
    for name in ("track_event", "track_request", "track_dependency"):
        setattr(local_store.LocalStore, name, lambda self, rec: None)


EXPERIMENTS = {"null_sink": null_sink, "fast_ids": fast_ids, "no_limiter": no_limiter, "fast_record": fast_record,
               "json_decoder": json_decoder, "no_write_ahead": no_write_ahead}
RECOMMENDED = "no_limiter,fast_record,json_decoder"


def apply(names=None):
    """Apply the experiments named (default: BENCH_EXPERIMENTS); returns the names applied."""
    if names is None:
        names = os.environ.get("BENCH_EXPERIMENTS", "")
    applied = []
    for name in filter(None, (n.strip() for n in names.split(","))):
        EXPERIMENTS[name]()
        applied.append(name)
    return applied
