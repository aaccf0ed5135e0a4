"""Harness caps: a killed call is an exact pause at its cap; predictions never pass cap + overhead."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ctk.predict.caps import learn_caps, point_mass_cap
from ctk.predict.cost import CostModel
from ctk.predict.dataset import prepare_frame
from ctk.predict.predictors import HistogramPredictor, LightGBMPredictor, build_tables
from ctk.predict.train import config_cap_s
from tests.predict_fixtures import synthetic_rows

LEVELS = (0.1, 0.5, 0.9, 0.99)
CAP_S = 30.0


def _two_sources() -> pd.DataFrame:
    """A source whose harness kills at 30 s (killed pauses 29.7-30.3 s: the harness's overhead) and one
    without a cap whose same commands run for minutes (a training-script source)."""
    capped = synthetic_rows(120, 12, seed=5, source="capped", timeout_s=CAP_S)
    jitter = np.random.default_rng(0).uniform(-0.3, 0.3, len(capped))
    capped.loc[capped["censored"], "duration_s"] += jitter[capped["censored"].to_numpy()]
    long = synthetic_rows(60, 12, seed=6, source="long", timeout_s=1e9)
    long["duration_s"] *= 40.0
    return pd.concat([capped, long], ignore_index=True)


@pytest.fixture(scope="module")
def frame():
    return prepare_frame(_two_sources())[0]


def test_cap_is_the_point_mass_of_killed_calls(frame):
    caps = learn_caps(frame)
    assert set(caps) == {"capped"}  # the uncapped source has no killed call
    c = caps["capped"]
    assert abs(c.cap_s - CAP_S) < 0.1 and c.origin == "learned"
    assert CAP_S <= c.bound_s <= CAP_S + 0.3 and c.killed_calls == int(frame["killed"].sum())
    # killed at scattered times (per-command timeouts): no harness cap
    assert point_mass_cap(np.array([5.0, 12.0, 30.0, 60.0, 90.0, 300.0]), 100) is None


@pytest.mark.parametrize("kind", ["histogram", "lightgbm"])
def test_a_30s_capped_source_never_gets_a_quantile_past_cap_plus_overhead(frame, kind):
    p = (
        HistogramPredictor(LEVELS)
        if kind == "histogram"
        else LightGBMPredictor(LEVELS, n_estimators=40, num_threads=1)
    ).fit(frame)
    bound = learn_caps(frame)["capped"].bound_s
    capped = frame[frame["source"] == "capped"]
    q = p.predict_quantiles(capped)
    assert q[:, LEVELS.index(0.99)].max() <= bound
    # a command the source never ran, which the long source ran for minutes
    new = prepare_frame(
        pd.DataFrame(
            [{"program_id": "n", "source": "capped", "duration_s": 1.0, "command_or_args": "make -j8 all"}]
        )
    )[0]
    assert p.predict_quantiles(new).max() <= bound
    # the long source keeps its tail
    assert p.predict_quantiles(frame[frame["source"] == "long"])[:, -1].max() > 10 * bound


def test_tables_of_keys_only_capped_calls_hold_stay_under_the_bound(frame):
    capped = frame[frame["source"] == "capped"]
    t = build_tables(HistogramPredictor(LEVELS).fit(capped), capped, CostModel())
    bound = learn_caps(capped)["capped"].bound_s
    assert max(max(q) for q in t.quantiles_s.values()) <= bound


def test_a_longer_serve_cap_censors_killed_calls_and_bounds_by_that_cap():
    rows = _two_sources()
    frame, _ = prepare_frame(rows, serve_cap_s=120.0)
    assert (frame["censored"] == (frame["killed"] & (frame["source"] == "capped"))).all()
    capped = frame[frame["source"] == "capped"]
    q = HistogramPredictor(LEVELS).fit(capped).predict_quantiles(capped)
    assert q.max() > CAP_S + 1  # the run time past the 30 s cap shows ...
    assert q.max() <= 120.0 + 0.3  # ... up to the longer cap


def test_the_config_cap_is_read_from_the_run_config():
    assert config_cap_s('{"env": "local", "timeout": 60}') == 60.0
    assert config_cap_s('{"timeout": null}') is None and config_cap_s("not json") is None
