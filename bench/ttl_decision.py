"""TTL decision latency for one finished request (target: p99 <= 20 µs), as the scheduler pays it.

A decision = ``command_keys(command)`` (parse the command text) + ``TTLRule.decide(call, state, price)``:
the key's return-time distribution (the tables' quantiles, cached per key) and the τ maximising
``F(τ)·B − price·N·H(τ)`` under the **live memory price** (a different price for every call, as the engine's
price moves). Measured in one run, per call with ``perf_counter_ns``, over the real commands of the traces:

- ``ctk (new command)``: every command text seen for the first time (the parse cache cleared): the honest
  case, since tool-call texts rarely repeat exactly;
- ``ctk (repeated command)``: the same commands again (parse cache warm);
- ``decide only``: the priced decision alone (keys given);
- ``price update``: ``MemoryPrice.update(state)``, paid once per engine step, not per decision;
- ``continuum``: the public baseline's decision, first word of the command + a running-mean dict read.

Usage: ``python bench/ttl_decision.py [--traces ../shared/data/agent-traces] [--rounds 5]``
"""

from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ctk.datasets import shell
from ctk.policy.config import ServeConfig
from ctk.policy.detect import ToolCall
from ctk.policy.events import EngineState, PinCall
from ctk.policy.hints import RequestHints
from ctk.policy.price import MemoryPrice
from ctk.policy.rules import make_rule
from ctk.predict import features
from ctk.predict.cost import CostModel
from ctk.predict.dataset import prepare_frame
from ctk.predict.predictors import HistogramPredictor, build_tables

TARGET_P99_US = 20.0
REPO = Path(__file__).resolve().parents[1]


def shared_traces() -> Path:
    """The shared agent traces: the first ``shared/data/agent-traces`` above the repository (a git worktree
    sits deeper than the main checkout; the old ``REPO.parent`` default silently fell back to the sample
    traces there)."""
    for up in REPO.parents:
        if (up / "shared" / "data" / "agent-traces").is_dir():
            return up / "shared" / "data" / "agent-traces"
    return REPO.parent / "shared" / "data" / "agent-traces"


def _commands(traces: Path) -> pd.DataFrame:
    csv = traces / "tool_calls.csv"
    if not csv.exists():
        from ctk.datasets.samples import sample_traces_dir

        csv = sample_traces_dir() / "tool_calls.csv.gz"
    print(f"commands from {csv}")
    return pd.read_csv(csv)


def _pct(ns: list[int]) -> tuple[float, float, float]:
    a = np.asarray(ns) / 1000.0
    return float(np.percentile(a, 50)), float(np.percentile(a, 99)), float(a.max())


def main() -> None:
    print(f"load average before the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--traces", type=Path, default=shared_traces())
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    rows = _commands(args.traces)
    frame, _ = prepare_frame(rows)
    tables = build_tables(HistogramPredictor().fit(frame), frame, CostModel())
    cmds = [c if isinstance(c, str) else "" for c in rows["command_or_args"].tolist()]
    rng = random.Random(0)
    ctxs = [rng.randint(500, 60000) for _ in cmds]
    prices = [rng.choice([0.0, 0.0, 1e-7, 1e-6, 1e-5, 1e-4]) * rng.random() for _ in cmds]
    states = [
        EngineState(
            0.0,
            rng.randint(0, 1000),
            1000,
            rng.randint(0, 8),
            block_size=16,
            waiting_demand_tokens=rng.randint(0, 40000),
        )
        for _ in cmds
    ]
    means = {str(k): float(v) for k, v in frame.groupby("tool")["duration_s"].mean().items()}
    rule = make_rule("ttl", ServeConfig(policy="ttl", ttl_model="x", online=False), tables)
    hints = RequestHints(program_id="p")
    tools = [ToolCall("bash", None, c) for c in cmds]

    perf = time.perf_counter_ns
    decide = rule.decide
    command_keys = features.command_keys
    results: dict[str, list[int]] = {
        "ctk (new command)": [],
        "ctk (repeated command)": [],
        "decide only": [],
        "price update": [],
        "continuum": [],
    }
    keys_cache = [tuple(command_keys(c)) for c in cmds]
    state = states[0]
    price = MemoryPrice()
    rows = list(zip(cmds, tools, ctxs, prices, strict=True))
    for _ in range(args.rounds):
        for cached in (shell._parse_cached, shell._keys_cached, shell.normalize_program):
            cached.cache_clear()  # every command is new to the parser again
        for c, tool, x, p in rows:
            t0 = perf()
            decide(PinCall("p", "r", tool, tuple(command_keys(c)), x, x // 16 + 1, 16, hints), state, p)
            results["ctk (new command)"].append(perf() - t0)
        for c, tool, x, p in rows:
            t0 = perf()
            decide(PinCall("p", "r", tool, tuple(command_keys(c)), x, x // 16 + 1, 16, hints), state, p)
            results["ctk (repeated command)"].append(perf() - t0)
        for k, (_, tool, x, p) in zip(keys_cache, rows, strict=True):
            t0 = perf()
            decide(PinCall("p", "r", tool, k, x, x // 16 + 1, 16, hints), state, p)
            results["decide only"].append(perf() - t0)
        for st in states:
            t0 = perf()
            price.update(st)
            results["price update"].append(perf() - t0)
        for c in cmds:
            t0 = perf()
            word = c.split(None, 1)[0] if c else ""
            _ = 2.0 if means.get(word, 1e9) <= 2.0 else 0.0
            results["continuum"].append(perf() - t0)

    print(
        f"TTL decision latency over {len(cmds)} real commands x {args.rounds} rounds "
        f"({len(tables.keys())} table keys); target p99 <= {TARGET_P99_US:.0f} us"
    )
    base_p99 = _pct(results["continuum"])[1]
    print(f"{'decision':26s} {'p50 us':>8s} {'p99 us':>8s} {'max us':>9s} {'p99 / continuum':>16s}")
    for name, ns in results.items():
        p50, p99, mx = _pct(ns)
        print(f"{name:26s} {p50:8.2f} {p99:8.2f} {mx:9.1f} {p99 / base_p99:16.1f}")
    # per command, the best of the rounds: drops the time slices other processes took (this box is shared)
    new_ns = np.asarray(results["ctk (new command)"]).reshape(args.rounds, len(cmds))
    best_p99 = float(np.percentile(new_ns.min(axis=0) / 1000.0, 99))
    p99 = _pct(results["ctk (new command)"])[1]
    for label, v in (("all samples", p99), (f"per-command best of {args.rounds} rounds", best_p99)):
        verdict = "MEETS" if v <= TARGET_P99_US else "MISSES"
        print(
            f"ctk p99 (new command, {label}) {v:.2f} us vs target {TARGET_P99_US:.0f} us: {verdict} "
            f"the target ({v / TARGET_P99_US:.2f}x of budget)"
        )
    print(f"load average after the run: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
