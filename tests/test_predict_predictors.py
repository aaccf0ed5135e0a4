"""Predictors on synthetic traces with known structure: back-off, censoring, calibration, round trips."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ctk.datasets.shell import PROGRAM_KEY
from ctk.predict.cost import CONTINUUM_PIN_S, CostModel
from ctk.predict.dataset import DataError, prepare_frame, program_fold
from ctk.predict.evaluate import pinball
from ctk.predict.modelfile import load_model, save_model
from ctk.predict.predictors import (
    HistogramPredictor,
    LightGBMPredictor,
    RunningMeanPredictor,
    build_tables,
    predictor_from_dict,
)
from tests.predict_fixtures import TIMEOUT_S, synthetic_rows

LEVELS = (0.1, 0.5, 0.9, 0.99)


@pytest.fixture(scope="module")
def split():
    frame, _ = prepare_frame(synthetic_rows(240, 12, seed=3))
    test = program_fold(frame["program_id"], 0.3, seed=0)
    return frame[~test], frame[test]


@pytest.fixture(scope="module")
def lgbm(split):
    return LightGBMPredictor(LEVELS, n_estimators=120).fit(split[0])


def _pinball_mean(frame, q, levels=LEVELS):
    y, c = frame["y"].to_numpy(), frame["censored"].to_numpy()
    return np.mean([pinball(y, q[:, levels.index(lv)], lv, c).mean() for lv in (0.5, 0.9)])


def test_program_split_has_no_program_on_both_sides(split):
    train, test = split
    assert set(train["program_id"]).isdisjoint(test["program_id"])
    assert 0.2 < len(test) / (len(train) + len(test)) < 0.4


def test_history_features_do_not_leak_the_calls_own_duration():
    rows = synthetic_rows(3, 5, seed=1)
    frame, _ = prepare_frame(rows)
    first = frame.groupby("program_id").head(1)
    assert first["prev_duration_log"].isna().all() and (first["n_prev"] == 0).all()
    second = frame.groupby("program_id").nth(1)
    firsts = frame.groupby("program_id")["y"].first()
    assert np.allclose(
        np.exp(second["prev_duration_log"].to_numpy()), firsts.loc[second["program_id"]].to_numpy()
    )


def test_bad_rows_are_counted_not_fatal():
    rows = synthetic_rows(4, 4, seed=2)
    rows["duration_s"] = rows["duration_s"].astype(object)
    rows.loc[0, "duration_s"] = np.nan
    rows.loc[1, "duration_s"] = "garbage"
    rows.loc[2, "quality_flag"] = "implausible_lt_2ms"
    frame, skipped = prepare_frame(rows)
    assert skipped == 3 and len(frame) == len(rows) - 3
    with pytest.raises(DataError, match="lack column"):
        prepare_frame(rows.drop(columns=["duration_s"]))
    with pytest.raises(DataError, match="no usable"):
        prepare_frame(rows.assign(duration_s=np.nan))


def test_running_mean_is_the_2s_rule(split):
    train, test = split
    rm = RunningMeanPredictor(LEVELS).fit(train)
    q = rm.predict_quantiles(test)
    assert (q == q[:, :1]).all()  # a point prediction at every level
    ttl, hit = rm.choose_ttls(test, q, np.ones(len(test)), np.full(len(test), 1e-9))
    means = test["tool"].map(rm.means_).fillna(rm.means_["*"]).to_numpy()
    assert ((ttl == CONTINUUM_PIN_S) == (means <= CONTINUUM_PIN_S)).all()
    assert set(np.unique(ttl)) <= {0.0, CONTINUUM_PIN_S}


def test_histogram_backs_off_to_coarser_keys():
    rows = synthetic_rows(40, 10, seed=4)
    frame, _ = prepare_frame(rows)
    h = HistogramPredictor(LEVELS, min_samples=10, by_source=False).fit(frame)
    rare = prepare_frame(
        pd.DataFrame(
            [
                {"program_id": "x", "duration_s": 1.0, "command_or_args": "git bisect run"},
                {"program_id": "x", "duration_s": 1.0, "command_or_args": "npm ci"},
            ]
        )
    )[0]
    q = h.predict_quantiles(rare)
    assert "git:bisect" not in h.table_ and "git" in h.table_
    assert q[0].tolist() == h.table_["git"]  # unseen sub-command -> its program's distribution
    assert q[1].tolist() == h.table_[PROGRAM_KEY] != h.table_["*"]  # unseen program -> its kind
    frame2 = frame.copy()
    assert h.predict_quantiles(frame2[frame2["key0"] == "git:status"])[0].tolist() == h.table_["git:status"]


@pytest.fixture(scope="module")
def longer_cap_split():
    """The same calls prepared for a deployment with a longer cap: killed calls are censored run times."""
    frame, _ = prepare_frame(synthetic_rows(240, 12, seed=3), serve_cap_s=600.0)
    test = program_fold(frame["program_id"], 0.3, seed=0)
    return frame[~test], frame[test]


def test_killed_calls_are_exact_pauses_under_their_own_cap(split):
    train, _ = split
    assert train["killed"].any() and not train["censored"].any()


def test_histogram_treats_timeouts_as_censored_under_a_longer_cap(longer_cap_split):
    train, _ = longer_cap_split
    pip = train[train["key0"] == "pip:install"]
    assert pip["censored"].any()
    h = HistogramPredictor(LEVELS).fit(train)
    naive = HistogramPredictor(LEVELS).fit(train.assign(censored=False))
    hq, nq = h.table_["pip:install"], naive.table_["pip:install"]
    assert all(a >= b for a, b in zip(hq, nq, strict=True)) and hq[-1] > nq[-1]
    assert hq[-1] > TIMEOUT_S  # the top quantile lies past the harness timeout


def test_lightgbm_quantiles_do_not_cross_and_are_calibrated(split, lgbm):
    _, test = split
    q = lgbm.predict_quantiles(test)
    assert q.shape == (len(test), len(LEVELS))
    assert (np.diff(q, axis=1) >= 0).all()
    assert lgbm.cal_rows_ > 0 and any(s != 0 for s in lgbm.shifts_)
    cov = (test["y"].to_numpy()[:, None] <= q).mean(axis=0)
    assert 0.83 <= cov[LEVELS.index(0.9)] <= 0.96, cov
    assert 0.42 <= cov[LEVELS.index(0.5)] <= 0.58, cov


def test_lightgbm_uses_program_history_where_the_histogram_cannot(split, lgbm):
    _, test = split
    train = split[0]
    hist = HistogramPredictor(LEVELS).fit(train)
    rm = RunningMeanPredictor(LEVELS).fit(train)
    p_lgb = _pinball_mean(test, lgbm.predict_quantiles(test))
    p_hist = _pinball_mean(test, hist.predict_quantiles(test))
    p_rm = _pinball_mean(test, rm.predict_quantiles(test))
    assert p_lgb < p_hist < p_rm


def test_lightgbm_censoring_raises_upper_quantiles(longer_cap_split):
    train, test = longer_cap_split
    cens = LightGBMPredictor(LEVELS, n_estimators=120).fit(train)
    naive = LightGBMPredictor(LEVELS, n_estimators=120).fit(train.assign(censored=False))
    pip = test[test["key0"] == "pip:install"]
    top = LEVELS.index(0.99)
    assert np.median(cens.predict_quantiles(pip)[:, top]) > np.median(naive.predict_quantiles(pip)[:, top])


@pytest.mark.parametrize("kind", ["running-mean", "histogram", "lightgbm"])
def test_round_trip_through_the_model_file(split, lgbm, tmp_path, kind):
    train, test = split
    p = {
        "running-mean": lambda: RunningMeanPredictor(LEVELS).fit(train),
        "histogram": lambda: HistogramPredictor(LEVELS).fit(train),
        "lightgbm": lambda: lgbm,
    }[kind]()
    path = save_model({"predictors": {kind: p.to_dict()}}, tmp_path / "m.pkl")
    back = predictor_from_dict(load_model(path)["predictors"][kind])
    np.testing.assert_allclose(back.predict_quantiles(test), p.predict_quantiles(test))


def test_tables_from_predictors_follow_the_cost_model(split, lgbm):
    train, _ = split
    t = build_tables(lgbm, train, CostModel())
    assert {"ls", "pip:install", "python:script", "*"} <= set(t.keys()) and not t.fixed_pins
    # a quick listing is pinned at every pressure, a package install is not pinned when memory is tight
    assert all(t.engine_decision(["ls", "*"], 4000, p).ttl_s > 0 for p in t.cost_model.pressure_levels)
    assert t.engine_decision(["pip:install", "pip", "*"], 60000, 1.0).ttl_s == 0.0
    assert t.engine_decision(["pip:install", "pip", "*"], 1000, 0.0).ttl_s > TIMEOUT_S * 0.5
    q = t.quantiles_s["ls"]
    assert q == sorted(q) and q[LEVELS.index(0.5)] < 0.2


def test_vectorized_ttls_match_choose_ttl():
    from ctk.predict.cost import choose_ttl
    from ctk.predict.predictors import cost_model_ttls

    rng = np.random.default_rng(0)
    lv = [0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99]
    q = np.sort(rng.lognormal(0, 2, (3000, 7)), axis=1)
    q[::7, 0] = 0.0  # instant calls
    q[::11, 2] = q[::11, 1]  # point masses
    b = rng.uniform(0.1, 3, len(q))
    c = rng.lognormal(-3, 2, len(q))
    ttl, hit = cost_model_ttls(lv, q, b, c)
    ref = np.array([choose_ttl(lv, list(r), bb, cc) for r, bb, cc in zip(q, b, c, strict=True)])
    np.testing.assert_array_equal(ttl, ref[:, 0])
    np.testing.assert_array_equal(hit, ref[:, 1])
    assert 0 < (ttl > 0).mean() < 1


@pytest.mark.parametrize("cls", [RunningMeanPredictor, HistogramPredictor, LightGBMPredictor])
def test_predictors_follow_estimator_conventions(split, cls):
    """Parameters in __init__ and unchanged by fit (num_threads stays auto), learned state ends with _."""
    from sklearn.base import clone

    p = cls(LEVELS) if cls is not LightGBMPredictor else cls(LEVELS, n_estimators=5)
    params = p.get_params()
    p.fit(split[0])
    assert p.get_params() == params
    assert clone(p).get_params() == params
    learned = [k for k in vars(p) if k.endswith("_") and not k.startswith("_")]
    assert learned and not any(k in params for k in learned)
    if cls is LightGBMPredictor:
        assert p.num_threads == -1 and p.to_dict()["params"]["num_threads"] == -1


def _rows(source: str, n_programs: int, command: str, median_s: float, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "program_id": [f"{source}-{i // 4}" for i in range(4 * n_programs)],
            "turn_index": [i % 4 for i in range(4 * n_programs)],
            "source": source,
            "command_or_args": command,
            "duration_s": rng.lognormal(np.log(median_s), 0.3, 4 * n_programs),
        }
    )


def test_histogram_keeps_sources_apart():
    """A terminal source's python scripts never take their tail from another source's hour-long training
    runs; a source with few calls of a key borrows from a similar source, not from a dissimilar one."""
    rows = pd.concat(
        [
            _rows("term", 50, "python3 sol.py", 0.3, 1),
            _rows("term", 50, "ls -la", 0.02, 2),
            _rows("mle", 10, "python train.py", 3000.0, 3),
            _rows("mle", 10, "ls -la", 0.5, 4),
            _rows("term2", 30, "ls -la", 0.021, 5),
            _rows("term2", 1, "python3 x.py", 0.35, 6),
        ],
        ignore_index=True,
    )
    frame, _ = prepare_frame(rows)
    h = HistogramPredictor(LEVELS).fit(frame)
    assert h.similarity_["term2"]["term"] > 0.8 > 0.1 > h.similarity_["term2"]["mle"]
    q9 = LEVELS.index(0.9)

    def q(source: str, command: str) -> np.ndarray:
        one, _ = prepare_frame(
            pd.DataFrame(
                {"program_id": ["x"], "source": [source], "command_or_args": [command], "duration_s": [1.0]}
            )
        )
        return h.predict_quantiles(one)[0]

    assert q("term", "python3 a.py")[q9] < 1.0  # own source: 0.3 s scripts
    assert q("mle", "python a.py")[q9] > 1000.0
    assert q("term2", "python3 a.py")[q9] < 1.0  # 4 own calls + the similar terminal source, not mle
    pooled = q("unknown-source", "python3 a.py")[q9]
    assert pooled > 1000.0  # no source known: the pooled key (the engine's tables; online adapts them)
    back = predictor_from_dict(h.to_dict())
    np.testing.assert_allclose(back.predict_quantiles(frame), h.predict_quantiles(frame))


def test_histogram_never_takes_a_rare_keys_tail_from_another_source_unshrunk():
    """A key with 2 calls of its own source, which another, alike source runs for an hour: the own
    source's coarser key is the prior, so the other source's hour does not become the median."""
    rows = []
    for src, foo_s in (("mine", 0.1), ("other", 3600.0)):
        for p in range(30):
            for t, cmd in enumerate(("ls -la", "git status", "cat a.txt")):
                rows.append(
                    {
                        "program_id": f"{src}{p}",
                        "turn_index": t,
                        "source": src,
                        "command_or_args": cmd,
                        "duration_s": 0.05,
                    }
                )
        n_foo = 2 if src == "mine" else 12
        for i in range(n_foo):
            rows.append(
                {
                    "program_id": f"{src}{i}",
                    "turn_index": 9,
                    "source": src,
                    "command_or_args": "foo --run",
                    "duration_s": foo_s,
                }
            )
    frame, _ = prepare_frame(pd.DataFrame(rows))
    h = HistogramPredictor(LEVELS, rare_calls=0).fit(frame)
    assert h.similarity_["mine"]["other"] > 0.96  # the sources look alike on their shared keys
    q = h.predict_quantiles(frame[(frame["source"] == "mine") & (frame["key0"] == "foo")].head(1))[0]
    assert q[LEVELS.index(0.5)] < 1.0
