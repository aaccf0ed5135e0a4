"""The client's timing measured in a real replay: what a turn spends outside the engine's scheduler.

A profile's ``rtt_s`` is measured with one request on an idle server (HTTP + tokenisation, a few ms). Under a
replay's load the API server, the client and the engine share the machine, and a turn spends much longer
outside the scheduler: on this 2-core machine the median request's ``TTFT - queue wait - prefill compute``
is ~0.08 s (all five policies alike: it is not the policy), with a long tail. Pins are held across exactly
that time, so a simulator that leaves it out holds pins too briefly and keeps too many of them (more hits,
fewer pressure releases), most of all under strict program order where pinned memory keeps others waiting.

Two samples per real run, each drawn per turn by the simulator (:class:`~ctk.simulate.workload.Arrivals`):

- ``rtt_samples_s``: per turn, the request's way in and its first token's way out: ``ttft_s - queue_s -
  server_prefill_s`` when the replay recorded the engine's own time from scheduling to the first token
  (vLLM's per-request ``time_to_first_token_ms``, kept since 2026-12-07), else ``ttft_s - queue_s -
  prefill_s(uncached tokens)`` with ``prefill_s`` from the simulator's own profile. The second keeps what a
  solo prefill does not explain of the engine's time (the rest of the step the prefill shared, a chunked
  prefill's other steps), which the simulator then adds again: measured on the simulator's own output it
  gives back 0.07-0.09 s more than the round trips that went in (bench-out4's three arms, 2026-12-07);
- ``gap_samples_s``: per turn, the client's time between a response's end and its next request beyond the
  recorded tool pause (the replay's event loop; 1 ms typically, up to a second under load).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ClientTiming:
    rtt_samples_s: tuple[float, ...]
    gap_samples_s: tuple[float, ...]
    turns: int  # turns measured
    rtt_exact: int = 0  # round trips measured with the engine's own time to first token (the rest: the model)

    def summary(self) -> dict[str, float | int | None]:
        import numpy as np

        out: dict[str, float | int | None] = {"turns": self.turns, "rtt_exact": self.rtt_exact}
        for name, xs in (("rtt", self.rtt_samples_s), ("gap", self.gap_samples_s)):
            arr = np.asarray(xs, dtype=float)
            out[f"{name}_mean_s"] = float(arr.mean()) if len(arr) else None
            out[f"{name}_p50_s"] = float(np.median(arr)) if len(arr) else None
            out[f"{name}_p90_s"] = float(np.percentile(arr, 90)) if len(arr) else None
        return out


def client_timing(replays: Iterable[dict], prefill_s) -> ClientTiming:
    """Measure :class:`ClientTiming` in replay results (``ctk replay --json`` files' content);
    ``prefill_s(tokens)``: the engine's compute for a prefill of that many uncached tokens. Turns without a
    TTFT or a server-side queue time (a server without per-request metrics) give no round trip."""
    rtt: list[float] = []
    gap: list[float] = []
    turns = exact = 0
    for replay in replays:
        for prog in replay.get("programs") or []:
            ts = [t for t in prog.get("turns") or [] if not t.get("error")]
            for k, t in enumerate(ts):
                turns += 1
                ttft, queue = t.get("ttft_s"), t.get("queue_s")
                engine = t.get("server_prefill_s")
                if ttft is not None and queue is not None and engine is not None:
                    rtt.append(max(0.0, ttft - queue - engine))
                    exact += 1
                elif ttft is not None and queue is not None and t.get("prompt_tokens") is not None:
                    uncached = t["prompt_tokens"] - (t.get("cached_tokens") or 0)
                    rtt.append(max(0.0, ttft - queue - prefill_s(uncached)))
                if k + 1 < len(ts) and t.get("latency_s") is not None:
                    nxt = ts[k + 1]["sent_unix_s"] - t["sent_unix_s"]
                    gap.append(max(0.0, nxt - t["latency_s"] - (t.get("pause_s") or 0.0)))
    return ClientTiming(tuple(rtt), tuple(gap), turns, exact)


def load_client_timing(paths: Iterable[Path], prefill_s) -> ClientTiming:
    """:func:`client_timing` of replay result files."""
    return client_timing((json.loads(Path(p).read_text()) for p in paths), prefill_s)
