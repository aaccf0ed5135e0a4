"""ctk's log lines in vLLM's processes go where vLLM's go, at vLLM's level, in vLLM's format.

vLLM configures only its own ``vllm`` logger (a stream handler at ``VLLM_LOGGING_LEVEL``); ctk's engine-side
logger (``ctk.engine_patch``, every module that runs inside vLLM logs to it) has no handler, so Python's
last-resort handler drops its INFO lines (the scheduler's start-up line, the class it picked) and prints its
warnings bare. :func:`follow_vllm_logging` gives it vLLM's handlers and level, once, in a process that
imported vLLM. It still propagates (a root handler the user or pytest installed sees its records too). With
``VLLM_CONFIGURE_LOGGING=0`` vLLM's logger has no handler and nothing changes (the user configures logging);
a logger that already has a handler is left alone.
"""

from __future__ import annotations

import logging

#: The logger of every ctk module that runs inside vLLM's processes.
ENGINE_LOGGER = "ctk.engine_patch"


def follow_vllm_logging() -> bool:
    """Route ``ctk.engine_patch``'s records through vLLM's handlers; True when it does (now or before)."""
    ours, vllm = logging.getLogger(ENGINE_LOGGER), logging.getLogger("vllm")
    if ours.handlers:
        return any(h in vllm.handlers for h in ours.handlers)
    if not vllm.handlers:
        return False
    for handler in vllm.handlers:
        ours.addHandler(handler)
    ours.setLevel(vllm.level)
    return True
