"""A step model checked against a real replay: how long the replay's decode windows took, against what the
profile predicts for the batches that ran in them.

A turn's decode window (first token to last, client-side; the way out cancels) holds exactly ``n - 1``
engine steps of that request. Which other work shared those steps is read from the other turns' windows:
another turn decoding over a share ``f`` of its own window put ``f × (n - 1)`` decode steps (at its
context) into this one; a turn prefilling (server-side scheduled to client-side first token) over a share
``f`` of that span put ``f ×`` its uncached tokens in. Summed over the run, the predicted time of every
window against the measured time is the profile's error on the steps the replay actually ran, apart from
anything the simulator's scheduling or policies do. One number per replay, a few percent of noise.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class _Turn:
    decode: tuple[float, float]  # first token .. last token (client clock)
    prefill: tuple[float, float]  # scheduled (sent + server queue wait) .. first token
    steps: int  # decode steps in the window (output tokens - 1)
    context: float  # mean context of its decode steps
    uncached: int
    cached: int


def _turns(replay: dict) -> list[_Turn]:
    out = []
    for prog in replay.get("programs") or []:
        for t in prog.get("turns") or []:
            keys = ("ttft_s", "latency_s", "prompt_tokens", "completion_tokens", "sent_unix_s")
            if t.get("error") or any(t.get(k) is None for k in keys):
                continue
            sent, n = t["sent_unix_s"], int(t["completion_tokens"])
            cached = int(t.get("cached_tokens") or 0)
            out.append(
                _Turn(
                    decode=(sent + t["ttft_s"], sent + t["latency_s"]),
                    prefill=(sent + (t.get("queue_s") or 0.0), sent + t["ttft_s"]),
                    steps=max(0, n - 1),
                    context=t["prompt_tokens"] + n / 2,
                    uncached=int(t["prompt_tokens"]) - cached,
                    cached=cached,
                )
            )
    return out


def _share(a: tuple[float, float], b: tuple[float, float]) -> float:
    """The share of ``b`` that lies inside ``a``."""
    span = b[1] - b[0]
    return max(0.0, min(a[1], b[1]) - max(a[0], b[0])) / span if span > 0 else 0.0


def decode_window_check(replay: dict, step_s) -> dict[str, float]:
    """``step_s(prefill_tokens, prefill_attn, n_decode, decode_ctx)`` (a profile's) against one replay result
    (``ctk replay --json`` content): ``real_over_model`` (measured / predicted decode-window time) and the
    mean step a decoding token saw (``batch``, ``context``, ``prefill_tokens``)."""
    turns = _turns(replay)
    real = model = tokens = batch = ctx = prefill = 0.0
    for i in turns:
        if i.steps < 1 or i.decode[1] <= i.decode[0]:
            continue
        b = c = p = a = 0.0  # decode steps, their context, prefill tokens and attention pairs in the window
        for j in turns:
            if j.steps:
                f = _share(i.decode, j.decode) * j.steps
                b += f
                c += f * j.context
            if j.uncached > 0:
                f = _share(i.decode, j.prefill)
                p += f * j.uncached
                a += f * j.uncached * (j.cached + j.uncached / 2)
        n = i.steps  # the window's steps, as many mean steps (the others' work spread over them)
        model += n * step_s(p / n, a / n, b / n, c / n)
        real += i.decode[1] - i.decode[0]
        tokens += n
        batch += b
        ctx += c
        prefill += p
    if not tokens:
        return {"real_over_model": float("nan"), "windows": 0}
    return {
        "real_over_model": real / model,
        "windows": len(turns),
        "real_s": real,
        "model_s": model,
        "batch": batch / tokens,
        "context": ctx / batch if batch else 0.0,
        "prefill_tokens": prefill / tokens,
        "itl_real_s": real / tokens,
        "itl_model_s": model / tokens,
    }


def check_replays(replays: Iterable[dict], step_s) -> dict[str, dict[str, float]]:
    """:func:`decode_window_check` per replay (keyed by its label and position) and ``all`` (the summed
    times)."""
    out: dict[str, dict[str, float]] = {}
    real = model = 0.0
    for k, replay in enumerate(replays):
        res = decode_window_check(replay, step_s)
        out[f"{replay.get('label') or 'replay'}#{k}"] = res
        if res.get("windows"):
            real += res["real_s"]
            model += res["model_s"]
    out["all"] = {"real_over_model": real / model if model else float("nan")}
    return out


#: A run whose prefill ran this much slower (or faster) than the profile's measurement: the machine (or its
#: install) is not in the state the profile was measured in. The run's prefill speed rescales only prefill
#: work; decode steps (most of an agent run's steps: overhead, per-sequence work) keep the profile's speed,
#: and on 2026-12-07 a profile measured when prefill ran 2.1x faster put them 1.25x too fast.
STALE_SPEED_FACTOR = 1.25
#: Decode windows this far from the profile's time (real / model): the step model is off on this run.
DECODE_WINDOW_TOLERANCE = 0.15


def profile_warnings(speed_factor: float, real_over_model: float | None = None) -> list[str]:
    """What a fidelity run should say about its step model: the run's prefill speed factor against the
    profile's measurement (:meth:`~ctk.simulate.profiles.HardwareProfile.speed_factor`) and the replays'
    decode windows over the model's time (:func:`check_replays`' ``all``)."""
    out = []
    if not 1 / STALE_SPEED_FACTOR <= speed_factor <= STALE_SPEED_FACTOR:
        out.append(
            f"the run's prefill ran {speed_factor:.2f}x the profile's measurement: the profile was measured "
            "on this machine in another state, and only prefill work is rescaled, not decode steps; "
            "re-derive it (python -m ctk.simulate.derive cpu)"
        )
    if real_over_model is not None and abs(real_over_model - 1) > DECODE_WINDOW_TOLERANCE:
        out.append(
            f"the real decode windows ran {real_over_model:.2f}x the profile's time for the same steps: "
            "the simulated engine runs "
            + ("fast" if real_over_model > 1 else "slow")
            + " on every arm alike (compare the arms' ratios, or re-derive the profile on this machine as it "
            "runs: python -m ctk.simulate.derive cpu, twice, then derive cpu-fit)"
        )
    return out
