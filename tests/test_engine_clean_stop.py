"""A deliberate stop of vLLM's async engine (as ``ctk serve`` runs it) logs no dead-engine error.

vLLM 0.32's ``AsyncLLM.shutdown`` stops the engine core before it cancels the output handler; the handler
logs an ``EngineDeadError`` when it sees the reader's shutdown pill first (a thread race,
vllm-project/vllm#48745; :mod:`ctk.engine_patch.clean_stop`). The engine test forces that losing order
instead of waiting for it: the handler's cancellation is held back until the handler has ended.
"""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest
from engine_fixtures import KV_BYTES


def test_the_patched_vllm_names_exist():
    from ctk.engine_patch.clean_stop import STOP_INTERNALS, check_vllm_contract

    assert check_vllm_contract(STOP_INTERNALS) == []


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage() + (record.exc_text or repr(record.exc_info)))


@pytest.mark.engine
def test_stop_that_loses_vllms_race_ends_the_output_handler_quietly(tiny_model_dir, monkeypatch):
    import vllm.v1.engine.async_llm as async_llm_mod
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.core_client import AsyncMPClient

    from ctk.engine_patch import clean_stop

    monkeypatch.setattr(AsyncLLM, "shutdown", AsyncLLM.shutdown)  # restored after the test
    monkeypatch.setattr(AsyncMPClient, "get_output_async", AsyncMPClient.get_output_async)
    assert clean_stop.install()

    handler_ended = threading.Event()
    cancel = async_llm_mod.cancel_task_threadsafe

    def cancel_late(task):  # vLLM's losing order: the handler's cancellation arrives after it ended
        handler_ended.wait(20)
        cancel(task)

    monkeypatch.setattr(async_llm_mod, "cancel_task_threadsafe", cancel_late)
    records = _Records()
    vllm_logger = logging.getLogger("vllm.v1.engine.async_llm")
    vllm_logger.addHandler(records)

    async def serve_then_stop():
        args = AsyncEngineArgs(
            model=str(tiny_model_dir),
            enforce_eager=True,
            kv_cache_memory_bytes=KV_BYTES,
            max_model_len=1024,
            max_num_seqs=2,
            shutdown_timeout=30,
        )
        llm = AsyncLLM.from_engine_args(args)
        sp = SamplingParams(max_tokens=4, ignore_eos=True)
        async for out in llm.generate({"prompt_token_ids": [11, 12, 13, 14]}, sp, request_id="r1"):
            last = out
        assert last.finished
        handler = llm.output_handler
        handler.add_done_callback(lambda _: handler_ended.set())
        # the API server runs shutdown in an executor thread while its event loop keeps running
        await asyncio.get_running_loop().run_in_executor(None, lambda: llm.shutdown(timeout=30))
        await asyncio.wait([handler], timeout=20)
        return handler

    try:
        handler = asyncio.run(serve_then_stop())
    finally:
        vllm_logger.removeHandler(records)
    assert handler_ended.is_set()
    assert handler.cancelled(), "the output handler ended on its own: it saw the shutdown pill as a crash"
    assert not [m for m in records.messages if "EngineDeadError" in m or "output_handler failed" in m]
