"""Tool-duration predictors with a scikit-learn-style interface.

The predictors follow scikit-learn's estimator conventions (:class:`sklearn.base.BaseEstimator`): every
parameter is an ``__init__`` argument stored as is, learned state ends with ``_``, ``fit`` never
changes a parameter. Each predictor takes the frame of :func:`ctk.predict.dataset.prepare_frame`,
``fit(frame)`` and then ``predict_quantiles(frame)`` -> array ``(n_rows, n_levels)`` of seconds,
non-decreasing along each row. It also gives per-key prior quantiles (``key_quantiles``) from which the
TTL tables are built, and serializes to plain data (``to_dict`` / :func:`predictor_from_dict`).

- ``running-mean``: the public Continuum behaviour, the baseline to beat.
- ``histogram``: per-key Kaplan–Meier distribution with back-off along the command-key chain; a call's own
  source decides, other sources enter only shrunk and weighted by how alike their durations are.
- ``lightgbm``: LightGBM quantile regression on the call's features, non-crossing by rearrangement,
  conformally calibrated on a held-out program fold.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator

from ctk.datasets.shell import PROGRAM_KEY, QUICK_KEY
from ctk.predict.caps import (
    HarnessCap,
    caps_from_dict,
    caps_to_dict,
    clip_to_bounds,
    key_bounds,
    learn_caps,
    row_bounds,
)
from ctk.predict.cost import CONTINUUM_PIN_S, MIN_TTL_S, CostModel
from ctk.predict.dataset import program_fold
from ctk.predict.features import FeatureSpec
from ctk.predict.survival import KaplanMeier
from ctk.predict.tables import TTLTables

DEFAULT_LEVELS = (0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
PREDICTOR_NAMES = ("running-mean", "histogram", "lightgbm")
#: Rows per key whose predicted distributions are mixed into the key's table quantiles.
TABLE_ROWS_PER_KEY = 1000


class Predictor(Protocol):
    name: str
    levels: tuple[float, ...]

    def fit(self, frame: pd.DataFrame) -> Predictor: ...

    def predict_quantiles(self, frame: pd.DataFrame) -> np.ndarray: ...

    def choose_ttls(
        self, frame: pd.DataFrame, quantiles: np.ndarray, benefit_s: np.ndarray, cost_per_s: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]: ...

    def key_quantiles(self, frame: pd.DataFrame) -> dict[str, tuple[list[float], int]]: ...

    def to_dict(self) -> dict: ...


def cost_model_ttls(
    levels: Sequence[float], quantiles: np.ndarray, benefit_s: np.ndarray, cost_per_s: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the cost model's TTL from the row's quantiles, vectorized over rows.

    Same result as :func:`ctk.predict.cost.choose_ttl` row by row: the objective is evaluated at the knots of
    the piecewise-linear CDF (quantiles floored at ``MIN_TTL_S`` and made non-decreasing), ``(0, 0)`` when no
    knot has a positive objective.
    """
    n = len(quantiles)
    if n == 0:
        return np.zeros(0), np.zeros(0)
    order = np.argsort(np.asarray(levels))
    lv = np.asarray(levels, dtype=float)[order]
    q = np.asarray(quantiles, dtype=float)[:, order]
    q = np.where(np.isfinite(q), q, 1e12)
    q = np.maximum.accumulate(np.maximum(q, MIN_TTL_S), axis=1)
    t = np.concatenate([np.zeros((n, 1)), q], axis=1)
    f = np.concatenate([[0.0], np.maximum.accumulate(lv)])
    held = np.cumsum(np.diff(t, axis=1) * (1.0 - 0.5 * (f[1:] + f[:-1]))[None, :], axis=1)
    j = (
        f[None, 1:] * np.asarray(benefit_s, dtype=float)[:, None]
        - np.asarray(cost_per_s, dtype=float)[:, None] * held
    )
    best = np.argmax(j, axis=1)
    jbest = j[np.arange(n), best]
    pin = jbest > 1e-12
    return np.where(pin, q[np.arange(n), best], 0.0), np.where(pin, f[1:][best], 0.0)


def _backoff_lookup(chains: pd.Series, table: dict[str, Any]) -> list[Any]:
    out = []
    for chain in chains:
        for k in chain:
            if k in table:
                out.append(table[k])
                break
        else:
            out.append(table["*"])
    return out


SOURCE_SEP = "|"


def source_chain(source: str | None, chain: Sequence[str]) -> list[str]:
    """Back-off chain with a source-specific key before each pooled key: ``src|k0, k0, src|k1, k1, ...``."""
    out = []
    for k in chain:
        if source:
            out.append(f"{source}{SOURCE_SEP}{k}")
        out.append(k)
    return out


def _chain_counts(frame: pd.DataFrame, source_keys: bool = False) -> dict[str, np.ndarray]:
    """Row positions per key, over every level of every row's chain (``source|key`` keys if asked)."""
    if len(frame) == 0:
        return {}
    chains = frame["keys"].reset_index(drop=True)
    exploded = chains.explode()
    keys = exploded.astype(str)
    if source_keys:
        src = frame["source"].astype(str).reset_index(drop=True)
        keys = src.loc[exploded.index].to_numpy(dtype=object) + SOURCE_SEP + keys.to_numpy(dtype=object)
        keys = pd.Series(keys, index=exploded.index)
    pos = exploded.index.to_numpy()
    codes, uniq = pd.factorize(keys.to_numpy(dtype=object))
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(uniq) + 1))
    return {str(k): pos[order[bounds[i] : bounds[i + 1]]] for i, k in enumerate(uniq)}


def build_tables(
    predictor: Predictor,
    frame: pd.DataFrame,
    cost: CostModel,
) -> TTLTables:
    """TTL tables from the predictor's per-key quantiles and the cost model; a key whose calls all come from
    capped sources never states a pause past the largest of their bounds (:mod:`ctk.predict.caps`)."""
    kq = predictor.key_quantiles(frame)
    bounds = key_bounds(frame, learn_caps(frame), _chain_counts(frame))
    bounds["*"] = bounds.get("*", float("inf"))
    return TTLTables.build(
        {k: [min(x, bounds.get(k, float("inf"))) for x in q] for k, (q, _) in kq.items()},
        {k: n for k, (_, n) in kq.items()},
        predictor.levels,
        cost,
    )


# -- running mean (the public Continuum) ------------------------------------------------------------------


class RunningMeanPredictor(BaseEstimator):
    """Per-tool mean of the recorded durations (censored rows taken at face value, as the public code does).

    Every quantile is the mean (a point prediction); the pin is :data:`CONTINUUM_PIN_S` when the tool's mean
    is at most that, else no pin, whatever the context length or memory pressure.
    """

    name = "running-mean"

    def __init__(self, levels: Sequence[float] = DEFAULT_LEVELS):
        self.levels = tuple(levels)

    def fit(self, frame: pd.DataFrame) -> RunningMeanPredictor:
        g = frame["duration_s"].groupby(frame["tool"])
        self.means_ = {str(k): float(v) for k, v in g.mean().items()}
        self.counts_ = {str(k): int(v) for k, v in g.size().items()}
        hit = frame["duration_s"] <= CONTINUUM_PIN_S
        self.hit_2s_ = {str(k): float(v) for k, v in hit.groupby(frame["tool"]).mean().items()}
        self.means_["*"] = float(frame["duration_s"].mean())
        self.hit_2s_["*"] = float(hit.mean())
        # the engine looks keys up by command chain; tabulate the chain keys' means too
        for k, idx in _chain_counts(frame).items():
            if k not in self.means_:
                self.means_[k] = float(frame["duration_s"].iloc[idx].mean())
                self.hit_2s_[k] = float(hit.iloc[idx].mean())
            self.counts_.setdefault(k, len(idx))
        return self

    def _mean(self, frame: pd.DataFrame) -> np.ndarray:
        g = self.means_["*"]
        return frame["tool"].map(lambda t: self.means_.get(t, g)).to_numpy(dtype=float)

    def predict_quantiles(self, frame: pd.DataFrame) -> np.ndarray:
        m = self._mean(frame)
        return np.repeat(m[:, None], len(self.levels), axis=1)

    def choose_ttls(self, frame, quantiles, benefit_s, cost_per_s):
        m = self._mean(frame)
        ttl = np.where(m <= CONTINUUM_PIN_S, CONTINUUM_PIN_S, 0.0)
        g = self.hit_2s_["*"]
        hit = frame["tool"].map(lambda t: self.hit_2s_.get(t, g)).to_numpy(dtype=float)
        return ttl, np.where(ttl > 0, hit, 0.0)

    def key_quantiles(self, frame):
        return {k: ([m] * len(self.levels), self.counts_.get(k, 0)) for k, m in self.means_.items()}

    def mean_tables(self, cost: CostModel) -> TTLTables:
        """Tables of each key's mean as its every quantile (a point mass), unbounded by harness caps: the
        engine's ``ttl`` rule prices that point mass live, as it prices any trained key. The public rule
        itself (2 s or nothing) is the engine's ``continuum`` policy, or a hand-set file
        (``TTLTables.fixed({"*": CONTINUUM_PIN_S})``)."""
        return TTLTables.build(
            {k: [m] * len(self.levels) for k, m in self.means_.items()},
            {k: self.counts_.get(k, 0) for k in self.means_},
            self.levels,
            cost,
        )

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "levels": list(self.levels),
            "means": self.means_,
            "counts": self.counts_,
            "hit_2s": self.hit_2s_,
        }

    @classmethod
    def from_dict(cls, d: dict) -> RunningMeanPredictor:
        p = cls(d["levels"])
        p.means_, p.counts_, p.hit_2s_ = dict(d["means"]), dict(d["counts"]), dict(d["hit_2s"])
        return p


# -- histogram with back-off -------------------------------------------------------------------------------


#: Levels at which each (source, key) distribution is kept, to mix distributions of several sources.
MIX_GRID = tuple(round(x, 3) for x in np.arange(0.025, 1.0, 0.05))


def _grid(levels: Sequence[float]) -> tuple[float, ...]:
    return tuple(sorted(set(MIX_GRID) | {float(v) for v in levels}))


def weighted_mixture_quantiles(
    components: Sequence[tuple[Sequence[float], float]], grid: Sequence[float], levels: Sequence[float]
) -> list[float]:
    """Quantiles at ``levels`` of a weighted mixture of distributions, each given by quantiles at ``grid``.

    Each component's value at ``grid[j]`` carries ``weight * (grid[j] - grid[j-1])`` (the top one the rest of
    its weight): a level of the grid is reproduced exactly when one component has all the weight.
    """
    g = np.asarray(grid, dtype=float)
    mass = np.diff(np.concatenate([[0.0], g]))
    mass[-1] += 1.0 - g[-1]
    vals = np.concatenate([np.asarray(q, dtype=float) for q, _ in components])
    w = np.concatenate([mass * float(wt) for _, wt in components])
    order = np.argsort(vals, kind="stable")
    cw = np.cumsum(w[order]) / w.sum()
    idx = np.minimum(np.searchsorted(cw, np.asarray(levels) - 1e-9, side="left"), len(vals) - 1)
    return [float(x) for x in vals[order][idx]]


def _rare_kinds(frame: pd.DataFrame, counts: dict[str, np.ndarray], rare_calls: int) -> dict[str, np.ndarray]:
    """Restrict the kind keys (``(quick)``, ``(program)``, per source too) to calls of programs with fewer
    than ``rare_calls`` calls: what a program never seen before looks like is learned from the rarely seen
    ones, not from the pip installs and test runs that dominate the pool (empirical Bayes for new keys)."""
    if rare_calls <= 0:
        return counts
    out = dict(counts)
    chains = frame["keys"].to_numpy()
    for kind in (QUICK_KEY, PROGRAM_KEY):
        for k in [k for k in counts if k == kind or k.endswith(SOURCE_SEP + kind)]:
            prefix = k[: -len(kind)]  # "" or "source|"

            def rare(i: int, prefix: str = prefix, kind: str = kind) -> bool:
                program = chains[i][list(chains[i]).index(kind) - 1]
                return len(counts.get(prefix + program, ())) < rare_calls

            keep = [i for i in counts[k] if rare(i)]
            if len(keep) >= 10:
                out[k] = np.asarray(keep, dtype=int)
    return out


class HistogramPredictor(BaseEstimator):
    """Per-key empirical (Kaplan–Meier) distribution, backing off along the command-key chain
    (sub-command -> main program -> tool -> global) when a key has too few calls.

    Sources stay apart: for a call of a known source, a key's distribution is the source's own, mixed with
    other sources' distributions of the same key each weighted ``similarity * min(n, prior_samples)`` and
    shrunk by ``prior_samples / (prior_samples + n_own)``; the key is used when that effective count reaches
    ``min_samples``, else the chain backs off. Similarity of two sources is ``exp(-d)``, ``d`` the mean
    absolute difference of their median log-durations over the keys both have. So a terminal command never
    takes its tail from another source's 70-minute training runs. A call of an unknown source (and the TTL
    tables, since the engine knows no source) uses the keys pooled over all sources. The kind levels of the
    chain (``(quick)``, ``(program)``) hold only calls of programs with fewer than ``rare_calls`` calls: what
    a program never seen looks like.

    Censoring: a timed-out call enters the Kaplan–Meier estimate as "at least t" (it is at risk up to t and
    never counted as finishing); quantiles the estimate never reaches are stated as ``TAIL_FACTOR`` times
    the largest time seen.
    """

    name = "histogram"

    def __init__(
        self,
        levels: Sequence[float] = DEFAULT_LEVELS,
        min_samples: int = 10,
        by_source: bool = True,
        prior_samples: int = 10,
        rare_calls: int = 20,
    ):
        self.levels = tuple(levels)
        self.min_samples = min_samples
        self.by_source = by_source
        self.prior_samples = prior_samples
        self.rare_calls = rare_calls

    def fit(self, frame: pd.DataFrame) -> HistogramPredictor:
        y = frame["y"].to_numpy()
        cens = frame["censored"].to_numpy(dtype=bool)
        grid = _grid(self.levels)
        self.table_, self.counts_, self.km_ = {}, {}, {}
        self.source_grid_: dict[str, list[float]] = {}
        counts = _rare_kinds(frame, _chain_counts(frame), self.rare_calls)
        if self.by_source:
            by_src = _rare_kinds(frame, _chain_counts(frame, source_keys=True), self.rare_calls)
            for k, idx in by_src.items():
                km = KaplanMeier.fit(y[idx], cens[idx])
                self.km_[k] = km
                self.source_grid_[k] = km.quantiles(grid)
                self.counts_[k] = len(idx)
        for k, idx in counts.items():
            if len(idx) < self.min_samples and k != "*":
                continue
            km = KaplanMeier.fit(y[idx], cens[idx])
            self.km_[k] = km
            self.table_[k] = km.quantiles(self.levels)
            self.counts_[k] = len(idx)
        self.sources_ = sorted(frame["source"].astype(str).unique()) if self.by_source else []
        self.similarity_ = self._similarity(grid)
        self.caps_: dict[str, HarnessCap] = learn_caps(frame)
        self._cache: dict = {}
        return self

    def _similarity(self, grid: Sequence[float]) -> dict[str, dict[str, float]]:
        """``exp(-mean |median log-duration difference|)`` over the keys two sources both have."""
        mid = list(grid).index(0.525) if 0.525 in grid else len(grid) // 2
        by_src: dict[str, dict[str, tuple[float, int]]] = {}
        for sk, q in self.source_grid_.items():
            src, key = sk.split(SOURCE_SEP, 1)
            n = self.counts_[sk]
            if n >= self.min_samples:
                by_src.setdefault(src, {})[key] = (float(np.log(max(q[mid], 1e-3))), n)
        sim: dict[str, dict[str, float]] = {}
        for a in self.sources_:
            sim[a] = {}
            for b in self.sources_:
                if a == b:
                    continue
                ka, kb = by_src.get(a, {}), by_src.get(b, {})
                shared = [k for k in ka if k in kb and k != "*"] or [k for k in ka if k in kb]
                if not shared:
                    sim[a][b] = 0.0
                    continue
                w = np.array([min(ka[k][1], kb[k][1]) for k in shared], dtype=float)
                d = np.array([abs(ka[k][0] - kb[k][0]) for k in shared])
                sim[a][b] = float(np.exp(-(w * d).sum() / w.sum()))
        return sim

    def _source_quantiles(self, source: str, chain: tuple[str, ...]) -> list[float]:
        """The quantiles at ``levels`` of :meth:`_source_grid` (the call's own source's chain)."""
        hit = self._cache.get((source, chain))
        if hit is None:
            grid = _grid(self.levels)
            g = self._source_grid(source, chain)
            hit = self._cache[(source, chain)] = [g[grid.index(lv)] for lv in self.levels]
        return hit

    def _source_grid(self, source: str, chain: tuple[str, ...]) -> list[float]:
        """Quantiles at the mixing grid of a key of ``source``: its own calls (weight ``n_own``), other
        sources' calls of the key (similarity-weighted, at most ``prior_samples`` each, shrunk by
        ``prior_samples / (prior_samples + n_own)``) and, as the prior, the same source's next key of the
        chain (weight ``prior_samples``). A key with few calls of its own thus leans on its own source's
        coarser key: another source's tail never decides alone."""
        hit = self._cache.get(("grid", source, chain))
        if hit is not None:
            return hit
        grid = _grid(self.levels)
        k = chain[0]
        parent = self._source_grid(source, chain[1:]) if len(chain) > 1 else None
        own_key = f"{source}{SOURCE_SEP}{k}"
        n_own = self.counts_.get(own_key, 0)
        comps = [(self.source_grid_[own_key], float(n_own))] if n_own else []
        shrink = self.prior_samples / (self.prior_samples + n_own)
        for other, sim in self.similarity_.get(source, {}).items():
            n = self.counts_.get(f"{other}{SOURCE_SEP}{k}", 0)
            w = sim * min(n, self.prior_samples) * shrink
            if w > 1e-6:
                comps.append((self.source_grid_[f"{other}{SOURCE_SEP}{k}"], w))
        if parent is not None:
            if not comps:
                out = parent
            else:
                out = weighted_mixture_quantiles([*comps, (parent, float(self.prior_samples))], grid, grid)
        elif comps:
            out = weighted_mixture_quantiles(comps, grid, grid)
        else:
            t = self.table_["*"]
            out = [float(np.interp(g, self.levels, t)) for g in grid]
        self._cache[("grid", source, chain)] = out
        return out

    def predict_quantiles(self, frame: pd.DataFrame) -> np.ndarray:
        known = set(self.sources_)
        rows = []
        pooled = _backoff_lookup(frame["keys"], self.table_)
        for src, chain, pool in zip(frame["source"].astype(str), frame["keys"], pooled, strict=True):
            rows.append(self._source_quantiles(src, tuple(chain)) if src in known else pool)
        q = np.asarray(rows, dtype=float).reshape(len(frame), -1)
        return clip_to_bounds(q, row_bounds(frame, self.caps_))

    def kaplan_meier(self, chain: Sequence[str], source: str | None = None) -> KaplanMeier:
        for k in source_chain(source, chain) if (self.by_source and source) else chain:
            if k in self.km_ and (SOURCE_SEP not in k or self.counts_[k] >= self.min_samples):
                return self.km_[k]
        return self.km_["*"]

    def choose_ttls(self, frame, quantiles, benefit_s, cost_per_s):
        return cost_model_ttls(self.levels, quantiles, benefit_s, cost_per_s)

    def key_quantiles(self, frame):
        """Pooled keys only: the engine keys by command text and does not know the source."""
        return {k: (q, self.counts_[k]) for k, q in self.table_.items()}

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "levels": list(self.levels),
            "min_samples": self.min_samples,
            "by_source": self.by_source,
            "prior_samples": self.prior_samples,
            "rare_calls": self.rare_calls,
            "table": self.table_,
            "counts": self.counts_,
            "source_grid": self.source_grid_,
            "sources": self.sources_,
            "similarity": self.similarity_,
            "caps": caps_to_dict(self.caps_),
        }

    @classmethod
    def from_dict(cls, d: dict) -> HistogramPredictor:
        p = cls(
            d["levels"],
            int(d["min_samples"]),
            bool(d.get("by_source", True)),
            int(d.get("prior_samples", 10)),
            int(d.get("rare_calls", 20)),
        )
        p.table_ = {k: list(v) for k, v in d["table"].items()}
        p.counts_ = dict(d["counts"])
        p.source_grid_ = {k: list(v) for k, v in d.get("source_grid", {}).items()}
        p.sources_ = list(d.get("sources", []))
        p.similarity_ = {a: dict(v) for a, v in d.get("similarity", {}).items()}
        p.caps_ = caps_from_dict(d.get("caps"))
        p.km_, p._cache = {}, {}
        return p


# -- LightGBM quantile regression ---------------------------------------------------------------------------


def _mixture_quantiles(q: np.ndarray, levels: Sequence[float]) -> list[float]:
    """Quantiles of the mixture of per-row distributions given by their quantiles (rows of ``q``).

    Each row's distribution is discretized on its own quantiles: the value ``q[i, j]`` carries the mass
    ``levels[j] - levels[j-1]`` (and the top value the rest): a slight over-statement, on the safe side.
    """
    lv = np.asarray(levels)
    mass = np.diff(np.concatenate([[0.0], lv]))
    mass[-1] += 1.0 - lv[-1]
    vals = q.ravel()
    w = np.tile(mass, q.shape[0])
    order = np.argsort(vals, kind="stable")
    cw = np.cumsum(w[order]) / w.sum()
    idx = np.minimum(np.searchsorted(cw, lv - 1e-12, side="left"), len(vals) - 1)
    return [float(x) for x in vals[order][idx]]


class LightGBMPredictor(BaseEstimator):
    """LightGBM quantile regression of log-duration at each level, on the call's features.

    - Non-crossing: the per-level predictions of a row are sorted (monotone rearrangement, which never
      increases pinball loss), before and after calibration.
    - Calibration: a held-out fold of programs (``cal_fraction``) is not used for boosting; on it, one-sided
      conformalized quantile regression shifts each level by the ``level``-quantile of the residuals
      ``log y - q_level(x)`` (with the finite-sample correction), so the stated levels hold on new programs.
    - Censoring: a timed-out call is not an exact target. For boosting, each censored row is replaced by
      ``n_impute`` rows (weight 1/``n_impute`` each) drawn from T | T > t of its key's Kaplan–Meier
      distribution (multiple imputation from the censored tail); in calibration, the residual of a censored
      row is itself censored, and the shift is a Kaplan–Meier quantile of the residuals.
    """

    name = "lightgbm"

    def __init__(
        self,
        levels: Sequence[float] = DEFAULT_LEVELS,
        *,
        n_estimators: int = 120,
        learning_rate: float = 0.08,
        num_leaves: int = 15,
        min_data_in_leaf: int = 10,
        max_bin: int = 63,
        cal_fraction: float = 0.25,
        n_impute: int = 4,
        max_train_rows: int = 30_000,
        max_cal_rows: int = 30_000,
        min_table_samples: int = 10,
        num_threads: int = -1,
        seed: int = 0,
        spec: FeatureSpec | None = None,
    ):
        self.levels = tuple(levels)
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.num_leaves = num_leaves
        self.min_data_in_leaf = min_data_in_leaf
        self.max_bin = max_bin
        self.cal_fraction = cal_fraction
        self.n_impute = n_impute
        self.max_train_rows = max_train_rows
        self.max_cal_rows = max_cal_rows
        self.min_table_samples = min_table_samples
        self.num_threads = num_threads
        self.seed = seed
        self.spec = spec
        self.progress = None  # optional callable(step: str, done: int, total: int); not a parameter

    @property
    def spec_(self) -> FeatureSpec:
        return self.spec or FeatureSpec()

    def _threads(self, n_rows: int) -> int:
        """``num_threads`` < 0 means auto: OpenMP threads only pay on large data (and hurt on a busy box)."""
        if self.num_threads > 0:
            return self.num_threads
        import os

        return 1 if n_rows < 100_000 else (os.cpu_count() or 1)

    # features
    def _matrix(self, frame: pd.DataFrame) -> np.ndarray:
        cols = []
        for c in self.spec_.categorical:
            codes = {v: i for i, v in enumerate(self.vocab_.get(c, []))}
            cols.append(frame[c].map(codes).to_numpy(dtype=float))
        for c in self.spec_.numeric:
            cols.append(pd.to_numeric(frame[c], errors="coerce").to_numpy(dtype=float))
        return np.column_stack(cols) if cols else np.empty((len(frame), 0))

    def _fit_vocab(self, frame: pd.DataFrame, min_count: int = 3, max_size: int = 500) -> None:
        self.vocab_ = {}
        for c in self.spec_.categorical:
            vc = frame[c].value_counts()
            self.vocab_[c] = [str(v) for v in vc[vc >= min_count].index[:max_size]]

    def _raw(self, x: np.ndarray) -> np.ndarray:
        nt = self.num_threads if self.num_threads > 0 else (1 if len(x) < 100_000 else 0)
        pred = np.column_stack([m.predict(x, num_threads=nt) for m in self.models_])
        return np.sort(pred, axis=1)

    def fit(self, frame: pd.DataFrame) -> LightGBMPredictor:
        import lightgbm as lgb

        p = self.get_params()
        rng = np.random.default_rng(p["seed"])
        cal_mask = program_fold(frame["program_id"], p["cal_fraction"], seed=p["seed"] + 1)
        if cal_mask.all() or not cal_mask.any() or frame.loc[cal_mask, "program_id"].nunique() < 5:
            cal_mask = np.zeros(len(frame), dtype=bool)  # too few programs to hold out: no calibration
        fit_df = frame[~cal_mask]
        if len(fit_df) > p["max_train_rows"]:
            fit_df = fit_df.sample(p["max_train_rows"], random_state=p["seed"])
        self._fit_vocab(fit_df)
        hist = HistogramPredictor(self.levels, min_samples=20).fit(fit_df)
        # multiple imputation of censored rows from their key's Kaplan-Meier tail
        y = np.log(fit_df["y"].to_numpy())
        w = np.ones(len(fit_df))
        x = self._matrix(fit_df)
        cens = fit_df["censored"].to_numpy(dtype=bool)
        if cens.any():
            k = p["n_impute"]
            ci = np.flatnonzero(cens)
            draws = []
            for i in ci:
                km = hist.kaplan_meier(fit_df["keys"].iat[i], fit_df["source"].iat[i])
                u = (np.arange(k) + rng.random(k)) / k
                draws.append(km.sample_beyond(float(fit_df["y"].iat[i]), u))
            keep = ~cens
            x = np.vstack([x[keep], np.repeat(x[ci], k, axis=0)])
            y = np.concatenate([y[keep], np.log(np.concatenate(draws))])
            w = np.concatenate([w[keep], np.full(len(ci) * k, 1.0 / k)])
        threads = self._threads(len(x))
        cat_idx = list(range(len(self.spec_.categorical)))
        self.models_ = []
        for j, level in enumerate(self.levels):
            params = {
                "objective": "quantile",
                "alpha": level,
                "learning_rate": p["learning_rate"],
                "num_leaves": p["num_leaves"],
                "min_data_in_leaf": p["min_data_in_leaf"],
                "max_bin": p["max_bin"],
                "min_data_per_group": 5,
                "cat_smooth": 5.0,
                "verbose": -1,
                "seed": p["seed"],
                "num_threads": threads,
                "deterministic": True,
                "force_row_wise": True,
            }
            ds = lgb.Dataset(
                x,
                y,
                weight=w,
                categorical_feature=cat_idx,
                free_raw_data=True,
                params={"max_bin": p["max_bin"], "verbose": -1},
            )
            self.models_.append(lgb.train(params, ds, num_boost_round=p["n_estimators"]))
            if self.progress:
                self.progress("quantile models", j + 1, len(self.levels))
        cal_df = frame[cal_mask]
        if len(cal_df) > p["max_cal_rows"]:  # conformal shifts need thousands of rows, not millions
            cal_df = cal_df.sample(p["max_cal_rows"], random_state=p["seed"])
        self._calibrate(cal_df)
        self.caps_: dict[str, HarnessCap] = learn_caps(frame)
        return self

    def _calibrate(self, cal: pd.DataFrame) -> None:
        self.cal_rows_ = len(cal)
        self.shifts_ = [0.0] * len(self.levels)
        if len(cal) < 20:
            return
        q = self._raw(self._matrix(cal))
        logy = np.log(cal["y"].to_numpy())
        cens = cal["censored"].to_numpy(dtype=bool)
        n = len(cal)
        for j, level in enumerate(self.levels):
            resid = logy - q[:, j]
            km = KaplanMeier.fit(resid - resid.min() + 1.0, cens)  # KM on a positive shift of the residuals
            lv = min(1.0, level * (n + 1) / n)
            s = km.quantile(lv)
            s = (s if s is not None else km.t_max) + resid.min() - 1.0
            self.shifts_[j] = float(s)

    def predict_quantiles(self, frame: pd.DataFrame) -> np.ndarray:
        q = self._raw(self._matrix(frame)) + np.asarray(self.shifts_)[None, :]
        return clip_to_bounds(np.exp(np.sort(q, axis=1)), row_bounds(frame, self.caps_))

    def choose_ttls(self, frame, quantiles, benefit_s, cost_per_s):
        return cost_model_ttls(self.levels, quantiles, benefit_s, cost_per_s)

    def key_quantiles(self, frame):
        """Per key: the mixture of the model's predicted distributions over (a sample of) its rows."""
        rng = np.random.default_rng(self.seed)
        chosen = {}
        for k, idx in _chain_counts(frame).items():
            if len(idx) < self.min_table_samples and k != "*":
                continue
            n_rows = TABLE_ROWS_PER_KEY
            sel = idx if len(idx) <= n_rows else rng.choice(idx, n_rows, replace=False)
            chosen[k] = (sel, len(idx))
        rows = np.unique(np.concatenate([sel for sel, _ in chosen.values()]))
        q = np.zeros((len(frame), len(self.levels)))
        q[rows] = self.predict_quantiles(frame.iloc[rows])
        return {k: (_mixture_quantiles(q[sel], self.levels), n) for k, (sel, n) in chosen.items()}

    def feature_importance(self) -> dict[str, float]:
        if not getattr(self, "models_", None):
            return {}
        m = self.models_[self.levels.index(0.5)] if 0.5 in self.levels else self.models_[0]
        gain = m.feature_importance(importance_type="gain")
        tot = float(gain.sum()) or 1.0
        return {n: float(g) / tot for n, g in zip(self.spec_.names, gain, strict=True)}

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "levels": list(self.levels),
            "params": {k: v for k, v in self.get_params().items() if k not in ("levels", "spec")},
            "feature_spec": self.spec_.to_dict(),
            "vocab": self.vocab_,
            "models": [m.model_to_string() for m in self.models_],
            "calibration": {
                "method": "one-sided CQR on held-out programs, Kaplan-Meier residual quantiles",
                "shifts_log": list(self.shifts_),
                "rows": self.cal_rows_,
            },
            "caps": caps_to_dict(self.caps_),
        }

    @classmethod
    def from_dict(cls, d: dict) -> LightGBMPredictor:
        import inspect

        import lightgbm as lgb

        known = set(inspect.signature(cls.__init__).parameters) - {"self", "levels", "spec"}
        params = {k: v for k, v in dict(d.get("params", {})).items() if k in known}
        p = cls(d["levels"], spec=FeatureSpec.from_dict(d["feature_spec"]), **params)
        p.vocab_ = {k: list(v) for k, v in d["vocab"].items()}
        p.models_ = [lgb.Booster(model_str=s) for s in d["models"]]
        if len(p.models_) != len(p.levels):
            raise ValueError(f"{len(p.models_)} LightGBM models for {len(p.levels)} quantile levels")
        cal = d.get("calibration", {})
        p.shifts_ = [float(s) for s in cal.get("shifts_log", [0.0] * len(p.levels))]
        p.cal_rows_ = int(cal.get("rows", 0))
        p.caps_ = caps_from_dict(d.get("caps"))
        return p


def make_predictor(name: str, levels: Sequence[float] = DEFAULT_LEVELS, **kwargs) -> Predictor:
    if name == "running-mean":
        return RunningMeanPredictor(levels)  # no parameters: it is the fixed public behaviour
    if name == "histogram":
        return HistogramPredictor(levels, **kwargs)
    if name == "lightgbm":
        return LightGBMPredictor(levels, **kwargs)
    raise ValueError(f"unknown predictor {name!r}; choose one of {', '.join(PREDICTOR_NAMES)}")


def predictor_from_dict(d: dict) -> Predictor:
    name = d.get("name")
    cls = {
        "running-mean": RunningMeanPredictor,
        "histogram": HistogramPredictor,
        "lightgbm": LightGBMPredictor,
    }.get(name)
    if cls is None:
        raise ValueError(f"unknown predictor {name!r} in model file")
    return cls.from_dict(d)
