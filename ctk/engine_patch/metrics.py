"""Prometheus metrics of the pin policy, as an :class:`~ctk.policy.events.EventSink`.

The scheduler runs in vLLM's engine-core process while ``/metrics`` is served by the API-server process.
``ctk serve`` (:mod:`ctk.engine_patch.serve.server`) sets ``PROMETHEUS_MULTIPROC_DIR`` before vLLM starts, so
prometheus_client writes these metrics to per-process files and vLLM's ``/metrics`` (which uses a
``MultiProcessCollector`` whenever that variable is set) reports them. In a single process (``vllm.LLM``)
they land in the default registry.

Metrics: ``ctk:pins_created_total``, ``ctk:pin_hits_total``, ``ctk:pin_expirations_total``,
``ctk:pin_pressure_releases_total``, ``ctk:pin_releases_total{reason}``, ``ctk:pinned_blocks``,
``ctk:pins_active``, ``ctk:ttl_seconds`` (histogram of chosen TTLs), ``ctk:tool_duration_seconds``
(histogram of observed tool durations), all labelled with the ``policy``. Events reach the collectors
through a flusher thread, at most :data:`FLUSH_S` late (see :class:`PrometheusSink`).
"""

from __future__ import annotations

import logging
import threading
from collections import deque

from ctk.policy.events import Pin, Release, ToolObservation

logger = logging.getLogger("ctk.engine_patch")

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


# -- the sink: events queued on the engine's step, written to Prometheus by a flusher thread -----------------
# A Prometheus write in the engine's step (``Counter.inc`` & co: a lock, its value object, in ``ctk serve``
# an mmap file of the multiprocess mode) costs 8-15 us each: the step touches them cold (bench
# sched_overhead --scale). The sink only appends each event to a deque (atomic, thread-safe); a daemon thread
# drains it into the collectors every :data:`FLUSH_S` through the public API. /metrics lags by that much.

#: Seconds between the flusher's writes (a scrape sees events at most this old as not yet counted).
FLUSH_S = 0.5

_CREATED, _RELEASED, _HIT, _TOOL = range(4)


class PrometheusSink:
    """Mirrors the core's events into Prometheus collectors: queued on the engine's step, written by a
    daemon thread every ``flush_s`` (None: only by :meth:`flush`, e.g. tests). :meth:`close` writes what is
    queued and stops the thread."""

    def __init__(self, policy: str, registry=None, flush_s: float | None = FLUSH_S):
        m = _metrics(registry)
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
        self._events: deque[tuple] = deque()
        self._add = self._events.append  # (the one call an event makes on the engine's step)
        self._flushing = threading.Lock()  # one writer at a time (the thread, or flush() / close())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if flush_s is not None:
            self._thread = threading.Thread(
                target=self._run, args=(flush_s,), name="ctk-metrics", daemon=True
            )
            self._thread.start()

    # -- events (the engine's step) ------------------------------------------------------------------------

    def pin_created(self, pin: Pin) -> None:
        self._add((_CREATED, pin.ttl_s, pin.blocks))

    def pin_released(self, release: Release, pinned_blocks: int) -> None:
        self._add((_RELEASED, release.reason, pinned_blocks))

    def pin_hit(self, pin: Pin) -> None:
        self._add((_HIT,))

    def tool_observed(self, obs: ToolObservation) -> None:
        self._add((_TOOL, obs.duration_s))

    # -- writes (the flusher thread) -----------------------------------------------------------------------

    def flush(self) -> int:
        """Write the queued events to the collectors, each collector once (a histogram once per value);
        returns how many events."""
        events = self._events
        with self._flushing:
            n = created = hits = 0
            released: dict[str, int] = {}
            ttls: list[float] = []
            tools: list[float] = []
            blocks_inc, blocks_set = 0, None  # pinned blocks: added since the last set, the last set
            active = self._n_active
            while events:
                event = events.popleft()
                n += 1
                kind = event[0]
                if kind == _CREATED:
                    created += 1
                    ttls.append(event[1])
                    active += 1
                    blocks_inc += event[2]
                elif kind == _RELEASED:
                    released[event[1]] = released.get(event[1], 0) + 1
                    active = max(0, active - 1)
                    blocks_set, blocks_inc = event[2], 0
                elif kind == _HIT:
                    hits += 1
                else:
                    tools.append(event[1])
            if not n:
                return 0
            if created:
                self._created.inc(created)
            if hits:
                self._hits.inc(hits)
            for reason, count in released.items():
                counter = self._by_reason.get(reason)
                if counter is None:  # (labels() takes a lock and builds a key: once per reason)
                    counter = self._by_reason[reason] = self._released.labels(self.policy, reason)
                counter.inc(count)
                if reason == "expired":
                    self._expired.inc(count)
                elif reason == "pressure":
                    self._pressure.inc(count)
            for ttl in ttls:
                self._ttl.observe(ttl)
            for duration in tools:
                self._tool.observe(duration)
            if active != self._n_active:
                self._n_active = active
                self._active.set(active)
            if blocks_set is not None:
                self._blocks.set(blocks_set)
            if blocks_inc:
                self._blocks.inc(blocks_inc)
        return n

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                self.flush()
            except Exception:  # a metrics write must never take the engine down
                logger.exception("ctk: writing the pin metrics failed")

    def close(self) -> None:
        """Stop the flusher and write what is queued (shutdown, reconfiguration)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self.flush()
