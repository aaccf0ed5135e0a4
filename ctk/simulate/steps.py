"""Engine step times measured through a running ``ctk serve``, and the step model fitted to them.

``ctk profile`` times prefill alone; a simulated agent run spends most engine steps decoding a few requests,
often with a prefill chunk in the same step. This module measures those steps on the real server, the way
the replay drives it (streamed completions of fresh token-id prompts, the server's per-request metrics):

- decode: ``b`` requests of ``c`` prompt tokens leave together and decode together; the step time is the
  time per token of the request that started last while every request decodes, client-side as the replay
  sees it (the server's own mean inter-token time when the client read a burst of chunks at once);
- prefill, alone or mixed: a fresh prompt of ``p`` tokens (after a cached prefix of ``k``) arrives while
  ``b`` requests decode; the step that prefills it is timed by the server itself (per-request metrics:
  first token minus scheduled, one step when ``p`` fits the token budget).

:func:`fit_steps` fits every point to the simulator's step model (:class:`~ctk.simulate.profiles.
HardwareProfile.step_s`) with non-negative least squares, relative errors weighted alike.
"""

from __future__ import annotations

import json
import random
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

#: (context, batch) decode points: b x (c + 128) must fit the benchmark server's 16 MiB cache (~8k tokens).
DECODE_POINTS = (
    (256, 1),
    (256, 4),
    (256, 8),
    (768, 8),
    (1024, 1),
    (1024, 3),
    (1024, 6),
    (1536, 4),
    (2048, 1),
    (2048, 3),
    (4096, 1),
    (5600, 1),
)
#: (prefill tokens, cached context before them, decoding requests, their context) points.
PREFILL_POINTS = (
    (256, 0, 0, 0),
    (1024, 0, 0, 0),
    (1900, 0, 0, 0),
    (1024, 2048, 0, 0),
    (1024, 4096, 0, 0),
    (256, 0, 4, 1024),
    (1024, 0, 4, 1024),
    (1024, 0, 2, 2048),
    (512, 2048, 2, 1024),
    (1900, 0, 4, 1024),
    (512, 1024, 6, 512),
)
OUTPUT_TOKENS = 128  # long enough that every request of a batch decodes together for 100+ steps
# a mixed step's decoders decode 2x OUTPUT_TOKENS, doubled up to this while they end before the probe
MAX_DECODE_TOKENS = 16 * OUTPUT_TOKENS


@dataclass
class StepPoint:
    """One measured step kind: the step model's inputs and the median measured duration."""

    prefill_tokens: int
    prefill_attn: float  # Σ chunk x (context before + chunk / 2)
    n_decode: int
    decode_ctx: int  # Σ context of the decoding requests
    step_s: float
    kind: str

    def features(self) -> list[float]:
        """The step model's terms: overhead, tokens, prefill attention, decode context, decoding sequences."""
        return [
            1.0,
            float(self.prefill_tokens + self.n_decode),
            self.prefill_attn,
            float(self.decode_ctx),
            float(self.n_decode),
        ]


class _Stream(threading.Thread):
    """One streamed completion: each token's arrival time and the server's per-request metrics."""

    def __init__(self, client, base, model, prompt: list[int], max_tokens: int, start=None):
        super().__init__(daemon=True)
        self.args = (client, base, model, prompt, max_tokens)
        self.start_together = start  # a threading.Barrier: the batch's requests leave at once
        self.times: list[float] = []
        self.metrics: dict = {}
        self.error: str | None = None

    def run(self) -> None:
        client, base, model, prompt, max_tokens = self.args
        if self.start_together is not None:
            self.start_together.wait()
        body = {
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "min_tokens": max_tokens,
            "ignore_eos": True,
            "temperature": 1.0,  # as ctk replay asks: sampled, streamed, token ids returned
            "stream": True,
            "stream_options": {"include_usage": True},
            "return_token_ids": True,
        }
        try:
            with client.stream("POST", f"{base}/completions", json=body) as r:
                for line in r.iter_lines():
                    if not line.startswith("data:") or line.strip() == "data: [DONE]":
                        continue
                    chunk = json.loads(line[5:])
                    now = time.perf_counter()
                    for c in chunk.get("choices") or []:  # one time per token (a late chunk carries several)
                        n = len(c.get("token_ids") or []) or bool(c.get("text"))
                        self.times.extend([now] * n)
                    self.metrics.update(chunk.get("metrics") or {})
        except Exception as exc:  # noqa: BLE001 - reported by the caller as one line
            self.error = f"{type(exc).__name__}: {exc}"


def _prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(300, 3800) for _ in range(n)]


def _decode_step(client, base, model, rng, ctx: int, batch: int) -> float | None:
    together = threading.Barrier(batch)
    streams = [_Stream(client, base, model, _prompt(rng, ctx), OUTPUT_TOKENS, together) for _ in range(batch)]
    for s in streams:
        s.start()
    for s in streams:
        s.join()
    if any(s.error or len(s.times) < 8 for s in streams):
        return None
    # client-side, as the replay sees a turn: the time the request that started last takes per token while
    # every request decodes
    start = max(s.times[0] for s in streams)
    end = min(s.times[-1] for s in streams)
    last = max(streams, key=lambda s: s.times[0])
    inside = [t for t in last.times if start < t <= end]
    client = (inside[-1] - start) / len(inside) if len(inside) >= 8 else None
    # the server's own mean inter-token time of that request: a floor when the client read a burst of
    # chunks at once (a starved client thread; it shrinks the client-side time towards 0)
    server = (last.metrics.get("mean_itl_ms") or 0.0) / 1e3
    if client is None or client < 0.5 * server:
        return server or None
    return client


def _prefill_step(
    client, base, model, rng, tokens: int, cached: int, batch: int, ctx: int, decode_tokens: int
) -> float | None:
    together = threading.Barrier(max(1, batch))
    decoders = [
        _Stream(client, base, model, _prompt(rng, ctx), decode_tokens, together) for _ in range(batch)
    ]
    for s in decoders:
        s.start()
    t0 = time.perf_counter()
    while decoders and time.perf_counter() - t0 < 30 and min(len(s.times) for s in decoders) < 8:
        time.sleep(0.002)  # until every decoder has left its prefill
    prefix = _prompt(rng, cached)
    if cached:
        warm = _Stream(client, base, model, prefix, 1)  # the cached context: prefilled once before
        warm.run()
    probe = _Stream(client, base, model, prefix + _prompt(rng, tokens), 1)
    sent = time.perf_counter()
    probe.run()
    for s in decoders:
        s.join()
    ttft_ms = probe.metrics.get("time_to_first_token_ms")
    if probe.error or ttft_ms is None:
        return None
    # the probe's prefill ended about ``sent + TTFT`` (the server's own TTFT: on a starved client the
    # response is read much later, and a decoder that was still decoding then is the step asked for)
    prefilled = sent + float(ttft_ms) / 1e3
    if any(s.error or not s.times or s.times[-1] < prefilled for s in decoders):
        return None  # a decoder failed or finished before the probe: not the step asked for
    return float(ttft_ms) / 1e3


def measure_steps(
    url: str,
    model: str | None = None,
    decode_points: Sequence[tuple[int, int]] = DECODE_POINTS,
    prefill_points: Sequence[tuple[int, int, int, int]] = PREFILL_POINTS,
    repeats: int = 3,
    seed: int | None = None,
    block_size: int = 128,
) -> list[StepPoint]:
    """Measure decode and (mixed) prefill steps on the server at ``url``; the median of ``repeats`` each.
    A prefix hit counts whole blocks: the cached context of a prefill point is rounded down to
    ``block_size`` (vLLM's CPU default 128)."""
    import httpx

    from ctk.predict.profile import first_model

    base = url.rstrip("/")
    base = base if base.endswith("/v1") else base + "/v1"
    rng = random.Random(time.time_ns() if seed is None else seed)
    points: list[StepPoint] = []
    with httpx.Client(timeout=300.0, limits=httpx.Limits(max_connections=32)) as client:
        model = model or first_model(client, base)
        _decode_step(client, base, model, rng, 64, 1)  # warm-up
        for ctx, batch in decode_points:
            xs = [x for _ in range(repeats) if (x := _decode_step(client, base, model, rng, ctx, batch))]
            if xs:
                mid = ctx + OUTPUT_TOKENS // 2
                points.append(StepPoint(0, 0.0, batch, batch * mid, statistics.median(xs), "decode"))
        for tokens, cached, batch, ctx in prefill_points:
            xs: list[float] = []
            decode_tokens = OUTPUT_TOKENS * 2
            for _ in range(2 * repeats):
                if len(xs) == repeats:
                    break
                x = _prefill_step(client, base, model, rng, tokens, cached, batch, ctx, decode_tokens)
                if x is not None:
                    xs.append(x)
                elif decode_tokens < MAX_DECODE_TOKENS:  # the decoders finished before the probe (a slow
                    decode_tokens *= 2  # machine): longer decoders next time
            if xs:
                hit = cached // block_size * block_size
                new = tokens + cached - hit
                mid = ctx + OUTPUT_TOKENS // 2 if batch else 0
                kind = "mixed" if batch else "prefill"
                points.append(
                    StepPoint(new, new * (hit + new / 2), batch, batch * mid, statistics.median(xs), kind)
                )
    return points


def fit_steps(points: Sequence[StepPoint]) -> dict[str, float]:
    """Non-negative least squares of the step model on relative error: ``step_overhead_s``,
    ``per_token_s``, ``attn_prefill_s``, ``attn_decode_s``, ``decode_seq_s``."""
    import numpy as np
    from scipy.optimize import nnls

    a = np.array([p.features() for p in points], dtype=float)
    y = np.array([p.step_s for p in points], dtype=float)
    scale = a.max(axis=0)
    scale[scale == 0] = 1.0
    coef, _ = nnls(a / scale / y[:, None], np.ones(len(y)))
    coef = coef / scale
    names = ("step_overhead_s", "per_token_s", "attn_prefill_s", "attn_decode_s", "decode_seq_s")
    return dict(zip(names, (float(c) for c in coef), strict=True))
