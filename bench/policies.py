"""The policy benchmark: stock vLLM vs Continuum's 2 s pin vs progress-ttl vs ctk's TTL policy vs an oracle.

    python bench/policies.py                         # default configuration, one round
    python bench/policies.py --rounds 3 --json f.json # every policy 3 times, rotated order, medians
    python bench/policies.py --config long-tail      # unscaled pauses, the programs with the longest ones
    python bench/policies.py --config mixed-agents   # two agents, Poisson arrivals: the admission order
    python bench/policies.py --factorial             # {stock, oracle pins} x {FCFS, program FCFS}
    python bench/policies.py --both-orders           # ttl and the oracle, strict and age-bounded order

Starts the tiny model once per policy and round with a KV cache smaller than the programs' working set,
replays the same recorded programs (same seed) against each, and prints one table of medians over rounds:
mean / p50 / p99 JCT, p99 and max TTFT, prefix-cache hit rate, pins, preemptions, and every ratio against
stock vLLM, ``continuum`` and ``progress-ttl`` (baseline / policy: above 1 the policy is better), then each
ratio's min-max over rounds and the issue's targets, met or MISSED. See bench/README.md for the choices.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_TRACES = REPO.parent / "shared" / "data" / "agent-traces"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--config", default="default", help="default, full, long-tail or mixed-agents (see bench/README.md)"
    )
    p.add_argument("--full", action="store_true", help="the same as --config full")
    p.add_argument("--rounds", type=int, default=1, help="run every policy this many times (rotated order)")
    p.add_argument("--json", type=Path, help="write the figures keyed by policy to this file")
    p.add_argument(
        "--db",
        type=Path,
        help="trace store to replay (default: ../shared/data/agent-traces, else the bundled sample)",
    )
    p.add_argument("--out-dir", type=Path, default=REPO / "out" / "bench-policies", help="work folder")
    p.add_argument("--model-dir", type=Path, help="served model (default: build the tiny model)")
    p.add_argument(
        "--ttl-model",
        type=Path,
        help="model file for 'ttl' and 'oracle' (default: ctk train on held-out programs, once per run)",
    )
    p.add_argument(
        "--policies",
        help="comma-separated; policy or policy/fcfs, policy/program-fcfs "
        "(default: vllm,continuum,progress-ttl,ttl,oracle)",
    )
    p.add_argument(
        "--factorial",
        action="store_true",
        help="run vllm and oracle each with program ordering off and on (instead of --policies)",
    )
    p.add_argument(
        "--both-orders",
        action="store_true",
        help="ttl and the oracle each in strict program order and under the age bound, with the baselines "
        "(instead of --policies)",
    )
    p.add_argument("--programs", type=int, help="programs to replay")
    p.add_argument("--concurrency", type=int, help="programs in flight")
    p.add_argument("--time-scale", type=float, help="tool pause = recorded duration x this")
    p.add_argument("--kv-mb", type=float, help="KV cache size in MiB")
    p.add_argument("--max-turns", type=int, help="turns per program at most")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-agent-names",
        action="store_true",
        help="send no agent hint (the engine derives each program's class from its prompt's prefix)",
    )
    p.add_argument("--report", action="store_true", help="also write an HTML report into the work folder")
    return p.parse_args(argv)


def trace_store(args: argparse.Namespace, out_dir: Path) -> Path:
    """The store to replay: --db, else the shared traces, else the bundled sample (imported once)."""
    if args.db:
        return args.db
    from ctk.datasets.importer import import_paths
    from ctk.datasets.samples import sample_traces_dir
    from ctk.store import TraceStore

    if (SHARED_TRACES / "tool_calls.csv").exists():
        src, name = SHARED_TRACES / "tool_calls.csv", "shared-traces.duckdb"
    else:
        src, name = sample_traces_dir() / "tool_calls.csv.gz", "sample-traces.duckdb"
    db = out_dir / name
    if not db.exists():
        tmp = db.with_suffix(".tmp.duckdb")
        tmp.unlink(missing_ok=True)
        with TraceStore(tmp) as store:
            import_paths(store, [src])
        tmp.rename(db)
    return db


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ctk.measure.compare import BOTH_ORDERS_ARMS, FACTORIAL_ARMS, CompareError, run_comparison
    from ctk.measure.presets import preset
    from ctk.measure.table import format_table
    from ctk.measure.workload import WorkloadError
    from ctk.policy.arms import split_arms
    from ctk.store import StoreError

    t0 = time.monotonic()
    try:
        cfg = preset("full" if args.full else args.config, seed=args.seed)
    except CompareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if sum(map(bool, (args.factorial, args.both_orders, args.policies))) > 1:
        print("error: give one of --factorial, --both-orders, --policies", file=sys.stderr)
        return 2
    if args.factorial:
        cfg.policies = list(FACTORIAL_ARMS)
    elif args.both_orders:
        cfg.policies = list(BOTH_ORDERS_ARMS)
    elif args.policies:
        cfg.policies = split_arms(args.policies)
    cfg.rounds = args.rounds
    try:
        cfg.validate()
    except CompareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.programs:
        cfg.workload.n_programs = args.programs
    if args.max_turns:
        cfg.workload.max_turns = args.max_turns
    if args.concurrency:
        cfg.replay.concurrency = args.concurrency
    if args.time_scale is not None:
        cfg.replay.time_scale = args.time_scale
    if args.kv_mb:
        cfg.server.kv_cache_bytes = int(args.kv_mb * 2**20)
    cfg.replay.send_agent = not args.no_agent_names
    cfg.replay.progress = sys.stderr.isatty()
    cfg.ttl_model = args.ttl_model
    out_dir = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    db = trace_store(args, out_dir)
    model_dir = args.model_dir
    if model_dir is None:
        model_dir = out_dir / "tiny-model"
        if not (model_dir / "config.json").exists():
            from ctk.engine_patch.serve.tiny_model import build_tiny_model

            build_tiny_model(model_dir)
    print(
        f"store {db}; model {model_dir}; policies {', '.join(cfg.policies)}; {cfg.rounds} round(s); "
        f"{cfg.workload.n_programs} programs at concurrency {cfg.replay.concurrency}, "
        f"time scale {cfg.replay.time_scale}, KV {cfg.server.kv_cache_bytes / 2**20:.0f} MiB",
        flush=True,
    )
    try:
        comp = run_comparison(db, model_dir, out_dir, cfg, log=lambda m: print(m, flush=True))
    except (CompareError, WorkloadError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished policies are in " + str(out_dir), file=sys.stderr)
        return 130
    print()
    print(format_table(comp))
    print(f"\n{time.monotonic() - t0:.0f} s in all; results in {out_dir / 'compare-results.json'}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(comp.to_json(), indent=1, default=str))
        print(f"figures -> {args.json}")
    if args.report:
        from ctk.measure.report import build_report, load_inputs

        inputs = load_inputs(
            db,
            [out_dir / "compare-results.json"],
            out_dir / "model.pkl" if (out_dir / "model.pkl").exists() else None,
            cfg.replay.time_scale,
        )
        print(f"report -> {build_report(inputs, out_dir / 'report')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
