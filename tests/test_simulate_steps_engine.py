"""The step measurement against the real CPU engine (``ctk serve``, policy vllm): decode steps of a batch
and a prefill step next to decodes come out as the simulator's step model needs them."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    from ctk.engine_patch.serve.server import free_port, launch_server, stop_server, wait_ready
    from ctk.measure.presets import bench_config

    cfg = bench_config()
    port = free_port()
    log = tmp_path_factory.mktemp("steps") / "server.log"
    proc = launch_server(tiny_model_dir, port, "vllm", extra_args=tuple(cfg.server.args(4096)), log_path=log)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, timeout=240, proc=proc)
        yield base
    finally:
        stop_server(proc)


def test_measure_steps_times_decode_batches_and_mixed_prefill(server):
    from ctk.simulate.steps import OUTPUT_TOKENS, measure_steps

    points = measure_steps(
        server,
        decode_points=((256, 1), (256, 4)),
        prefill_points=((1024, 0, 0, 0), (1024, 0, 2, 512)),
        repeats=2,
        seed=1,
    )
    by_kind = {(p.kind, p.n_decode): p for p in points}
    assert set(by_kind) == {("decode", 1), ("decode", 4), ("prefill", 0), ("mixed", 2)}
    one, four = by_kind["decode", 1], by_kind["decode", 4]
    assert 0 < one.step_s < 0.05 and four.decode_ctx == 4 * (256 + OUTPUT_TOKENS // 2)
    assert four.step_s < 4 * one.step_s  # a batch shares the step's fixed cost
    prefill, mixed = by_kind["prefill", 0], by_kind["mixed", 2]
    assert prefill.prefill_tokens == 1024 and prefill.prefill_attn == 1024 * 512
    assert prefill.step_s > one.step_s  # 1024 prompt tokens cost more than one decode token
    assert mixed.prefill_tokens == 1024 and mixed.decode_ctx == 2 * (512 + OUTPUT_TOKENS // 2)
