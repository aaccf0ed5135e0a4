"""The simulated client's timing: each turn's round trip and the client's gap, measured in a real replay
(:mod:`ctk.simulate.client_timing`) and drawn per turn by the simulator."""

from __future__ import annotations

import json

import pytest

from ctk.measure.workload import ProgramSpec, TurnSpec
from ctk.simulate.client_timing import client_timing, load_client_timing
from ctk.simulate.profiles import load_profile
from ctk.simulate.run import SimConfig, simulate
from ctk.simulate.workload import Arrivals
from tests.test_simulate_engine import flat_profile
from tests.test_simulate_policy import programs


def replay(turns: list[dict]) -> dict:
    return {"programs": [{"turns": turns}]}


def test_client_timing_measures_the_time_outside_the_engine(tmp_path):
    keys = ("sent_unix_s", "ttft_s", "queue_s", "prompt_tokens", "cached_tokens", "latency_s", "pause_s")
    turns = [  # 1.0 s apart: 0.3 s response + 0.5 s tool pause -> 0.2 s client gap
        dict(zip(keys, (100.0, 0.25, 0.05, 1000, 500, 0.3, 0.5), strict=True)),
        dict(zip(keys, (101.0, 0.12, 0.0, 1200, 1100, 0.2, None), strict=True)),
        dict(sent_unix_s=102.0, ttft_s=None, queue_s=None, error="HTTP 500"),  # failed turn: skipped
    ]
    t = client_timing([replay(turns)], prefill_s=lambda n: n * 1e-4)
    assert t.rtt_samples_s == pytest.approx((0.25 - 0.05 - 0.05, 0.12 - 0.0 - 0.01))
    assert t.gap_samples_s == pytest.approx((0.2,))
    assert t.turns == 2
    # no per-request metrics (queue time): no round trip, the client's gap still counts
    turns[0]["queue_s"] = None
    path = tmp_path / "replay-x.json"
    path.write_text(json.dumps(replay(turns[:2])))
    t = load_client_timing([path], prefill_s=lambda n: 0.0)
    assert t.rtt_samples_s == pytest.approx((0.12,)) and t.gap_samples_s == pytest.approx((0.2,))
    assert t.summary()["rtt_mean_s"] == pytest.approx(0.12)


def one_program(turns: int = 5, pause: float = 1.0) -> list[ProgramSpec]:
    ts = [TurnSpec(k, 16, 8, pause, "make") for k in range(turns)]
    ts[-1].last_turn, ts[-1].tool_duration_s, ts[-1].observation_tokens = True, 0.0, 0
    return [ProgramSpec("p0", "test", 64, ts)]


def test_every_turn_takes_its_drawn_round_trip_and_gap():
    """One program alone on an engine: the measured timing adds exactly one round trip per turn and one
    client gap per tool pause to its JCT, and the round trip to every TTFT."""
    prof = flat_profile()
    idle = SimConfig(arrivals=Arrivals(rtt_s=0.0), shared_prefix_tokens=0)
    base = simulate(one_program(), prof, "vllm", idle).summary()
    arr = Arrivals(rtt_s=0.0, rtt_samples_s=(0.2,), gap_samples_s=(0.1,))
    timed = simulate(one_program(), prof, "vllm", SimConfig(arrivals=arr, shared_prefix_tokens=0)).summary()
    assert timed["mean_jct_s"] - base["mean_jct_s"] == pytest.approx(5 * 0.2 + 4 * 0.1)
    assert timed["mean_ttft_s"] - base["mean_ttft_s"] == pytest.approx(0.2)


def test_every_policy_draws_the_same_round_trips():
    """The draws are seeded per program, not by the order events happen in: policies are compared on the
    same client behaviour."""
    prof = load_profile("cpu", "tiny")
    arr = Arrivals(concurrency=8, rtt_samples_s=(0.01, 0.1, 0.3, 0.6), gap_samples_s=(0.0, 0.2))
    last = {}
    for policy in ("vllm", "continuum"):
        res = simulate(programs(), prof, policy, SimConfig(arrivals=arr, shared_prefix_tokens=512))
        last[policy] = [c.rtt_s for c in res.clients]
    assert last["vllm"] == last["continuum"]
    assert len(set(last["vllm"])) > 1


def test_round_trip_subtracts_the_engines_own_time_to_first_token_when_the_replay_has_it():
    """``ttft - queue - prefill_s(uncached)`` keeps the part of the engine's time to the first token that a
    solo prefill does not explain (the rest of the step the prefill shared, the steps of a chunked prefill):
    measured on the simulator's own output it gives back 0.07-0.09 s more than the round trips that went in
    (2026-12-07, out4's three arms), and the simulator then adds its own steps on top. A replay that records
    the engine's time from scheduling to first token (vLLM's per-request ``time_to_first_token_ms``) gives
    the round trip exactly: ``ttft - queue - server_prefill_s``."""
    keys = ("sent_unix_s", "ttft_s", "queue_s", "prompt_tokens", "cached_tokens", "latency_s", "pause_s")
    turns = [
        dict(zip(keys, (100.0, 0.45, 0.05, 1000, 900, 0.6, 0.0), strict=True), server_prefill_s=0.3),
        dict(zip(keys, (101.0, 0.25, 0.05, 1000, 500, 0.4, 0.0), strict=True)),  # older replay: the model
    ]
    t = client_timing([replay(turns)], prefill_s=lambda n: n * 1e-4)
    assert t.rtt_samples_s == pytest.approx((0.45 - 0.05 - 0.3, 0.25 - 0.05 - 0.05))
    assert t.rtt_exact == 1


def test_client_seed_draws_other_round_trips_over_the_same_arrivals():
    """``Arrivals.client_seed`` re-draws the client timing alone: a Poisson workload keeps the programs' start
    times (seeded by ``seed``, as the replay that is compared drew them) while the round trips change."""
    prof = load_profile("cpu", "tiny")
    arr = Arrivals(rate=2.0, concurrency=None, rtt_samples_s=(0.01, 0.1, 0.3, 0.6), gap_samples_s=(0.0, 0.2))
    runs = {}
    for client_seed in (None, 1):
        a = Arrivals(**{**arr.__dict__, "client_seed": client_seed})
        res = simulate(programs(), prof, "vllm", SimConfig(arrivals=a, shared_prefix_tokens=512))
        runs[client_seed] = ([c.start_s for c in res.clients], [c.rtt_s for c in res.clients])
    assert runs[None][0] == runs[1][0]  # the same arrivals
    assert runs[None][1] != runs[1][1]  # other round trips
