"""Prometheus metrics of the pin policy, as an :class:`~ctk.policy.events.EventSink`.

The scheduler runs in vLLM's engine-core process while ``/metrics`` is served by the API-server process.
``ctk serve`` (:mod:`ctk.engine_patch.serve.server`) sets ``PROMETHEUS_MULTIPROC_DIR`` before vLLM starts, so
prometheus_client writes these metrics to per-process files and vLLM's ``/metrics`` (which uses a
``MultiProcessCollector`` whenever that variable is set) reports them. In a single process (``vllm.LLM``)
they land in the default registry.

Metrics: ``ctk:pins_created_total``, ``ctk:pin_hits_total``, ``ctk:pin_expirations_total``,
``ctk:pin_pressure_releases_total``, ``ctk:pin_releases_total{reason}``, ``ctk:pinned_blocks``,
``ctk:pins_active``, ``ctk:ttl_seconds`` (histogram of chosen TTLs), ``ctk:tool_duration_seconds``
(histogram of observed tool durations), all labelled with the ``policy``.
"""

from __future__ import annotations

from bisect import bisect_left

from ctk.policy.events import Pin, Release, ToolObservation

BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 3600)
_METRICS: dict | None = None


def _metrics(registry=None) -> dict:
    """Create the collectors once per process in the default registry (prometheus_client refuses
    duplicates); with ``registry`` (tests), new ones there."""
    global _METRICS
    if _METRICS is None or registry is not None:
        from prometheus_client import REGISTRY, Counter, Gauge, Histogram

        reg = registry if registry is not None else REGISTRY
        lab, kw = ["policy"], {"registry": reg}
        metrics = {
            "created": Counter("ctk:pins_created", "KV pins created after a tool-call turn", lab, **kw),
            "hits": Counter("ctk:pin_hits", "Pins whose program's next turn found its cache", lab, **kw),
            "expired": Counter("ctk:pin_expirations", "Pins released because their TTL expired", lab, **kw),
            "pressure": Counter(
                "ctk:pin_pressure_releases", "Pins released under memory pressure", lab, **kw
            ),
            "released": Counter("ctk:pin_releases", "Pins released, by reason", [*lab, "reason"], **kw),
            "blocks": Gauge(
                "ctk:pinned_blocks", "KV blocks held by pins", lab, multiprocess_mode="livesum", **kw
            ),
            "active": Gauge("ctk:pins_active", "Pins held", lab, multiprocess_mode="livesum", **kw),
            "ttl": Histogram("ctk:ttl_seconds", "TTL chosen for a pin", lab, buckets=BUCKETS_S, **kw),
            "tool": Histogram(
                "ctk:tool_duration_seconds",
                "Observed tool durations (finish -> next arrival)",
                lab,
                buckets=BUCKETS_S,
                registry=reg,
            ),
        }
        if registry is not None:
            return metrics
        _METRICS = metrics
    return _METRICS


# -- prometheus_client's internals, written directly ------------------------------------------------------
# A public call (``Counter.inc``, ``Gauge.set``, ``Histogram.observe``) runs two Python frames before it
# reaches the child's value object (the method, its observability check; ``observe`` a loop over the
# buckets), and the sink runs in the engine's step with cold caches, where each frame costs about a
# microsecond. The sink binds the value objects' own ``inc`` / ``set`` (prometheus_client's ``ValueClass``:
# a float under a lock, or its multiprocess file) once, per child, and does what the public method does with
# them. :func:`_fast_parts` checks the internals first; the public API is used when they are not as expected.


def _value_of(child, *methods: str):
    """The child's value object when it has the methods the public call uses, else None."""
    value = getattr(child, "_value", None)
    if value is None or not all(callable(getattr(value, m, None)) for m in methods):
        return None
    return value


def _observe(histogram, parts, value: float) -> None:
    """``histogram.observe(value)``; with ``parts`` (its sum's add, bucket bounds and bucket adds, resolved
    once) written directly, as Histogram.observe does."""
    if parts is None:
        histogram.observe(value)
        return
    add, bounds, buckets = parts
    add(value)
    i = bisect_left(bounds, value)
    if i < len(bounds) and value <= bounds[i]:  # NaN counts in no bucket, as in Histogram.observe
        buckets[i](1)


def _counter_inc(child):
    """``child.inc`` without its frames (``Counter.inc(amount)``: ``_value.inc(amount)``, amount >= 0)."""
    from prometheus_client import Counter

    value = _value_of(child, "inc") if type(child) is Counter else None
    return value.inc if value is not None else child.inc


def _gauge_parts(child):
    """(``inc``, ``set``) of a gauge child's value: ``Gauge.inc`` is ``_value.inc(amount)``, ``Gauge.set``
    ``_value.set(float(value))`` (not in the ``mostrecent`` modes, which stamp the time); None when not so."""
    from prometheus_client import Gauge

    if type(child) is not Gauge or getattr(child, "_is_most_recent", True):
        return None
    value = _value_of(child, "inc", "set")
    return (value.inc, value.set) if value is not None else None


def _histogram_parts(child):
    """``Histogram.observe`` of one child on its internals: (the sum's ``inc``, the sorted upper bounds, the
    buckets' ``inc``), used as ``observe`` does: the sum, then the first bucket whose bound holds the amount
    (a bisection; none for NaN, as the public loop); None when the internals are not as expected."""
    from prometheus_client import Histogram

    if type(child) is not Histogram:
        return None
    bounds = getattr(child, "_upper_bounds", None)
    buckets = getattr(child, "_buckets", None)
    total = getattr(child, "_sum", None)
    if (
        not isinstance(bounds, list)
        or not isinstance(buckets, list)
        or len(bounds) != len(buckets)
        or not bounds
        or bounds != sorted(bounds)
        or not callable(getattr(total, "inc", None))
        or not all(callable(getattr(b, "inc", None)) for b in buckets)
    ):
        return None
    return total.inc, tuple(bounds), tuple(b.inc for b in buckets)


class PrometheusSink:
    """Mirrors the core's events into Prometheus collectors (on their internals, see above; ``fast=False``:
    the public API only)."""

    def __init__(self, policy: str, registry=None, fast: bool = True):
        m = _metrics(registry)
        self.policy = policy
        self._fast = fast
        self._created = m["created"].labels(policy)
        self._hits = m["hits"].labels(policy)
        self._expired = m["expired"].labels(policy)
        self._pressure = m["pressure"].labels(policy)
        self._released = m["released"]
        self._by_reason: dict = {}
        self._blocks = m["blocks"].labels(policy)
        self._active = m["active"].labels(policy)
        self._ttl = m["ttl"].labels(policy)
        self._tool = m["tool"].labels(policy)
        self._n_active = 0
        self._blocks.set(0)
        self._active.set(0)
        # Touch the counters so they are exported (as 0) before the first event.
        for c in (self._created, self._hits, self._expired, self._pressure):
            c.inc(0)
        # the calls of each event, resolved once (the public methods when the internals are not as expected)
        inc = _counter_inc if fast else (lambda child: child.inc)
        self._created_inc = inc(self._created)
        self._hits_inc = inc(self._hits)
        self._expired_inc = inc(self._expired)
        self._pressure_inc = inc(self._pressure)
        self._ttl_parts = _histogram_parts(self._ttl) if fast else None
        self._tool_parts = _histogram_parts(self._tool) if fast else None
        # gauges: set(float(n)) is Gauge.set(n) on its value (both take a float)
        blocks = _gauge_parts(self._blocks) if fast else None
        active = _gauge_parts(self._active) if fast else None
        if blocks is not None and active is not None:
            (self._blocks_inc, self._blocks_set), (_, self._active_set) = blocks, active
        else:
            self._blocks_inc, self._blocks_set, self._active_set = (
                self._blocks.inc,
                self._blocks.set,
                self._active.set,
            )

    def _reason_inc(self, reason):
        # labels() takes a lock and builds a key: once per reason
        child = self._released.labels(self.policy, reason)
        inc = self._by_reason[reason] = _counter_inc(child) if self._fast else child.inc
        return inc

    def pin_created(self, pin: Pin) -> None:
        self._created_inc(1)
        _observe(self._ttl, self._ttl_parts, pin.ttl_s)
        self._n_active += 1
        self._active_set(float(self._n_active))
        self._blocks_inc(pin.blocks)

    def pin_released(self, release: Release, pinned_blocks: int) -> None:
        reason = release.reason
        inc = self._by_reason.get(reason)
        if inc is None:
            inc = self._reason_inc(reason)
        inc(1)
        if reason == "expired":
            self._expired_inc(1)
        elif reason == "pressure":
            self._pressure_inc(1)
        self._n_active = max(0, self._n_active - 1)
        self._active_set(float(self._n_active))
        self._blocks_set(float(pinned_blocks))

    def pin_hit(self, pin: Pin) -> None:
        self._hits_inc(1)

    def tool_observed(self, obs: ToolObservation) -> None:
        _observe(self._tool, self._tool_parts, obs.duration_s)
