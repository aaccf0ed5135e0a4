"""Online adaptation: observed tool durations blended with the exported TTL tables.

A tool call's real duration is measured by the engine as (finish of turn k) -> (arrival of the same
program's turn k+1). Observations are kept per table key (the most specific key of the call's back-off
chain) in a sliding window. Once a key has ``min_samples`` observations, its distribution is the mixture

    F(t) = (w·F_prior(t) + n·F_obs(t)) / (w + n),   w = min(prior samples, prior_weight)

of the table's prior quantiles (of that key, or of the first backed-off key the table knows) and the
empirical CDF; its quantiles at the table's levels go through :meth:`TTLTables.recompute`, so the key gets
(or refreshes) its own rows. Pure Python.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from ctk.predict.tables import TTLTables


@dataclass
class KeyStats:
    samples: deque
    n_total: int = 0
    last_recompute: float = float("-inf")


def _prior_cdf(levels: Sequence[float], quantiles: Sequence[float], t: float) -> float:
    """Piecewise-linear CDF through (0, 0) and the (quantile, level) knots; flat after the last knot."""
    prev_t, prev_f = 0.0, 0.0
    for lvl, q in zip(levels, quantiles, strict=True):
        if t < q:
            if q <= prev_t:
                return lvl
            return prev_f + (lvl - prev_f) * (t - prev_t) / (q - prev_t)
        prev_t, prev_f = max(prev_t, q), lvl
    return prev_f


def blend_quantiles(
    levels: Sequence[float], prior: Sequence[float] | None, prior_weight: float, observed: Sequence[float]
) -> list[float]:
    """Quantiles at ``levels`` of the prior/empirical mixture (see module docstring)."""
    obs = sorted(float(x) for x in observed)
    n = len(obs)
    w = prior_weight if prior is not None else 0.0
    if n == 0 and w == 0:
        raise ValueError("nothing to blend")
    cands = sorted(set(obs) | set(float(q) for q in (prior or ())) | {0.0})

    def cdf(t: float) -> float:
        f_obs = bisect.bisect_right(obs, t) / n if n else 0.0
        f_pri = _prior_cdf(levels, prior, t) if prior is not None else 0.0
        return (w * f_pri + n * f_obs) / (w + n)

    fs = [cdf(t) for t in cands]
    out = []
    for lvl in levels:  # the smallest candidate whose mixture CDF reaches the level
        i = bisect.bisect_left(fs, lvl - 1e-12)
        out.append(cands[min(i, len(cands) - 1)])
    for i in range(1, len(out)):  # non-crossing
        out[i] = max(out[i], out[i - 1])
    return out


class OnlineDurations:
    """Per-key windows of observed durations; refreshes ``tables`` rows as observations arrive."""

    def __init__(
        self,
        tables: TTLTables | None,
        min_samples: int = 5,
        prior_weight: int = 20,
        window: int = 256,
        min_interval_s: float = 0.5,
    ):
        self.tables = tables
        self.min_samples = min_samples
        self.prior_weight = prior_weight
        self.window = window
        self.min_interval_s = min_interval_s
        self.keys: dict[str, KeyStats] = {}
        self.recomputes = 0
        # The file's priors, kept apart so repeated blends never feed on their own output.
        self._exported: dict[str, tuple[list[float], int]] = {}
        if tables is not None:
            self._exported = {
                k: (list(v), int(tables.n_samples.get(k, 0))) for k, v in tables.quantiles_s.items()
            }

    def observe(self, keys: Sequence[str], duration_s: float, now: float) -> str | None:
        """Record one duration under ``keys[0]``; returns the key whose table rows were refreshed."""
        if not keys:
            return None
        key = keys[0]
        st = self.keys.get(key)
        if st is None:
            if len(self.keys) >= 10_000:  # bound memory against unbounded key sets
                return None
            st = self.keys[key] = KeyStats(deque(maxlen=self.window))
        st.samples.append(float(duration_s))
        st.n_total += 1
        if self.tables is None or len(st.samples) < self.min_samples:
            return None
        if now - st.last_recompute < self.min_interval_s:
            return None
        prior, n_prior = self._prior(keys)
        try:
            q = blend_quantiles(
                self.tables.quantile_levels, prior, min(n_prior, self.prior_weight), st.samples
            )
            self.tables.recompute(key, q, n_prior + st.n_total)
        except ValueError:
            return None
        st.last_recompute = now
        self.recomputes += 1
        return key

    def _prior(self, keys: Sequence[str]) -> tuple[list[float] | None, int]:
        """The exported prior of the first key the model file had quantiles for (own key first)."""
        for k in keys:
            if k in self._exported:
                q, n = self._exported[k]
                return list(q), n if n > 0 else self.prior_weight
        return None, 0
