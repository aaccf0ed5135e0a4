"""The pin cost model: what a prefix-cache hit saves, what holding KV blocks costs, and the TTL that pays.

Choose τ to maximise ``J(τ) = F(τ)·B − c·E[min(T, τ)]`` with ``E[min(T, τ)] = ∫₀^τ (1 − F(s)) ds``, where
``B`` is the time a hit saves (re-prefill of the context plus the re-queue delay after an eviction) and
``c = λ(pressure)·M`` the price per second of holding ``M`` KV blocks. ``F`` is the predicted CDF given by
quantiles, interpolated linearly between them (``F(0) = 0``). Between two quantile knots F is linear, so
``dJ/dτ = f·B − c·(1 − F(τ))`` rises within the segment: J is convex there and its maximum over τ is at a
knot. :func:`choose_ttl` therefore only has to compare ``τ = 0`` (no pin) with the quantiles themselves.

Pure Python (no numpy): the engine's scheduler process imports this module.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

#: Shortest pin worth tabulating; quantiles below it are raised to it (a zero-length pin never hits).
MIN_TTL_S = 0.001
#: The public Continuum rule: pin for this long when the tool's mean duration is at most this long (the
#: engine's ``continuum`` policy, the running-mean baseline, the long-tail preset's "long pause").
CONTINUUM_PIN_S = 2.0

#: Default prefill-time profile (context tokens -> seconds): an 8B model on one datacenter GPU, roughly
#: linear with a quadratic attention term. Replace it with a measurement (``ctk profile``) of your engine.
DEFAULT_PREFILL_TOKENS = (0, 512, 2048, 8192, 32768, 131072)
DEFAULT_PREFILL_S = (0.0, 0.04, 0.15, 0.65, 3.0, 16.0)
#: KV usage fractions at which the price of a block-second is given, ascending.
DEFAULT_PRESSURE_LEVELS = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 1.0)
#: Price of holding one KV block for one second, in seconds of saved work, per pressure level. Free memory
#: is nearly free to hold; near exhaustion a held block displaces running work.
DEFAULT_BLOCK_SECOND_PRICE = (2e-7, 2e-6, 1e-5, 4e-5, 2e-4, 6e-4, 2e-3)


def _interp(x: float, xs: Sequence[float], ys: Sequence[float]) -> float:
    """Piecewise-linear interpolation, extrapolating linearly beyond the last point (prefill grows on)."""
    if len(xs) == 1:
        return float(ys[0])
    i = bisect.bisect_right(xs, x)
    if i <= 0:
        return float(ys[0])
    if i >= len(xs):
        i = len(xs) - 1
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    if x1 == x0:
        return float(y1)
    return float(y0 + (y1 - y0) * (x - x0) / (x1 - x0))


@dataclass
class CostModel:
    """Benefit of a hit and price of holding blocks; all times in seconds.

    ``requeue_delay_s`` is the queueing delay an evicted program suffers when its next turn arrives (it
    re-enters the waiting queue behind newer work); ``block_second_price[i]`` is λ at
    ``pressure_levels[i]`` (interpolated between levels).
    """

    prefill_tokens: tuple[int, ...] = DEFAULT_PREFILL_TOKENS
    prefill_s: tuple[float, ...] = DEFAULT_PREFILL_S
    block_size_tokens: int = 16
    requeue_delay_s: float = 0.25
    pressure_levels: tuple[float, ...] = DEFAULT_PRESSURE_LEVELS
    block_second_price: tuple[float, ...] = DEFAULT_BLOCK_SECOND_PRICE
    profile_source: str = "default"

    def __post_init__(self) -> None:
        self.prefill_tokens = tuple(int(t) for t in self.prefill_tokens)
        self.prefill_s = tuple(float(s) for s in self.prefill_s)
        self.pressure_levels = tuple(float(p) for p in self.pressure_levels)
        self.block_second_price = tuple(float(p) for p in self.block_second_price)
        self.validate()
        # per-segment slopes of the prefill profile (the benefit is computed at every pin decision)
        xs, ys = self.prefill_tokens, self.prefill_s
        self._slopes = [(ys[i] - ys[i - 1]) / (xs[i] - xs[i - 1]) for i in range(1, len(xs))] or [0.0]

    def validate(self) -> None:
        if not self.prefill_tokens or len(self.prefill_tokens) != len(self.prefill_s):
            raise ValueError("prefill profile: tokens and seconds must be non-empty and of equal length")
        if list(self.prefill_tokens) != sorted(set(self.prefill_tokens)):
            raise ValueError("prefill profile: token counts must be strictly ascending")
        if any(s < 0 or not math.isfinite(s) for s in self.prefill_s):
            raise ValueError("prefill profile: seconds must be finite and >= 0")
        if self.block_size_tokens <= 0:
            raise ValueError("block_size_tokens must be > 0")
        if self.requeue_delay_s < 0 or not math.isfinite(self.requeue_delay_s):
            raise ValueError("requeue_delay_s must be finite and >= 0")
        if not self.pressure_levels or len(self.pressure_levels) != len(self.block_second_price):
            raise ValueError("pressure levels and block-second prices must be non-empty and of equal length")
        if list(self.pressure_levels) != sorted(set(self.pressure_levels)):
            raise ValueError("pressure levels must be strictly ascending")
        if any(p < 0 or not math.isfinite(p) for p in self.block_second_price):
            raise ValueError("block-second prices must be finite and >= 0")

    def prefill_time_s(self, context_tokens: int | None) -> float:
        """Prefill seconds of a context, piecewise linear in the profile, extrapolated past its last point."""
        xs = self.prefill_tokens
        x = context_tokens or 0
        if x <= xs[0] or len(xs) == 1:
            return max(0.0, self.prefill_s[0])
        i = min(bisect.bisect_right(xs, x), len(xs) - 1)
        return max(0.0, self.prefill_s[i - 1] + self._slopes[i - 1] * (x - xs[i - 1]))

    def blocks(self, context_tokens: int | None) -> int:
        return max(1, -(-int(context_tokens or 0) // self.block_size_tokens))

    def benefit_s(self, context_tokens: int | None) -> float:
        """B: seconds a hit saves (re-prefill of the context + re-queue delay)."""
        return self.prefill_time_s(context_tokens) + self.requeue_delay_s

    def block_second_price_at(self, pressure: float) -> float:
        p = min(max(float(pressure), self.pressure_levels[0]), self.pressure_levels[-1])
        return _interp(p, self.pressure_levels, self.block_second_price)

    def live_price_at(self, pressure: float) -> float:
        """The live memory price (JCT-s per token-s, what the engine's ``ttl`` rule is given) at which the
        engine's decision costs what this profile's λ(pressure) charges: ``λ / block size``, so that
        ``price · held tokens = λ · blocks``. Offline figures grade the engine's rule at these prices."""
        return self.block_second_price_at(pressure) / self.block_size_tokens

    def holding_cost_per_s(self, context_tokens: int | None, pressure: float) -> float:
        """c = λ(pressure)·M: seconds of saved work lost per second of holding the context's blocks."""
        return self.block_second_price_at(pressure) * self.blocks(context_tokens)

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("prefill_tokens", "prefill_s", "pressure_levels", "block_second_price"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> CostModel:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def cdf_knots(
    levels: Sequence[float], quantiles_s: Sequence[float], floor_s: float = MIN_TTL_S
) -> tuple[list[float], list[float]]:
    """Knots (t, F(t)) of the piecewise-linear CDF through the quantiles, starting at (0, 0): the one rule
    turning quantiles into a distribution (pin decisions, online blending, reports). Quantiles are sorted
    by level, floored at ``floor_s`` and made non-crossing; knots stop at the first non-finite quantile."""
    if len(levels) != len(quantiles_s) or not levels:
        raise ValueError("levels and quantiles_s must be non-empty and of equal length")
    ts = [0.0]
    fs = [0.0]
    q_prev = floor_s
    for lvl, q in sorted(zip(levels, quantiles_s, strict=True)):
        q = float(q)
        if not math.isfinite(q):  # an infinite upper quantile: F never reaches this level in finite time
            break
        q = max(q, q_prev)  # non-crossing
        q_prev = q
        # equal quantiles at two levels: a point mass, i.e. a zero-length segment where F jumps
        ts.append(q)
        fs.append(max(float(lvl), fs[-1]))
    return ts, fs


class CDF:
    """A piecewise-linear return-time CDF through knots ``(t_i, F_i)`` from ``(0, 0)``, flat after the last.

    ``H(t) = E[min(T, t)] = ∫₀^t (1 − F(s)) ds`` is precomputed at the knots. Everything a pin rule asks of a
    distribution lives here: the TTL that maximises ``F(τ)·B − c·H(τ)`` (:meth:`best_ttl`), the same choice
    given that the pin has already been held ``e`` seconds without a return (:meth:`best_ttl` with
    ``after=e``: the gain ``(F(τ) − F(e))·B − c·(H(τ) − H(e))``), the return hazard, and the valve value
    ``(F(x) − F(e))·B / (N·(H(x) − H(e)))``: expected benefit per token-second still to hold (:meth:`value`).
    Between two knots F is linear, the gain is convex in τ, so its maximum is at a knot or at the horizon.
    """

    __slots__ = ("ts", "fs", "hs", "_hull", "_neg_slopes")

    def __init__(self, ts: Sequence[float], fs: Sequence[float]):
        self.ts = [float(t) for t in ts]
        self.fs = [float(f) for f in fs]
        if not self.ts or self.ts[0] != 0.0 or self.fs[0] != 0.0 or len(self.ts) != len(self.fs):
            raise ValueError("CDF knots must start at (0, 0) and have equal lengths")
        hs = [0.0]
        for i in range(1, len(self.ts)):
            hs.append(hs[-1] + (self.ts[i] - self.ts[i - 1]) * (1.0 - 0.5 * (self.fs[i] + self.fs[i - 1])))
        self.hs = hs
        self._build_hull()

    def _build_hull(self) -> None:
        """Upper concave hull of the knots in the (H, F) plane: the decision at finish, ``argmax F·B − c·H``
        over the knots, is the hull vertex where the hull's slope falls to ``c / B`` (one bisect)."""
        hs, fs = self.hs, self.fs
        hull: list[int] = [0]
        for i in range(1, len(self.ts)):
            h, f = hs[i], fs[i]
            if f <= fs[hull[-1]]:
                continue  # no more probability for more holding: never optimal
            while len(hull) >= 2:
                a, b = hull[-2], hull[-1]
                if (fs[b] - fs[a]) * (h - hs[a]) > (f - fs[a]) * (hs[b] - hs[a]):
                    break  # b lies above the chord a -> i: keep it
                hull.pop()
            hull.append(i)
        neg = []
        for a, b in zip(hull, hull[1:], strict=False):
            dh = self.hs[b] - self.hs[a]
            neg.append(-(self.fs[b] - self.fs[a]) / dh if dh > 0 else -math.inf)
        self._hull = hull
        self._neg_slopes = neg

    @classmethod
    def from_quantiles(
        cls, levels: Sequence[float], quantiles_s: Sequence[float], floor_s: float = MIN_TTL_S
    ) -> CDF:
        """The CDF through :func:`cdf_knots`."""
        return cls(*cdf_knots(levels, quantiles_s, floor_s))

    @classmethod
    def linear(cls, ttl_s: float, p_hit: float) -> CDF:
        """Returns spread evenly over ``[0, ttl_s]`` with total probability ``p_hit`` (a fixed-TTL pin)."""
        return cls([0.0, max(MIN_TTL_S, ttl_s)], [0.0, min(1.0, max(0.0, p_hit))])

    @classmethod
    def window(cls, start_s: float, end_s: float) -> CDF:
        """A return known to fall in ``[start_s, end_s]`` (uniformly): the oracle's true duration + slack."""
        start_s = max(0.0, start_s)
        end_s = max(start_s + MIN_TTL_S, end_s)
        if start_s == 0.0:
            return cls([0.0, end_s], [0.0, 1.0])
        return cls([0.0, start_s, end_s], [0.0, 0.0, 1.0])

    @property
    def horizon_s(self) -> float:
        return self.ts[-1]

    def at(self, t: float) -> tuple[float, float]:
        """``(F(t), H(t))``; right-continuous: a point mass at ``t`` is counted in ``F(t)``."""
        ts = self.ts
        if t < 0.0:
            return 0.0, 0.0
        if t >= ts[-1]:
            return self.fs[-1], self.hs[-1] + (t - ts[-1]) * (1.0 - self.fs[-1])
        i = bisect.bisect_right(ts, t)
        t0, f0 = ts[i - 1], self.fs[i - 1]
        dt = ts[i] - t0
        f = f0 + (self.fs[i] - f0) * (t - t0) / dt if dt > 0 else self.fs[i]
        return f, self.hs[i - 1] + (t - t0) * (1.0 - 0.5 * (f0 + f))

    def hazard(self, t: float) -> float:
        """Return rate at ``t`` given no return yet (1/s); 0 after the last knot."""
        ts = self.ts
        if t >= ts[-1]:
            return 0.0
        i = max(1, bisect.bisect_right(ts, t))
        dt = ts[i] - ts[i - 1]
        f, _ = self.at(t)
        if f >= 1.0:
            return math.inf
        return (self.fs[i] - self.fs[i - 1]) / dt / (1.0 - f) if dt > 0 else math.inf

    def best_ttl(
        self, benefit_s: float, cost_per_s: float, after: float = 0.0, until: float = math.inf
    ) -> tuple[float, float, float]:
        """``(ttl_s, F(ttl_s), gain)`` maximising the gain over ``after < τ ≤ until``; ``(0, 0, 0)`` when no
        τ gains (do not pin / release now). With ``after = 0`` this is the decision at finish."""
        if after <= 0.0 and until >= self.ts[-1]:
            return self._best_at_finish(benefit_s, cost_per_s)
        f_a, h_a = self.at(after) if after > 0.0 else (0.0, 0.0)
        best_g, best_t, best_f = 0.0, 0.0, 0.0
        ts, fs, hs = self.ts, self.fs, self.hs
        for i in range(1, len(ts)):
            t = ts[i]
            if t <= after:
                continue
            if t > until:
                break
            g = (fs[i] - f_a) * benefit_s - cost_per_s * (hs[i] - h_a)
            if g > best_g + 1e-12:
                best_g, best_t, best_f = g, t, fs[i]
        if until < ts[-1] and until > after:
            f_u, h_u = self.at(until)
            g = (f_u - f_a) * benefit_s - cost_per_s * (h_u - h_a)
            if g > best_g + 1e-12:
                best_g, best_t, best_f = g, until, f_u
        return best_t, best_f, best_g

    def _best_at_finish(self, benefit_s: float, cost_per_s: float) -> tuple[float, float, float]:
        if benefit_s <= 0.0:
            return 0.0, 0.0, 0.0
        k = bisect.bisect_left(self._neg_slopes, -cost_per_s / benefit_s)  # hull slopes above c / B
        i = self._hull[k]
        if i == 0:
            return 0.0, 0.0, 0.0
        return self.ts[i], self.fs[i], self.fs[i] * benefit_s - cost_per_s * self.hs[i]

    def value(self, benefit_s: float, tokens: int, elapsed_s: float, horizon_s: float) -> float:
        """Expected benefit per token-second still to hold, for a pin held ``elapsed_s`` of ``horizon_s``:
        ``(F(x) − F(e))·B / (N·(H(x) − H(e)))`` (JCT-s per token-s). 0 when nothing is left to gain."""
        if elapsed_s >= horizon_s:
            return 0.0
        f_e, h_e = self.at(elapsed_s)
        f_x, h_x = self.at(horizon_s)
        dh = h_x - h_e
        if f_x <= f_e:
            return 0.0
        if dh <= 0.0:
            return math.inf
        return (f_x - f_e) * benefit_s / (max(1, tokens) * dh)


def choose_ttl(
    levels: Sequence[float], quantiles_s: Sequence[float], benefit_s: float, holding_cost_per_s: float
) -> tuple[float, float]:
    """``(ttl_s, p_hit)`` maximising ``F(τ)·B − c·E[min(T, τ)]``; ``(0.0, 0.0)`` means do not pin.

    ``p_hit = F(ttl_s)`` is the predicted probability that the tool returns within the pin.
    """
    ttl, f, _ = CDF.from_quantiles(levels, quantiles_s).best_ttl(benefit_s, holding_cost_per_s)
    return ttl, f


def expected_holding_s(levels: Sequence[float], quantiles_s: Sequence[float], ttl_s: float) -> float:
    """E[min(T, ttl)] under the piecewise-linear CDF of the quantiles (for reports)."""
    return CDF.from_quantiles(levels, quantiles_s).at(ttl_s)[1]


def realized_cost(ttl_s: float, duration_s: float, benefit_s: float, holding_cost_per_s: float) -> float:
    """The cost-model loss of pinning for ``ttl_s`` when the tool really takes ``duration_s``.

    Loss = lost benefit (B if the pin did not cover the call) + the price of the time the blocks were held.
    The oracle (knowing T) pins exactly T when ``c·T < B`` and otherwise does not pin: loss ``min(B, c·T)``.
    """
    if ttl_s <= 0:
        return benefit_s
    hit = duration_s <= ttl_s
    return (0.0 if hit else benefit_s) + holding_cost_per_s * min(duration_s, ttl_s)


def oracle_cost(duration_s: float, benefit_s: float, holding_cost_per_s: float) -> float:
    return min(benefit_s, holding_cost_per_s * duration_s)


#: Live memory prices (JCT-seconds per token-second, :mod:`ctk.policy.price`) at which ``ctk inspect`` shows
#: the engine's decision: free memory, and a cache of ~800k tokens with 1, 8 and 80 requests blocked.
REPRESENTATIVE_PRICES = (0.0, 1.25e-6, 1e-5, 1e-4)


def live_ttl(cdf: CDF, benefit_s: float, price: float, held_tokens: int) -> tuple[float, float]:
    """The engine's pin decision when a turn ends in a tool call: the TTL maximising
    ``F(τ)·B − price·N·H(τ)`` over the key's return-time distribution, and ``F(TTL)``; ``(0, 0)``: do not pin.
    The ``ttl`` rule decides with it, and every offline figure of a key's TTL (``ctk inspect``) calls it."""
    ttl, f, _ = cdf.best_ttl(benefit_s, price * held_tokens)
    return (ttl, f) if ttl > 0.0 else (0.0, 0.0)

