"""TTL tables: the pin decision precomputed per key × context bucket × pressure level.

At serve time a decision is a dict read plus two bisects (:meth:`TTLTables.lookup`), not a model evaluation.
Pure Python: the engine's scheduler process imports this module.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from ctk.predict.cost import CDF, CostModel, choose_ttl, live_ttl

#: Upper edges (tokens) of the context-length buckets; contexts above the last edge use the last bucket.
DEFAULT_CONTEXT_EDGES = (1024, 4096, 16384, 65536, 262144)
TABLES_VERSION = 1


@dataclass(frozen=True)
class TTLDecision:
    ttl_s: float  # 0 means do not pin
    p_hit: float  # predicted P(T <= ttl_s)
    key: str  # the table key that decided ("" when no key matched)


NO_PIN = TTLDecision(0.0, 0.0, "")


@dataclass
class TTLTables:
    """``ttl_s[key][ctx_bucket][pressure_idx]`` and ``p_hit[...]``, with the quantiles they came from."""

    context_edges: list[int]
    pressure_levels: list[float]
    quantile_levels: list[float]
    ttl_s: dict[str, list[list[float]]] = field(default_factory=dict)
    p_hit: dict[str, list[list[float]]] = field(default_factory=dict)
    quantiles_s: dict[str, list[float]] = field(default_factory=dict)
    n_samples: dict[str, int] = field(default_factory=dict)
    cost: dict = field(default_factory=dict)
    fixed: bool | None = None  # hand-set TTLs pinned as tabulated (None: no cost profile)
    _cost_model: CostModel | None = field(default=None, repr=False, compare=False)
    #: keys whose quantiles changed since their rows were derived (rows are re-derived on first lookup)
    _stale: set[str] = field(default_factory=set, repr=False, compare=False)
    #: per key: (the quantiles list it was built from, its CDF), for :meth:`live_decision`
    _cdfs: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.context_edges = [int(e) for e in self.context_edges]
        self.pressure_levels = [float(p) for p in self.pressure_levels]
        self.quantile_levels = [float(q) for q in self.quantile_levels]
        if not self.context_edges or self.context_edges != sorted(set(self.context_edges)):
            raise ValueError("context_edges must be non-empty and strictly ascending")
        if not self.pressure_levels or self.pressure_levels != sorted(set(self.pressure_levels)):
            raise ValueError("pressure_levels must be non-empty and strictly ascending")
        shape = (len(self.context_edges), len(self.pressure_levels))
        for name in ("ttl_s", "p_hit"):
            for key, rows in getattr(self, name).items():
                if len(rows) != shape[0] or any(len(r) != shape[1] for r in rows):
                    raise ValueError(f"{name}[{key!r}] must have shape {shape[0]}x{shape[1]}")
        if set(self.ttl_s) != set(self.p_hit):
            raise ValueError("ttl_s and p_hit must have the same keys")

    # -- serve time --------------------------------------------------------------------------------------

    def context_bucket(self, context_tokens: int | None) -> int:
        i = bisect.bisect_left(self.context_edges, context_tokens or 0)
        return i if i < len(self.context_edges) else len(self.context_edges) - 1

    def pressure_index(self, pressure: float) -> int:
        """Pressure rounded UP to the next tabulated level (above the last level: the last)."""
        i = bisect.bisect_left(self.pressure_levels, pressure)
        return i if i < len(self.pressure_levels) else len(self.pressure_levels) - 1

    def lookup(self, keys: Sequence[str], context_tokens: int | None, pressure: float) -> TTLDecision:
        """The decision of the first key present in the table; :data:`NO_PIN` when none is."""
        ttl = self.ttl_s
        stale = self._stale
        for key in keys:
            if stale and key in stale:
                self._derive_rows(key)
            rows = ttl.get(key)
            if rows is not None:
                c = self.context_bucket(context_tokens)
                p = self.pressure_index(pressure)
                return TTLDecision(rows[c][p], self.p_hit[key][c][p], key)
        return NO_PIN

    def engine_decision(self, keys: Sequence[str], context_tokens: int, pressure: float) -> TTLDecision:
        """:meth:`live_decision` at the live price equivalent to ``pressure`` under the tables' cost profile
        (:meth:`ctk.predict.cost.CostModel.live_price_at`): what offline figures grade per pressure."""
        return self.live_decision(keys, context_tokens, self.cost_model.live_price_at(pressure), pressure)

    def live_decision(
        self, keys: Sequence[str], context_tokens: int, price: float, pressure: float = 1.0
    ) -> TTLDecision:
        """What the engine's ``ttl`` rule decides for a call of this chain at this context and live price
        (:func:`ctk.predict.cost.live_ttl` on the first key's quantiles; the tables' cost profile; memory
        held = the context's blocks). Keys without quantiles (old or hand-set files): the tabulated row at
        ``pressure``, as the rule reads them."""
        for key in keys:
            q = self.quantiles_s.get(key)
            if q is not None and not self.fixed_ttl:
                cm = self.cost_model
                held = cm.blocks(context_tokens) * cm.block_size_tokens
                hit = self._cdfs.get(key)
                if hit is None or hit[0] is not q:  # new key, or online adaptation replaced its quantiles
                    hit = self._cdfs[key] = (q, CDF.from_quantiles(self.quantile_levels, q))
                ttl, f = live_ttl(hit[1], cm.benefit_s(context_tokens), price, held)
                return TTLDecision(ttl, f, key)
            if key in self.ttl_s or key in self._stale:
                return self.lookup((key,), context_tokens, pressure)
        return NO_PIN

    @property
    def fixed_ttl(self) -> bool:
        """Hand-set fixed-TTL tables: pin each key for its tabulated TTL (no distribution to price). Tables
        built by ``ctk train`` carry a cost profile and are priced live from their quantiles."""
        return self.fixed if self.fixed is not None else not self.cost

    # -- building ----------------------------------------------------------------------------------------

    @property
    def cost_model(self) -> CostModel:
        if self._cost_model is None:
            self._cost_model = CostModel.from_dict(self.cost) if self.cost else CostModel()
        return self._cost_model

    def bucket_context_tokens(self, bucket: int) -> int:
        """The context length a bucket is priced at: its upper edge (the cost of its longest contexts)."""
        return self.context_edges[bucket]

    def has_key(self, key: str) -> bool:
        """The tables decide for ``key`` (rows derived, or due on its next lookup)."""
        return key in self.ttl_s or key in self._stale

    def set_quantiles(self, key: str, quantiles_s: Sequence[float], n_samples: int) -> None:
        """New quantiles for ``key`` (online adaptation): cheap; its rows are re-derived on its next
        :meth:`lookup`. The engine's TTL rule reads ``quantiles_s`` and prices them live, so it never pays for
        rows; offline replays (``ctk predict --online``) look the rows up."""
        self.quantiles_s[key] = self._checked(key, quantiles_s)  # a new list: readers see the change
        self.n_samples[key] = int(n_samples)
        self._stale.add(key)

    def _checked(self, key: str, quantiles_s: Sequence[float]) -> list[float]:
        q = [float(x) for x in quantiles_s]
        if len(q) != len(self.quantile_levels):
            raise ValueError(f"{key!r}: {len(q)} quantiles for {len(self.quantile_levels)} levels")
        if any(math.isnan(x) or x < 0 for x in q):
            raise ValueError(f"{key!r}: quantiles must be >= 0 and not NaN")
        return q

    def _derive_rows(self, key: str) -> None:
        self._stale.discard(key)
        self.recompute(key, self.quantiles_s[key], self.n_samples.get(key, 0))

    def recompute(self, key: str, quantiles_s: Sequence[float], n_samples: int) -> None:
        """(Re-)derive ``key``'s rows from new quantiles with the cost model, now."""
        q = self._checked(key, quantiles_s)
        self._stale.discard(key)
        cm = self.cost_model
        ttl_rows: list[list[float]] = []
        hit_rows: list[list[float]] = []
        for b in range(len(self.context_edges)):
            ctx = self.bucket_context_tokens(b)
            benefit = cm.benefit_s(ctx)
            ttl_row, hit_row = [], []
            for pressure in self.pressure_levels:
                t, f = choose_ttl(self.quantile_levels, q, benefit, cm.holding_cost_per_s(ctx, pressure))
                ttl_row.append(t)
                hit_row.append(f)
            ttl_rows.append(ttl_row)
            hit_rows.append(hit_row)
        self.ttl_s[key] = ttl_rows
        self.p_hit[key] = hit_rows
        self.quantiles_s[key] = q
        self.n_samples[key] = int(n_samples)

    @classmethod
    def build(
        cls,
        quantiles_by_key: dict[str, Sequence[float]],
        n_samples: dict[str, int],
        quantile_levels: Sequence[float],
        cost: CostModel | None = None,
        context_edges: Sequence[int] = DEFAULT_CONTEXT_EDGES,
        pressure_levels: Sequence[float] | None = None,
    ) -> TTLTables:
        cost = cost or CostModel()
        tables = cls(
            context_edges=list(context_edges),
            pressure_levels=list(pressure_levels if pressure_levels is not None else cost.pressure_levels),
            quantile_levels=list(quantile_levels),
            cost=cost.to_dict(),
        )
        for key, q in quantiles_by_key.items():
            tables.recompute(key, q, n_samples.get(key, 0))
        return tables

    # -- plain data --------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        for key in list(self._stale):
            self._derive_rows(key)
        return {
            "version": TABLES_VERSION,
            "context_edges": list(self.context_edges),
            "pressure_levels": list(self.pressure_levels),
            "quantile_levels": list(self.quantile_levels),
            "ttl_s": {k: [list(r) for r in v] for k, v in self.ttl_s.items()},
            "p_hit": {k: [list(r) for r in v] for k, v in self.p_hit.items()},
            "quantiles_s": {k: list(v) for k, v in self.quantiles_s.items()},
            "n_samples": dict(self.n_samples),
            "cost": dict(self.cost),
            **({} if self.fixed is None else {"fixed": bool(self.fixed)}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> TTLTables:
        """Rebuild from :meth:`to_dict` output; raises ``ValueError`` naming what is wrong."""
        if not isinstance(d, dict):
            raise ValueError(f"TTL tables must be a dict, not {type(d).__name__}")
        version = d.get("version", TABLES_VERSION)
        if not isinstance(version, int) or version > TABLES_VERSION:
            raise ValueError(
                f"TTL tables version {version!r} is newer than this ctk reads ({TABLES_VERSION})"
            )
        missing = [
            k for k in ("context_edges", "pressure_levels", "quantile_levels", "ttl_s", "p_hit") if k not in d
        ]
        if missing:
            raise ValueError(f"TTL tables lack {', '.join(missing)}")
        try:
            return cls(
                context_edges=list(d["context_edges"]),
                pressure_levels=list(d["pressure_levels"]),
                quantile_levels=list(d["quantile_levels"]),
                ttl_s={str(k): [[float(x) for x in r] for r in v] for k, v in d["ttl_s"].items()},
                p_hit={str(k): [[float(x) for x in r] for r in v] for k, v in d["p_hit"].items()},
                quantiles_s={str(k): [float(x) for x in v] for k, v in d.get("quantiles_s", {}).items()},
                n_samples={str(k): int(v) for k, v in d.get("n_samples", {}).items()},
                cost=dict(d.get("cost", {})),
                fixed=None if d.get("fixed") is None else bool(d["fixed"]),
            )
        except (TypeError, AttributeError) as exc:
            raise ValueError(f"TTL tables are malformed ({exc})") from None
