"""Issue 24, item 4, measured: a table of τ* over live prices (a) against the engine's exact rule (b).

(b), what ctk does: when a turn ends in a tool call the ``ttl`` rule computes
τ* = argmax F(τ)·B − price·N·H(τ) on the key's quantiles at the live price (``cost.live_ttl``: one bisect
on the CDF's hull).
(a), the alternative: ``ctk train`` tabulates τ* per key over a grid of G contexts × (price 0 + G prices),
both log-spaced, and the engine reads the table at the live (context, price), bilinear in (log context, log
price) (``interp``) or at the nearest grid point in log space (``nearest``).

Decisions graded are the ones the engine makes: ``ctk simulate`` (H100 × Llama-3.1-8B, the bundled profile)
runs the ``ttl`` rule on the shared agent traces (imported as ``bench/predictors.py`` does) with a model
``ctk train`` fits on the other half of the programs, and every call of the rule is recorded (keys, context,
held tokens, live price, the true pause). Per seed (a different program sample and arrivals), two loads:
below the knee and past it (``--rates``). (a)'s price grid spans the recorded positive prices' 1st-99th
percentile of that seed (its best case: a real table fixes its grid before it sees a price), its context grid
512-131,072 tokens.

Columns: ``agree`` share of decisions with the exact rule's pin / no-pin and TTL within 1 %; ``pin agree``
pin / no-pin only; ``regret`` the expected-cost regret of (a)'s TTL under the key's predicted distribution
(J(τ_b) − J(τ_a), JCT-ms per decision, and as a share of the exact rule's expected gain); ``realised`` the
mean cost difference on the true pauses (``cost.realized_cost``, ms; > 0: (a) loses); ``tables kB`` the TTL
tables in model.pkl (pickled plain data, as saved) and ``model kB`` the whole file; ``us`` the time per
decision, and its ratio to (b) timed in the same rounds (orders rotated). Medians over the seeds.

Usage: ``python bench/ttl_design.py [--traces ../shared/data/agent-traces] [--seeds 0,1,2] [-n 1000]``
"""

from __future__ import annotations

import argparse
import bisect
import math
import os
import pickle
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctk.predict.cost import CDF, live_ttl, realized_cost
from ctk.predict.tables import TTLTables

REPO = Path(__file__).resolve().parents[1]
GRIDS = (4, 8, 16)
CONTEXT_RANGE = (512, 131072)
AGREE_REL = 0.01
#: The ttl arms recorded: the default (strict program order: a returning pin goes first, so the price it is
#: charged is mostly 0) and under the age bound (the price is charged while the queue's head is overdue).
ARMS = ("ttl", "ttl@age_bound=true")


@dataclass(frozen=True)
class Sample:
    """One call of the engine's ``ttl`` rule in the simulator."""

    keys: tuple[str, ...]
    context_tokens: int
    held_tokens: int
    price: float
    duration_s: float | None


def shared_traces() -> Path:
    for up in REPO.parents:
        if (up / "shared" / "data" / "agent-traces").is_dir():
            return up / "shared" / "data" / "agent-traces"
    return REPO.parent / "shared" / "data" / "agent-traces"


# -- (b): the engine's rule ---------------------------------------------------------------------------------


class ExactRule:
    """What ``TTLRule.decide`` computes for a key (no hint): ``live_ttl`` on its CDF at the live price."""

    def __init__(self, tables: TTLTables):
        self.cost = tables.cost_model
        self.cdfs = {k: CDF.from_quantiles(tables.quantile_levels, q) for k, q in tables.quantiles_s.items()}

    def first(self, keys) -> str | None:
        cdfs = self.cdfs
        return next((k for k in keys if k in cdfs), None)

    def ttl(self, keys, context_tokens: int, held_tokens: int, price: float) -> float:
        cdfs = self.cdfs
        for key in keys:
            cdf = cdfs.get(key)
            if cdf is not None:
                return live_ttl(cdf, self.cost.benefit_s(context_tokens), price, held_tokens)[0]
        return 0.0


# -- (a): a table over (context, live price) --------------------------------------------------------------


class PriceGridTable:
    """τ* per key at G log-spaced contexts × (price 0, G log-spaced prices), read at the live point."""

    def __init__(self, exact: ExactRule, g: int, price_lo: float, price_hi: float, interp: bool):
        cm = exact.cost
        self.interp = interp
        self.log_ctx = [
            float(x) for x in np.linspace(math.log(CONTEXT_RANGE[0]), math.log(CONTEXT_RANGE[1]), g)
        ]
        self.log_price = [float(x) for x in np.linspace(math.log(price_lo), math.log(price_hi), g)]
        # nearest point in log space without a log per read: bisect on the geometric midpoints
        self.ctx_mid = [math.exp(0.5 * (a + b)) for a, b in zip(self.log_ctx, self.log_ctx[1:], strict=False)]
        self.price_mid = [
            math.exp(0.5 * (a + b)) for a, b in zip(self.log_price, self.log_price[1:], strict=False)
        ]
        self.rows: dict[str, list[list[float]]] = {}
        for key, cdf in exact.cdfs.items():
            rows = []
            for lc in self.log_ctx:
                ctx = int(round(math.exp(lc)))
                b, held = cm.benefit_s(ctx), cm.blocks(ctx) * cm.block_size_tokens
                rows.append([live_ttl(cdf, b, p, held)[0] for p in [0.0, *map(math.exp, self.log_price)]])
            self.rows[key] = rows
        # p_hit rows as well: the engine's valve and re-judgement need F(τ) of a pin
        self.p_hit = {k: [list(r) for r in v] for k, v in self.rows.items()}

    @staticmethod
    def _pos(grid: list[float], x: float) -> tuple[int, float]:
        """(lower index, weight of the upper point) of ``x`` on ``grid``, clamped to its ends."""
        if x <= grid[0]:
            return 0, 0.0
        if x >= grid[-1]:
            return len(grid) - 1, 0.0
        i = bisect.bisect_right(grid, x) - 1
        return i, (x - grid[i]) / (grid[i + 1] - grid[i])

    def ttl(self, keys, context_tokens: int, held_tokens: int, price: float) -> float:
        rows = self.rows
        for key in keys:
            r = rows.get(key)
            if r is None:
                continue
            if not self.interp:
                j = 0 if price <= 0.0 else 1 + bisect.bisect_left(self.price_mid, price)
                return r[bisect.bisect_left(self.ctx_mid, context_tokens)][j]
            i, wi = self._pos(self.log_ctx, math.log(max(1, context_tokens)))
            if price <= 0.0:
                j, wj = 0, 0.0
            else:
                j, wj = self._pos(self.log_price, math.log(price))
                j += 1  # column 0 is price 0
            i1, j1 = min(i + 1, len(r) - 1), min(j + 1, len(r[0]) - 1)
            top = r[i][j] + wj * (r[i][j1] - r[i][j])
            bottom = r[i1][j] + wj * (r[i1][j1] - r[i1][j])
            return top + wi * (bottom - top)
        return 0.0

    def tables_dict(self, base: dict) -> dict:
        """``base`` (a tables dict as saved: quantiles, no rows) with this grid's rows added."""
        grid = [math.exp(x) for x in self.log_price]
        return {**base, "ttl_s": self.rows, "p_hit": self.p_hit, "price_grid": grid}


# -- recording the engine's decisions ------------------------------------------------------------------------


def record(
    db: Path, seed: int, n: int, rates: list[float], arms: list[str], work: Path
) -> tuple[Path, TTLTables, dict[str, list[Sample]]]:
    """Simulate ``n`` programs under each ``ttl`` arm at each rate, recording every call of the rule."""
    from ctk.measure.presets import gpu_workload
    from ctk.measure.workload import load_programs
    from ctk.policy import rules
    from ctk.simulate.profiles import load_profile
    from ctk.simulate.run import SimConfig, simulate_arm
    from ctk.simulate.ttl import ttl_tables
    from ctk.simulate.workload import Arrivals, repeat_programs
    from ctk.store import TraceStore

    prof = load_profile("h100", "llama-3.1-8b", None)
    wl = gpu_workload(
        None, seed, max_turns=30, sources=None, max_context_tokens=min(prof.max_model_len, 65536)
    )
    with TraceStore(db, read_only=True) as store:
        distinct = load_programs(store, wl)
    distinct = distinct[: len(distinct) // 2]  # the model trains on the other half (as ctk simulate)
    progs = repeat_programs(distinct, n) if n > len(distinct) else distinct[:n]
    model_path, tables = ttl_tables(db, progs, prof, work / f"seed{seed}")
    samples: list[Sample] = []
    by_arm: dict[str, list[Sample]] = {}

    class Recording(rules.TTLRule):
        def decide(self, call, state, price):
            samples.append(
                Sample(call.keys, call.context_tokens, call.held_tokens, price, call.hints.tool_duration_s)
            )
            return super().decide(call, state, price)

    saved = rules.RULES[rules.Policy.TTL]
    rules.RULES[rules.Policy.TTL] = Recording
    try:
        for arm in arms:
            for rate in rates:
                arr = Arrivals(rate=rate, concurrency=None, rtt_s=prof.rtt_s, seed=seed)
                cfg = SimConfig(arrivals=arr, shared_prefix_tokens=wl.system_prompt_tokens)
                simulate_arm(progs, prof, arm, cfg, tables=tables, ttl_model=str(model_path))
            by_arm[arm], samples[:] = list(samples), []
    finally:
        rules.RULES[rules.Policy.TTL] = saved
    return model_path, tables, by_arm


# -- grading -----------------------------------------------------------------------------------------------


def gain(cdf: CDF, ttl: float, benefit: float, cost_per_s: float) -> float:
    if ttl <= 0.0:
        return 0.0
    f, h = cdf.at(ttl)
    return f * benefit - cost_per_s * h


def grade(exact: ExactRule, design, samples: list[Sample], ttl_b: list[float]) -> dict:
    agree = pin_agree = 0
    regret = gain_b = realised = 0.0
    n_real = 0
    cm = exact.cost
    for s, tb in zip(samples, ttl_b, strict=True):
        ta = design.ttl(s.keys, s.context_tokens, s.held_tokens, s.price)
        agree += (ta > 0) == (tb > 0) and abs(ta - tb) <= AGREE_REL * max(tb, 1e-9)
        pin_agree += (ta > 0) == (tb > 0)
        key = exact.first(s.keys)
        if key is None:
            continue
        b, c = cm.benefit_s(s.context_tokens), s.price * s.held_tokens
        gb = gain(exact.cdfs[key], tb, b, c)
        regret += gb - gain(exact.cdfs[key], ta, b, c)
        gain_b += gb
        if s.duration_s is not None:
            realised += realized_cost(ta, s.duration_s, b, c) - realized_cost(tb, s.duration_s, b, c)
            n_real += 1
    n = len(samples)
    return {
        "agree": agree / n,
        "pin_agree": pin_agree / n,
        "regret_ms": 1e3 * regret / n,
        "regret_share": regret / gain_b if gain_b > 0 else 0.0,
        "realised_ms": 1e3 * realised / max(1, n_real),
    }


def time_designs(designs: dict, samples: list[Sample], rounds: int) -> dict[str, float]:
    """µs per decision of each design, median over rounds; the order rotates every round."""
    args = [(s.keys, s.context_tokens, s.held_tokens, s.price) for s in samples]
    names = list(designs)
    per: dict[str, list[float]] = {n: [] for n in names}
    perf = time.perf_counter_ns
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            f = designs[name].ttl
            t0 = perf()
            for a in args:
                f(*a)
            per[name].append((perf() - t0) / 1e3 / len(args))
    return {n: statistics.median(v) for n, v in per.items()}


def pickled_kb(model: dict) -> float:
    from ctk.predict.modelfile import save_model

    with tempfile.TemporaryDirectory() as tmp:
        return save_model(model, Path(tmp) / "m.pkl").stat().st_size / 1024


def run_seed(
    db: Path, seed: int, n: int, rates: list[float], arms: list[str], rounds: int, work: Path
) -> dict[str, dict]:
    from ctk.predict.modelfile import load_model

    t0 = time.perf_counter()
    model_path, tables, by_arm = record(db, seed, n, rates, arms, work)
    exact = ExactRule(tables)
    known = [s for arm in arms for s in by_arm[arm] if exact.first(s.keys) is not None]
    for arm in arms:
        p = np.array([s.price for s in by_arm[arm]])
        pos = p[p > 0]
        print(
            f"seed {seed}, {arm}: {len(p)} decisions, live price 0 in {np.mean(p == 0):.1%}; positive "
            + (
                f"p1 / p50 / p99 {np.percentile(pos, 1):.2e} / {np.median(pos):.2e} / "
                f"{np.percentile(pos, 99):.2e} JCT-s per token-s"
                if len(pos)
                else "none"
            )
        )
    prices = np.array([s.price for s in known])
    pos = prices[prices > 0]
    lo, hi = (float(np.percentile(pos, 1)), float(np.percentile(pos, 99))) if len(pos) else (1e-8, 1e-4)
    if hi <= lo:
        hi = lo * 10
    print(
        f"seed {seed}: {len(known)} decisions with a known key graded ({time.perf_counter() - t0:.0f} s); "
        f"(a)'s price grid {lo:.2e}-{hi:.2e}; contexts p50 "
        f"{np.median([s.context_tokens for s in known]):.0f} tokens"
    )
    positive = [s for s in known if s.price > 0]
    ttl_b = [exact.ttl(s.keys, s.context_tokens, s.held_tokens, s.price) for s in known]
    ttl_b_pos = [exact.ttl(s.keys, s.context_tokens, s.held_tokens, s.price) for s in positive]
    designs: dict = {"(b) exact rule": exact}
    for g in GRIDS:
        for interp in (True, False):
            designs[f"(a) {g}x{g + 1} {'interp' if interp else 'nearest'}"] = PriceGridTable(
                exact, g, lo, hi, interp
            )
    model = load_model(model_path)
    base = model["ttl_tables"]
    no_rows = {k: v for k, v in base.items() if k not in ("ttl_s", "p_hit")}  # (b): the file as written
    us = time_designs(designs, known, rounds)
    out: dict[str, dict] = {}
    for name, d in designs.items():
        t = d.tables_dict(base) if isinstance(d, PriceGridTable) else no_rows
        row = grade(exact, d, known, ttl_b)
        if positive:
            g_pos = grade(exact, d, positive, ttl_b_pos)
            row["agree_pos"] = g_pos["agree"]
            row["regret_share_pos"] = g_pos["regret_share"]
        row["tables_kb"] = len(pickle.dumps(t, protocol=pickle.HIGHEST_PROTOCOL)) / 1024
        row["model_kb"] = pickled_kb({**model, "ttl_tables": t})
        row["us"] = us[name]
        row["us_ratio"] = us[name] / us["(b) exact rule"]
        out[name] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--traces", type=Path, default=shared_traces())
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("-n", "--programs", type=int, default=1000, help="programs simulated per rate")
    ap.add_argument("--rates", default="0.75,1", help="Poisson program rates (past the knee)")
    ap.add_argument(
        "--arms",
        default=",".join(ARMS),
        help="ttl arms whose decisions are recorded (bench/policies.py names)",
    )
    ap.add_argument("--rounds", type=int, default=7, help="timing rounds")
    args = ap.parse_args()
    print(f"load average before the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")

    from ctk.datasets.importer import import_paths
    from ctk.store import TraceStore

    csv = args.traces / "tool_calls.csv"
    if not csv.exists():
        raise SystemExit(f"{csv} not found (the shared agent traces; --traces)")
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    rates = [float(x) for x in args.rates.split(",") if x.strip()]
    arms = [a for a in args.arms.split(",") if a.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "traces.duckdb"
        with TraceStore(db) as store:
            import_paths(store, [csv])
        results = [run_seed(db, s, args.programs, rates, arms, args.rounds, Path(tmp)) for s in seeds]

    def med(name: str, col: str) -> float:
        v = [r[name][col] for r in results if col in r[name]]
        return statistics.median(v) if v else math.nan

    def spread(name: str, col: str) -> str:
        v = [r[name][col] for r in results]
        return f"{min(v):.2f}-{max(v):.2f}"

    print(
        f"\nMedians over seeds {args.seeds} ({args.programs} programs per rate, rates {args.rates} /s, arms "
        f"{args.arms}; H100 x Llama-3.1-8B simulated). Agreement and regret against the exact live rule, "
        "over all decisions and over those at a positive price (p>0)"
    )
    head = (
        f"{'design':<26} {'agree':>6} {'agree p>0':>9} {'pin agree':>9} {'regret ms':>9} {'regret %':>8} "
        f"{'regret % p>0':>12} {'realised ms':>11} {'tables kB':>9} {'model kB':>9} {'us':>6} {'x (b)':>6} "
        f"{'x (b) range':>11}"
    )
    print(head)
    for name in results[0]:
        if "agree" not in results[0][name]:
            print(
                f"{name:<26} {'':>6} {'':>9} {'':>9} {'':>9} {'':>8} {'':>12} {'':>11} "
                f"{med(name, 'tables_kb'):9.1f} {med(name, 'model_kb'):9.1f}"
            )
            continue
        print(
            f"{name:<26} {med(name, 'agree'):6.3f} {med(name, 'agree_pos'):9.3f} "
            f"{med(name, 'pin_agree'):9.3f} "
            f"{med(name, 'regret_ms'):9.3f} {100 * med(name, 'regret_share'):7.2f}% "
            f"{100 * med(name, 'regret_share_pos'):11.2f}% {med(name, 'realised_ms'):11.3f} "
            f"{med(name, 'tables_kb'):9.1f} {med(name, 'model_kb'):9.1f} {med(name, 'us'):6.2f} "
            f"{med(name, 'us_ratio'):6.2f} {spread(name, 'us_ratio'):>11}"
        )
    print(f"load average after the run: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
