"""A fresh ``ctk serve --policy ttl`` (no wait measured yet): a flood of new programs during a 50 ms tool call
must not take the returning program's pin (issue 22). Behind the router: test_engine_replicas."""

from __future__ import annotations

import pytest
from engine_fixtures import FLOOD_PROGRAMS, KV_BYTES, block_size_args, flood_during_tool, pin_releases

pytestmark = pytest.mark.engine


@pytest.fixture
def fresh_server(tiny_model_dir, ttl_model_file):
    from ctk.engine_patch.serve.server import free_port, launch_server, stop_server, wait_ready

    port = free_port()
    proc = launch_server(
        tiny_model_dir,
        port,
        "ttl",
        ttl_model_file,
        extra_args=["--kv-cache-memory-bytes", str(KV_BYTES), "--max-model-len", "4096"]
        + ["--max-num-seqs", "8", *block_size_args()],  # memory, not run slots, keeps the flood out
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, timeout=240, proc=proc)
        yield base
    finally:
        stop_server(proc)


def test_a_flood_of_new_programs_on_a_fresh_server_leaves_a_short_tool_calls_pin(fresh_server):
    cached = flood_during_tool(fresh_server, "cold")
    print(f"cached share of turn 1's prompt after a flood of {FLOOD_PROGRAMS} new programs:", cached)
    assert all(v >= 0.9 for v in cached.values()), (cached, pin_releases(fresh_server))
