"""The Prometheus sink writes prometheus_client's internals directly (each child's value objects, resolved
once): what it exposes is what the public API gives for the same events."""

from __future__ import annotations

import math
import random

from ctk.engine_patch import metrics as metrics_mod
from ctk.engine_patch.metrics import PrometheusSink
from ctk.policy.events import Pin, Release, ReleaseReason, ToolObservation


def _exposed(registry) -> list[str]:
    from prometheus_client import generate_latest

    # (the *_created samples are the collectors' creation times)
    return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]


def _pin(rng: random.Random, i: int) -> Pin:
    ttl = rng.choice([0.0, 0.01, 0.3, 1.0, 5.0, 30.0, 3600.0, 5000.0, rng.uniform(0, 100)])
    return Pin(f"r{i}", f"p{i}", rng.randrange(1, 50), 100, ttl, 0.0, ttl, 0.5, 1.0, "make", None)


def _feed(sinks, seed: int = 0, n: int = 400) -> None:
    rng = random.Random(seed)
    reasons = list(ReleaseReason)
    held = 0
    for i in range(n):
        op = rng.random()
        pin = _pin(rng, i)
        if op < 0.35:
            held += pin.blocks
            events = [("pin_created", pin)]
        elif op < 0.7:
            held = max(0, held - pin.blocks)
            events = [("pin_released", Release(pin.request_id, rng.choice(reasons), pin.blocks), held)]
        elif op < 0.85:
            events = [("pin_hit", pin)]
        else:
            d = rng.choice([0.0, 0.05, 2.0, 1e5, math.nan, rng.uniform(0, 1000)])
            events = [("tool_observed", ToolObservation(f"p{i}", 1, None, [], d, 0.0, 10, 5))]
        for name, *args in events:
            for sink in sinks:
                getattr(sink, name)(*args)


def test_the_sink_exposes_what_the_public_api_gives():
    from prometheus_client import CollectorRegistry

    fast_reg, public_reg = CollectorRegistry(), CollectorRegistry()
    fast = PrometheusSink("ttl", registry=fast_reg)
    public = PrometheusSink("ttl", registry=public_reg, fast=False)
    # the internals are as expected here: every write bypasses the public methods
    assert fast._ttl_parts is not None and fast._tool_parts is not None
    assert fast._created_inc != fast._created.inc and fast._active_set != fast._active.set
    assert public._ttl_parts is None and public._created_inc == public._created.inc
    assert _exposed(fast_reg) == _exposed(public_reg)
    _feed([fast, public])
    text = _exposed(fast_reg)
    assert text == _exposed(public_reg)
    assert any(line.startswith("ctk:pin_releases_total{") for line in text)
    assert any(line.startswith('ctk:ttl_seconds_bucket{le="+Inf"') for line in text)


def test_unexpected_internals_fall_back_to_the_public_api():
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    reg = CollectorRegistry()
    counter = Counter("c", "c", ["x"], registry=reg).labels("a")
    gauge = Gauge("g", "g", ["x"], registry=reg).labels("a")
    hist = Histogram("h", "h", ["x"], registry=reg).labels("a")
    assert metrics_mod._counter_inc(counter) == counter._value.inc
    assert metrics_mod._gauge_parts(gauge) == (gauge._value.inc, gauge._value.set)
    assert metrics_mod._histogram_parts(hist) is not None
    del counter._value  # (an instance attribute: another prometheus_client could lack it)
    assert metrics_mod._counter_inc(counter) == counter.inc
    mostrecent = Gauge("m", "m", ["x"], multiprocess_mode="mostrecent", registry=reg).labels("a")
    assert metrics_mod._gauge_parts(mostrecent) is None  # its set stamps the time
    hist._buckets = hist._buckets[:-1]
    assert metrics_mod._histogram_parts(hist) is None


def test_a_sink_on_the_public_api_when_internals_differ(monkeypatch):
    from prometheus_client import CollectorRegistry

    monkeypatch.setattr(metrics_mod, "_histogram_parts", lambda child: None)
    monkeypatch.setattr(metrics_mod, "_gauge_parts", lambda child: None)
    monkeypatch.setattr(metrics_mod, "_counter_inc", lambda child: child.inc)
    a_reg, b_reg = CollectorRegistry(), CollectorRegistry()
    a = PrometheusSink("ttl", registry=a_reg)
    b = PrometheusSink("ttl", registry=b_reg, fast=False)
    assert a._ttl_parts is None and a._blocks_set == a._blocks.set
    _feed([a, b], seed=3, n=200)
    assert _exposed(a_reg) == _exposed(b_reg)
