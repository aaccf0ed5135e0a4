"""The policy benchmark: stock vLLM vs Continuum's 2 s pin vs ctk's TTL policy vs an oracle.

    python bench/policies.py                 # default configuration, <= 15 minutes on 2 cores
    python bench/policies.py --full          # more and longer programs
    python bench/policies.py --json out.json # the same figures keyed by policy

Starts the tiny model once per policy with a KV cache smaller than the programs' working set, replays the
same recorded programs (same seed) against each, and prints one table: mean / p50 / p99 JCT, p99 and max
TTFT, prefix-cache hit rate, pins, preemptions, and every ratio against stock vLLM and against
``continuum`` (baseline / policy: above 1 the policy is better). See bench/README.md for the choices.
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
    p.add_argument("--full", action="store_true", help="more and longer programs (about 45 minutes)")
    p.add_argument("--json", type=Path, help="write the figures keyed by policy to this file")
    p.add_argument(
        "--db",
        type=Path,
        help="trace store to replay (default: ../shared/data/agent-traces, else the bundled sample)",
    )
    p.add_argument("--out-dir", type=Path, default=REPO / "out" / "bench-policies", help="work folder")
    p.add_argument("--model-dir", type=Path, help="served model (default: build the tiny model)")
    p.add_argument(
        "--ttl-model", type=Path, help="TTL model for 'ttl' (default: ctk train on held-out programs)"
    )
    p.add_argument("--policies", default="vllm,continuum,ttl,oracle", help="comma-separated")
    p.add_argument("--programs", type=int, help="programs to replay")
    p.add_argument("--concurrency", type=int, help="programs in flight")
    p.add_argument("--time-scale", type=float, help="tool pause = recorded duration x this")
    p.add_argument("--kv-mb", type=float, help="KV cache size in MiB")
    p.add_argument("--max-turns", type=int, help="turns per program at most")
    p.add_argument("--seed", type=int, default=0)
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
    from ctk.measure.compare import CompareError, format_table, run_comparison
    from ctk.measure.presets import bench_config
    from ctk.measure.workload import WorkloadError
    from ctk.store import StoreError

    t0 = time.monotonic()
    cfg = bench_config(full=args.full, seed=args.seed)
    cfg.policies = [p.strip() for p in args.policies.split(",") if p.strip()]
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
    cfg.replay.progress = sys.stderr.isatty()
    cfg.ttl_model = args.ttl_model
    out_dir = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    db = trace_store(args, out_dir)
    model_dir = args.model_dir
    if model_dir is None:
        model_dir = out_dir / "tiny-model"
        if not (model_dir / "config.json").exists():
            from ctk.engine_patch.tiny_model import build_tiny_model

            build_tiny_model(model_dir)
    print(
        f"store {db}; model {model_dir}; policies {', '.join(cfg.policies)}; "
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
