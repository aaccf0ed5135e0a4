"""The job figures (issue 22): one definition, used by replay results and the simulator alike."""

from __future__ import annotations

import pytest

from ctk.measure.metrics import JOB_KEYS, ProgramTiming, job_figures


def test_the_first_turn_is_the_admission_wait_later_turns_are_resumes():
    progs = [
        ProgramTiming(0.0, 100.0, [30.0, 0.5, 0.7]),  # waited 30 s to start, resumed fast
        ProgramTiming(10.0, 3610.0, [1.0, None, 2.0]),  # a turn without a first token is left out
        ProgramTiming(20.0, None, [5.0]),  # unfinished: its wait counts, not its JCT
    ]
    f = job_figures(progs, prompt_tokens=1000, cached_tokens=250)
    assert set(JOB_KEYS) == set(f)
    assert f["mean_jct_s"] == pytest.approx((100.0 + 3600.0) / 2)
    assert f["max_admission_wait_s"] == 30.0 and f["p50_admission_wait_s"] == 5.0
    assert f["mean_resume_ttft_s"] == pytest.approx((0.5 + 0.7 + 2.0) / 3)
    assert f["p99_resume_ttft_s"] < 2.0 + 1e-9 and f["p99_resume_ttft_s"] > 1.9
    assert f["programs_per_hour"] == pytest.approx(2 * 3600.0 / 3610.0)  # first start -> last finish
    assert f["hit_rate"] == 0.25
    assert job_figures([], 0, None)["mean_jct_s"] is None


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # an empty simulation's mean KV usage
def test_replay_results_and_the_simulator_report_the_same_keys():
    from ctk.measure.results import ProgramResult, ReplayResult, TurnResult

    res = ReplayResult("ttl")
    res.programs = [
        ProgramResult("p", "r", 0.0, 10.0, [TurnResult(1, 5.0, ttft_s=0.2), TurnResult(0, 0.0, ttft_s=3.0)])
    ]
    s = res.summary()
    assert s["p99_admission_wait_s"] == 3.0 and s["p99_resume_ttft_s"] == pytest.approx(0.2)  # turn order
    from ctk.simulate.run import SimResult

    assert set(JOB_KEYS) <= set(s)
    assert set(JOB_KEYS) <= set(SimResult("vllm", [], [], 0.0, 0.0).summary())
