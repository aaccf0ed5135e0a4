"""Fixtures of the measure part's tests: a store of the bundled real traces, a live tiny-model server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: Source A of the bundled sample: mini-swe-agent runs with several turns per program.
MSWEA_SOURCE = "tbench1_leaderboard_mini-swe-agent-v1_claude-sonnet-4"


@pytest.fixture(scope="session")
def sample_store(tmp_path_factory) -> Path:
    """A trace store of the bundled sample of real agent traces (imported as ``ctk import`` does)."""
    from ctk.datasets.importer import import_paths
    from ctk.datasets.samples import sample_traces_dir
    from ctk.store import TraceStore

    path = tmp_path_factory.mktemp("measure-store") / "traces.duckdb"
    with TraceStore(path) as store:
        import_paths(store, [sample_traces_dir() / "tool_calls.csv.gz"])
    return path


@pytest.fixture(scope="session")
def measure_model_dir(tmp_path_factory) -> Path:
    from ctk.engine_patch.serve.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("measure-tiny") / "model")


@pytest.fixture(scope="session")
def live_server(measure_model_dir, tmp_path_factory):
    """A stock-policy ``ctk serve`` on the tiny model with a small KV cache (one start per session)."""
    from ctk.engine_patch.serve.server import free_port, launch_server, stop_server, wait_ready
    from ctk.measure.compare import ServerConfig

    port = free_port()
    log = tmp_path_factory.mktemp("measure-server") / "server.log"
    from engine_fixtures import TEST_BLOCK_SIZE

    args = ServerConfig(
        kv_cache_bytes=16 * 2**20, max_num_seqs=8, max_model_len=4096, block_size=TEST_BLOCK_SIZE
    ).args()
    proc = launch_server(measure_model_dir, port, "vllm", extra_args=args, log_path=log)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base_url, 300, proc)
        yield base_url
    finally:
        stop_server(proc)
