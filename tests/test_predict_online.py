"""Online adaptation measured prequentially: no leakage, coverage converges on new and shifted deployments."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from ctk.cli import app
from ctk.datasets.samples import sample_traces_dir
from ctk.predict.cost import CDF, CostModel, cdf_knots
from ctk.predict.dataset import prepare_frame
from ctk.predict.modelfile import save_model
from ctk.predict.online import LogShiftCalibrator, OnlineDurations, blend_quantiles
from ctk.predict.online_eval import (
    OnlineConfig,
    copy_tables,
    online_report,
    order_by_start,
    replay,
    shift_durations,
)
from ctk.predict.predictors import HistogramPredictor, build_tables
from ctk.predict.tables import TTLTables

HELD = "tbench1_usaco_adapter_codex-cli_o4-mini"


@pytest.fixture(scope="module")
def sample():
    rows = pd.read_csv(sample_traces_dir() / "tool_calls.csv.gz")
    frame, _ = prepare_frame(rows)
    return rows, frame


@pytest.fixture(scope="module")
def held_out(sample):
    """A histogram trained without source C, C's calls in start order, and the model's TTL tables."""
    _, frame = sample
    train = frame[frame["source"] != HELD]
    h = HistogramPredictor().fit(train)
    tables = build_tables(h, train, CostModel())
    test, skipped = order_by_start(frame[frame["source"] == HELD])
    assert skipped == 0 and test["start_s"].is_monotonic_increasing
    return h, tables, test


def test_changing_later_durations_never_changes_an_earlier_prediction(held_out):
    _, tables, test = held_out
    q, _ = replay(test, copy_tables(tables))
    cut = len(test) // 2
    changed = test.copy()
    rng = np.random.default_rng(0)
    later = np.arange(len(test)) > cut
    changed.loc[later, "duration_s"] = rng.lognormal(3.0, 2.0, later.sum())  # very different futures
    q2, _ = replay(changed, copy_tables(tables))
    np.testing.assert_array_equal(q[: cut + 1], q2[: cut + 1])
    assert not np.allclose(q[cut + 1 :], q2[cut + 1 :])  # ... and the later ones do see them


def test_a_call_running_when_another_starts_is_not_seen(held_out):
    """Only calls FINISHED before a call's start inform it: a long call overlapping the next one does not."""
    _, tables, test = held_out
    two = test.iloc[:2].copy()
    two["start_s"] = [0.0, 1.0]
    cfg = OnlineConfig(min_samples=1, prior_weight=1, min_interval_s=0.0)
    initial = OnlineDurations(copy_tables(tables)).quantiles(two["keys"].iat[1])
    for dur, seen in ((0.5, True), (5.0, False)):
        two["duration_s"] = [dur, 0.1]
        q, _ = replay(two, copy_tables(tables), cfg)
        assert (q[1].tolist() != initial) == seen


@pytest.mark.parametrize("add_s", [0.0, 0.2])
def test_coverage_converges_on_a_held_out_source(held_out, add_s):
    """C is held out whole (and shifted by +0.2 s per call, a docker-exec overhead no training source had):
    after the first 100 calls q0.9 covers 85-95 % and the online pinball beats the offline prediction."""
    h, tables, test = held_out
    test = shift_durations(test, add_s) if add_s else test
    rep = online_report(test, h.predict_quantiles(test), tables)["variants"]
    assert 0.85 <= rep["online"]["coverage_0.9_after_warmup"] <= 0.95, rep
    assert rep["online"]["pinball_mean"] < rep["offline"]["pinball_mean"], rep
    assert rep["online"]["pinball_mean_after_warmup"] < rep["offline"]["pinball_mean_after_warmup"], rep


def test_calibrator_tracks_a_constant_shift():
    """A prior that is 10x too low: the log-shift moves until ~90 % of calls fall under q0.9."""
    cal = LogShiftCalibrator([0.5, 0.9], learning_rate=0.05)
    rng = np.random.default_rng(1)
    base = [0.1, 0.3]
    hits = []
    for i in range(3000):
        d = float(np.exp(rng.normal(np.log(1.0), 0.5)))
        q9 = base[1] * np.exp(cal.shifts[1])
        if i >= 1000:
            hits.append(d <= q9)
        cal.update(base, d)
    assert 0.87 <= np.mean(hits) <= 0.93
    assert cal.shifts[1] > np.log(3.0)


def test_global_shift_reaches_keys_never_observed():
    """Keys with no call of their own get the deployment-wide shift (the global fallback)."""
    t = TTLTables.build({"a": [0.01, 0.02], "b": [0.01, 0.02], "*": [0.01, 0.02]}, {}, [0.5, 0.9])
    on = OnlineDurations(t, min_samples=5, prior_weight=5, min_interval_s=0.0)
    for i in range(200):
        on.observe(["a", "*"], 0.2, now=float(i))
    assert t.quantiles_s["b"][1] > 0.05  # 'b' never ran, yet its q0.9 moved towards 0.2 s


def test_predict_online_cli_writes_predict_columns_in_start_order(sample, held_out, tmp_path):
    rows, _ = sample
    h, tables, _ = held_out
    model = {"predictor": "histogram", "predictors": {"histogram": h.to_dict()}}
    model["ttl_tables"] = tables.to_dict()
    save_model(model, tmp_path / "m.pkl")
    held = rows[rows["source"] == HELD].sample(frac=1.0, random_state=0)  # shuffled input
    held.to_csv(tmp_path / "held.csv", index=False)
    runner = CliRunner()
    args = ["predict", str(tmp_path / "held.csv"), "--model", str(tmp_path / "m.pkl")]
    r_off = runner.invoke(app, [*args, "-o", str(tmp_path / "off.csv")])
    r_on = runner.invoke(app, [*args, "--online", "-o", str(tmp_path / "on.csv")])
    assert r_off.exit_code == 0 and r_on.exit_code == 0, r_on.output
    off, on = pd.read_csv(tmp_path / "off.csv"), pd.read_csv(tmp_path / "on.csv")
    assert list(off.columns) == [c for c in on.columns if c != "start_s"]
    assert on["start_s"].is_monotonic_increasing and len(on) == len(off)
    assert json.loads(r_on.output.strip().splitlines()[-1])["predictor"] == "histogram+online"
    db, m = str(tmp_path / "held.csv"), str(tmp_path / "m.pkl")
    r_eval = runner.invoke(app, ["evaluate", "--db", db, "--model", m, "--online", "--json"])
    assert r_eval.exit_code == 0, r_eval.output
    res = json.loads(r_eval.output)
    assert res["variants"]["online"]["pinball_mean"] < res["variants"]["offline"]["pinball_mean"]
    r_bad = runner.invoke(app, ["evaluate", "--db", db, "--online"])
    assert r_bad.exit_code == 2 and "--model" in r_bad.output


def test_prior_blend_uses_the_cost_models_cdf_with_point_masses():
    """The online prior is :func:`ctk.predict.cost.cdf_knots` without the TTL floor: a quantile of 0 s is a
    point mass at 0 (``F(0)`` counts it), equal quantiles jump, an infinite one ends the knots."""
    levels = [0.1, 0.25, 0.5, 0.9]
    prior = [0.0, 0.0, 2.0, float("inf")]
    ts, fs = cdf_knots(levels, prior, floor_s=0.0)
    assert ts == [0.0, 0.0, 0.0, 2.0] and fs == [0.0, 0.1, 0.25, 0.5]
    cdf = CDF(ts, fs)
    assert cdf.at(0.0)[0] == 0.25 and cdf.at(1.0)[0] == pytest.approx(0.375) and cdf.at(9.0)[0] == 0.5
    assert CDF.from_quantiles(levels, prior).at(0.0) == (0.0, 0.0)  # the pin rule's floor: no mass at 0
    # only the prior (no observation): the blend gives back the prior (F never reaches 0.9: infinite)
    assert blend_quantiles(levels, prior, 5.0, []) == [0.0, 0.0, 2.0, float("inf")]
    # one observation at 1 s with weight 1 against a prior of weight 1: the median moves onto it
    assert blend_quantiles(levels, prior, 1.0, [1.0])[2] == 1.0


def _duel_tables(row: list[float]) -> TTLTables:
    return TTLTables.build({"k": row, "*": row}, {"k": 50, "*": 50}, [0.5, 0.9], CostModel())


def test_online_keeps_a_good_offline_prediction_level_by_level():
    """Durations 1 s (80%) / 10 s (20%); the call's own offline prediction is right at q0.5 and wrong at
    q0.9, the model file's row wrong at both: online adapts q0.9 (it beats the offline q0.9 on the key's
    calls) and keeps the offline q0.5 (nothing beat it), each level on its own."""
    tables = _duel_tables([5.0, 5.0])
    online = OnlineDurations(tables, min_samples=5, duel_min_calls=20, min_interval_s=0.0)
    offline = [1.0, 1.5]
    rng = np.random.default_rng(0)
    for i in range(300):
        d = 10.0 if rng.random() < 0.2 else 1.0
        online.observe(["k", "*"], d, float(i), offline)
    q = online.quantiles(["k", "*"], offline)
    assert q[0] == offline[0]  # the adapted median never beat the exact offline one
    assert q[1] > 5.0  # the adapted q0.9 did beat the offline 1.5 s
    wins = online._wins("k")
    assert wins == [False, True]


def test_online_falls_back_to_offline_until_the_key_has_calls():
    tables = _duel_tables([5.0, 5.0])
    online = OnlineDurations(tables, min_samples=5, duel_min_calls=20, min_interval_s=0.0)
    for i in range(10):  # fewer calls than the duel needs: the offline prediction stands
        online.observe(["k", "*"], 0.2, float(i), [0.3, 0.6])
    assert online.quantiles(["k", "*"], [0.3, 0.6]) == [0.3, 0.6]
    assert tables.quantiles_s["k"] == [5.0, 5.0]  # the engine's row too: the model file's until won


def test_blend_quantiles_is_the_smallest_candidate_whose_mixture_cdf_reaches_each_level():
    """The blend's search (bisections that start from the lower level's answer, the prior's F computed
    in place) against a plain scan of every candidate with the prior's CDF object: the same floats, on
    random windows, priors and level orders (unsorted levels included)."""
    import random

    rng = random.Random(3)
    for case in range(300):
        levels = sorted(rng.sample([0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99], rng.randrange(1, 8)))
        if case % 5 == 0:
            rng.shuffle(levels)
        n = rng.choice([0, 1, 3, 50])
        observed = [rng.choice([0.0, 0.5, rng.lognormvariate(0, 2)]) for _ in range(n)]
        prior = None if n and rng.random() < 0.2 else sorted(rng.lognormvariate(0, 1) for _ in levels)
        weight = rng.choice([1, 5, 20])
        w = weight if prior is not None else 0.0
        obs = sorted(observed)
        prior_cdf = CDF.from_quantiles(levels, prior, floor_s=0.0) if prior is not None else None

        def mixture(t: float, obs=obs, n=n, w=w, prior_cdf=prior_cdf) -> float:
            f_obs = sum(x <= t for x in obs) / n if n else 0.0
            f_pri = prior_cdf.at(t)[0] if prior_cdf is not None else 0.0
            return (w * f_pri + n * f_obs) / (w + n)

        cands = sorted(set(obs) | set(prior or ()) | {0.0})
        want = [next((c for c in cands if mixture(c) >= lvl - 1e-12), cands[-1]) for lvl in levels]
        for i in range(1, len(want)):
            want[i] = max(want[i], want[i - 1])
        assert blend_quantiles(levels, prior, weight, observed) == want, case
