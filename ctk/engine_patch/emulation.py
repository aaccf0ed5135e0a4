"""vLLM 0.32's engine-core loop without a model: a real scheduler (ctk's or vLLM's) driven the way the engine
core drives it, with made-up model outputs (one sampled token per request and step, none for a prefill chunk).

What only a GPU runs can be exercised on a CPU this way: async scheduling's two batches in flight
(``EngineCore.step_with_batch_queue``), KV layouts of EAGLE/MTP and sliding-window models, GPU block sizes and
batch sizes (tests, ``bench/sched_overhead.py --scale``). The scheduler, KV-cache manager, block pool and
requests are vLLM's own; only the model executor is replaced. Not for serving.
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field


def engine_config(base, *, async_scheduling: bool, ctk: dict | None = None, **scheduler_fields):
    """A copy of the ``VllmConfig`` ``base`` with its scheduler config copied and changed (async scheduling,
    ``max_num_seqs``, ``max_num_batched_tokens``, ...) and, when given, ``additional_config["ctk"]`` set to
    ``ctk``; ``base`` is left as it is."""
    cfg = copy.copy(base)
    if ctk is not None:
        object.__setattr__(cfg, "additional_config", {**(base.additional_config or {}), "ctk": ctk})
    sc = copy.copy(base.scheduler_config)
    object.__setattr__(sc, "async_scheduling", async_scheduling)
    for name, value in scheduler_fields.items():
        object.__setattr__(sc, name, value)
    object.__setattr__(cfg, "scheduler_config", sc)
    return cfg


def kv_layout(
    num_blocks: int, block_size: int = 16, *, eagle: bool = False, sliding_window: int | None = None
):
    """A ``KVCacheConfig`` of ``num_blocks`` blocks: one full-attention group (an EAGLE/MTP group when
    ``eagle``: vLLM drops the last block of its hits), plus a sliding-window group when ``sliding_window``."""
    import torch
    from vllm.v1.kv_cache_interface import (
        FullAttentionSpec,
        KVCacheConfig,
        KVCacheGroupSpec,
        SlidingWindowSpec,
    )

    shape = {"block_size": block_size, "num_kv_heads": 1, "head_size": 64, "dtype": torch.bfloat16}
    groups = [KVCacheGroupSpec(["full"], FullAttentionSpec(**shape), is_eagle_group=eagle)]
    if sliding_window is not None:
        groups.append(KVCacheGroupSpec(["swa"], SlidingWindowSpec(**shape, sliding_window=sliding_window)))
    return KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=groups)


def build_scheduler(cls, vllm_config, kv_cache_config, block_size: int):
    """``cls`` (a scheduler class, or ctk's ``matching_scheduler``) built as the engine core builds it."""
    from vllm.v1.structured_output import StructuredOutputManager

    if vllm_config.cache_config.num_gpu_blocks is None:  # a fresh config: the engine sets it after profiling
        vllm_config = copy.copy(vllm_config)
        cache = copy.copy(vllm_config.cache_config)
        object.__setattr__(cache, "num_gpu_blocks", kv_cache_config.num_blocks)
        object.__setattr__(vllm_config, "cache_config", cache)
    return cls(
        vllm_config=vllm_config,
        kv_cache_config=kv_cache_config,
        structured_output_manager=StructuredOutputManager(vllm_config),
        block_size=block_size,
        hash_block_size=block_size,
    )


class RequestMaker:
    """vLLM ``Request`` objects hashed for the prefix cache at ``block_size`` (as the engine core hashes)."""

    def __init__(self, vllm_config, block_size: int):
        from vllm.utils.hashing import get_hash_fn_by_name
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash

        hash_fn = get_hash_fn_by_name(vllm_config.cache_config.prefix_caching_hash_algo)
        init_none_hash(hash_fn)
        self._hasher = get_request_block_hasher(block_size, hash_fn)

    def __call__(
        self,
        request_id: str,
        prompt: list[int],
        max_tokens: int,
        *,
        extra_args=None,
        session_id: str | None = None,
        stop: list[str] | None = None,
    ):
        from vllm import SamplingParams
        from vllm.v1.request import Request

        sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True, extra_args=extra_args, stop=stop)
        request = Request(request_id, prompt, sp, None, block_hasher=self._hasher)
        if session_id is not None:
            request.session_id = session_id
        return request


@dataclass
class LoopStats:
    schedule_calls: int = 0
    empty_schedules: int = 0  # schedule() calls that scheduled no token
    steps: int = 0  # model outputs fed back
    admitted: int = 0  # requests scheduled for the first time (vLLM's scheduled_new_reqs)
    finished: list[str] = field(default_factory=list)


class EngineLoop:
    """``EngineCore.step`` (``batches_in_flight`` 1) or ``step_with_batch_queue`` (2: async scheduling) with
    a model that samples ``token`` for every request whose prefill is complete."""

    def __init__(self, scheduler, batches_in_flight: int = 1, token: int = 7):
        self.sched = scheduler
        self.depth = batches_in_flight
        self.token = token
        self.queue: deque = deque()
        self.stats = LoopStats()

    def _model_output(self, out):
        from vllm.v1.outputs import ModelRunnerOutput

        ids = list(out.num_scheduled_tokens)
        requests = self.sched.requests
        sampled = [[] if requests[r].is_prefill_chunk else [self.token] for r in ids]
        return ModelRunnerOutput(
            req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)}, sampled_token_ids=sampled
        )

    def _update(self, out, model_output) -> None:
        outputs = self.sched.update_from_output(out, model_output)
        self.stats.steps += 1
        for eco in outputs.values():
            self.stats.finished += [o.request_id for o in eco.outputs if o.finish_reason is not None]

    def step(self) -> None:
        """One engine-core step (schedule, and feed back the oldest batch once the queue is full)."""
        sched, queue = self.sched, self.queue
        if sched.has_requests():
            out = sched.schedule()
            self.stats.schedule_calls += 1
            self.stats.admitted += len(out.scheduled_new_reqs)
            executed = out.total_num_scheduled_tokens > 0
            self.stats.empty_schedules += not executed
            queue.appendleft((out, self._model_output(out)))
            if len(queue) < self.depth and (executed or sched.has_requests()):
                return
        if queue:
            self._update(*queue.pop())

    def run(self, max_steps: int = 100_000) -> LoopStats:
        """Step until no request is left and no batch is in flight."""
        for _ in range(max_steps):
            if not (self.sched.has_requests() or self.queue):
                break
            self.step()
        return self.stats

    def add(self, requests: Iterable) -> None:
        for r in requests:
            self.sched.add_request(r)
