"""Kaplan-Meier handling of censored (timed-out) durations."""

from __future__ import annotations

import numpy as np
import pytest

from ctk.predict import survival
from ctk.predict.survival import KaplanMeier


def test_no_censoring_is_the_empirical_distribution():
    rng = np.random.default_rng(0)
    t = rng.lognormal(0, 1, 501)
    km = KaplanMeier.fit(t)
    for lv in (0.1, 0.5, 0.9):
        expected = np.sort(t)[int(np.ceil(lv * len(t))) - 1]  # smallest t with ECDF >= level
        assert km.quantile(lv) == pytest.approx(expected)


def test_censored_row_is_a_lower_bound_not_an_event():
    # textbook: 1, 2, 3+ (censored), 4, 5 -> S = .8, .6, (no step at 3), .3, 0
    km = KaplanMeier.fit([1, 2, 3, 4, 5], [False, False, True, False, False])
    assert km.cdf_at(2.5) == pytest.approx(0.4)
    assert km.cdf_at(3.5) == pytest.approx(0.4)
    assert km.cdf_at(4) == pytest.approx(0.7)
    assert km.quantile(0.5) == 4.0
    naive = KaplanMeier.fit([1, 2, 3, 4, 5])
    assert naive.quantile(0.5) == 3.0  # treating the timeout as exact understates the median


def test_weights_and_ties():
    a = KaplanMeier.fit([1, 1, 2, 3], [False, False, False, True])
    b = KaplanMeier.fit([1, 2, 3], [False, False, True], weights=[2, 1, 1])
    assert a.cdf_at(2) == pytest.approx(b.cdf_at(2)) == pytest.approx(0.75)


def test_unreached_quantiles_extrapolate_beyond_the_censoring_point():
    # half the calls time out at 30 s: the 0.9 quantile is unknown but at least 30 s
    t = [1.0] * 10 + [30.0] * 10
    c = [False] * 10 + [True] * 10
    km = KaplanMeier.fit(t, c)
    assert km.quantile(0.5) == 1.0
    assert km.quantile(0.9) is None
    assert km.quantiles([0.5, 0.9]) == [1.0, pytest.approx(30.0 * survival.TAIL_FACTOR)]


def test_sample_beyond_draws_from_the_tail():
    rng = np.random.default_rng(1)
    km = KaplanMeier.fit(rng.lognormal(1, 1, 400))
    u = rng.random(1000)
    d = km.sample_beyond(5.0, u)
    assert (d >= 5.0).all()
    assert np.median(d) > 5.0
    # past all data: log-uniform up to TAIL_FACTOR times the largest observation
    far = km.sample_beyond(km.t_max * 1.01, u)
    assert (far >= km.t_max).all() and (far <= km.t_max * 1.01 * survival.TAIL_FACTOR + 1e-9).all()


def test_empty():
    km = KaplanMeier.fit([])
    assert km.quantile(0.5) is None
