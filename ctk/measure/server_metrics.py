"""Read a vLLM server's Prometheus ``/metrics`` and reduce it to the counters the benchmark reports."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from ctk.engine_patch.metrics import FLUSH_S

#: How long after a run's last response its pin events are surely on ``/metrics``: ``ctk serve`` writes them
#: from a flusher thread every ``FLUSH_S`` (twice that, for a thread woken late on a busy host).
SETTLE_S = 2 * FLUSH_S

#: Short name -> Prometheus sample names (first found wins; counters appear with ``_total``).
COUNTERS = {
    "prefix_cache_queries": ("vllm:prefix_cache_queries_total",),
    "prefix_cache_hits": ("vllm:prefix_cache_hits_total",),
    "prompt_tokens": ("vllm:prompt_tokens_total",),
    "prompt_tokens_cached": ("vllm:prompt_tokens_cached_total",),
    "preemptions": ("vllm:num_preemptions_total",),
    "queue_time_sum_s": ("vllm:request_queue_time_seconds_sum",),
    "queue_time_count": ("vllm:request_queue_time_seconds_count",),
}


#: Between a sample's name and its ``reason`` label in the keys :func:`parse_metrics` adds per reason.
REASON_SEP = "|"


def parse_metrics(text: str) -> dict[str, float]:
    """All samples summed over their labels, keyed by sample name (``ctk:*`` and ``vllm:*`` alike); a
    ``ctk`` sample with a ``reason`` label (pin releases) is also kept per reason, as ``name|reason``."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name] = out.get(s.name, 0.0) + float(s.value)
            reason = s.labels.get("reason")
            if reason and s.name.startswith("ctk"):
                key = f"{s.name}{REASON_SEP}{reason}"
                out[key] = out.get(key, 0.0) + float(s.value)
    return out


def _metrics_text(base_url: str, timeout: float) -> str | None:
    """The text of ``base_url/metrics`` (``/v1`` dropped); None when the server has no metrics endpoint."""
    url = base_url.rstrip("/").removesuffix("/v1") + "/metrics"
    try:
        r = httpx.get(url, timeout=timeout)
        r.raise_for_status()
    except httpx.HTTPError:
        return None
    return r.text


def scrape(base_url: str, timeout: float = 10.0) -> dict[str, float]:
    """Raw samples from ``base_url/metrics``; an empty dict when the server has no metrics endpoint."""
    text = _metrics_text(base_url, timeout)
    return parse_metrics(text) if text is not None else {}


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Counter increases over a run, under short names, plus every ``ctk*`` counter (pins and friends).

    The serve part's pin counters are reported under their names without prefix and ``_total`` suffix
    (``ctk:pins_total`` -> ``pins``), per-reason ones with the reason appended
    (``ctk:pin_releases_total{reason="hit"}`` -> ``pin_releases_hit``).
    """
    out: dict[str, float] = {}
    for short, names in COUNTERS.items():
        for name in names:
            if name in after:
                out[short] = after[name] - before.get(name, 0.0)
                break
    for name, value in after.items():
        base, _, reason = name.partition(REASON_SEP)
        if name.startswith("ctk") and base.endswith("_total"):
            short = base.split(":", 1)[-1].removesuffix("_total").removeprefix("ctk_")
            out[f"{short}_{reason}" if reason else short] = value - before.get(name, 0.0)
    return out


#: Gauges sampled over time: short name -> sample name.
GAUGES = {
    "kv_usage": "vllm:kv_cache_usage_perc",
    "running": "vllm:num_requests_running",
    "waiting": "vllm:num_requests_waiting",
}


def gauges(samples: dict[str, float]) -> dict[str, float]:
    """The sampled gauges, plus every ``ctk*`` gauge (e.g. pinned blocks) under its short name."""
    out = {short: samples[name] for short, name in GAUGES.items() if name in samples}
    for name, value in samples.items():
        if REASON_SEP in name:
            continue  # a counter's per-reason copy
        if name.startswith("ctk") and not name.endswith(("_total", "_created", "_sum", "_count", "_bucket")):
            out[name.split(":", 1)[-1].removeprefix("ctk_")] = value
    return out


def info_labels(
    base_url: str, family: str = "vllm:cache_config_info", timeout: float = 10.0
) -> dict[str, str]:
    """The labels of an info metric (e.g. the engine's cache config: ``block_size``, ...); {} if absent."""
    text = _metrics_text(base_url, timeout)
    if text is None:
        return {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.startswith(family):
                return dict(s.labels)
    return {}
