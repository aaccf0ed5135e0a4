"""Scheduler overhead of the ctk plugin with zero pins versus stock vLLM, measured in the same run.

One in-process vLLM CPU engine (tiny model) runs the same kind of agent-like workload in alternating phases:
``stock`` (the scheduler object dispatches every hook to vLLM's own ``Scheduler`` methods, and the KV
manager's ``allocate_slots`` is the original) and ``ctk`` (the ``CTKScheduler`` hooks with policy ``ttl``
and a TTL table that never pins, so every hook runs — metadata parsing, program ordering, TTL lookups,
the allocation wrapper — but nothing is held). Only the time spent
inside the scheduler (``add_request``, ``schedule``, ``update_from_output``, which frees finished requests)
is counted, per engine step. Phases alternate to cancel drift on a shared machine.

    .venv/bin/python bench/sched_overhead.py [--model PATH] [--phases 6] [--requests 48]

Prints the per-step scheduler time of both and the ratio ctk / stock (target: <= 1.02).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from pathlib import Path


def build_inputs(tmp: Path, model: str | None) -> tuple[str, str]:
    from ctk.engine_patch.tiny_model import build_tiny_model
    from ctk.predict.modelfile import save_model
    from ctk.predict.tables import TTLTables

    model_dir = model or str(build_tiny_model(tmp / "tiny"))
    tables = TTLTables(
        context_edges=[1_000_000],
        pressure_levels=[1.0],
        quantile_levels=[0.5],
        ttl_s={"*": [[0.0]], "make": [[0.0]]},
        p_hit={"*": [[0.0]], "make": [[0.0]]},
        quantiles_s={"*": [10.0], "make": [10.0]},
        n_samples={"*": 1, "make": 1},
    )
    model_file = save_model({"ttl_tables": tables.to_dict()}, tmp / "never-pins.pkl")
    return model_dir, str(model_file)


HOOKS = ("add_request", "schedule", "update_from_output", "_free_blocks", "has_requests")
TIMED = ("add_request", "schedule", "update_from_output")


class Switch:
    """Instance-level dispatch of the scheduler hooks to vLLM's or ctk's methods, timing the entry points."""

    def __init__(self, sched, stock_cls, ctk_cls):
        self.sched = sched
        self.total = 0.0
        self.impl = {
            "stock": {h: getattr(stock_cls, h) for h in HOOKS},
            "ctk": {h: getattr(ctk_cls, h) for h in HOOKS},
        }
        self.alloc = {"stock": sched._ctk_orig_allocate, "ctk": sched.kv_cache_manager.allocate_slots}
        self.variant = "ctk"
        for name in HOOKS:
            setattr(sched, name, self._wrap(name, timed=name in TIMED))

    def use(self, variant: str) -> None:
        self.variant = variant
        self.sched.kv_cache_manager.allocate_slots = self.alloc[variant]

    def _wrap(self, name, timed):
        sched = self.sched

        def call(*args, **kwargs):
            fn = self.impl[self.variant][name]
            if not timed:
                return fn(sched, *args, **kwargs)
            t = time.perf_counter()
            try:
                return fn(sched, *args, **kwargs)
            finally:
                self.total += time.perf_counter() - t

        return call


def run_phase(llm, timer: Switch, rng: random.Random, n_requests: int, tag: str) -> tuple[float, int]:
    from vllm import SamplingParams

    eng = llm.llm_engine
    timer.total = 0.0
    for i in range(n_requests):
        prog = f"{tag}-p{i % (n_requests // 3 or 1)}"
        prompt = [rng.randrange(10, 4000) for _ in range(rng.randrange(200, 800))]
        sp = SamplingParams(
            max_tokens=rng.randrange(8, 24),
            ignore_eos=True,
            extra_args={"program_id": prog, "turn_index": i, "tool": "make all"},
        )
        eng.add_request(f"{tag}-{i}", {"prompt_token_ids": prompt}, sp)
    steps = 0
    while eng.has_unfinished_requests():
        eng.step()
        steps += 1
    return timer.total, steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="model folder (default: build the tiny model)")
    ap.add_argument("--phases", type=int, default=6, help="phases per variant (alternating)")
    ap.add_argument("--requests", type=int, default=48, help="requests per phase")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    with tempfile.TemporaryDirectory(prefix="ctk-bench-") as tmp:
        model_dir, model_file = build_inputs(Path(tmp), args.model)
        from vllm import LLM
        from vllm.v1.core.sched.scheduler import Scheduler

        from ctk.engine_patch.scheduler import CTKScheduler

        llm = LLM(
            model_dir,
            enforce_eager=True,
            kv_cache_memory_bytes=64 << 20,
            max_model_len=4096,
            enable_prefix_caching=True,
            max_num_seqs=8,
            seed=0,
            scheduler_cls=CTKScheduler,
            additional_config={"ctk": {"policy": "ttl", "ttl_model": model_file, "online": False}},
        )
        sched = llm.llm_engine.engine_core.engine_core.scheduler
        timer = Switch(sched, Scheduler, CTKScheduler)
        use = timer.use

        rng = random.Random(0)
        for variant in ("stock", "ctk"):  # warm-up, not counted
            use(variant)
            run_phase(llm, timer, rng, args.requests // 2, f"warm-{variant}")
        per_step: dict[str, list[float]] = {"stock": [], "ctk": []}
        for phase in range(args.phases):
            order = ("stock", "ctk") if phase % 2 == 0 else ("ctk", "stock")
            for variant in order:
                use(variant)
                total, steps = run_phase(
                    llm, timer, random.Random(100 + phase), args.requests, f"{variant}-{phase}"
                )
                per_step[variant].append(total / steps)
                us = 1e6 * total / steps
                print(f"phase {phase} {variant:5s}: {steps:4d} steps, scheduler {us:7.1f} us/step")
        assert sched.ctk.stats.pins_created == 0, "the bench table must never pin"
        stock = statistics.median(per_step["stock"])
        ctk = statistics.median(per_step["ctk"])
        print(f"\nscheduler time per engine step (median of {args.phases} phases each):")
        print(f"  stock vLLM Scheduler : {1e6 * stock:7.1f} us")
        print(f"  ctk, zero pins       : {1e6 * ctk:7.1f} us")
        print(f"  ratio ctk / stock    : {ctk / stock:.3f}   (target <= 1.02)")


if __name__ == "__main__":
    main()
