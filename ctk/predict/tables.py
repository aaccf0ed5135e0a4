"""TTL tables: what a model file gives the engine's pin decision, per command key.

Two kinds of key:

- **Quantiles** (``quantiles_s[key]``, what ``ctk train`` writes): the key's return-time distribution. The
  engine's ``ttl`` rule prices it at the live memory price when a turn ends
  (:func:`ctk.predict.cost.live_ttl`); every offline figure calls the same rule
  (:meth:`TTLTables.live_decision`).
- **Fixed pins** (``fixed_pins[key]``, hand-set files): pin this key for ``ttl_s`` (0: never), at any context
  length, read as returns spread evenly over the pin with probability ``p_hit``. One fixed TTL for every call
  is ``{"*": FixedPin(ttl_s)}`` (``*`` ends every key chain). A fixed pin decides before quantiles of the
  same key; online adaptation never rewrites it.

Version 1 files also carried a TTL row per key × context bucket × pressure level. The engine never decided
with those rows for a key with quantiles, so :meth:`TTLTables.from_dict` drops them; a hand-set version 1 row
(no cost profile, or a key without quantiles) becomes a fixed pin when it is the same TTL at every context
and pressure, and is refused with a clear message otherwise.
Pure Python: the engine's scheduler process imports this module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from ctk.predict.cost import CDF, CostModel, live_ttl

#: 2: quantiles and fixed pins only (no key × context × pressure rows); 1 is still read.
TABLES_VERSION = 2


@dataclass(frozen=True)
class TTLDecision:
    ttl_s: float  # 0 means do not pin
    p_hit: float  # predicted P(T <= ttl_s)
    key: str  # the table key that decided ("" when no key matched)


NO_PIN = TTLDecision(0.0, 0.0, "")


class FixedPin(NamedTuple):
    """A hand-set pin: ``ttl_s`` seconds (0: do not pin), returns within it with probability ``p_hit``."""

    ttl_s: float
    p_hit: float = 1.0


@dataclass
class TTLTables:
    """Per key: the quantiles the engine prices live, or a hand-set :class:`FixedPin`; the cost profile."""

    quantile_levels: list[float]
    quantiles_s: dict[str, list[float]] = field(default_factory=dict)
    n_samples: dict[str, int] = field(default_factory=dict)
    cost: dict = field(default_factory=dict)
    fixed_pins: dict[str, FixedPin] = field(default_factory=dict)
    _cost_model: CostModel | None = field(default=None, repr=False, compare=False)
    #: per key: (the quantiles list it was built from, its CDF), for :meth:`live_decision`
    _cdfs: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.quantile_levels = [float(q) for q in self.quantile_levels]
        self.fixed_pins = {str(k): _fixed_pin(k, p) for k, p in self.fixed_pins.items()}
        for key, q in self.quantiles_s.items():
            self.quantiles_s[key] = self._checked(key, q)

    # -- serve time --------------------------------------------------------------------------------------

    def keys(self) -> list[str]:
        """Every key the tables decide for: fixed pins, then keys with quantiles."""
        return list(self.fixed_pins) + [k for k in self.quantiles_s if k not in self.fixed_pins]

    def has_key(self, key: str) -> bool:
        """The tables decide for ``key`` (a fixed pin or quantiles)."""
        return key in self.fixed_pins or key in self.quantiles_s

    def engine_decision(self, keys: Sequence[str], context_tokens: int, pressure: float) -> TTLDecision:
        """:meth:`live_decision` at the live price equivalent to ``pressure`` under the tables' cost profile
        (:meth:`ctk.predict.cost.CostModel.live_price_at`): what offline figures grade per pressure."""
        return self.live_decision(keys, context_tokens, self.cost_model.live_price_at(pressure))

    def live_decision(self, keys: Sequence[str], context_tokens: int, price: float) -> TTLDecision:
        """What the engine's ``ttl`` rule decides for a call of this chain at this context and live price:
        :func:`ctk.predict.cost.live_ttl` on the first key the tables know (its fixed pin read as
        :meth:`CDF.linear`, else its quantiles), the tables' cost profile, memory held = the context's
        blocks. A fixed pin of 0 s (or with ``p_hit`` 0) never pins."""
        for key in keys:
            cdf = self.cdf(key)
            if cdf is None:
                if key in self.fixed_pins:
                    return TTLDecision(0.0, 0.0, key)
                continue
            cm = self.cost_model
            held = cm.blocks(context_tokens) * cm.block_size_tokens
            ttl, f = live_ttl(cdf, cm.benefit_s(context_tokens), price, held)
            return TTLDecision(ttl, f, key)
        return NO_PIN

    def cdf(self, key: str) -> CDF | None:
        """The return-time distribution the rule prices for ``key``: its fixed pin's (None for a 0 s pin),
        else its quantiles' (cached until online adaptation replaces them); None when the key is unknown."""
        pin = self.fixed_pins.get(key)
        q = self.quantiles_s.get(key) if pin is None else None
        hit = self._cdfs.get(key)
        if hit is not None and hit[0] is (pin if pin is not None else q):
            return hit[1]
        if pin is not None:
            cdf = CDF.linear(pin.ttl_s, pin.p_hit) if pin.ttl_s > 0 else None
            self._cdfs[key] = (pin, cdf)
            return cdf
        if q is None:
            return None
        cdf = CDF.from_quantiles(self.quantile_levels, q)
        self._cdfs[key] = (q, cdf)
        return cdf

    # -- building ----------------------------------------------------------------------------------------

    @property
    def cost_model(self) -> CostModel:
        if self._cost_model is None:
            self._cost_model = CostModel.from_dict(self.cost) if self.cost else CostModel()
        return self._cost_model

    def set_quantiles(self, key: str, quantiles_s: Sequence[float], n_samples: int) -> None:
        """New quantiles for ``key`` (online adaptation): the engine's rule prices them on its next decision
        (a fixed pin of the same key still decides)."""
        self.quantiles_s[key] = self._checked(key, quantiles_s)  # a new list: readers see the change
        self.n_samples[key] = int(n_samples)

    def _checked(self, key: str, quantiles_s: Sequence[float]) -> list[float]:
        q = [float(x) for x in quantiles_s]
        if len(q) != len(self.quantile_levels):
            raise ValueError(f"{key!r}: {len(q)} quantiles for {len(self.quantile_levels)} levels")
        if any(math.isnan(x) or x < 0 for x in q):
            raise ValueError(f"{key!r}: quantiles must be >= 0 and not NaN")
        return q

    @classmethod
    def build(
        cls,
        quantiles_by_key: dict[str, Sequence[float]],
        n_samples: dict[str, int],
        quantile_levels: Sequence[float],
        cost: CostModel | None = None,
    ) -> TTLTables:
        """Tables of trained quantiles under ``cost`` (default: the default profile)."""
        cost = cost or CostModel()
        return cls(
            quantile_levels=list(quantile_levels),
            quantiles_s={k: list(q) for k, q in quantiles_by_key.items()},
            n_samples={k: int(n_samples.get(k, 0)) for k in quantiles_by_key},
            cost=cost.to_dict(),
        )

    @classmethod
    def fixed(
        cls, pins: dict[str, float | FixedPin | tuple[float, float]], cost: CostModel | None = None
    ) -> TTLTables:
        """Hand-set tables: each key pinned for a fixed TTL (``{"*": 2.0}``: one TTL for every call)."""
        return cls(
            quantile_levels=[],
            fixed_pins={k: _fixed_pin(k, p) for k, p in pins.items()},
            cost=cost.to_dict() if cost is not None else {},
        )

    # -- plain data --------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        out = {
            "version": TABLES_VERSION,
            "quantile_levels": list(self.quantile_levels),
            "quantiles_s": {k: list(v) for k, v in self.quantiles_s.items()},
            "n_samples": dict(self.n_samples),
            "cost": dict(self.cost),
        }
        if self.fixed_pins:
            out["fixed_pins"] = {k: {"ttl_s": p.ttl_s, "p_hit": p.p_hit} for k, p in self.fixed_pins.items()}
        return out

    @classmethod
    def from_dict(cls, d: dict) -> TTLTables:
        """Rebuild from :meth:`to_dict` output, or from a version 1 dict (see the module docstring); raises
        ``ValueError`` naming what is wrong."""
        if not isinstance(d, dict):
            raise ValueError(f"TTL tables must be a dict, not {type(d).__name__}")
        version = d.get("version", 1)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ValueError(f"TTL tables version {version!r} is not one this ctk reads")
        if version > TABLES_VERSION:
            raise ValueError(
                f"TTL tables version {version!r} is newer than this ctk reads ({TABLES_VERSION})"
            )
        try:
            if version == 1:
                return _from_v1(d)
            if "quantile_levels" not in d:
                raise ValueError("TTL tables lack quantile_levels")
            fixed = d.get("fixed_pins", {})
            return cls(
                quantile_levels=list(d["quantile_levels"]),
                quantiles_s={str(k): list(v) for k, v in d.get("quantiles_s", {}).items()},
                n_samples={str(k): int(v) for k, v in d.get("n_samples", {}).items()},
                cost=dict(d.get("cost", {})),
                fixed_pins={str(k): _pin_from_plain(k, p) for k, p in fixed.items()},
            )
        except (TypeError, AttributeError) as exc:
            raise ValueError(f"TTL tables are malformed ({exc})") from None


def _fixed_pin(key, pin) -> FixedPin:
    """A checked :class:`FixedPin` from a pin, a ``(ttl_s, p_hit)`` pair or a TTL."""
    if isinstance(pin, int | float) and not isinstance(pin, bool):
        pin = FixedPin(float(pin))
    ttl, p = (float(x) for x in pin)
    if not math.isfinite(ttl) or ttl < 0:
        raise ValueError(f"fixed pin {key!r}: ttl_s must be finite and >= 0, not {ttl!r}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"fixed pin {key!r}: p_hit must be in [0, 1], not {p!r}")
    return FixedPin(ttl, p if ttl > 0 else 0.0)


def _pin_from_plain(key, d) -> FixedPin:
    if not isinstance(d, dict) or "ttl_s" not in d:
        raise ValueError(f"fixed pin {key!r} must be a dict with ttl_s (and p_hit), not {d!r}")
    return _fixed_pin(key, (d["ttl_s"], d.get("p_hit", 1.0)))


def _from_v1(d: dict) -> TTLTables:
    """A version 1 dict: quantiles kept; each key's ``ttl_s`` / ``p_hit`` rows (context bucket × pressure
    level) dropped where the engine priced the key's quantiles instead (a cost profile and quantiles), else
    turned into a fixed pin, which needs the same TTL and p_hit at every context and pressure."""
    missing = [k for k in ("quantile_levels", "ttl_s", "p_hit") if k not in d]
    if missing:
        raise ValueError(f"TTL tables (version 1) lack {', '.join(missing)}")
    cost = dict(d.get("cost", {}))
    hand_set = bool(d["fixed"]) if d.get("fixed") is not None else not cost
    quantiles = {str(k): list(v) for k, v in d.get("quantiles_s", {}).items()}
    rows, hits = d["ttl_s"], d["p_hit"]
    if set(rows) != set(hits):
        raise ValueError("ttl_s and p_hit must have the same keys")
    fixed: dict[str, FixedPin] = {}
    for key, ttl_rows in rows.items():
        key = str(key)
        if not hand_set and key in quantiles:
            continue  # the engine priced the quantiles; the rows never decided
        cells = {
            (float(t), float(p))
            for t_row, p_row in zip(ttl_rows, hits[key], strict=True)
            for t, p in zip(t_row, p_row, strict=True)
        }
        if len(cells) != 1:
            raise ValueError(
                f"TTL tables (version 1): the hand-set rows of {key!r} vary with context or pressure "
                f"({len(cells)} different TTLs); this ctk reads one fixed TTL per key: write "
                f"fixed_pins={{{key!r}: {{'ttl_s': ..., 'p_hit': ...}}}} in version 2 tables"
            )
        fixed[key] = _fixed_pin(key, cells.pop())
    return TTLTables(
        quantile_levels=list(d["quantile_levels"]),
        quantiles_s=quantiles,
        n_samples={str(k): int(v) for k, v in d.get("n_samples", {}).items()},
        cost=cost,
        fixed_pins=fixed,
    )
