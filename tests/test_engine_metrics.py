"""The Prometheus sink queues the core's events on the engine's step and writes them from a flusher thread:
what a scrape shows once they are written is every event, counted as the metrics' names say."""

from __future__ import annotations

import math
import random
import time

from ctk.engine_patch.metrics import PrometheusSink
from ctk.policy.events import Pin, Release, ReleaseReason, ToolObservation


def _samples(registry) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in registry.collect():
        for s in family.samples:
            if not s.name.endswith("_created"):  # (the collectors' creation times)
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _value(registry, name: str, **labels) -> float:
    return _samples(registry).get((name, tuple(sorted({"policy": "ttl", **labels}.items()))), 0.0)


def _pin(rng: random.Random, i: int) -> Pin:
    ttl = rng.choice([0.0, 0.01, 0.3, 1.0, 5.0, 30.0, 3600.0, 5000.0, rng.uniform(0, 100)])
    return Pin(f"r{i}", f"p{i}", rng.randrange(1, 50), 100, ttl, 0.0, ttl, 0.5, 1.0, "make", None)


def _feed(sink, seed: int = 0, n: int = 400) -> dict:
    """Random events into ``sink``; returns what a scrape must show for them."""
    rng = random.Random(seed)
    reasons = list(ReleaseReason)
    want = {"created": 0, "hits": 0, "by_reason": {}, "active": 0, "blocks": 0, "ttl": [], "tool": []}
    held = 0
    for i in range(n):
        op = rng.random()
        pin = _pin(rng, i)
        if op < 0.35:
            held += pin.blocks
            sink.pin_created(pin)
            want["created"] += 1
            want["active"] += 1
            want["blocks"] += pin.blocks
            want["ttl"].append(pin.ttl_s)
        elif op < 0.7:
            held = max(0, held - pin.blocks)
            reason = rng.choice(reasons)
            sink.pin_released(Release(pin.request_id, reason, pin.blocks), held)
            want["by_reason"][reason] = want["by_reason"].get(reason, 0) + 1
            want["active"] = max(0, want["active"] - 1)
            want["blocks"] = held
        elif op < 0.85:
            sink.pin_hit(pin)
            want["hits"] += 1
        else:
            d = rng.choice([0.0, 0.05, 2.0, 1e5, rng.uniform(0, 1000)])
            sink.tool_observed(ToolObservation(f"p{i}", 1, None, [], d, 0.0, 10, 5))
            want["tool"].append(d)
    return want


def _check(registry, want: dict) -> None:
    assert _value(registry, "ctk:pins_created_total") == want["created"]
    assert _value(registry, "ctk:pin_hits_total") == want["hits"]
    for reason, n in want["by_reason"].items():
        assert _value(registry, "ctk:pin_releases_total", reason=str(reason)) == n
    assert _value(registry, "ctk:pin_expirations_total") == want["by_reason"].get(ReleaseReason.EXPIRED, 0)
    assert _value(registry, "ctk:pin_pressure_releases_total") == want["by_reason"].get(
        ReleaseReason.PRESSURE, 0
    )
    assert _value(registry, "ctk:pins_active") == want["active"]
    assert _value(registry, "ctk:pinned_blocks") == want["blocks"]
    for name, values in (("ctk:ttl_seconds", want["ttl"]), ("ctk:tool_duration_seconds", want["tool"])):
        assert _value(registry, f"{name}_count") == len(values)
        assert math.isclose(_value(registry, f"{name}_sum"), sum(values), rel_tol=1e-9)
        assert _value(registry, f"{name}_bucket", le="1.0") == sum(v <= 1.0 for v in values)


def test_events_reach_the_collectors_only_when_flushed():
    from prometheus_client import CollectorRegistry

    reg = CollectorRegistry()
    sink = PrometheusSink("ttl", registry=reg, flush_s=None)
    before = _samples(reg)
    want = _feed(sink)
    assert _samples(reg) == before  # the step wrote nothing
    assert sink.flush() == 400
    _check(reg, want)
    assert sink.flush() == 0
    _check(reg, want)  # (nothing counted twice)


def test_the_flusher_thread_writes_events_and_close_writes_the_rest():
    from prometheus_client import CollectorRegistry

    reg = CollectorRegistry()
    sink = PrometheusSink("ttl", registry=reg, flush_s=0.02)
    assert sink._thread is not None and sink._thread.is_alive()
    want = _feed(sink, seed=1, n=50)
    deadline = time.monotonic() + 10
    while _value(reg, "ctk:pin_hits_total") < want["hits"] and time.monotonic() < deadline:
        time.sleep(0.01)
    _check(reg, want)  # written by the thread, no flush() called
    sink._stop.set()  # the thread stops: events queued now are written by close()
    sink._thread.join(5)
    more = _feed(sink, seed=2, n=50)
    assert _value(reg, "ctk:pins_created_total") == want["created"]
    sink.close()
    assert _value(reg, "ctk:pins_created_total") == want["created"] + more["created"]
    assert not sink._thread.is_alive()


def test_a_failed_write_does_not_stop_the_flusher(monkeypatch):
    from prometheus_client import CollectorRegistry

    reg = CollectorRegistry()
    sink = PrometheusSink("ttl", registry=reg, flush_s=0.02)
    fails = {"n": 1}
    real_inc = sink._hits.inc

    def inc(*args):
        if fails["n"]:
            fails["n"] -= 1
            raise RuntimeError("disk full")
        real_inc(*args)

    monkeypatch.setattr(sink._hits, "inc", inc)
    sink.pin_hit(_pin(random.Random(0), 0))  # lost with the failed write
    time.sleep(0.1)
    sink.pin_hit(_pin(random.Random(0), 1))
    deadline = time.monotonic() + 10
    while _value(reg, "ctk:pin_hits_total") < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _value(reg, "ctk:pin_hits_total") == 1
    assert sink._thread.is_alive()
    sink.close()
