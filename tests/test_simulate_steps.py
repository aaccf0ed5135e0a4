"""The CPU step model's calibration: fitting measured decode / prefill / mixed steps, the profile built from
one measurement, and the speed factor read from a ``ctk profile`` file."""

from __future__ import annotations

import pytest

from ctk.simulate.derive import cpu_profile
from ctk.simulate.profiles import PREFILL_TERMS, HardwareProfile, load_profile
from ctk.simulate.steps import DECODE_POINTS, OUTPUT_TOKENS, PREFILL_POINTS, StepPoint, fit_steps

TRUE = {  # a CPU engine's step: overhead, per token, per prefill (query, key) pair, per decode context token
    "step_overhead_s": 0.002,
    "per_token_s": 1.8e-5,
    "attn_prefill_s": 2.2e-8,
    "attn_decode_s": 1.4e-7,
    "decode_seq_s": 1.6e-4,
}


def grid(coef: dict[str, float]) -> list[StepPoint]:
    """The measurement grid's steps, timed by a known step model."""
    points = []
    for ctx, b in DECODE_POINTS:
        points.append(StepPoint(0, 0.0, b, b * (ctx + OUTPUT_TOKENS // 2), 0.0, "decode"))
    for tokens, cached, b, ctx in PREFILL_POINTS:
        points.append(StepPoint(tokens, tokens * (cached + tokens / 2), b, b * ctx, 0.0, "mixed"))
    for p in points:
        p.step_s = sum(c * f for c, f in zip(coef.values(), p.features(), strict=True))
    return points


def measurement(points: list[StepPoint]) -> dict:
    prof = HardwareProfile.from_dict({**load_profile("cpu", "tiny").to_dict(), **fitted_profile_fields(TRUE)})
    short = prof.prefill_time_s(405)
    return {
        "prefill": {
            "prefill_tokens": [0, 1579, 3035],
            "prefill_s": [0.0, prof.prefill_time_s(1579) - short, prof.prefill_time_s(3035) - short],
            "overhead_s": short + 0.01,
            "raw": [{"requested": 128, "tokens": [405, 405], "latency_s": [short + 0.01, short + 0.01]}],
        },
        "steps": [p.__dict__ for p in points],
        "info": {"num_gpu_blocks": 64, "block_size": 128},
        "server_args": ["--max-num-seqs", "8"],
        "measured_unix_s": 1.0,
    }


def fitted_profile_fields(coef: dict[str, float]) -> dict:
    return {
        "step_overhead_s": coef["step_overhead_s"],
        "linear_tokens": [0, 2048],
        "linear_s": [0.0, coef["per_token_s"] * 2048],
        "attn_prefill_s": coef["attn_prefill_s"],
        "attn_decode_s": coef["attn_decode_s"],
        "decode_seq_s": coef["decode_seq_s"],
    }


def test_fit_recovers_the_step_model_from_the_measurement_grid():
    fit = fit_steps(grid(TRUE))
    for name, value in TRUE.items():
        assert fit[name] == pytest.approx(value, rel=1e-3), name


def test_cpu_profile_is_fitted_to_decode_and_mixed_steps_not_prefill_alone():
    """The profile predicts every measured step (batched decode included) and its round trip is the shortest
    prompt's latency minus that prompt's prefill step."""
    prof = HardwareProfile.from_dict(cpu_profile(measurement(grid(TRUE))))
    for p in grid(TRUE):
        assert prof.step_s(p.prefill_tokens, p.prefill_attn, p.n_decode, p.decode_ctx) == pytest.approx(
            p.step_s, rel=1e-3
        )
    # eight decoding sequences at ~300 tokens of context: overhead + 8 x per-sequence, not x 8 the overhead
    assert prof.step_s(0, 0.0, 8, 8 * 288) == pytest.approx(0.002 + 8 * (1.8e-5 + 1.6e-4) + 8 * 288 * 1.4e-7)
    assert prof.rtt_s == pytest.approx(0.01, abs=1e-5)
    assert "steps" in prof.sources["raw"]


def ctk_profile_of(prof: HardwareProfile) -> dict:
    """What ``ctk profile`` reports on an engine that runs exactly as ``prof``: each length's latency minus
    the shortest prompt's (405 tokens)."""
    short = prof.prefill_time_s(405)
    lengths = [1579, 3035, 6056]
    return {
        "prefill_tokens": [0, *lengths],
        "prefill_s": [0.0, *(prof.prefill_time_s(n) - short for n in lengths)],
        "raw": [{"requested": 128, "tokens": [405, 405], "latency_s": [short, short]}],
    }


def test_speed_factor_subtracts_the_shortest_prompt_as_ctk_profile_does():
    """A ``ctk profile`` of exactly the profiled engine reads as speed 1.0; of one whose prefill work runs
    1.3x slower, 1.3, and scaling the profile's prefill terms by it reproduces the measurement."""
    prof = HardwareProfile.from_dict(cpu_profile(measurement(grid(TRUE))))
    assert prof.speed_factor(ctk_profile_of(prof)) == pytest.approx(1.0, rel=1e-6)
    slow = ctk_profile_of(prof.scaled(1.3, terms=PREFILL_TERMS))
    factor = prof.speed_factor(slow)
    assert factor == pytest.approx(1.3, rel=1e-6)
    assert ctk_profile_of(prof.scaled(factor, terms=PREFILL_TERMS))["prefill_s"] == pytest.approx(
        slow["prefill_s"]
    )


def test_bundled_cpu_profile_predicts_its_measured_steps():
    """The bundled profile keeps its raw step measurement; the fitted model stays within 25% of every
    measured step (decode batches of 1-8, prefill alone and next to decodes)."""
    import json

    prof = load_profile("cpu", "tiny")
    raw = json.loads(prof.sources["raw"])
    kinds = {p["kind"] for p in raw["steps"]}
    assert kinds == {"decode", "prefill", "mixed"}
    assert max(p["n_decode"] for p in raw["steps"]) >= 6
    for p in raw["steps"]:
        est = prof.step_s(p["prefill_tokens"], p["prefill_attn"], p["n_decode"], p["decode_ctx"])
        assert est == pytest.approx(p["step_s"], rel=0.25), p


def replay_of(turns: list[dict]) -> dict:
    return {"label": "r", "programs": [{"turns": turns}]}


def turn(sent: float, ttft: float, latency: float, prompt: int, cached: int = 0, n: int = 11) -> dict:
    return {
        "sent_unix_s": sent,
        "ttft_s": ttft,
        "latency_s": latency,
        "queue_s": 0.0,
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "completion_tokens": n,
    }


def test_decode_window_check_compares_a_replays_decode_time_with_the_profile():
    """One turn alone decodes n - 1 steps at its context: a window of exactly that predicted time reads 1.0,
    twice as long 2.0; a second turn decoding over the same window doubles the batch the model charges."""
    from ctk.simulate.step_check import check_replays, decode_window_check

    prof = HardwareProfile.from_dict(cpu_profile(measurement(grid(TRUE))))
    step = prof.step_s(0, 0.0, 1, 1000 + 11 / 2)
    alone = replay_of([turn(0.0, 0.1, 0.1 + 10 * step, 1000)])
    assert decode_window_check(alone, prof.step_s)["real_over_model"] == pytest.approx(1.0)
    slow = replay_of([turn(0.0, 0.1, 0.1 + 20 * step, 1000)])
    assert decode_window_check(slow, prof.step_s)["real_over_model"] == pytest.approx(2.0)
    pair_step = prof.step_s(0, 0.0, 2, 2 * (1000 + 11 / 2))
    pair = replay_of([turn(0.0, 0.1, 0.1 + 10 * pair_step, 1000), turn(0.0, 0.1, 0.1 + 10 * pair_step, 1000)])
    res = decode_window_check(pair, prof.step_s)
    assert res["batch"] == pytest.approx(2.0) and res["real_over_model"] == pytest.approx(1.0)
    both = check_replays([alone, slow], prof.step_s)
    assert both["all"]["real_over_model"] == pytest.approx(1.5)


def test_pooled_measurements_fit_every_point_of_both_and_name_both_runs():
    """``derive cpu-fit``: two measurements of the same server pooled fit one step model to the points of both
    (two noisy runs averaged, not the first one's points alone); two servers cannot be pooled."""
    from ctk.simulate.derive import pool_measurements
    from ctk.simulate.steps import fit_steps

    fast = measurement(grid(TRUE))
    slow = measurement(grid({**TRUE, "step_overhead_s": 0.003}))
    slow["measured_unix_s"] = 2.0
    pooled = pool_measurements([fast, slow])
    assert len(pooled["steps"]) == 2 * len(fast["steps"])
    prof = HardwareProfile.from_dict(cpu_profile(pooled))
    alone = fit_steps([StepPoint(**p) for p in fast["steps"]])["step_overhead_s"]
    assert alone == pytest.approx(0.002, rel=1e-3)
    assert 0.0022 < prof.step_overhead_s < 0.0028  # between the two runs' overheads
    assert "2 runs" in prof.sources["measurement"] and "unix time 1, 2" in prof.sources["measurement"]
    other = {**slow, "server_args": ["--max-num-seqs", "16"]}
    with pytest.raises(ValueError):
        pool_measurements([fast, other])


def test_profile_warnings_flag_a_stale_profile_and_off_decode_windows():
    """A run whose prefill ran 2.1x the profile's measurement (the profile of 2026-11-30 against the runs of
    2026-12-07): only prefill work is rescaled, so the decode steps are stale: warned. Decode windows 1.25x
    the model's time: warned as a fast simulated engine. Inside the bounds: nothing."""
    from ctk.simulate.step_check import profile_warnings

    assert profile_warnings(1.1, 1.05) == []
    assert profile_warnings(0.85, 0.9) == []
    stale = profile_warnings(2.14, 1.25)
    assert len(stale) == 2 and "re-derive" in stale[0] and "runs fast" in stale[1]
    assert "runs slow" in profile_warnings(1.0, 0.8)[0] and "derive cpu" in profile_warnings(1.0, 0.8)[0]
    assert len(profile_warnings(0.7)) == 1
