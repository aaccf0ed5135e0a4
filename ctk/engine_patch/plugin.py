"""``vllm.general_plugins`` entry point ``ctk_scheduler = "ctk.engine_patch.plugin:register"``.

vLLM calls :func:`register` in every process it starts (API server, engine core) before the scheduler
class is read. Installed ctk therefore must do nothing unless asked: only when ``CTK_POLICY`` is set to a
policy other than ``vllm`` does it make vLLM choose the ctk scheduler (``CTKAsyncScheduler`` when async
scheduling is on, ``CTKScheduler`` otherwise) for configurations that did not choose a scheduler class
themselves (:func:`ctk.engine_patch.vllm_door.route_default_scheduler`). So a plain ``vllm serve`` is
untouched, and ``CTK_POLICY=ttl CTK_TTL_MODEL=model.pkl vllm serve ...`` serves with ctk. ``ctk serve``
passes ``--scheduler-cls`` explicitly and does not depend on this.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("ctk.engine_patch")
_PATCHED = False


def _ctk_scheduler_cls(async_scheduling: bool):
    from ctk.engine_patch import scheduler

    return scheduler.CTKAsyncScheduler if async_scheduling else scheduler.CTKScheduler


def register() -> None:
    global _PATCHED
    policy = os.environ.get("CTK_POLICY", "").strip()
    if not policy or _PATCHED:
        return
    from ctk.policy.rules import RULES

    rule = RULES.get(policy)  # an unknown name is ctk's too: the scheduler reports it
    if rule is not None and not rule.needs_ctk_scheduler:
        return
    from ctk.engine_patch.vllm_door import route_default_scheduler

    try:
        route_default_scheduler(_ctk_scheduler_cls)
    except ImportError as exc:  # not the supported vLLM: leave it alone, loudly
        logger.warning("ctk plugin: cannot hook the scheduler (%s); CTK_POLICY=%s ignored", exc, policy)
        return
    _PATCHED = True
