"""Online adaptation: observed tool durations blended with the exported TTL tables, then calibrated.

A tool call's real duration is measured by the engine as (finish of turn k) -> (arrival of the same
program's turn k+1). Two mechanisms adapt the tables to the deployment, both driven by :meth:`observe`:

1. **Blend.** Observations are kept per table key (every key of the call's back-off chain, so a new
   command's fallback ``*`` also becomes the deployment's own distribution) in a sliding window. Once a key
   has ``min_samples`` observations, its base distribution is the mixture

       F(t) = (w·F_prior(t) + n·F_obs(t)) / (w + n),   w = min(prior samples, prior_weight)

   of the key's prior quantiles (the model file's for that key, else the current row of the first
   backed-off key the table knows, itself adapted) and the empirical CDF.
2. **Calibration** (adaptive conformal inference on log-duration, :class:`LogShiftCalibrator`). Each quantile
   level carries a shift in log-seconds, moved after every call by ``learning_rate * (miss - (1 - level))``
   (a miss: the duration exceeded that level's quantile in use), so the share of calls under each quantile
   converges to its level whatever the shift of the deployment (``docker exec`` overhead, a slower disk).
   Per key once it has ``min_samples`` calls, else a global shift learned from every call against the model
   file's own prediction; keys without calls are refreshed with it when it has moved by ``refresh_log_step``.

A key's quantiles are ``base * exp(shift)`` and go into the tables with :meth:`TTLTables.set_quantiles`
(cheap: the engine's TTL rule reads ``tables.quantiles_s[key]`` and prices it live at its next decision;
a hand-set fixed pin of the key still decides before them).
``ctk predict --online`` replays recorded calls through this same class. Pure Python.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from ctk.predict.cost import cdf_knots
from ctk.predict.tables import TTLTables

#: Keys tracked at most (bounds memory against unbounded key sets).
MAX_KEYS = 10_000
#: Durations are floored here before taking logs.
MIN_DURATION_S = 0.001


@dataclass
class KeyStats:
    samples: deque
    n_total: int = 0
    last_recompute: float = float("-inf")


def blend_quantiles(
    levels: Sequence[float], prior: Sequence[float] | None, prior_weight: float, observed: Sequence[float]
) -> list[float]:
    """Quantiles at ``levels`` of the prior/empirical mixture (see module docstring)."""
    obs = sorted(map(float, observed))
    n = len(obs)
    w = prior_weight if prior is not None else 0.0
    if n == 0 and w == 0:
        raise ValueError("nothing to blend")
    cands = sorted(set(obs).union(map(float, prior or ()), (0.0,)))
    # the prior: piecewise linear through (0, 0) and its (quantile, level) knots, flat after the last
    # (``CDF.from_quantiles(levels, prior, floor_s=0.0).at(t)[0]``, its F alone, computed as ``at`` does)
    ts, fs = cdf_knots(levels, prior, floor_s=0.0) if prior is not None and levels else ([], [])
    t_end, f_end = (ts[-1], fs[-1]) if ts else (0.0, 0.0)
    bisect_right = bisect.bisect_right

    def cdf(t: float) -> float:
        f_obs = bisect_right(obs, t) / n if n else 0.0
        if not ts or t < 0.0:
            f_pri = 0.0
        elif t >= t_end:
            f_pri = f_end
        else:
            i = bisect_right(ts, t)
            t0, f0 = ts[i - 1], fs[i - 1]
            dt = ts[i] - t0
            f_pri = f0 + (fs[i] - f0) * (t - t0) / dt if dt > 0 else fs[i]
        return (w * f_pri + n * f_obs) / (w + n)

    out = []
    last = len(cands) - 1
    lo = 0
    for lvl in levels:  # the smallest candidate whose mixture CDF reaches the level (CDF is monotone) ...
        hi = last  # ... at or after the previous level's: what the non-crossing rule makes of it anyway
        while lo < hi:
            mid = (lo + hi) // 2
            if cdf(cands[mid]) >= lvl - 1e-12:
                hi = mid
            else:
                lo = mid + 1
        out.append(cands[lo])
    return out


def shifted(base: Sequence[float], shifts: Sequence[float]) -> list[float]:
    """``base * exp(shift)`` per level, made non-decreasing."""
    out = [max(float(b), 0.0) * math.exp(s) for b, s in zip(base, shifts, strict=True)]
    for i in range(1, len(out)):
        out[i] = max(out[i], out[i - 1])
    return out


@dataclass
class LogShiftCalibrator:
    """Adaptive conformal inference on log-duration: one additive log-shift per quantile level.

    ``update`` moves each shift by ``learning_rate * (miss - (1 - level))``: at equilibrium misses happen at
    rate ``1 - level``, i.e. the level's coverage holds on the observed stream (Gibbs & Candès 2021, in its
    quantile-tracking form).
    """

    levels: Sequence[float]
    learning_rate: float = 0.05
    shifts: list[float] = field(default_factory=list)
    n: int = 0

    def __post_init__(self) -> None:
        if not self.shifts:
            self.shifts = [0.0] * len(self.levels)
        # per level: the shift's move on a miss and on a hit, rate * (miss - (1 - level)), computed once
        lr = self.learning_rate
        self._moves = [(lr * (1.0 - (1.0 - lvl)), lr * (0.0 - (1.0 - lvl))) for lvl in self.levels]

    def update(self, base: Sequence[float], duration_s: float) -> None:
        """One call: ``base`` are the quantiles before this calibrator's shift."""
        self.update_logs(log_row(base), math.log(max(duration_s, MIN_DURATION_S)))

    def update_logs(self, log_base: Sequence[float], log_d: float) -> None:
        """:meth:`update` on the logs of the floored base (:func:`log_row`) and of the floored duration."""
        moves, shifts = self._moves, self.shifts
        if len(log_base) != len(moves):
            raise ValueError(f"a row of {len(log_base)} quantiles for {len(moves)} levels")
        for j, lb in enumerate(log_base):
            shifts[j] += moves[j][0] if log_d > lb + shifts[j] else moves[j][1]
        self.n += 1


def log_row(base: Sequence[float]) -> list[float]:
    """The logs of a quantile row floored at :data:`MIN_DURATION_S` (what the calibrators compare with)."""
    return [math.log(max(b, MIN_DURATION_S)) for b in base]


def pinball_loss(level: float, duration_s: float, q: float) -> float:
    d = duration_s - q
    return level * d if d >= 0 else (level - 1.0) * d


@dataclass
class Scoreboard:
    """Prequential duel per quantile level: the summed pinball loss of the adapted quantile and of the
    offline one on the calls seen so far. The adapted one is used at a level once ``n >= min_calls`` and its
    loss is below the offline one's; each level decides on its own."""

    levels: Sequence[float]
    adapted: list[float] = field(default_factory=list)
    offline: list[float] = field(default_factory=list)
    n: int = 0

    def __post_init__(self) -> None:
        self.adapted = self.adapted or [0.0] * len(self.levels)
        self.offline = self.offline or [0.0] * len(self.levels)

    def update(self, adapted: Sequence[float], offline: Sequence[float], duration_s: float) -> None:
        acc_a, acc_o = self.adapted, self.offline
        for j, lvl in enumerate(self.levels):  # (pinball_loss, inline: the learner's hot loop)
            d = duration_s - adapted[j]
            acc_a[j] += lvl * d if d >= 0 else (lvl - 1.0) * d
            d = duration_s - offline[j]
            acc_o[j] += lvl * d if d >= 0 else (lvl - 1.0) * d
        self.n += 1

    def wins(self, min_calls: int) -> list[bool] | None:
        """Per level: the adapted quantile has beaten the offline one (None: too few calls to say)."""
        if self.n < min_calls:
            return None
        return [a < o for a, o in zip(self.adapted, self.offline, strict=True)]


def select(adapted: Sequence[float], offline: Sequence[float], wins: Sequence[bool]) -> list[float]:
    """Per level the winner of its duel, made non-decreasing (a rearrangement never raises pinball loss)."""
    return sorted(a if w else o for a, o, w in zip(adapted, offline, wins, strict=True))


class OnlineDurations:
    """Per-key windows of observed durations and calibrators; refreshes ``tables`` quantiles as calls finish.

    Interface used by the engine: ``OnlineDurations(tables, min_samples, prior_weight, window)`` then
    ``observe(keys, duration_s, now)`` per finished tool call; the adapted quantiles are in
    ``tables.quantiles_s[key]``.
    """

    def __init__(
        self,
        tables: TTLTables | None,
        min_samples: int = 5,
        prior_weight: int = 20,
        window: int = 256,
        min_interval_s: float = 0.5,
        calibrate: bool = True,
        learning_rate: float = 0.05,
        refresh_log_step: float = 0.1,
        duel_min_calls: int | None = 20,
    ):
        self.tables = tables
        self.min_samples = min_samples
        self.prior_weight = prior_weight
        self.window = window
        self.min_interval_s = min_interval_s
        self.calibrate = calibrate
        self.learning_rate = learning_rate
        self.refresh_log_step = refresh_log_step
        self.duel_min_calls = duel_min_calls
        self.keys: dict[str, KeyStats] = {}
        self.recomputes = 0
        levels = list(tables.quantile_levels) if tables is not None else []
        self.global_cal = LogShiftCalibrator(levels, learning_rate)
        self.key_cal: dict[str, LogShiftCalibrator] = {}
        # The file's priors, kept apart so repeated blends never feed on their own output.
        self._exported: dict[str, tuple[list[float], int]] = {}
        if tables is not None:
            self._exported = {
                k: (list(v), int(tables.n_samples.get(k, 0))) for k, v in tables.quantiles_s.items()
            }
        self._base: dict[str, list[float]] = {}  # keys whose base was re-blended from observations
        # the calibrators' inputs, logged once: the model file's rows, and each key's base row (_log_base)
        self._exported_logs = {k: log_row(q) for k, (q, _) in self._exported.items()}
        self._base_logs: dict[str, tuple[list[float], list[float]]] = {}
        self._global_applied = [0.0] * len(levels)
        self._adapted: dict[str, list[float]] = {}  # per key: the adapted row (blend x calibration)
        self.duels: dict[str, Scoreboard] = {}  # per key: adapted vs offline, level by level
        self.global_duel = Scoreboard(levels)  # every call, at the key that decides it
        self._last_refresh = float("-inf")

    # -- what a call is predicted with -----------------------------------------------------------------

    def lookup_key(self, keys: Sequence[str]) -> str | None:
        """The first key of this chain with quantiles in the tables (the one the online adaptation scores)."""
        if self.tables is None:
            return None
        q = self.tables.quantiles_s
        for k in keys:
            if k in q and self.tables.has_key(k):
                return k
        return None

    def quantiles(self, keys: Sequence[str], offline: Sequence[float] | None = None) -> list[float] | None:
        """The quantiles for a call of this chain (None: no key known). Without ``offline``: what the tables
        state now (the engine's read). With the call's own offline prediction (``ctk predict --online``):
        per level the adapted quantile where it has beaten the offline one on the key's calls, else the
        offline one."""
        k = self.lookup_key(keys)
        if offline is None:
            return list(self.tables.quantiles_s[k]) if k is not None else None
        if k is None or k not in self._adapted:
            return [float(x) for x in offline]
        return select(self._adapted[k], offline, self._wins(k))

    def _wins(self, key: str) -> list[bool]:
        """Per level, does the adapted row decide: the key's own duel once it has enough calls, else the
        duel over every call; offline until either has."""
        if self.duel_min_calls is None:  # no duel: the adapted row always (the rule before issue 24)
            return [True] * len(self.tables.quantile_levels)
        d = self.duels.get(key)
        w = d.wins(self.duel_min_calls) if d is not None else None
        if w is None:
            w = self.global_duel.wins(self.duel_min_calls)
        return w if w is not None else [False] * len(self.tables.quantile_levels)

    def _offline_row(self, key: str) -> list[float] | None:
        """The model file's row of ``key`` (read only: its own list, not a copy)."""
        exp = self._exported.get(key)
        return exp[0] if exp is not None else None

    def _write(self, key: str, adapted: list[float], n_samples: int) -> None:
        """Put ``key``'s row into the tables: per level the adapted quantile where it won its duel, else the
        model file's (a key the file does not have: the adapted row)."""
        self._adapted[key] = adapted
        off = self._offline_row(key)
        row = adapted if off is None else select(adapted, off, self._wins(key))
        self.tables.set_quantiles(key, row, n_samples)

    def _base_of(self, key: str) -> list[float] | None:
        """The row ``key``'s calibrator shifts (read only: the model file's own row, not a copy)."""
        if key in self._base:
            return self._base[key]
        return self._offline_row(key)

    def _log_base(self, key: str) -> list[float] | None:
        """:func:`log_row` of :meth:`_base_of`, kept per key while its row stays the same object."""
        row = self._base_of(key)
        if row is None:
            return None
        hit = self._base_logs.get(key)
        if hit is None or hit[0] is not row:
            hit = self._base_logs[key] = (row, log_row(row))
        return hit[1]

    def _shifts_for(self, key: str) -> list[float]:
        cal = self.key_cal.get(key)
        if cal is not None and cal.n >= self.min_samples:
            return cal.shifts
        return self.global_cal.shifts

    # -- learning ----------------------------------------------------------------------------------------

    def observe(
        self, keys: Sequence[str], duration_s: float, now: float, offline: Sequence[float] | None = None
    ) -> str | None:
        """Record one duration under every key of its chain (``python:pytest``, ``python``, ``*``: each level
        learns the deployment's own calls); returns the most specific key whose quantiles were refreshed.
        ``offline``: the call's own offline prediction (else the model file's row of each key) for the duels.
        """
        if not keys:
            return None
        if self.tables is not None:
            self._duel(keys, duration_s, offline)
        if self.tables is not None and self.calibrate:
            self._calibrate(keys, duration_s)
        refreshed = None
        for k in keys:
            st = self.keys.get(k)
            if st is None:
                if len(self.keys) >= MAX_KEYS:
                    continue
                st = self.keys[k] = KeyStats(deque(maxlen=self.window))
            st.samples.append(float(duration_s))
            st.n_total += 1
            ready = len(st.samples) >= self.min_samples and now - st.last_recompute >= self.min_interval_s
            if self.tables is not None and ready:
                done = self._reblend(k, keys[keys.index(k) :], st, now)
                refreshed = refreshed or done
        if self.tables is not None and self.calibrate:
            self._refresh_global(now)
        return refreshed

    def _duel(self, keys: Sequence[str], duration_s: float, offline: Sequence[float] | None) -> None:
        """Score, before learning from it, each chain key's adapted row against the offline prediction."""
        decisive = self.lookup_key(keys)
        for k in keys:
            adapted = self._adapted.get(k)
            if adapted is None:
                continue
            off = offline if offline is not None else self._offline_row(k)
            if off is None:
                continue
            d = self.duels.get(k)
            if d is None:
                if len(self.duels) >= MAX_KEYS:
                    continue
                d = self.duels[k] = Scoreboard(self.tables.quantile_levels)
            d.update(adapted, off, duration_s)
            if k == decisive:
                self.global_duel.update(adapted, off, duration_s)

    def _calibrate(self, keys: Sequence[str], duration_s: float) -> None:
        """Update the calibrators before this call is learned: the global one against the model file's own
        prediction for the call (how far this deployment is from the model: the shift for keys that have no
        calls yet), each chain key's against the base its row holds now."""
        log_d = math.log(max(duration_s, MIN_DURATION_S))
        exported = next((k for k in keys if k in self._exported), None)
        if exported is not None:
            self.global_cal.update_logs(self._exported_logs[exported], log_d)
        for i, k in enumerate(keys):
            own = self._log_base(k)
            if own is None:
                lk = self.lookup_key(keys[i + 1 :])
                own = self._log_base(lk) if lk is not None else None
            if own is None:
                continue
            cal = self.key_cal.get(k)
            if cal is None:
                if len(self.key_cal) >= MAX_KEYS:
                    continue
                cal = self.key_cal[k] = LogShiftCalibrator(
                    self.tables.quantile_levels, self.learning_rate, list(self.global_cal.shifts)
                )
            cal.update_logs(own, log_d)

    def _reblend(self, key: str, keys: Sequence[str], st: KeyStats, now: float) -> str | None:
        prior, n_prior = self._prior(keys)
        try:
            base = blend_quantiles(
                self.tables.quantile_levels, prior, min(n_prior, self.prior_weight), st.samples
            )
            q = shifted(base, self._shifts_for(key)) if self.calibrate else base
            self._write(key, q, n_prior + st.n_total)
        except ValueError:
            return None
        if key not in self._base and key in self.key_cal:  # its own data now: start its shift afresh
            self.key_cal[key].shifts = [0.0] * len(base)
        self._base[key] = base
        st.last_recompute = now
        self.recomputes += 1
        return key

    def _refresh_global(self, now: float) -> None:
        """Re-derive the quantiles of keys on the global shift once it has moved by ``refresh_log_step``."""
        g = self.global_cal.shifts
        if now - self._last_refresh < self.min_interval_s or (
            max((abs(a - b) for a, b in zip(g, self._global_applied, strict=True)), default=0.0)
            < (self.refresh_log_step)
        ):
            return
        for k in list(self.tables.quantiles_s):
            cal = self.key_cal.get(k)
            if cal is not None and cal.n >= self.min_samples:
                continue  # calibrated on its own calls
            base = self._base_of(k)
            if base is not None:
                self._write(k, shifted(base, g), self.tables.n_samples.get(k, 0))
                self.recomputes += 1
        self._global_applied = list(g)
        self._last_refresh = now

    def _prior(self, keys: Sequence[str]) -> tuple[list[float] | None, int]:
        """The key's own exported prior, else the current (adapted) row of its first backed-off key."""
        if keys[0] in self._exported:
            q, n = self._exported[keys[0]]
            return list(q), n if n > 0 else self.prior_weight
        lk = self.lookup_key(keys[1:])
        if lk is None:
            return None, 0
        n = int(self.tables.n_samples.get(lk, 0))
        return list(self.tables.quantiles_s[lk]), n if n > 0 else self.prior_weight
