"""Harness caps: the time after which an agent's harness kills a tool call, and what that does to the pause.

A TTL decides on the **pause** the engine sees: from the turn that issued the tool call to the program's next
request. When the harness kills a command at its cap (mini-swe-agent's environment timeout, about 30 s in the
shared terminal-bench traces), the agent gets a timeout message and goes on: the pause is exactly the cap
(plus the harness's own overhead), not "at least the cap". Only the command's own *run time* is censored
there, and that matters only when predicting for a deployment whose cap is longer.

So, per source:

- the cap is known from the collection's config (``ctk collect --timeout``: ``runs.config.timeout``), or
  learned as the point mass of the calls the harness killed (``timeout_censored`` rows): their median;
- the pause bound is the largest pause a killed call shows (the 0.99 quantile of the killed calls' pauses,
  robust to one stray clock step): cap plus the tool's overhead. No prediction for the source exceeds it.

Under the same cap a killed call is an exact pause (:func:`pause_censoring`); served under a longer cap
(``serve_cap_s``) it is a censored run time, and predictions are bounded by the longer cap instead.
Pandas only: the serve path never imports this module.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

#: Fewer killed calls than this do not make a point mass (a cap is not learned from them).
MIN_KILLED_CALLS = 5
#: Share of the killed calls that must lie within :data:`POINT_MASS_TOLERANCE` of their median.
POINT_MASS_SHARE = 0.8
POINT_MASS_TOLERANCE = 0.1
#: Quantile of the killed calls' pauses taken as the pause bound (cap + overhead).
BOUND_LEVEL = 0.99
#: Overhead past a cap known only from a config (no killed call to measure it on).
DEFAULT_OVERHEAD_S = 1.0


@dataclass(frozen=True)
class HarnessCap:
    """One source's harness cap: ``cap_s`` (the kill time), ``bound_s`` (the longest pause it allows: cap +
    overhead), the killed calls it was measured on out of ``calls``, and where it came from."""

    cap_s: float
    bound_s: float
    killed_calls: int
    calls: int
    origin: str  # "learned" (point mass of killed calls) | "config" (the collection's --timeout)

    @property
    def overhead_s(self) -> float:
        return self.bound_s - self.cap_s

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> HarnessCap:
        return cls(
            float(d["cap_s"]), float(d["bound_s"]), int(d["killed_calls"]), int(d["calls"]), str(d["origin"])
        )


def point_mass_cap(killed_s: np.ndarray, calls: int) -> HarnessCap | None:
    """The cap learned from the pauses of killed calls, if they form a point mass (else None)."""
    k = np.asarray(killed_s, dtype=float)
    k = k[np.isfinite(k) & (k > 0)]
    if len(k) < MIN_KILLED_CALLS:
        return None
    cap = float(np.median(k))
    if np.mean(np.abs(k - cap) <= POINT_MASS_TOLERANCE * cap) < POINT_MASS_SHARE:
        return None  # killed at many different times: per-command timeouts, not one harness cap
    bound = max(cap, float(np.quantile(k, BOUND_LEVEL)))
    return HarnessCap(cap, bound, len(k), int(calls), "learned")


def learn_caps(frame: pd.DataFrame) -> dict[str, HarnessCap]:
    """Per source: the config's cap (``harness_cap_s`` column) if recorded, else the point mass of its killed
    calls (``killed`` column); sources with neither have no cap."""
    out: dict[str, HarnessCap] = {}
    if frame.empty:
        return out
    killed = frame["killed"] if "killed" in frame.columns else pd.Series(False, index=frame.index)
    config = (
        pd.to_numeric(frame["harness_cap_s"], errors="coerce")
        if "harness_cap_s" in frame.columns
        else pd.Series(np.nan, index=frame.index)
    )
    for src, idx in frame.groupby(frame["source"].astype(str), sort=True).groups.items():
        k = frame.loc[idx, "duration_s"].to_numpy(dtype=float)[killed.loc[idx].to_numpy(dtype=bool)]
        learned = point_mass_cap(k, len(idx))
        cfg = config.loc[idx].dropna()
        if len(cfg):
            cap = float(cfg.max())
            over = learned.overhead_s if learned is not None else DEFAULT_OVERHEAD_S
            out[str(src)] = HarnessCap(cap, cap + over, len(k), len(idx), "config")
        elif learned is not None:
            out[str(src)] = learned
    return out


def caps_to_dict(caps: dict[str, HarnessCap]) -> dict[str, dict]:
    return {s: c.to_dict() for s, c in caps.items()}


def caps_from_dict(d: dict | None) -> dict[str, HarnessCap]:
    return {str(s): HarnessCap.from_dict(c) for s, c in (d or {}).items()}


def pause_censoring(
    frame: pd.DataFrame, caps: dict[str, HarnessCap], serve_cap_s: float | None
) -> np.ndarray:
    """Which rows are censored for the target: none when predicting the pause under each source's own cap
    (``serve_cap_s`` None); a killed call of a source whose cap is shorter than ``serve_cap_s`` otherwise
    (its run time is only known to exceed its cap)."""
    killed = frame["killed"].to_numpy(dtype=bool) if "killed" in frame.columns else np.zeros(len(frame), bool)
    if serve_cap_s is None:
        return np.zeros(len(frame), dtype=bool)
    src_cap = frame["source"].astype(str).map({s: c.cap_s for s, c in caps.items()}).to_numpy(dtype=float)
    shorter = np.where(np.isfinite(src_cap), src_cap < serve_cap_s, True)
    return killed & shorter


def row_bounds(frame: pd.DataFrame, caps: dict[str, HarnessCap]) -> np.ndarray:
    """Per row: the longest pause it can have (inf: unbounded). A row served under a stated cap (the frame's
    ``serve_cap_s`` column, see :func:`ctk.predict.dataset.prepare_frame`) is bounded by it plus the largest
    overhead measured; else by its source's bound, if the source has a cap."""
    src_bound = frame["source"].astype(str).map({s: c.bound_s for s, c in caps.items()})
    out = src_bound.fillna(np.inf).to_numpy(dtype=float)
    if "serve_cap_s" in frame.columns:
        serve = pd.to_numeric(frame["serve_cap_s"], errors="coerce").to_numpy(dtype=float)
        over = max((c.overhead_s for c in caps.values()), default=DEFAULT_OVERHEAD_S)
        out = np.where(np.isfinite(serve), serve + over, out)
    return out


def clip_to_bounds(q: np.ndarray, bound: np.ndarray) -> np.ndarray:
    """Quantiles no higher than each row's pause bound (still non-decreasing along a row)."""
    if not len(q) or not np.isfinite(bound).any():
        return q
    return np.minimum(q, np.asarray(bound, dtype=float)[:, None])


def key_bounds(frame: pd.DataFrame, caps: dict[str, HarnessCap], chain_rows: dict[str, np.ndarray]) -> dict:
    """Per table key (pooled over sources, as the engine keys): the largest bound of the rows it pools, or
    no entry when any of them is unbounded."""
    b = row_bounds(frame, caps)
    out = {}
    for k, idx in chain_rows.items():
        m = float(np.max(b[idx])) if len(idx) else math.inf
        if math.isfinite(m):
            out[k] = m
    return out
