"""Sampling of request and dependency telemetry: the adaptive sampler with a clock the test controls, and at the wire."""
import random

import pytest
import requests

from app import create_app
from config import ConfigError
from fake_ingestion import FakeIngestion
from sampling import Sampler, keep_one_in
from telemetry import monitor_of


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


_RANDOM = random.Random(1)


def _ids(n):
    """n new operation ids (random trace ids, never repeated)."""
    return [f"{_RANDOM.getrandbits(128):032x}" for _ in range(n)]


def _offer(sampler, clock, per_second, seconds):
    """Offer `per_second` new operations each second for `seconds`; return the kept fractions seen."""
    kept = []
    for second in range(seconds):
        for operation_id in _ids(per_second):
            kept.append(sampler.decide(operation_id))
            clock.now += 1.0 / per_second
    return kept


def test_adaptive_keeps_everything_below_the_target():
    clock = Clock()
    sampler = Sampler("adaptive", target_per_s=5, interval_s=15, clock=clock)
    kept = _offer(sampler, clock, 4, 60)
    assert sampler.rate == 1.0 and all(k == 1.0 for k in kept)


def test_adaptive_converges_to_one_in_n_with_whole_item_counts():
    clock = Clock()
    sampler = Sampler("adaptive", target_per_s=5, interval_s=15, clock=clock)
    _offer(sampler, clock, 100, 2)  # the rate follows a rise within a second
    keep_one_in = 1 / sampler.rate  # 100/s against a target of 5/s: 1 in 20 (21 when the window ran a hair long)
    assert round(keep_one_in) in (20, 21) and abs(keep_one_in - round(keep_one_in)) < 1e-9
    kept = [k for k in _offer(sampler, clock, 100, 13) if k is not None]
    assert set(kept) == {sampler.rate}
    assert 35 <= len(kept) <= 100, f"about 65 of 1,300 kept, {len(kept)} were"  # 1/20 of 1,300, binomial spread
    _offer(sampler, clock, 100, 1)  # ends the interval
    for _ in range(20):  # traffic falls to 2/s: the moving average brings the rate back to 1
        _offer(sampler, clock, 2, 15)
    assert sampler.rate == 1.0


def test_adaptive_follows_a_burst_within_a_second_and_a_fall_gradually():
    clock = Clock()
    sampler = Sampler("adaptive", target_per_s=5, interval_s=15, clock=clock)
    _offer(sampler, clock, 4, 30)
    assert sampler.rate == 1.0
    _offer(sampler, clock, 400, 2)  # a burst (or a worker that starts under load)
    assert round(1 / sampler.rate) in (80, 81), "sampled within a second, not after a whole interval"
    _offer(sampler, clock, 4, 3)  # traffic falls back: the rate rises, but not at once
    assert 1 / 81 <= sampler.rate < 0.5
    _offer(sampler, clock, 4, 90)
    assert sampler.rate == 1.0


def test_an_operation_keeps_its_first_decision_and_rate():
    clock = Clock()
    sampler = Sampler("adaptive", target_per_s=1, interval_s=1, clock=clock)
    first = sampler.decide("ffffffff" + "0" * 24)   # the highest score: dropped as soon as the rate drops
    kept = sampler.decide("00000001" + "0" * 24)    # nearly the lowest: always kept
    assert first == 1.0 and kept == 1.0
    _offer(sampler, clock, 50, 3)                   # the rate drops meanwhile
    assert sampler.rate < 1
    assert sampler.decide("ffffffff" + "0" * 24) == 1.0, "its dependencies follow the request's decision"
    assert sampler.decide("00000001" + "0" * 24) == 1.0
    assert sampler.decide("fffffffe" + "0" * 24) is None


def test_fixed_rate():
    sampler = Sampler("fixed", rate=0.25)
    decisions = [sampler.decide(i) for i in _ids(4000)]
    kept = [d for d in decisions if d is not None]
    assert set(kept) == {0.25} and 800 <= len(kept) <= 1200
    assert Sampler("fixed", rate=0.0).decide(_ids(1)[0]) is None


def test_trace_sampling_names_the_variable(tmp_path):
    with pytest.raises(ConfigError, match="TRACE_SAMPLING must be adaptive or fixed"):
        create_app({"TESTING": True, "TELEMETRY_DB": str(tmp_path / "t.db"), "TRACE_SAMPLING": "sometimes"})


def test_adaptive_sampling_at_the_wire(tmp_path, backend):
    fake = FakeIngestion().start()
    application = create_app({
        "TESTING": True, "APPLICATIONINSIGHTS_CONNECTION_STRING": fake.connection_string, "DASHBOARD_AUTH": "off",
        "TELEMETRY_STORAGE": str(tmp_path / "outbox"), "EXPORT_INTERVAL": "0.05", "METRICS_EXPORT_INTERVAL": "3600",
        "TRACE_SAMPLING_TARGET": "50", "TRACE_SAMPLING_INTERVAL": "0.05"})

    def call():
        requests.get(f"{backend.url}/stock", timeout=5)
        return "", 204
    application.add_url_rule("/call", view_func=call)
    try:
        client = application.test_client()
        total = 120
        for _ in range(total):
            assert client.get("/call").status_code == 204
        ids = [client.post("/event", json={"event_name": "Kept"}).get_json()["event_id"] for _ in range(5)]
        assert monitor_of(application).flush(30)
        fake.wait_for(lambda f: len(f.of_type("EventData")) >= 5 and f.of_type("MetricData"))
        requests_sent = [r for r in fake.of_type("RequestData") if r["data"]["baseData"]["name"] == "GET /call"]
        dependencies = {d["tags"]["ai.operation.id"]: d for d in fake.of_type("RemoteDependencyData")}
        assert 0 < len(requests_sent) < total, "sampled, but not to nothing"
        sampled = [r for r in requests_sent if r.get("sampleRate", 100.0) < 100.0]
        assert sampled, "after the first interval the rate dropped"
        for request in requests_sent:  # a kept request has its dependency, at the same rate
            dependency = dependencies[request["tags"]["ai.operation.id"]]
            assert dependency.get("sampleRate", 100.0) == request.get("sampleRate", 100.0)
            item_count = 100.0 / request.get("sampleRate", 100.0)
            assert abs(item_count - round(item_count)) < 1e-9, "ItemCount is a whole number"
            assert "sampling.rate" not in request["data"]["baseData"].get("properties", {})
        assert len(dependencies) == len([r for r in fake.of_type("RequestData")
                                         if r["data"]["baseData"]["name"] == "GET /call"])
        assert sorted(e["data"]["baseData"]["properties"]["event_id"] for e in fake.of_type("EventData")) == sorted(ids)
        counted = sum(m["data"]["baseData"]["metrics"][0]["value"] for m in fake.of_type("MetricData")
                      if m["data"]["baseData"]["metrics"][0]["name"] == "request_count"
                      and m["data"]["baseData"]["properties"]["route"] == "/call")
        assert counted == total, "the response-time metrics count every request"
    finally:
        monitor_of(application).close()
        fake.stop()


# -- counting right: the rate of items outside an operation, 1/N rates, the smallest N --------------

def test_dependencies_outside_a_request_get_the_current_rate():
    """They have no trace id (or the all-zero one): each is decided alone, never with an old decision's rate."""
    clock = Clock()
    sampler = Sampler("adaptive", target_per_s=1, interval_s=1, clock=clock)
    _offer(sampler, clock, 121, 2)                  # busy: about 1 in 121
    assert sampler.rate < 1 / 100
    early = [(sampler.decide(op), sampler.rate) for op in ("", "0" * 32) for _ in range(2000)]
    kept = [(r, current) for r, current in early if r is not None]
    assert all(r == current < 1 / 100 for r, current in kept) and 0 < len(kept) < 100  # about 33 of 4,000
    for _ in range(30):                              # quiet again: everything is kept
        _offer(sampler, clock, 1, 1)
    assert sampler.rate == 1.0
    later = [sampler.decide(op) for op in ("", "0" * 32, None, "", "0" * 32)]
    assert later == [1.0] * 5 and sum(1 / r for r in later) == 5  # 5 calls count 5 (they counted 605)


@pytest.mark.parametrize("per_second, target, n", [
    (3.5, 0.7, 5), (10.5, 0.3, 35), (187.29, 20.81, 9), (649.298, 24.973, 26), (100, 5, 20), (101, 5, 21),
    (5, 5, 1), (4, 5, 1), (5.01, 5, 2), (0, 5, 1), (1e9, 1, 1000),
])
def test_adaptive_n_is_the_smallest_that_meets_the_target(per_second, target, n):
    assert keep_one_in(per_second, target) == n


def test_adaptive_n_is_the_smallest_that_meets_the_target_for_any_rate():
    rng = random.Random(7)
    for _ in range(20000):
        target = rng.choice([0.1, 0.3, 0.7, 5.0, round(rng.uniform(0.01, 50), 3) or 0.01])
        per_second = target * rng.randint(1, 900) + rng.choice([0.0, 1e-9, -1e-9, rng.uniform(-1, 1)])
        n = keep_one_in(per_second, target)
        assert per_second / n <= target and (n == 1 or per_second / (n - 1) > target), (per_second, target, n)


def test_the_sampler_adapts_to_the_smallest_n():
    clock = Clock()
    sampler = Sampler("adaptive", target_per_s=0.7, interval_s=15, clock=clock)
    for operation_id in _ids(6):
        sampler.decide(operation_id)
    clock.now += 2.0
    sampler.decide(_ids(1)[0])                       # 7 in 2 s, 3.5/s: 1 in 5 meets 0.7/s (3.5 // 0.7 made it 1 in 6)
    assert sampler.rate == 1 / 5


@pytest.mark.parametrize("value, rate", [("1", 1.0), ("0.5", 0.5), ("0.3333", 1 / 3), ("0.333333", 1 / 3),
                                         ("0.25", 0.25), ("0.2", 0.2), ("0.1", 0.1), ("0.01", 0.01), ("0", 0.0)])
def test_fixed_rates_are_one_in_n(tmp_path, value, rate):
    application = create_app({"TESTING": True, "TELEMETRY_DB": str(tmp_path / "t.db"), "TRACE_SAMPLING": "fixed",
                              "TRACE_SAMPLING_RATE": value})
    assert monitor_of(application).settings.trace_sampling_rate == rate
    if rate:
        assert round(100 / (rate * 100.0)) == round(1 / rate)  # ItemCount = 100 / sampleRate, a whole number
    monitor_of(application).close()


@pytest.mark.parametrize("value", ["0.3", "0.4", "0.6", "0.75", "0.15", "0.0015"])
def test_other_fixed_rates_are_refused_at_start_naming_the_variable(tmp_path, value):
    with pytest.raises(ConfigError, match="TRACE_SAMPLING_RATE must be 1/N"):
        create_app({"TESTING": True, "TELEMETRY_DB": str(tmp_path / "t.db"), "TRACE_SAMPLING": "fixed",
                    "TRACE_SAMPLING_RATE": value})
    with pytest.raises(ValueError):
        Sampler("fixed", rate=float(value))
