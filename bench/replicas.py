"""Two ctk replicas behind vllm-router: does a program's next turn reach the replica holding its pin?

    python bench/replicas.py                    # small: 12 programs, 2 replicas, ~12 minutes on 2 cores
    python bench/replicas.py --json out.json    # the same figures keyed by variant

Replays the same recorded programs (same seed, ``ctk replay``'s workload) through a fresh 2-replica fleet
per variant and prints mean JCT, hit rate (cached / prompt tokens), pins, the share of next turns that found
their context ("context found": cached tokens >= 90% of the previous turn's prompt, which happens only on the
replica that served the previous turn, and there only while the pin, or luck, kept the blocks), and the share
of pins whose program came back to them in time (pin hits / pins created, summed over the replicas):

- ``round-robin``     ctk ``ttl`` on both replicas, the router's round-robin (the baseline);
- ``consistent-hash`` ctk ``ttl`` on both replicas, consistent hashing on X-Session-ID + program binding;
- ``consistent-hash-stock`` the same routing in front of stock vLLM (``--policy vllm``): affinity alone;
- ``router-progress-ttl`` stock vLLM engines (``--policy vllm``) under vllm-router's own Program Scheduling
  (Progress-TTL and admission in the router, no pins): the nearest peer a user would pick instead.

Ratios are against round-robin, measured in the same run (baseline / variant: above 1 is better). The
machine has 2 cores: each replica gets one, so the figures are noisy; compare within one run only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

#: Program Scheduling's Progress-TTL waits for this many finish -> return gaps before its TTL leaves 0
#: (its default is 100, more than a small run has); the rest are the router's defaults.
PEER_STATS_WINDOW = 20
#: A next turn "found its context" when at least this share of the previous turn's prompt was cached.
FOUND = 0.9


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    routing: str
    policy: str


def variants():
    from ctk.engine_patch.serve.fleet import ConsistentHash, ProgramScheduling, RoundRobin

    peer = ProgramScheduling(config=(("stats_window_size", PEER_STATS_WINDOW),))
    return {
        "round-robin": (RoundRobin(), "ttl"),
        "consistent-hash": (ConsistentHash(), "ttl"),
        "consistent-hash-stock": (ConsistentHash(), "vllm"),
        "router-progress-ttl": (peer, "vllm"),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, help="write the figures keyed by variant to this file")
    p.add_argument("--db", type=Path, help="trace store to replay (default: as bench/policies.py)")
    p.add_argument("--out-dir", type=Path, default=REPO / "out" / "bench-replicas", help="work folder")
    p.add_argument("--model-dir", type=Path, help="served model (default: build the tiny model)")
    p.add_argument("--ttl-model", type=Path, help="TTL model (default: ctk train on held-out programs)")
    p.add_argument(
        "--variants",
        default="round-robin,consistent-hash,consistent-hash-stock,router-progress-ttl",
        help="comma-separated (default: all four)",
    )
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--programs", type=int, default=12)
    p.add_argument("--max-turns", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--time-scale", type=float, default=0.25)
    p.add_argument("--kv-mb", type=float, default=16, help="KV cache per replica, MiB")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def context_found(result) -> float | None:
    """Share of next turns whose cached tokens cover >= FOUND of their previous turn's prompt."""
    found = total = 0
    for prog in result.programs:
        for prev, turn in zip(prog.turns, prog.turns[1:], strict=False):
            if turn.error is None and prev.prompt_tokens and turn.cached_tokens is not None:
                total += 1
                found += turn.cached_tokens >= FOUND * prev.prompt_tokens
    return found / total if total else None


def replica_counters(urls: list[str]) -> dict[str, float]:
    """Counters summed over the replicas (``server_metrics.delta`` short names)."""
    from ctk.measure import server_metrics

    total: dict[str, float] = {}
    for u in urls:
        for k, v in server_metrics.scrape(u).items():
            total[k] = total.get(k, 0.0) + v
    return total


def run_variant(name, routing, policy, programs, cfg, model_dir, ttl_model, out_dir, log):

    from ctk.engine_patch.serve.fleet import Fleet
    from ctk.engine_patch.serve.server import free_port
    from ctk.measure import server_metrics
    from ctk.measure.compare import warm_up
    from ctk.measure.replay import run_replay
    from ctk.policy.config import ServeConfig
    from ctk.policy.rules import RULES, Policy

    needs_model = RULES[Policy(policy)].needs_model_file
    serve = ServeConfig(policy=policy, ttl_model=str(ttl_model) if needs_model else None)
    log_dir = out_dir / f"logs-{name}"
    fleet = Fleet(
        str(model_dir),
        cfg["replicas"],
        serve,
        [*cfg["server_args"], "--port", str(free_port())],  # the router's port
        routing,
        log_dir=str(log_dir),
        say=lambda m: log(f"[{name}] {m}"),
    )
    t0 = time.monotonic()
    with fleet:
        urls = [r.url for r in fleet.members]
        for u in urls:
            warm_up(u)
        log(f"[{name}] fleet ready in {time.monotonic() - t0:.0f} s; replaying")
        before = replica_counters(urls)
        rcfg = dataclasses.replace(cfg["replay"], base_url=fleet.url, label=name, sample_interval_s=0)
        result = run_replay(programs, cfg["workload"], rcfg)
        result.server_metrics = server_metrics.delta(before, replica_counters(urls))
        dead = fleet.check()
    result.save(out_dir / f"replay-{name}.json")
    s = result.summary()
    pins, hits = s.get("pins"), s.get("pin_hits")
    s["pin_hit_share"] = hits / pins if pins else None
    s["context_found"] = context_found(result)
    s["dead_replicas"] = len(dead)
    log(
        f"[{name}] {s['programs']} programs ({s['failed_programs']} failed): mean JCT "
        f"{s['mean_jct_s'] or 0:.2f} s, hit rate {s['hit_rate'] or 0:.2f}, pins {pins}, "
        f"context found {s['context_found']}"
    )
    return s


COLUMNS = (
    ("mean JCT s", "mean_jct_s", "{:.2f}"),
    ("p99 JCT s", "p99_jct_s", "{:.2f}"),
    ("p99 TTFT s", "p99_ttft_s", "{:.3f}"),
    ("hit rate", "hit_rate", "{:.2f}"),
    ("pins", "pins", "{:.0f}"),
    ("context found", "context_found", "{:.2f}"),
    ("pin hit/pins", "pin_hit_share", "{:.2f}"),
    ("failed", "failed_programs", "{:.0f}"),
    ("mean JCT x rr", "mean_jct_x_rr", "{:.2f}"),
    ("hit rate x rr", "hit_rate_x_rr", "{:.2f}"),
)


def table(figs: dict[str, dict]) -> str:
    base = figs.get("round-robin", {})
    for s in figs.values():
        b, v = base.get("mean_jct_s"), s.get("mean_jct_s")
        s["mean_jct_x_rr"] = b / v if b and v else None
        b, v = base.get("hit_rate"), s.get("hit_rate")
        s["hit_rate_x_rr"] = v / b if b and v is not None else None
    rows = [["variant"] + [c[0] for c in COLUMNS]]
    for name, s in figs.items():
        rows.append([name] + ["-" if s.get(k) is None else f.format(s[k]) for _, k, f in COLUMNS])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from policies import trace_store

    from ctk.engine_patch.serve.fleet import router_executable
    from ctk.engine_patch.serve.server import ServerError
    from ctk.measure.compare import CompareError, train_ttl_model, training_store
    from ctk.measure.presets import bench_config
    from ctk.measure.workload import load_programs
    from ctk.policy.config import ConfigError
    from ctk.store import TraceStore

    try:
        router_executable()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    out_dir = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    cmp = bench_config(seed=args.seed)
    cmp.workload.n_programs, cmp.workload.max_turns = args.programs, args.max_turns
    cmp.replay.concurrency, cmp.replay.time_scale = args.concurrency, args.time_scale
    cmp.replay.progress = sys.stderr.isatty()
    cmp.server.kv_cache_bytes = int(args.kv_mb * 2**20)
    db = trace_store(args, out_dir)
    with TraceStore(db, read_only=True) as store:
        programs = load_programs(store, cmp.workload)
    model_dir = args.model_dir or out_dir / "tiny-model"
    if not (model_dir / "config.json").exists():
        from ctk.engine_patch.serve.tiny_model import build_tiny_model

        build_tiny_model(model_dir)
    ttl_model = args.ttl_model
    if ttl_model is None:
        exclude = {p.program_id for p in programs}
        train_db = training_store(db, exclude, cmp.replay.time_scale, out_dir / "train.duckdb")
        ttl_model = train_ttl_model(train_db, out_dir / "model.pkl")
    cfg = {
        "replicas": args.replicas,
        "workload": cmp.workload,
        "replay": cmp.replay,
        "server_args": cmp.server.args(cmp.workload.max_context_tokens),
    }
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    known = variants()
    print(
        f"store {db}; {len(programs)} programs, {sum(len(p.turns) for p in programs)} turns; "
        f"{args.replicas} replicas x {args.kv_mb:.0f} MiB KV; variants {', '.join(chosen)}",
        flush=True,
    )
    figs = {}
    try:
        for name in chosen:
            routing, policy = known[name]
            figs[name] = run_variant(
                name,
                routing,
                policy,
                programs,
                cfg,
                model_dir,
                ttl_model,
                out_dir,
                lambda m: print(m, flush=True),
            )
    except (KeyError, ServerError, CompareError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print()
    print(table(figs))
    print(f"\n{time.monotonic() - t0:.0f} s in all (2 shared cores: noisy, compare within this run only)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figs, indent=1, default=str))
        print(f"figures -> {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
