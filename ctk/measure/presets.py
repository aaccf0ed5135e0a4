"""Named configurations of the policy comparison (the benchmark's default, ``full``, ``long-tail``, the demo)
and the GPU-scale workload of ``ctk simulate``.

The reasoning behind the numbers is in bench/README.md. In short: the tiny CPU model re-prefills a
3,000-token context in about 0.3 s, which is what a GPU pays for a 10k-token context of an 8-70B model;
tool pauses are the recorded ones (median 0.04 s, a heavy tail up to the 30 s harness timeout), scaled by
``time_scale``; and the KV cache holds about a third of the programs' working set, so stock vLLM's LRU
evicts a pausing program's blocks before it comes back. ``long-tail`` keeps the recorded pauses unscaled and
replays the programs with the most time in pauses over 2 s, where a fixed 2 s pin holds memory for nothing.
"""

from __future__ import annotations

from collections.abc import Callable

from ctk.measure.compare import CompareConfig, CompareError, ServerConfig
from ctk.measure.replay import ReplayConfig
from ctk.measure.workload import WorkloadConfig
from ctk.predict.cost import CONTINUUM_PIN_S

#: Multi-turn mini-swe-agent programs (source A of the shared agent traces and of the bundled sample).
MSWEA_SOURCE = "tbench1_leaderboard_mini-swe-agent-v1_claude-sonnet-4"


#: Short codex-cli programs (USACO tasks, mostly 1-3 turns): the small agent of the ``mixed-agents`` preset.
CODEX_SOURCE = "tbench1_usaco_adapter_codex-cli_o4-mini"


#: A pause longer than Continuum's fixed 2 s pin (the long-tail preset ranks programs by time in these).
LONG_PAUSE_S = CONTINUUM_PIN_S
#: The demo's policies: ``progress-ttl`` fits its TTL only after 100 observed gaps, which the demo's 8 short
#: programs never reach, so it would repeat ``vllm``.
DEMO_POLICIES = ("vllm", "continuum", "ttl", "oracle")


#: Workload defaults at GPU scale: recorded token counts unscaled, contexts up to 64k tokens.
GPU_WORKLOAD = dict(
    max_turns=30,
    token_scale=1.0,
    system_prompt_tokens=512,
    task_prompt_tokens=1024,
    max_output_tokens=2048,
    max_observation_tokens=8192,
    max_context_tokens=65536,
    max_pause_s=600.0,
)


def gpu_workload(n_programs: int | None, seed: int = 0, **overrides) -> WorkloadConfig:
    """``ctk simulate`` on a GPU profile: :data:`GPU_WORKLOAD` with ``overrides``."""
    return WorkloadConfig(n_programs=n_programs, seed=seed, **{**GPU_WORKLOAD, **overrides})


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
    """``make demo``: 12 programs of up to 10 turns, all in flight, on a KV cache that holds about a sixth of
    their contexts (the pressure of ``bench/policies.py --concurrency 16``, smaller): stock vLLM evicts a
    pausing program's blocks, so the policies differ. About 5 minutes for the whole loop on 2 cores."""
    cfg = bench_config(full=False, seed=seed)
    cfg.policies = list(DEMO_POLICIES)
    cfg.workload.n_programs = 12
    cfg.workload.max_turns = 10
    cfg.workload.max_context_tokens = 4096
    cfg.replay.concurrency = 12
    cfg.server.kv_cache_bytes = 12 * 2**20  # about 6,000 tokens for 12 programs of up to 4,096
    return cfg


def long_tail_config(seed: int = 0) -> CompareConfig:
    """Unscaled pauses, the 12 programs with the most time in pauses over 2 s (source A, first 8 turns).

    In the shared traces these 12 programs spend 1,048 s in 94 turns' pauses; 54% of their pauses last over
    2 s (up to the 30 s harness timeout) and 43% under 0.3 s, so a fixed 2 s pin wastes its memory on half of
    the pauses, and a duration-aware TTL can pin the short ones and skip the long ones. All 12 in flight,
    longest program 119 s of pauses: about 2.5-3 minutes per policy with the server start (not yet timed).
    """
    cfg = bench_config(full=False, seed=seed)
    cfg.workload.n_programs = 16
    cfg.workload.max_turns = 6
    cfg.workload.max_context_tokens = 4096  # 12 MiB holds about 6,000 tokens: max_model_len must fit
    cfg.workload.long_pause_s = LONG_PAUSE_S
    cfg.replay.time_scale = 1.0
    cfg.replay.concurrency = 16
    cfg.server.kv_cache_bytes = 12 * 2**20
    return cfg


def mixed_agents_config(seed: int = 0) -> CompareConfig:
    """Two agents, open-loop arrivals: 40 programs of mini-swe-agent (long: up to 14 turns) and codex-cli
    (short: 2-3 turns), a seeded sample of both sources' multi-turn programs, arriving as a Poisson process at
    1 program/s with no client-side cap, so new programs queue in the engine and its admission order decides
    who starts first (``ttl``'s default admits the agent whose finished programs were smaller first; the
    default preset replays one agent with every program in flight from the start, where the order has
    nothing to choose)."""
    cfg = bench_config(full=False, seed=seed)
    cfg.workload.sources = [MSWEA_SOURCE, CODEX_SOURCE]
    cfg.workload.n_programs = 40
    cfg.replay.concurrency = None
    cfg.replay.rate = 1.0
    return cfg


#: ``bench/policies.py --config NAME``.
PRESETS: dict[str, Callable[[int], CompareConfig]] = {
    "default": lambda seed: bench_config(full=False, seed=seed),
    "full": lambda seed: bench_config(full=True, seed=seed),
    "long-tail": long_tail_config,
    "mixed-agents": mixed_agents_config,
}


def preset(name: str, seed: int = 0) -> CompareConfig:
    """The named configuration; raises CompareError naming the choices."""
    if name not in PRESETS:
        raise CompareError(f"unknown configuration {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name](seed)
