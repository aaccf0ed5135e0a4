"""Shared fixtures of the serve part's tests (import them into a test module to use them)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random-weight Llama built once per test session."""
    from ctk.engine_patch.serve.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "model")


#: TTL tables of the engine tests: ``ls`` pins 30 s, ``sleep`` 1 s, anything else is not pinned.
TEST_TTLS = {"ls": 30.0, "sleep": 1.0, "*": 0.0}
SHORTEST_TTL_KEY, LONG_TTL_KEY = "sleep", "ls"
#: Tiny engine: 16 MiB of KV = 8,192 tokens (63 usable blocks of 128 tokens plus vLLM's null block; 511 + 1 of
#: 16); at most 2 requests run at once.
KV_BYTES = 16 << 20
#: The engine tests' KV block size: the platform's default (CPU 128, CUDA 16) unless CTK_TEST_BLOCK_SIZE says
#: otherwise. vLLM's CPU attention takes multiples of 32 only ("No common block size for 16"), so on the CPU
#: ``CTK_TEST_BLOCK_SIZE=32`` is the closest to GPU's 16; the emulated GPU tests (test_engine_gpu) run at 16.
TEST_BLOCK_SIZE = int(os.environ.get("CTK_TEST_BLOCK_SIZE") or 0) or None


def block_size_args() -> list[str]:
    """``ctk serve``'s ``--block-size`` for a served test engine: :data:`TEST_BLOCK_SIZE`'s, or none."""
    return ["--block-size", str(TEST_BLOCK_SIZE)] if TEST_BLOCK_SIZE else []


def served_block_size(base: str) -> int:
    """Tokens per KV block of the engine served at ``base`` (the ``block_size`` of its
    ``vllm:cache_config_info``): what a served test's expectations are computed from."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(httpx.get(base + "/metrics", timeout=10).text):
        for smp in fam.samples:
            if smp.name == "vllm:cache_config_info" and smp.labels.get("block_size"):
                return int(smp.labels["block_size"])
    raise AssertionError(f"{base}/metrics has no vllm:cache_config_info block_size")


def write_test_model(path: Path, ttls: dict[str, float] | None = None) -> Path:
    """A model.pkl whose TTL tables pin each key for a fixed TTL (hand-set fixed pins; quantiles that online
    adaptation may rewrite but that never decide for these keys)."""
    from ctk.predict.modelfile import save_model
    from ctk.predict.tables import FixedPin, TTLTables

    ttls = ttls or TEST_TTLS
    tables = TTLTables(
        quantile_levels=[0.5, 0.9],
        fixed_pins={k: FixedPin(v, 0.9 if v > 0 else 0.0) for k, v in ttls.items()},
        quantiles_s={k: [v / 2 or 1.0, v or 10.0] for k, v in ttls.items()},
        n_samples={k: 10 for k in ttls},
    )
    return save_model({"ttl_tables": tables.to_dict()}, path)


@pytest.fixture(scope="session")
def ttl_model_file(tmp_path_factory) -> Path:
    return write_test_model(tmp_path_factory.mktemp("ttl-model") / "model.pkl")


@pytest.fixture(scope="session")
def engine_llm(tiny_model_dir, ttl_model_file):
    """An in-process ``vllm.LLM`` on the tiny model with the ctk scheduler (policy ``ttl``)."""
    old = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the scheduler lives in this process
    try:
        from vllm import LLM

        llm = LLM(
            str(tiny_model_dir),
            enforce_eager=True,
            kv_cache_memory_bytes=KV_BYTES,
            max_model_len=4096,
            enable_prefix_caching=True,
            max_num_seqs=2,
            seed=0,
            block_size=TEST_BLOCK_SIZE,
            scheduler_cls="ctk.engine_patch.scheduler.matching_scheduler",
            additional_config={"ctk": {"policy": "ttl", "ttl_model": str(ttl_model_file)}},
        )
    finally:
        if old is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = old
    yield llm


def scheduler_of(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


#: The cold-start flood (issue 22): a program's tool call takes this long while this many new programs arrive.
FLOOD_TOOL_S, FLOOD_PROGRAMS = 0.05, 12
FLOOD_PROMPT, FLOOD_OUTPUT = 1500, 16  # 12 of them: twice the cache, at any block size


def flood_during_tool(base: str, tag: str, n_programs: int = 1, seed: int = 0) -> dict[str, float]:
    """``n_programs`` programs each finish a turn that ends in a (pinned) tool call; a flood of
    :data:`FLOOD_PROGRAMS` new programs then reaches ``base`` at once, and :data:`FLOOD_TOOL_S` later each
    program sends its next turn. Returns each program's cached share of its first turn's prompt."""
    import concurrent.futures
    import random
    import time

    import httpx

    model = httpx.get(base + "/v1/models", timeout=10).json()["data"][0]["id"]
    rng = random.Random(seed)

    def ids(n: int) -> list[int]:
        return [rng.randrange(10, 4000) for _ in range(n)]

    def complete(session: str, prompt: list[int], max_tokens: int, xargs: dict) -> dict:
        body = {
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "min_tokens": max_tokens,
            "ignore_eos": True,
            "return_token_ids": True,
            "vllm_xargs": xargs,
        }
        r = httpx.post(base + "/v1/completions", json=body, headers={"X-Session-ID": session}, timeout=300)
        r.raise_for_status()
        return r.json()

    programs = [f"{tag}-p{i}" for i in range(n_programs)]
    first = {s: ids(FLOOD_PROMPT) for s in programs}
    nxt = {}
    for s in programs:  # one at a time: each ends pinned, nothing else in the engine
        out = complete(s, first[s], 8, {"tool": LONG_TTL_KEY, "turn_index": 0})
        nxt[s] = first[s] + out["choices"][0]["token_ids"] + ids(50)
    floods = [(f"{tag}-new{k}", ids(FLOOD_PROMPT)) for k in range(FLOOD_PROGRAMS)]
    with concurrent.futures.ThreadPoolExecutor(FLOOD_PROGRAMS + n_programs) as pool:
        flooding = [
            pool.submit(complete, s, p, FLOOD_OUTPUT, {"tool": "cat", "turn_index": 0}) for s, p in floods
        ]
        time.sleep(FLOOD_TOOL_S)
        turns = {s: pool.submit(complete, s, nxt[s], 8, {"turn_index": 1, "last_turn": 1}) for s in programs}
        cached = {
            s: (f.result()["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0) / FLOOD_PROMPT
            for s, f in turns.items()
        }
        for f in flooding:
            f.result()
    return cached


def settled(read, at_least: float, timeout_s: float = 15.0) -> float:
    """``read()`` once it gives at least ``at_least`` (or at ``timeout_s``): a served engine's pin metrics
    reach ``/metrics`` through a flusher thread (``ctk.engine_patch.metrics.FLUSH_S`` late)."""
    import time

    deadline = time.monotonic() + timeout_s
    value = read()
    while value < at_least and time.monotonic() < deadline:
        time.sleep(0.05)
        value = read()
    return value


def pin_releases(base: str) -> dict[str, float]:
    """``ctk:pin_releases_total`` at ``base`` by reason (why pins ended, for a failure's message)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(httpx.get(base + "/metrics", timeout=10).text):
        for smp in fam.samples:
            if smp.name == "ctk:pin_releases_total":
                out[smp.labels.get("reason", "?")] = out.get(smp.labels.get("reason", "?"), 0.0) + smp.value
    return out
