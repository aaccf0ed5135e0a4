"""Evaluation metrics, splits and plots."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ctk.predict.cost import CostModel, oracle_cost, realized_cost
from ctk.predict.dataset import prepare_frame
from ctk.predict.evaluate import evaluate_frame, fold_ids, pinball, plot, regret_of, row_costs
from tests.predict_fixtures import synthetic_rows


def test_pinball_and_censored_rows():
    y = np.array([1.0, 1.0, 30.0, 30.0])
    q = np.array([2.0, 0.5, 40.0, 10.0])
    cens = np.array([False, False, True, True])
    got = pinball(y, q, 0.9, cens)
    # over-prediction costs (1 - level), under-prediction costs level; a timed-out call only the latter
    assert got.tolist() == pytest.approx([0.1 * 1.0, 0.9 * 0.5, 0.0, 0.9 * 20.0])


def test_vectorized_regret_matches_the_cost_functions():
    rng = np.random.default_rng(0)
    n = 500
    frame = pd.DataFrame({"duration_s": rng.lognormal(0, 2, n)})
    ttl = np.where(rng.random(n) < 0.3, 0.0, rng.lognormal(0, 2, n))
    b = rng.uniform(0.1, 3, n)
    c = rng.lognormal(-3, 2, n)
    scalar = np.mean(
        [
            realized_cost(t, d, bb, cc) - oracle_cost(d, bb, cc)
            for t, d, bb, cc in zip(ttl, frame["duration_s"], b, c, strict=True)
        ]
    )
    assert regret_of(ttl, frame, b, c) == pytest.approx(scalar)
    # the oracle's own decision has zero regret; any other is >= 0
    d = frame["duration_s"].to_numpy()
    assert regret_of(np.where(c * d < b, d, 0.0), frame, b, c) == pytest.approx(0.0, abs=1e-12)
    assert regret_of(ttl, frame, b, c) > 0


def test_row_costs_grow_with_context_and_pressure():
    frame = pd.DataFrame({"context_est": [1000.0, 20000.0]})
    b, c = row_costs(frame, CostModel(), 0.9)
    _, c_low = row_costs(frame, CostModel(), 0.5)
    assert b[1] > b[0] and c[1] > c[0] and (c > c_low).all()


def test_folds_keep_programs_whole():
    frame, _ = prepare_frame(synthetic_rows(50, 6, seed=1))
    f = fold_ids(frame, 5)
    per_program = pd.Series(f).groupby(frame["program_id"].to_numpy()).nunique()
    assert (per_program == 1).all() and set(f) == set(range(5))
    one = fold_ids(frame, 1)
    assert set(one) == {0, -1}


def test_evaluate_frame_reports_and_plots(tmp_path):
    rows = pd.concat([synthetic_rows(40, 8, seed=1, source="a"), synthetic_rows(30, 8, seed=2, source="b")])
    frame, _ = prepare_frame(rows)
    result = evaluate_frame(frame, ["running-mean", "histogram"], CostModel(), folds=3)
    rep = result["program_split"]
    assert rep["rows"] == len(frame) and rep["programs"] == 70
    for name in ("running-mean", "histogram"):
        e = rep["predictors"][name]
        assert set(e["pinball"]) == {f"{lv:g}" for lv in e["levels"]}
        assert e["pinball_mean"] == pytest.approx((e["pinball"]["0.5"] + e["pinball"]["0.9"]) / 2)
        assert e["regret"]["mean"] >= 0 and e["per_tool"]
    assert "regret_table" in rep["predictors"]["histogram"]
    assert rep["reference_regret"]["never-pin"]["mean"] > rep["predictors"]["histogram"]["regret"]["mean"]
    assert set(result["leave_one_source_out"]) == {"a", "b"}
    paths = plot(result, tmp_path)
    assert all(p.exists() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths) and len(paths) == 2


def test_vectorized_row_costs_match_the_cost_model():
    cm = CostModel()
    ctx = [0.0, 15.0, 16.0, 17.5, 1000.0, 4096.0, 131072.0, 400000.0]
    b, c = row_costs(pd.DataFrame({"context_est": ctx}), cm, 0.87)
    assert b.tolist() == pytest.approx([cm.benefit_s(int(x)) for x in ctx])
    assert c.tolist() == pytest.approx([cm.holding_cost_per_s(int(x), 0.87) for x in ctx])


def test_folds_keep_task_groups_whole_and_skip_sources_held_out_whole():
    """GroupKFold by task: no task on both sides; a one-task source is left to leave-one-source-out."""
    from ctk.predict.evaluate import cross_predict, task_groups

    frame, _ = prepare_frame(synthetic_rows(60, 5, seed=2))
    frame["task_id"] = [f"t{int(p[-5:]) % 12}" for p in frame["program_id"]]  # 12 tasks of 5 programs
    lone = frame["program_id"] == frame["program_id"].iloc[0]
    frame.loc[lone, "task_id"] = "only-task"
    frame.loc[lone, "source"] = "one-task-source"
    f = fold_ids(frame, 4, seed=1)
    per_task = pd.Series(f).groupby(task_groups(frame)).nunique()
    assert (per_task == 1).all() and set(f) == set(range(4))
    preds, mask = cross_predict(frame, ["histogram"], 4, CostModel(), seed=1, tables=False)
    assert not mask[lone.to_numpy()].any() and mask[~lone.to_numpy()].all()


def test_mean_pinball_is_sklearn_with_censored_targets():
    from ctk.predict.evaluate import mean_pinball

    rng = np.random.default_rng(3)
    y, q = rng.lognormal(0, 1, 200), rng.lognormal(0, 1, 200)
    cens = rng.random(200) < 0.2
    for level in (0.5, 0.9):
        assert mean_pinball(y, q, level, cens) == pytest.approx(pinball(y, q, level, cens).mean())
    # a censored call predicted at or above its censoring time costs nothing
    assert mean_pinball(np.array([30.0]), np.array([40.0]), 0.9, np.array([True])) == 0.0
