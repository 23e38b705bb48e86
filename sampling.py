"""Sampling of request and dependency telemetry in Azure mode: adaptive (the default) or fixed.

Adaptive sampling works as Application Insights' own SDKs do by default: the sampler compares the
items it is offered per second (a moving average over about TRACE_SAMPLING_INTERVAL seconds,
re-evaluated every second) with TRACE_SAMPLING_TARGET and keeps 1 in N operations, N the smallest
whole number that brings the average to the target or under it. Fixed sampling keeps 1 in N too
(TRACE_SAMPLING_RATE is 1/N: Application Insights supports sampleRate 100/N only). A rise in traffic lowers the rate within a second (a burst, or a new process under load,
is sampled at once); a fall raises it gradually. Each kept item stands for exactly N (its envelope's sampleRate is 100/N and ingestion sets ItemCount
to N; the dashboard's sum(ItemCount) estimates the true counts). The decision is made once per
operation (trace id) and remembered, so a request and its dependencies are kept or dropped
together, with one rate. An item outside any operation (a dependency called outside a request:
no trace id, or the all-zero one) is decided alone, at the current rate. Events, logins and CRUD are never sampled, and the response-time
metrics count every request before any sampling.
"""
import collections
import math
import random
import threading
import time

MODES = ("adaptive", "fixed")
_STEP_S = 1.0          # the rate is re-evaluated this often (or every interval, when that is shorter)
_MAX_KEEP_ONE_IN = 1000
_REMEMBERED = 10000    # operations whose decision is remembered (a request outlives its dependencies)
_EVICT_EVERY = 1000
_ZERO_TRACE = "0" * 32  # no operation: OpenCensus' span context before a trace starts


class Sampler:
    """Keeps or drops whole operations; `decide(operation_id)` gives the kept fraction, or None to drop."""

    def __init__(self, mode="adaptive", rate=1.0, target_per_s=5.0, interval_s=15.0, clock=time.monotonic):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        if mode == "fixed" and rate and abs(rate * round(1 / rate) - 1) > 1e-9:
            raise ValueError("a fixed rate must be 1/N for a whole N (sampleRate 100/N), or 0")
        self.mode = mode
        self.rate = rate if mode == "fixed" else 1.0
        self._target, self._interval, self._clock = target_per_s, interval_s, clock
        self._step = min(_STEP_S, interval_s)
        self._lock = threading.Lock()
        self._offered = 0
        self._window_start = clock()
        self._average = None  # items offered per second, smoothed
        self._decisions = collections.OrderedDict()

    def decide(self, operation_id):
        """The fraction this operation is kept at, or None when it is dropped (the same for all its items).

        No lock on the common path (request threads call it for every request): the GIL makes each
        dict operation atomic, `setdefault` keeps the first decision when two threads race on one
        operation, and the count may miss an increment under a race (a rate estimate). An item
        outside any operation (no id, or the all-zero trace id) is decided alone at the current rate.
        """
        self._offered += 1
        if self.mode == "adaptive" and self._clock() - self._window_start >= self._step:
            with self._lock:
                self._adapt()
        if not operation_id or operation_id == _ZERO_TRACE:
            rate = self.rate
            return rate if random.random() < rate else None
        decisions = self._decisions
        known = decisions.get(operation_id)
        if known is None:
            rate = self.rate
            known = decisions.setdefault(operation_id, rate if _score(operation_id) < rate else 0.0)
            if len(decisions) > _REMEMBERED + _EVICT_EVERY:  # forget the oldest, a chunk at a time
                with self._lock:
                    while len(decisions) > _REMEMBERED:
                        decisions.popitem(last=False)
        return known or None

    def _adapt(self):
        """Every step, move the rate towards the target (caller holds the lock)."""
        now = self._clock()
        elapsed = now - self._window_start
        if elapsed < self._step:
            return  # another thread adapted meanwhile
        observed = self._offered / elapsed
        if self._average is None or observed >= self._average:
            self._average = observed  # more traffic: sample it now
        else:  # less: an exponential moving average over about one interval
            weight = min(1.0, elapsed / self._interval)
            self._average = (1 - weight) * self._average + weight * observed
        self.rate = 1.0 / keep_one_in(self._average, self._target)
        self._offered, self._window_start = 0, now


def keep_one_in(per_second, target):
    """The smallest whole N with per_second / N <= target (1 at or under the target), at most _MAX_KEEP_ONE_IN."""
    n = max(1, math.ceil(per_second / target))
    while n > 1 and per_second / (n - 1) <= target:  # the float quotient may round up past a whole N
        n -= 1
    while per_second / n > target:
        n += 1
    return min(_MAX_KEEP_ONE_IN, n)


def _score(operation_id):
    """A number in [0, 1) fixed by the operation id (a random hex trace id), the same in every process."""
    try:
        return int(operation_id[:8], 16) / 0x100000000
    except (TypeError, ValueError):
        return (hash(operation_id) & 0xFFFFFFFF) / 0x100000000
