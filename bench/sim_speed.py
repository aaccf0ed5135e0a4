"""Simulator speed: 1,000 programs x up to 30 turns on a simulated H100 x Llama-3.1-8B, per policy.

    python bench/sim_speed.py                     # target: <= 60 s of wall time per policy on 2 cores
    python bench/sim_speed.py --programs 200 --rate 2 --policies vllm,oracle

Programs are the shared traces' recorded programs at GPU scale (unscaled token counts, contexts up to 64k),
repeated to reach ``--programs`` (each copy is its own program), arriving as a Poisson process. Prints per
policy the wall time, the simulated time, engine steps per wall second, and two ratios: the 60 s target /
wall time (>= 1: met) and the wall time against the stock-vLLM policy's measured in the same run (the cost
of running ctk's policy code in the loop).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

TARGET_S = 60.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--programs", type=int, default=1000)
    p.add_argument("--max-turns", type=int, default=30)
    p.add_argument("--rate", type=float, default=2.0, help="Poisson program arrivals per second")
    p.add_argument("--policies", default="vllm,continuum,progress-ttl,oracle")
    p.add_argument("--db", type=Path, help="trace store (default: the shared traces, imported once)")
    p.add_argument("--out-dir", type=Path, default=REPO / "out" / "bench-sim")
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--ttl-model", type=Path, help="also time the 'ttl' policy with this model (ctk train)")
    args = p.parse_args(argv)

    from policies import trace_store  # bench/policies.py: the shared traces as a store

    from ctk.measure.workload import load_programs
    from ctk.policy.rules import RULES, Policy
    from ctk.simulate.profiles import load_profile
    from ctk.simulate.run import SimConfig, simulate
    from ctk.simulate.sweep import gpu_workload
    from ctk.simulate.workload import Arrivals
    from ctk.store import TraceStore

    args.out_dir.mkdir(parents=True, exist_ok=True)
    db = trace_store(argparse.Namespace(db=args.db), args.out_dir)
    wl = gpu_workload(None, max_turns=args.max_turns)
    with TraceStore(db, read_only=True) as store:
        base = load_programs(store, wl)
    programs = [dataclasses.replace(base[i % len(base)]) for i in range(args.programs)]
    prof = load_profile("h100", "llama-3.1-8b")
    turns = sum(len(x.turns) for x in programs)
    print(f"{len(programs)} programs ({len(base)} distinct), {turns} turns, rate {args.rate}/s, {prof.name}")
    figures = {}
    policies = [x.strip() for x in args.policies.split(",") if x.strip()]
    tables = None
    if args.ttl_model:
        from ctk.predict.modelfile import load_ttl_tables

        tables = load_ttl_tables(str(args.ttl_model))
        policies.append("ttl")
    for policy in policies:
        needs_model = RULES[Policy(policy)].needs_model_file
        serve = {"ttl_model": str(args.ttl_model)} if needs_model else {}
        cfg = SimConfig(arrivals=Arrivals(rate=args.rate, concurrency=None, rtt_s=prof.rtt_s), serve=serve)
        t0 = time.perf_counter()
        res = simulate(programs, prof, policy, cfg, tables=tables if needs_model else None)
        wall = time.perf_counter() - t0
        s = res.summary()
        figures[policy] = {
            "wall_s": wall,
            "sim_time_s": s["sim_time_s"],
            "steps": s["steps"],
            "steps_per_wall_s": s["steps"] / wall,
            "target_x": TARGET_S / wall,
            "mean_jct_s": s["mean_jct_s"],
            "hit_rate": s["hit_rate"],
            "kv_usage_mean": s["kv_usage_mean"],
            "failed_programs": s["failed_programs"],
        }
        print(
            f"{policy:>13}: {wall:6.1f} s wall for {s['sim_time_s']:8.0f} s simulated, {s['steps']:,} steps "
            f"({s['steps'] / wall:,.0f}/s); target 60 s x{TARGET_S / wall:.1f} "
            f"{'met' if wall <= TARGET_S else 'MISSED'}; mean JCT {s['mean_jct_s']:.1f} s, hit rate "
            f"{s['hit_rate']:.3f}, KV use {s['kv_usage_mean']:.2f}",
            flush=True,
        )
    if "vllm" in figures:
        for f in figures.values():
            f["wall_x_vs_vllm"] = f["wall_s"] / figures["vllm"]["wall_s"]
        print(
            "wall time vs the stock-vLLM run: "
            + ", ".join(f"{k} {v['wall_x_vs_vllm']:.2f}x" for k, v in figures.items())
        )
    if args.json:
        args.json.write_text(
            json.dumps({"policies": figures, "config": vars(args) | {"db": str(db)}}, indent=1, default=str)
        )
    return 0 if all(f["wall_s"] <= TARGET_S for f in figures.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
