"""Kaplan–Meier estimation for right-censored durations (harness timeouts).

A censored row says "the call took at least ``t``". The product-limit (Kaplan–Meier) estimator uses it
exactly so: the row counts in the risk set of every event before ``t`` and drops out afterwards, without
claiming an event at ``t``. Quantiles of the estimate that it never reaches (all remaining mass is censored)
are reported as ``None``; callers extrapolate beyond the data with :data:`TAIL_FACTOR`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Beyond the largest observation, an unreached quantile is stated as this multiple of it ("longer than
#: anything seen"): a pin decision only needs to know the mass lies past the censoring point.
TAIL_FACTOR = 1.25


@dataclass
class KaplanMeier:
    times: np.ndarray  # sorted times at which the CDF steps (events only)
    cdf: np.ndarray  # F just after each of ``times``
    t_max: float  # largest time seen (event or censored)
    n: float  # total weight

    @classmethod
    def fit(cls, times, censored=None, weights=None) -> KaplanMeier:
        t = np.asarray(times, dtype=float)
        c = np.zeros(len(t), dtype=bool) if censored is None else np.asarray(censored, dtype=bool)
        w = np.ones(len(t)) if weights is None else np.asarray(weights, dtype=float)
        if len(t) == 0:
            return cls(np.array([]), np.array([]), 0.0, 0.0)
        order = np.lexsort((c, t))  # by time; at ties events (c=False) before censorings
        t, c, w = t[order], c[order], w[order]
        at_risk = np.cumsum(w[::-1])[::-1]
        factor = np.where(c, 1.0, 1.0 - w / np.maximum(at_risk, 1e-300))
        surv = np.cumprod(factor)
        ev = ~c
        return cls(t[ev], 1.0 - surv[ev], float(t[-1]), float(w.sum()))

    def quantile(self, level: float) -> float | None:
        """Smallest t with F(t) >= level, or None when the estimate never reaches ``level``."""
        if len(self.cdf) == 0:
            return None
        i = int(np.searchsorted(self.cdf, level - 1e-12, side="left"))
        return float(self.times[i]) if i < len(self.times) else None

    def quantiles(self, levels, tail_factor: float | None = None) -> list[float]:
        tail_factor = TAIL_FACTOR if tail_factor is None else tail_factor
        out = []
        for lvl in levels:
            q = self.quantile(lvl)
            out.append(q if q is not None else max(self.t_max, 1e-3) * tail_factor)
        return out

    def cdf_at(self, t: float) -> float:
        i = int(np.searchsorted(self.times, t, side="right"))
        return float(self.cdf[i - 1]) if i > 0 else 0.0

    def sample_beyond(self, c: float, u: np.ndarray, tail_factor: float | None = None) -> np.ndarray:
        """Draws of T given T > c (u uniform in [0, 1)): the KM tail where it has mass, else log-uniform on
        [c, tail_factor·max(c, t_max)]. Used to impute censored rows for learners that need exact targets."""
        tail_factor = TAIL_FACTOR if tail_factor is None else tail_factor
        f_c = self.cdf_at(c)
        f_top = float(self.cdf[-1]) if len(self.cdf) else 0.0
        target = f_c + u * (1.0 - f_c)
        out = np.empty(len(u))
        inside = target < f_top - 1e-12
        if inside.any():
            idx = np.searchsorted(self.cdf, target[inside], side="left")
            out[inside] = np.maximum(self.times[np.minimum(idx, len(self.times) - 1)], c)
        rest = ~inside
        if rest.any():
            lo = max(c, 1e-3)
            hi = max(lo, self.t_max) * tail_factor
            # spread the unreached mass log-uniformly over [lo, hi]
            frac = (target[rest] - f_top) / max(1.0 - f_top, 1e-12)
            out[rest] = lo * (hi / lo) ** np.clip(frac, 0.0, 1.0)
        return out
