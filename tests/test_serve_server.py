"""``ctk serve`` end to end: vLLM's OpenAI server (engine in its own process) with the ctk scheduler."""

from __future__ import annotations

import random
import re
import time
from pathlib import Path

import httpx
import pytest
from engine_fixtures import (
    KV_BYTES,
    LONG_TTL_KEY,
    SHORTEST_TTL_KEY,
    TEST_TTLS,
    block_size_args,
    served_block_size,
    settled,
)

pytestmark = pytest.mark.engine

WORDS = ["alpha", "beta", "gamma", "delta", "repo", "test", "python", "file", "error", "value", "make"]


@pytest.fixture(scope="module")
def served(tiny_model_dir, ttl_model_file, tmp_path_factory):
    from ctk.engine_patch.serve.server import free_port, launch_server, stop_server, wait_ready

    record = tmp_path_factory.mktemp("served") / "traces.duckdb"
    port = free_port()
    proc = launch_server(
        tiny_model_dir,
        port,
        "ttl",
        ttl_model_file,
        record=record,
        extra_args=[
            "--kv-cache-memory-bytes",
            str(KV_BYTES),
            "--max-model-len",
            "4096",
            "--max-num-seqs",
            "2",
            *block_size_args(),
        ],
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, timeout=240, proc=proc)
        yield {"base": base, "proc": proc, "record": record, "model": str(tiny_model_dir)}
    finally:
        stop_server(proc)


def metrics(base: str) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(httpx.get(base + "/metrics", timeout=10).text):
        for s in fam.samples:
            out[(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k == "reason")))] = s.value
    return out


def metric(base: str, name: str, **labels) -> float:
    return metrics(base).get((name, tuple(sorted(labels.items()))), 0.0)


def chat(served, session: str, messages: list[dict], **xargs) -> dict:
    r = httpx.post(
        served["base"] + "/v1/chat/completions",
        headers={"X-Session-ID": session},
        json={
            "model": served["model"],
            "messages": messages,
            "max_tokens": 4,
            "ignore_eos": True,
            "vllm_xargs": xargs,
        },
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return r.json()


def long_text(rng: random.Random, n_words: int = 900) -> str:
    return " ".join(rng.choice(WORDS) + str(rng.randrange(100)) for _ in range(n_words))


def test_session_pin_hit_over_http_and_metrics(served):
    base = served["base"]
    rng = random.Random(11)
    msgs = [{"role": "user", "content": long_text(rng)}]
    first = chat(served, "S1", msgs, tool=LONG_TTL_KEY)
    assert first["usage"]["prompt_tokens"] > 1024
    assert settled(lambda: metric(base, "ctk:pins_created_total"), 1) >= 1
    assert metric(base, "ctk:pinned_blocks") > 0
    msgs += [
        {"role": "assistant", "content": first["choices"][0]["message"]["content"]},
        {"role": "user", "content": "observation: " + long_text(rng, 30)},
    ]
    time.sleep(0.3)  # the "tool" runs
    second = chat(served, "S1", msgs, tool=LONG_TTL_KEY, last_turn=True)
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    block = served_block_size(base)  # the platform's (CPU 128, CUDA 16) or CTK_TEST_BLOCK_SIZE's
    assert cached >= (first["usage"]["prompt_tokens"] // block - 1) * block
    assert settled(lambda: metric(base, "ctk:pin_hits_total"), 1) >= 1
    assert metric(base, "ctk:tool_duration_seconds_count") >= 1
    assert metric(base, "ctk:tool_duration_seconds_sum") >= 0.3
    assert metric(base, "ctk:ttl_seconds_count") >= 1


def test_idle_engine_releases_expired_pins(served):
    base = served["base"]
    rng = random.Random(12)
    expired = metric(base, "ctk:pin_expirations_total")
    created = metric(base, "ctk:pins_created_total")
    chat(served, "S2", [{"role": "user", "content": long_text(rng)}], tool=SHORTEST_TTL_KEY)
    # (the pin, of 1 s, may be gone by the flush that shows it: its creation is what is checked)
    assert settled(lambda: metric(base, "ctk:pins_created_total"), created + 1) == created + 1
    time.sleep(TEST_TTLS[SHORTEST_TTL_KEY] + 1.5)  # no request reaches the engine meanwhile
    assert settled(lambda: metric(base, "ctk:pin_expirations_total"), expired + 1) == expired + 1
    assert metric(base, "ctk:pinned_blocks") == 0
    assert metric(base, "ctk:pin_releases_total", reason="expired") >= 1


def test_garbage_metadata_is_ignored(served):
    out = chat(
        served,
        "S3",
        [{"role": "user", "content": "hi"}],
        turn_index="abc",
        last_turn="maybe",
        tool=["ls"],
        tool_duration_s="soon",
        program_id=["a", 1],
    )
    assert out["choices"][0]["message"]["content"] is not None
    assert httpx.get(served["base"] + "/v1/models", timeout=10).status_code == 200


def test_the_server_log_names_the_scheduler_class_and_its_settings(served):
    """The engine core's ctk lines reach the server's log in vLLM's format (vLLM configures only its own
    logger: without ``follow_vllm_logging`` they were dropped), naming the class that matches the mode."""
    from ctk.engine_patch.scheduler import class_in_log, scheduler_class

    log = Path(served["proc"].log_path).read_text(errors="replace")
    found = class_in_log(log)
    assert found is not None, log[-2000:]
    name, is_async = found
    assert name == scheduler_class(is_async).__name__
    assert re.search(r"\(EngineCore pid=\d+\) INFO .* ctk scheduler: policy=ttl ", log), log[-2000:]
    # the engine core process parses each request's hints in its input thread, off the scheduler's step
    from ctk.engine_patch.vllm_door import AHEAD_LINE

    assert AHEAD_LINE in log, log[-2000:]


def test_recorded_tool_durations_land_in_the_trace_store(served):
    """Runs last: stops the server (the engine process owns the DuckDB file while it runs)."""
    from ctk.engine_patch.serve.server import _group_alive, stop_server
    from ctk.store import TraceStore

    proc = served["proc"]
    assert proc.poll() is None  # it served every test before this one
    stop_server(proc)
    assert proc.poll() is not None and not _group_alive(proc.pid)  # nothing the server started is left
    log = Path(served["proc"].log_path).read_text(errors="replace")
    # SIGTERM drains (ctk serve's --shutdown-timeout): no leaked-semaphore warning, no dead-engine traceback
    # (vLLM 0.32 logs one in some stops unless ctk.engine_patch.clean_stop is installed), and the engine
    # core's teardown ends within the timeout instead of being killed
    assert "leaked semaphore" not in log and "EngineDeadError" not in log
    assert "force killing" not in log
    with TraceStore(served["record"], read_only=True) as store:
        calls = store.tool_calls()
        runs = store.table("runs")
    row = calls[calls["program_id"] == "S1"].iloc[0]
    assert row["source"] == "serve" and row["command_or_args"] == LONG_TTL_KEY
    assert row["duration_s"] >= 0.3 and row["provenance"] == "serve:finish_to_next_arrival"
    assert list(runs["kind"]) == ["serve"]
