"""A deliberate stop of ``ctk serve`` ends without vLLM's spurious dead-engine traceback.

vLLM 0.32's ``AsyncLLM.shutdown`` (run by the API server on SIGTERM / SIGINT, in an executor thread) first
stops the engine core, which cancels the client task reading the engine's output socket, and only then
cancels the ``output_handler`` task. The cancelled reader queues an ``EngineDeadError`` for whoever waits on
the engine's outputs; when the event loop hands it to the output handler before the handler's own
cancellation arrives from the other thread, the handler logs "AsyncLLM output_handler failed" with an
``EngineDeadError`` traceback although the drain was clean. A thread race, so it shows in some stops only
(vllm-project/vllm#48745, open; the fix proposed there, #49000, is not in 0.32).

:func:`install` (called by the ``ctk serve`` process before vLLM's API server starts) marks the engine
client as the first step of ``AsyncLLM.shutdown``, before any teardown, and turns an ``EngineDeadError``
that reaches the output handler after the mark into the cancellation ``shutdown`` is about to deliver
anyway: the end the handler has when the race goes the other way. An engine that dies while no stop was
asked for still raises ``EngineDeadError`` as before; one that dies during a stop is reported by the engine
core's own traceback. The vLLM names used are listed in :data:`STOP_INTERNALS` and checked with the door's
contract check; without them nothing is patched (a warning says so).
"""

from __future__ import annotations

import asyncio
import functools
import logging

from ctk.engine_patch.logs import follow_vllm_logging
from ctk.engine_patch.vllm_door import Internal, check_vllm_contract

logger = logging.getLogger("ctk.engine_patch")

_ASYNC_LLM = "vllm.v1.engine.async_llm:AsyncLLM"
_CLIENT = "vllm.v1.engine.core_client:AsyncMPClient"
#: Set on the engine client when a deliberate shutdown begins.
STOPPING = "_ctk_stopping"

#: The vLLM names :func:`install` relies on.
STOP_INTERNALS: tuple[Internal, ...] = (
    Internal(_ASYNC_LLM, "shutdown", "hook", "marks the engine client before any teardown"),
    Internal(_ASYNC_LLM, "engine_core", "attribute", "the client the output handler reads from"),
    Internal(_CLIENT, "get_output_async", "hook", "the output handler's read: EngineDeadError after a stop"),
)


def install() -> bool:
    """Patch vLLM's async engine client for quiet deliberate stops; True if patched (now or before)."""
    from vllm.v1.engine.async_llm import AsyncLLM

    follow_vllm_logging()  # the warning below, in vLLM's format
    if getattr(AsyncLLM.shutdown, STOPPING, False):
        return True
    missing = check_vllm_contract(STOP_INTERNALS)
    if missing:
        why = "; ".join(missing)
        logger.warning("ctk serve: a stop may log a spurious EngineDeadError (vLLM lacks %s)", why)
        return False
    from vllm.v1.engine.core_client import AsyncMPClient

    AsyncLLM.shutdown = _marking_shutdown(AsyncLLM.shutdown)
    AsyncMPClient.get_output_async = _quiet_after_stop(AsyncMPClient.get_output_async)
    return True


def _marking_shutdown(shutdown):
    @functools.wraps(shutdown)
    def marked(self, *args, **kwargs):
        if (client := getattr(self, "engine_core", None)) is not None:
            setattr(client, STOPPING, True)
        return shutdown(self, *args, **kwargs)

    setattr(marked, STOPPING, True)
    return marked


def _quiet_after_stop(get_output_async):
    from vllm.v1.engine.exceptions import EngineDeadError

    @functools.wraps(get_output_async)
    async def get_output(self):
        try:
            return await get_output_async(self)
        except EngineDeadError:
            if getattr(self, STOPPING, False):
                raise asyncio.CancelledError("engine client shut down") from None
            raise

    return get_output
