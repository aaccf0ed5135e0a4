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

from ctk.policy.events import Pin, Release, ToolObservation

BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 3600)
_METRICS: dict | None = None


def _metrics() -> dict:
    """Create the collectors once per process (prometheus_client refuses duplicates)."""
    global _METRICS
    if _METRICS is None:
        from prometheus_client import Counter, Gauge, Histogram

        lab = ["policy"]
        _METRICS = {
            "created": Counter("ctk:pins_created", "KV pins created after a tool-call turn", lab),
            "hits": Counter("ctk:pin_hits", "Pins whose program's next turn found its cache", lab),
            "expired": Counter("ctk:pin_expirations", "Pins released because their TTL expired", lab),
            "pressure": Counter("ctk:pin_pressure_releases", "Pins released under memory pressure", lab),
            "released": Counter("ctk:pin_releases", "Pins released, by reason", [*lab, "reason"]),
            "blocks": Gauge("ctk:pinned_blocks", "KV blocks held by pins", lab, multiprocess_mode="livesum"),
            "active": Gauge("ctk:pins_active", "Pins held", lab, multiprocess_mode="livesum"),
            "ttl": Histogram("ctk:ttl_seconds", "TTL chosen for a pin", lab, buckets=BUCKETS_S),
            "tool": Histogram(
                "ctk:tool_duration_seconds",
                "Observed tool durations (finish -> next arrival)",
                lab,
                buckets=BUCKETS_S,
            ),
        }
    return _METRICS


class PrometheusSink:
    """Mirrors the core's events into Prometheus collectors."""

    def __init__(self, policy: str):
        m = _metrics()
        self.policy = policy
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

    def pin_created(self, pin: Pin) -> None:
        self._created.inc()
        self._ttl.observe(pin.ttl_s)
        self._n_active += 1
        self._active.set(self._n_active)
        self._blocks.inc(pin.blocks)

    def pin_released(self, release: Release, pinned_blocks: int) -> None:
        child = self._by_reason.get(release.reason)
        if child is None:  # labels() takes a lock and builds a key: once per reason
            child = self._by_reason[release.reason] = self._released.labels(self.policy, release.reason)
        child.inc()
        if release.reason == "expired":
            self._expired.inc()
        elif release.reason == "pressure":
            self._pressure.inc()
        self._n_active = max(0, self._n_active - 1)
        self._active.set(self._n_active)
        self._blocks.set(pinned_blocks)

    def pin_hit(self, pin: Pin) -> None:
        self._hits.inc()

    def tool_observed(self, obs: ToolObservation) -> None:
        self._tool.observe(obs.duration_s)
