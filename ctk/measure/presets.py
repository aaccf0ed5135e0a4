"""Named configurations of the policy comparison: the benchmark's default, ``--full``, and the demo.

The reasoning behind the numbers is in bench/README.md. In short: the tiny CPU model re-prefills a
3,000-token context in about 0.3 s, which is what a GPU pays for a 10k-token context of an 8-70B model;
tool pauses are the recorded ones (median 0.04 s, a heavy tail up to the 30 s harness timeout), scaled by
``time_scale``; and the KV cache holds about a third of the programs' working set, so stock vLLM's LRU
evicts a pausing program's blocks before it comes back.
"""

from __future__ import annotations

from ctk.measure.compare import CompareConfig, ServerConfig
from ctk.measure.replay import ReplayConfig
from ctk.measure.workload import WorkloadConfig

#: Multi-turn mini-swe-agent programs (source A of the shared agent traces and of the bundled sample).
MSWEA_SOURCE = "tbench1_leaderboard_mini-swe-agent-v1_claude-sonnet-4"


def bench_config(full: bool = False, seed: int = 0) -> CompareConfig:
    """``bench/policies.py``: ≤ 15 minutes on 2 cores by default; ``full`` runs more and longer programs."""
    workload = WorkloadConfig(
        n_programs=48 if full else 16,
        seed=seed,
        sources=[MSWEA_SOURCE],
        max_turns=30 if full else 14,
        system_prompt_tokens=512,
        task_prompt_tokens=512,
        max_output_tokens=64,
        max_observation_tokens=512,
        max_context_tokens=6144,
        max_pause_s=30.0,
    )
    replay = ReplayConfig(concurrency=8, time_scale=0.5 if full else 0.25, seed=seed, progress=True)
    server = ServerConfig(kv_cache_bytes=(24 if full else 16) * 2**20, max_num_seqs=8)
    return CompareConfig(workload=workload, replay=replay, server=server)


def demo_config(seed: int = 0) -> CompareConfig:
    """``make demo``: a few short programs per policy, the whole loop under 10 minutes."""
    cfg = bench_config(full=False, seed=seed)
    cfg.workload.n_programs = 8
    cfg.workload.max_turns = 8
    cfg.workload.max_context_tokens = 3072
    cfg.replay.concurrency = 4
    cfg.server.kv_cache_bytes = 8 * 2**20  # about 4,000 tokens for 4 programs of up to 3,000
    return cfg
