"""What ttl's age bound buys and costs: mean JCT against p99 TTFT, in the simulator, over workload seeds.

    python bench/tail_frontier.py                    # the bench configuration at 8 and 16 in flight
    python bench/tail_frontier.py --seeds 12 --concurrency 16 --factors 0.75,1,1.5,2,inf --quantiles 0.95,0.99

``bench/policies.py``'s configuration (its workload drawn with ``--seeds`` different seeds, the CPU engine's
measured profile ``cpu--tiny``, the bench server's KV cache) runs through ``ctk.simulate``, which drives the
same policy code as ``ctk serve``. Per seed every arm sees the same programs; ``ttl`` runs once per
(``age_factor``, ``age_quantile``), next to stock vLLM, Continuum, progress-ttl and the oracle. One TTL model
is trained on the trace store minus every seed's programs (as the benchmark trains, tool durations on the
replay's clock). Prints per arm the geometric mean over seeds of mean JCT × stock vLLM (min-max), the median
over seeds of p99 TTFT / stock's (max), and the hit rate: the frontier between mean JCT and the tail that
``age_factor`` moves along. The oracle also runs under each finite bound (``age_bound`` on: clairvoyant pins,
the same tail bound), which separates what ttl loses to its predictions from what the bound costs every
policy. One p99 over ~200 requests is nearly a maximum, so single seeds are noisy; the
medians are the figures to quote. Simulated time: no machine noise, a few seconds per arm and seed.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

BASELINES = ("vllm", "continuum", "progress-ttl", "oracle")


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=8, help="workload seeds (different programs each)")
    p.add_argument("--concurrency", default="8,16", help="programs in flight, one table each")
    p.add_argument("--factors", default="0.75,1,1.5,2,inf", help="ttl age_factor values (inf: no bound)")
    p.add_argument("--quantiles", default="0.95", help="ttl age_quantile values")
    p.add_argument("--db", type=Path, help="trace store (default: the shared traces, imported once)")
    p.add_argument("--out-dir", type=Path, default=REPO / "out" / "bench-tail-frontier")
    p.add_argument("--json", type=Path, help="write the figures here")
    return p.parse_args(argv)


def arms(factors: list[float], quantiles: list[float]) -> list[tuple[str, str]]:
    """(label, arm of the policy comparison) of every arm; stock vLLM first (the baseline)."""
    out = [(p, p) for p in BASELINES]
    for q in quantiles:
        for f in factors:
            name = "no bound" if math.isinf(f) else f"f={f:g} q={q:g}"
            if math.isinf(f) and q != quantiles[0]:
                continue  # without a bound the quantile does not matter
            # ServeConfig takes finite factors only: 1e6 x any wait is no bound
            out.append((f"ttl {name}", f"ttl@age_factor={min(f, 1e6)!r},age_quantile={q!r}"))
    for q in quantiles:  # the oracle held to the same bounds: what clairvoyant pins give at a given tail
        for f in factors:
            if not math.isinf(f):
                out.append(
                    (f"oracle f={f:g} q={q:g}", f"oracle@age_bound=true,age_factor={f!r},age_quantile={q!r}")
                )
    return out


def summarize(per_seed: list[dict[str, dict]]) -> dict[str, dict]:
    """Per arm: geometric mean and range of the JCT ratio, median and max of the p99 TTFT ratio."""
    out = {}
    for label in per_seed[0]:
        jx = [s["vllm"]["mean_jct_s"] / s[label]["mean_jct_s"] for s in per_seed]
        tx = [s[label]["p99_ttft_s"] / s["vllm"]["p99_ttft_s"] for s in per_seed]
        out[label] = {
            "mean_jct_x_vs_vllm_gmean": math.exp(statistics.fmean(math.log(x) for x in jx)),
            "mean_jct_x_vs_vllm_min": min(jx),
            "mean_jct_x_vs_vllm_max": max(jx),
            "p99_ttft_x_of_vllm_median": statistics.median(tx),
            "p99_ttft_x_of_vllm_max": max(tx),
            "hit_rate_mean": statistics.fmean(s[label]["hit_rate"] for s in per_seed),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from policies import trace_store  # bench/policies.py: the shared traces as a store

    from ctk.measure.presets import bench_config
    from ctk.measure.workload import load_programs
    from ctk.simulate.profiles import load_profile
    from ctk.simulate.run import comparison_sim_config, simulate_arm
    from ctk.simulate.ttl import ttl_tables
    from ctk.store import TraceStore

    t0 = time.monotonic()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    db = trace_store(argparse.Namespace(db=args.db), args.out_dir)
    prof = load_profile("cpu", "tiny")
    arm_list = arms(floats(args.factors), floats(args.quantiles))
    workloads = {}
    with TraceStore(db, read_only=True) as store:
        for seed in range(args.seeds):
            workloads[seed] = load_programs(store, bench_config(seed=seed).workload)
    everyone = [p for progs in workloads.values() for p in progs]
    time_scale = bench_config().replay.time_scale
    model, tables = ttl_tables(db, everyone, prof, args.out_dir, time_scale, log=print)
    results: dict[str, dict] = {"concurrency": {}, "config": {}}
    for concurrency in [int(c) for c in args.concurrency.split(",") if c.strip()]:
        per_seed = []
        for seed, programs in workloads.items():
            cfg = bench_config(seed=seed)
            cfg.replay.concurrency = concurrency
            sim_cfg = comparison_sim_config(cfg, prof)
            figs = {}
            for label, arm in arm_list:
                res = simulate_arm(programs, prof, arm, sim_cfg, tables, str(model), tables.cost_model)
                figs[label] = res.summary()
            per_seed.append(figs)
        table = summarize(per_seed)
        results["concurrency"][str(concurrency)] = table
        print(f"\n{concurrency} programs in flight, {args.seeds} workload seeds (simulated, {prof.name})")
        print(
            f"{'arm':<22} {'mean JCT x stock: gmean':>24} {'min-max':>12}  {'p99 TTFT / stock: median':>25} "
            f"{'max':>5}  {'hit':>5}"
        )
        for label, row in table.items():
            print(
                f"{label:<22} {row['mean_jct_x_vs_vllm_gmean']:>24.3f} "
                f"{row['mean_jct_x_vs_vllm_min']:>6.2f}-{row['mean_jct_x_vs_vllm_max']:<5.2f}  "
                f"{row['p99_ttft_x_of_vllm_median']:>25.2f} {row['p99_ttft_x_of_vllm_max']:>5.2f}  "
                f"{row['hit_rate_mean']:>5.3f}",
                flush=True,
            )
    results["config"] = vars(args) | {"db": str(db), "profile": prof.name, "ttl_model": str(model)}
    print(f"\n{time.monotonic() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
