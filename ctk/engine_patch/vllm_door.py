"""The one door to vLLM 0.32.0 internals: :class:`VllmDoor`, the :class:`~ctk.policy.driver.EngineView`
of a vLLM ``Scheduler`` / ``AsyncScheduler``.

Every name of vLLM's that ctk relies on and that vLLM does not promise to keep (private methods, instance
attributes of the scheduler and the KV-cache manager, request fields, the engine core's input queue) is used
in this module only, and listed in :data:`VLLM_INTERNALS`. :func:`check_vllm_contract` checks exactly that
list against the installed vLLM (the contract test runs it; the scheduler runs it at construction), so
another vLLM version fails loudly, naming what is missing, instead of misbehaving. One exception lives apart
because it runs in the API-server process, not the engine core: the quiet-stop patch of ``ctk serve``
(:mod:`ctk.engine_patch.clean_stop`, its names in ``STOP_INTERNALS``, checked by the same function).

The seams used, and why:

- **Waiting order**: vLLM's own seam, a ``RequestQueue`` subclass. ``Scheduler.__init__`` builds
  ``self.waiting`` with ``create_request_queue`` (no injection point), so the door replaces the (still
  empty) ``FCFSRequestQueue``: by :class:`KeyedRequestQueue` while the policy's order has no age bound
  (ttl's default: the queue holds its requests in the order by their keys, fixed while they wait), else by
  :class:`ProgramOrderQueue`, an ``FCFSRequestQueue`` the driver re-orders in place each step
  (``EngineView.keep_waiting_order`` switches between them). vLLM only ever calls the ``RequestQueue`` API
  on either. With ``--scheduling-policy priority`` the priority queue is kept and ctk does not re-order.
- **Pressure valve**: ``kv_cache_manager.allocate_slots`` is wrapped on the instance, only for a step in
  which pins are held and an allocation can fail (fewer free blocks than the step could ask for: its token
  budget plus two blocks and the lookahead per run slot, per KV-cache group; the class method otherwise:
  zero cost, where a wrapper would add a Python frame to each of up to 1,024 calls a step): vLLM calls it
  right before it would preempt a running request or refuse a waiting one, which is when a pin must go
  first. vLLM 0.32 has no other point that sees a failed allocation before the preemption.
- **Holding a finished request's blocks**: ``Scheduler._free_blocks`` (the mixin's hook) is the single
  place vLLM frees a finished request; to hold, the door removes the request from ``Scheduler.requests``
  without freeing; ``Scheduler._free_request_blocks`` frees it later.
- **Idle wake-up**: an idle engine-core process blocks on ``EngineCoreProc.input_queue``; vLLM itself wakes
  it by putting ``EngineCoreRequestType.WAKEUP`` there (its signal handler does). The scheduler is handed
  no reference to its engine, and no registry or callback exposes one in 0.32 (``_idle_state_callbacks``
  needs the engine to register on), so the door finds the ``EngineCoreProc`` being constructed on the call
  stack (``EngineCoreProc.__init__`` creates ``input_queue`` before ``EngineCore.__init__`` builds the
  scheduler; checked by the contract). In-process engines (``vllm.LLM`` without multiprocessing) have no
  such loop and need no wake-up.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import itertools
import logging
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from operator import attrgetter, itemgetter

from ctk.errors import CtkError
from ctk.policy.config import ConfigError
from ctk.policy.detect import CALL_CHARS, detect_tool_call
from ctk.policy.driver import RequestEnd, head_demand
from ctk.policy.hints import RequestHints, parse_hints, prefix_agent
from ctk.policy.keyed_queue import KeyedQueue

logger = logging.getLogger("ctk.engine_patch")

SUPPORTED_VLLM = "0.32.0"
#: Output tokens decoded for tool-call detection (a tool call ends the turn): at most
#: :data:`DETECT_TAIL_TOKENS`, first the last :data:`DETECT_FIRST_TOKENS`, four times more only while the tail
#: ends a tool call whose start it does not hold (see :meth:`VllmDoor.text_of`).
DETECT_TAIL_TOKENS = 2048
DETECT_FIRST_TOKENS = 256
#: A tail holding one of these but no tool call may have cut the call's start off: decode a longer one.
_CALL_END_MARKERS = ("```", "</tool_call>", '"name"')
#: Output tokens decoded to find a stop string in an aborted request's output (the front end aborts right
#: after it, at most a few steps later), beyond the stop string's own length in characters.
STOP_TAIL_TOKENS = 64

_SCHED = "vllm.v1.core.sched.scheduler:Scheduler"
_KV = "vllm.v1.core.kv_cache_manager:KVCacheManager"
_REQ = "vllm.v1.request:Request"
_STATUS = "vllm.v1.request:RequestStatus"
_QUEUE = "vllm.v1.core.sched.request_queue:FCFSRequestQueue"
_BASE_QUEUE = "vllm.v1.core.sched.request_queue:RequestQueue"
_COORD = "vllm.v1.core.kv_cache_coordinator:KVCacheCoordinator"
_TYPE_MGR = "vllm.v1.core.single_type_kv_cache_manager:SingleTypeKVCacheManager"
_BLOCK = "vllm.v1.core.kv_cache_utils:KVCacheBlock"


@dataclass(frozen=True)
class Internal:
    """One vLLM name the door relies on. ``kind``: ``hook`` (a method the mixin overrides), ``override`` (a
    method :class:`ProgramOrderQueue` overrides or :class:`KeyedRequestQueue` implements), ``method``,
    ``attribute`` (class attribute, property, dataclass field or ``self.<name>`` set in ``__init__``),
    ``member`` (enum member), ``param`` (constructor parameter), ``base`` (``owner`` subclasses ``name``),
    ``before-super`` (``owner``'s ``__init__`` sets ``self.<name>`` before calling ``super().__init__``)."""

    owner: str  # "module:Qualname"
    name: str
    kind: str
    use: str

    @property
    def label(self) -> str:
        return f"{self.owner.split(':')[1]}.{self.name}"


#: Every vLLM name the door (and the mixin's hooks) rely on; the contract test checks exactly this list.
VLLM_INTERNALS: tuple[Internal, ...] = (
    # hooks the mixin overrides (each calls vLLM's own implementation)
    Internal(_SCHED, "add_request", "hook", "a request arrived: hints -> core"),
    Internal(_SCHED, "schedule", "hook", "each step: expiry, waiting/running order, admissions"),
    Internal(_SCHED, "_free_blocks", "hook", "the single place a finished request's blocks are freed"),
    Internal(_SCHED, "_handle_blocked_waiting_request", "hook", "the waiting loop skips a held-back request"),
    Internal(_SCHED, "has_requests", "hook", "the idle engine loop asks it: idle expiry"),
    Internal(_SCHED, "reset_prefix_cache", "hook", "pins are released first (held blocks fail the reset)"),
    Internal(_SCHED, "shutdown", "hook", "pins released, recorder flushed"),
    Internal(
        "vllm.v1.core.sched.async_scheduler:AsyncScheduler", _SCHED.replace(":", "."), "base", "one mixin"
    ),
    # scheduler internals
    Internal(_SCHED, "_free_request_blocks", "method", "free a held request's blocks at release"),
    Internal(_SCHED, "has_unfinished_requests", "method", "busy: schedule(), not has_requests, steps"),
    Internal(_SCHED, "requests", "attribute", "a held request leaves it without its blocks being freed"),
    Internal(_SCHED, "waiting", "attribute", "replaced (empty) by ctk's queue; its length, ids"),
    Internal(_SCHED, "running", "attribute", "ordered so the preemption victim (last) is the core's"),
    Internal(_SCHED, "kv_cache_manager", "attribute", "free blocks, block ids, the valve"),
    Internal(_SCHED, "block_size", "attribute", "tokens per block"),
    Internal(_SCHED, "max_num_active_reqs", "attribute", "run slots: the waiting demand memory keeps out"),
    Internal(_SCHED, "vllm_config", "attribute", "additional_config['ctk'], the tokenizer's model config"),
    Internal(_SCHED, "waiting = create_request_queue(", "source", "self.waiting is built from the policy"),
    Internal(_QUEUE, "collections.deque", "base", "ProgramOrderQueue re-orders it with deque operations"),
    Internal(_QUEUE, "vllm.v1.core.sched.request_queue.RequestQueue", "base", "vLLM's queue seam"),
    Internal(_QUEUE, "add_request", "override", "ProgramOrderQueue: running demand sums"),
    Internal(_QUEUE, "pop_request", "override", "ProgramOrderQueue: running demand sums"),
    Internal(_QUEUE, "prepend_request", "override", "ProgramOrderQueue: running demand sums"),
    Internal(_QUEUE, "prepend_requests", "override", "ProgramOrderQueue: running demand sums"),
    Internal(_QUEUE, "remove_request", "override", "ProgramOrderQueue: sums stale"),
    Internal(_QUEUE, "remove_requests", "override", "ProgramOrderQueue: sums stale"),
    # (KeyedRequestQueue implements the rest of RequestQueue's abstract API in ctk.policy.keyed_queue: a
    # method vLLM adds to it makes the class fail to instantiate)
    Internal(_BASE_QUEUE, "add_request", "override", "KeyedRequestQueue: its tokens for the head's demand"),
    Internal(_BASE_QUEUE, "prepend_request", "override", "KeyedRequestQueue: the same"),
    Internal(_SCHED, "_request_blocks_can_be_freed", "method", "valve: a deferred free will not help"),
    # KV cache
    Internal(_KV, "allocate_slots", "method", "wrapped on the instance while pins are held: the valve"),
    Internal(_SCHED, "num_lookahead_tokens", "attribute", "valve: the most blocks a step can ask for"),
    Internal("vllm.config.scheduler:SchedulerConfig", "max_num_batched_tokens", "attribute", "the same"),
    Internal(_KV, "coordinator", "attribute", "its single-type managers: blocks a finished request holds"),
    Internal(_COORD, "single_type_managers", "attribute", "one manager per KV-cache group"),
    Internal(_COORD, "find_longest_cache_hit", "method", "what a next turn reuses (EAGLE, sliding window)"),
    Internal(
        "vllm.v1.core.kv_cache_coordinator:UnitaryKVCacheCoordinator",
        _COORD.replace(":", "."),
        "base",
        "one KV-cache group: the full-block rule is exact without EAGLE",
    ),
    Internal(_TYPE_MGR, "req_to_blocks", "attribute", "request id -> blocks (counted, not copied)"),
    Internal(_TYPE_MGR, "use_eagle", "attribute", "EAGLE/MTP drops the last block of a hit"),
    Internal(
        "vllm.v1.core.single_type_kv_cache_manager:FullAttentionManager",
        _TYPE_MGR.replace(":", "."),
        "base",
        "the one manager that never pads its block lists with the null block",
    ),
    Internal("vllm.v1.core.kv_cache_utils:KVCacheBlock", "ref_cnt", "attribute", "shared blocks a pin skips"),
    Internal(_BLOCK, "is_null", "attribute", "padding a pin does not hold"),
    Internal(_KV, "block_pool", "attribute", "free-block count, pool size"),
    Internal("vllm.v1.core.block_pool:BlockPool", "get_num_free_blocks", "method", "free + evictable"),
    Internal("vllm.v1.core.block_pool:BlockPool", "num_gpu_blocks", "attribute", "pool size (+1 null)"),
    # requests and scheduler output
    Internal(_REQ, "request_id", "attribute", "ids"),
    Internal(_REQ, "status", "attribute", "running (valve) / how it finished"),
    Internal(_REQ, "session_id", "param", "program identity (X-Session-ID)"),
    Internal(_REQ, "sampling_params", "attribute", "extra_args = vllm_xargs hints"),
    Internal("vllm.sampling_params:SamplingParams", "extra_args", "attribute", "vllm_xargs hints"),
    Internal(_REQ, "num_prompt_tokens", "attribute", "finish record"),
    Internal(_REQ, "num_tokens", "attribute", "finish record; waiting demand"),
    Internal(_REQ, "num_output_tokens", "attribute", "finish record"),
    Internal(_REQ, "num_computed_tokens", "attribute", "waiting demand"),
    Internal(_REQ, "_all_token_ids", "attribute", "num_tokens without its property frame"),
    Internal(_REQ, "_output_token_ids", "attribute", "num_output_tokens without its property frame"),
    Internal(_REQ, "output_token_ids", "attribute", "tool-call detection (decoded tail)"),
    Internal(_REQ, "block_hashes", "attribute", "what a next turn reuses; a prompt prefix's agent class"),
    Internal(_SCHED, "hash_block_size", "attribute", "tokens per block hash (the agent prefix's unit)"),
    Internal("vllm.config.cache:CacheConfig", "enable_prefix_caching", "attribute", "no hashes: no class"),
    Internal("vllm.sampling_params:SamplingParams", "stop", "attribute", "stop-string finish seen as abort"),
    Internal(_STATUS, "RUNNING", "member", "valve: preempting vs admitting"),
    Internal(_STATUS, "FINISHED_STOPPED", "member", "natural finish"),
    Internal(_STATUS, "FINISHED_LENGTH_CAPPED", "member", "natural finish"),
    Internal(_STATUS, "FINISHED_ABORTED", "member", "abort"),
    Internal("vllm.v1.core.sched.output:SchedulerOutput", "scheduled_new_reqs", "attribute", "admissions"),
    Internal("vllm.v1.core.sched.output:NewRequestData", "req_id", "attribute", "admissions"),
    Internal("vllm.v1.core.sched.output:NewRequestData", "num_computed_tokens", "attribute", "prefix hit"),
    # idle wake-up
    Internal("vllm.v1.engine.core:EngineCoreProc", "input_queue", "before-super", "idle wake-up"),
    # hints parsed in vLLM's input thread (wrapped on the engine core instance)
    Internal("vllm.v1.engine.core:EngineCore", "preprocess_add_request", "method", "hints parsed ahead"),
    Internal("vllm.v1.engine:EngineCoreRequestType", "WAKEUP", "member", "idle wake-up message"),
    # tokenizer (tool-call detection when the client gives no 'tool' hint)
    Internal("vllm.tokenizers.registry:cached_tokenizer_from_config", "model_config", "param", "decode"),
    # plugin entry point (ctk.engine_patch.plugin)
    Internal("vllm.config.scheduler:SchedulerConfig", "get_scheduler_cls", "method", "plugin hook"),
    Internal("vllm.config.scheduler:SchedulerConfig", "scheduler_cls", "attribute", "plugin"),
    Internal("vllm.config.scheduler:SchedulerConfig", "async_scheduling", "attribute", "plugin"),
)


@dataclass(frozen=True)
class Premise:
    """An assumption about what vLLM *does* that ctk relies on, beyond the names it has (``statement``);
    the check reads ``owner``'s source (``module:Qual.name``, or ``module:`` for the whole module), which must
    contain every text of ``contains``, none of ``absent``, and each text of ``counts`` that many times."""

    statement: str
    owner: str
    contains: tuple[str, ...] = ()
    absent: tuple[str, ...] = ()
    counts: tuple[tuple[str, int], ...] = ()

    def holds(self) -> bool:
        module, qual = self.owner.split(":")
        src = inspect.getsource(_resolve(self.owner) if qual else importlib.import_module(module))
        return (
            all(t in src for t in self.contains)
            and not any(t in src for t in self.absent)
            and all(src.count(t) == n for t, n in self.counts)
        )


_SCHED_MODULE = "vllm.v1.core.sched.scheduler:"

#: What ctk assumes vLLM 0.32 does; the contract test (and the scheduler, at construction) checks each one.
VLLM_PREMISES: tuple[Premise, ...] = (
    Premise(
        "Scheduler._free_blocks is the single free point of a finished request: _free_request_blocks is "
        "called only there and on a preemption, and _free_blocks from _free_request and the KV connector's "
        "delayed frees only (so skipping it holds the blocks, and nothing else frees them behind the pin)",
        _SCHED_MODULE,
        counts=(("self._free_request_blocks(", 2), ("self._free_blocks(", 3)),
    ),
    Premise(
        "Request.num_tokens is len(self._all_token_ids) (ProgramOrderQueue sums the waiting demand from it, "
        "the door reads a finished request's length from it)",
        _REQ + ".num_tokens.fget",
        contains=("return len(self._all_token_ids)",),
    ),
    Premise(
        "Request.num_output_tokens is len(self._output_token_ids) (the door reads a finished request's "
        "output length from it)",
        _REQ + ".num_output_tokens.fget",
        contains=("return len(self._output_token_ids)",),
    ),
    Premise(
        "vLLM asks allocate_slots before it preempts a running request or leaves a waiting one out, and does "
        "not preempt when the victim's free would be deferred (the valve mirrors both)",
        _SCHED + ".schedule",
        contains=(
            "self.kv_cache_manager.allocate_slots(",
            "self._request_blocks_can_be_freed(preempted_req)",
        ),
    ),
    Premise(
        "the engine core process sets each added request up in its input thread (preprocess_add_request, "
        "looked up on the instance per request), before the request reaches the scheduler",
        "vllm.v1.engine.core:EngineCoreProc.process_input_sockets",
        contains=("request = self.preprocess_add_request(req)",),
    ),
    Premise(
        "the scheduler changes the waiting queue only through the RequestQueue API (ProgramOrderQueue's "
        "demand sums follow add/pop/prepend/remove; KeyedRequestQueue implements nothing else)",
        _SCHED_MODULE,
        absent=("self.waiting.append", "self.waiting.popleft", "self.waiting.extend", "self.waiting.clear"),
    ),
    Premise(
        "the engine core ends every abort as FINISHED_ABORTED, and the front end aborts a request in the "
        "engine core when it finds a stop string (so a stop-string finish reaches _free_blocks as an abort)",
        "vllm.v1.engine.core:EngineCore.abort_requests",
        contains=("RequestStatus.FINISHED_ABORTED",),
    ),
    Premise(
        "the front end aborts a request in the engine core when it detects a stop string",
        "vllm.v1.engine.output_processor:",
        contains=("detected stop string, abort needed in EngineCore", "reqs_to_abort.append(req_id)"),
    ),
    Premise(
        "the engine core builds the scheduler by calling what get_scheduler_cls() returns with keywords "
        "(so ctk serve's matching_scheduler, a factory, can pick the class for the final async mode)",
        "vllm.v1.engine.core:EngineCore.__init__",
        contains=("Scheduler = vllm_config.scheduler_config.get_scheduler_cls()", "vllm_config=vllm_config,"),
    ),
    Premise(
        "a block returns to the free queue (and may be evicted) only when its ref_cnt drops to 0, so a held "
        "request's blocks stay cached",
        "vllm.v1.core.block_pool:BlockPool.free_blocks",
        contains=("ref_cnt -= 1", "ref_cnt == 0"),
    ),
    Premise(
        "a block hash is bytes (the door labels a prompt prefix's agent class by its hex digits)",
        "vllm.v1.core.kv_cache_utils:",
        contains=('BlockHash = NewType("BlockHash", bytes)',),
    ),
    Premise(
        "the engine core hashes a request's full blocks as it builds the request (before add_request), with "
        "prefix caching on or a KV connector, and not otherwise (no hashes: no agent class from the prefix)",
        "vllm.v1.engine.core:EngineCore.__init__",
        contains=(
            "if vllm_config.cache_config.enable_prefix_caching or kv_connector is not None:",
            "self.request_block_hasher = get_request_block_hasher(",
        ),
    ),
    Premise(
        "vLLM turns async scheduling on by default when nothing prevents it (CUDA), so ctk serve must not "
        "assume the synchronous class",
        "vllm.config.vllm:VllmConfig",
        contains=("self.scheduler_config.async_scheduling = True",),
    ),
)


class VllmContractError(CtkError, RuntimeError):
    """The installed vLLM lacks something the door relies on; the message names it."""


def _resolve(path: str):
    """``module:Qual.name`` or ``module.Name``."""
    module, qual = path.split(":") if ":" in path else path.rsplit(".", 1)
    obj = importlib.import_module(module)
    for part in qual.split("."):
        obj = getattr(obj, part)
    return obj


def _init_source(cls) -> str:
    parts = []
    for klass in inspect.getmro(cls):
        init = vars(klass).get("__init__")
        if init is not None:
            with contextlib.suppress(OSError, TypeError):
                parts.append(inspect.getsource(init))
    return "\n".join(parts)


def _has(internal: Internal, obj) -> bool:
    name, kind = internal.name, internal.kind
    if kind in ("hook", "override", "method"):
        return callable(getattr(obj, name, None))
    if kind == "member":
        return hasattr(obj, name)
    if kind == "param":
        target = obj.__init__ if inspect.isclass(obj) else obj
        return name in inspect.signature(target).parameters
    if kind == "base":
        return inspect.isclass(obj) and issubclass(obj, _resolve(name))
    if kind == "source":
        return name in _init_source(obj)
    if kind == "before-super":
        src = inspect.getsource(obj.__init__)
        at, sup = src.find(f"self.{name} ="), src.find("super().__init__(")
        return 0 <= at < sup
    # attribute
    if hasattr(obj, name) or name in getattr(obj, "__dataclass_fields__", {}):
        return True
    src = _init_source(obj)
    return f"self.{name} =" in src or f"self.{name}:" in src


def check_vllm_contract(
    internals: tuple[Internal, ...] = VLLM_INTERNALS, premises: tuple[Premise, ...] | None = None
) -> list[str]:
    """What the installed vLLM lacks of ``internals`` and ``premises`` (default: :data:`VLLM_PREMISES` with
    the door's own internals, none otherwise); empty: all there. One entry per missing name or premise."""
    if premises is None:
        premises = VLLM_PREMISES if internals is VLLM_INTERNALS else ()
    try:
        import vllm
    except ImportError as exc:
        return [f"import vllm: {exc}"]
    missing: list[str] = []
    if getattr(vllm, "__version__", None) != SUPPORTED_VLLM:
        missing.append(f"vllm version {SUPPORTED_VLLM} (installed: {getattr(vllm, '__version__', '?')})")
    for internal in internals:
        try:
            ok = _has(internal, _resolve(internal.owner))
        except (ImportError, AttributeError, OSError, TypeError, ValueError) as exc:
            ok = False
            logger.debug("contract %s: %s", internal.label, exc)
        if not ok:
            missing.append(f"{internal.label} ({internal.kind}: {internal.use})")
    for premise in premises:
        try:
            ok = premise.holds()
        except (ImportError, AttributeError, OSError, TypeError, ValueError) as exc:
            ok = False
            logger.debug("premise %s: %s", premise.owner, exc)
        if not ok:
            missing.append(f"premise: {premise.statement}")
    return missing


def require_vllm_contract() -> None:
    missing = check_vllm_contract()
    if missing:
        raise VllmContractError(
            "ctk scheduler: the installed vLLM lacks what ctk relies on: "
            + "; ".join(missing)
            + f". ctk supports vLLM {SUPPORTED_VLLM}."
        )


def check_engine_fit(async_class: bool, vllm_config) -> None:
    """Refuse, in one line (ConfigError), an engine the ctk scheduler cannot serve right: a scheduler class
    that does not match vLLM's async-scheduling mode (a sync class under async scheduling leaves many steps
    empty; an async class under the sync loop miscounts its output placeholders), or data parallelism (each
    rank would hold its own pins while vLLM's balancer ignores the program, and ``--record`` would open one
    store from every rank)."""
    if vllm_config is None:
        return
    is_async = bool(vllm_config.scheduler_config.async_scheduling)
    if is_async != async_class:
        names = ("CTKScheduler", "CTKAsyncScheduler")
        want, have = names[is_async], names[not is_async]
        raise ConfigError(
            f"ctk scheduler: {have} does not match vLLM's async scheduling ({'on' if is_async else 'off'}); "
            f"use ctk.engine_patch.scheduler.{want} or ctk.engine_patch.scheduler.matching_scheduler"
        )
    dp = vllm_config.parallel_config.data_parallel_size
    if dp > 1:
        raise ConfigError(
            f"ctk scheduler: --data-parallel-size {dp} is not supported (each rank would pin for programs "
            f"vLLM's balancer sends elsewhere); run ctk serve --replicas {dp}, which keeps a program on one "
            "replica"
        )


def find_engine_core():
    """The ``EngineCoreProc`` constructing this scheduler (it owns the input queue), or None (in-process)."""
    from vllm.v1.engine.core import EngineCoreProc

    f = sys._getframe(1)
    while f is not None:
        obj = f.f_locals.get("self")
        if isinstance(obj, EngineCoreProc) and hasattr(obj, "input_queue"):
            return obj
        f = f.f_back
    return None


def program_order_queue_class():
    """:class:`ProgramOrderQueue`, built on first use (it subclasses a vLLM class)."""
    global ProgramOrderQueue
    if ProgramOrderQueue is None:
        from vllm.v1.core.sched.request_queue import FCFSRequestQueue
        from vllm.v1.request import RequestStatus

        preempted = RequestStatus.PREEMPTED

        # A request's uncomputed tokens: ``num_tokens - num_computed_tokens``, with vLLM's ``num_tokens``
        # property read as what it returns, ``len(_all_token_ids)`` (a premise the contract checks): the sums
        # below run without a Python frame per request (the hooks run with cold caches, a frame ~1 us each).

        class _ProgramOrderQueue(FCFSRequestQueue):
            """vLLM's FCFS waiting queue that the policy can re-order in place (program FCFS), and that keeps
            the running sums of its requests' uncomputed tokens, so the demand of its head is two reads.

            ``_cum[i]`` - ``_base`` is the uncomputed tokens of the first i + 1 requests (each counted as it
            entered). vLLM's own moves (append, pop from the head, prepend) keep the sums in O(1); a removal,
            a move or a re-order marks them stale, and they are rebuilt at the next :meth:`head_demand` (a
            short head is summed instead).

            ``changed`` is set when vLLM moves a preempted request in or out (the policy was not told of it:
            ``EngineView.waiting_changed``)."""

            def __init__(self, *args):
                super().__init__(*args)
                self._cum: deque[int] = deque()
                self._base = 0
                self._stale = True
                self.changed = False

            def add_request(self, request) -> None:
                self.append(request)
                if not self._stale:
                    cum = self._cum
                    last = cum[-1] if cum else self._base
                    cum.append(last + len(request._all_token_ids) - request.num_computed_tokens)

            def pop_request(self):
                request = self.popleft()
                if not self._stale:
                    self._base = self._cum.popleft()
                if request.status == preempted:
                    self.changed = True
                return request

            def prepend_request(self, request) -> None:
                self.appendleft(request)
                if not self._stale:
                    self._cum.appendleft(self._base)
                    self._base -= len(request._all_token_ids) - request.num_computed_tokens
                if request.status == preempted:
                    self.changed = True

            def prepend_requests(self, requests) -> None:
                for request in requests:  # extendleft's order: each one goes to the front
                    self.prepend_request(request)

            def remove_request(self, request) -> None:
                super().remove_request(request)
                self._stale = True
                if request.status == preempted:
                    self.changed = True

            def remove_requests(self, requests) -> None:
                requests = list(requests)
                super().remove_requests(requests)
                self._stale = True
                if any(r.status == preempted for r in requests):
                    self.changed = True

            def ids(self) -> list[str]:
                return [r.request_id for r in self]

            def reorder(self, order: list[int]) -> None:
                items = list(self)
                self.clear()
                self.extend([items[i] for i in order])
                self._stale = True

            def move(self, src: int, dst: int) -> None:
                request = self[src]
                del self[src]
                self.insert(dst, request)
                self._stale = True

            def head_demand(self, slots: int) -> tuple[int, int]:
                """(requests, uncomputed tokens) of the first ``slots`` requests (``head_demand``'s rule).
                (deque's own __len__ / __iter__: vLLM's queue class redefines both in Python, as a super()
                call, two frames each step.)"""
                n = min(slots, deque.__len__(self))
                if n <= 0:
                    return 0, 0
                if self._stale:
                    if n <= SHORT_HEAD:
                        head = itertools.islice(deque.__iter__(self), n)
                        return n, sum([len(r._all_token_ids) - r.num_computed_tokens for r in head])
                    self._cum = deque(
                        itertools.accumulate([len(r._all_token_ids) - r.num_computed_tokens for r in self])
                    )
                    self._base = 0
                    self._stale = False
                return n, self._cum[n - 1] - self._base

        _ProgramOrderQueue.__name__ = _ProgramOrderQueue.__qualname__ = "ProgramOrderQueue"
        _ProgramOrderQueue.__module__ = __name__
        ProgramOrderQueue = _ProgramOrderQueue
    return ProgramOrderQueue


ProgramOrderQueue = None
_new = object.__new__

#: (request id, prefix-cached tokens) of one of a step's ``scheduled_new_reqs`` (``VllmDoor.admissions``)
_ADMISSION = attrgetter("req_id", "num_computed_tokens")

#: The engine's log line saying hints are parsed in vLLM's input thread (:meth:`VllmDoor.hints_ahead`).
AHEAD_LINE = "ctk: request hints parsed in vLLM's input thread, in parallel with the model's forward pass"


def keyed_queue_class():
    """:class:`KeyedRequestQueue`, built on first use (it subclasses a vLLM class)."""
    global KeyedRequestQueue
    if KeyedRequestQueue is None:
        from vllm.v1.core.sched.request_queue import RequestQueue

        class _KeyedRequestQueue(KeyedQueue, RequestQueue):
            """vLLM's waiting queue holding its requests in the policy's scheduling order by itself
            (:class:`~ctk.policy.keyed_queue.KeyedQueue`), used while the order has no age bound; vLLM
            takes the head. A request's uncomputed tokens (for the head's demand): ``num_tokens -
            num_computed_tokens``, vLLM's ``num_tokens`` read as ``len(_all_token_ids)``."""

            def add_request(self, request) -> None:
                self._add(request, len(request._all_token_ids) - request.num_computed_tokens)

            def prepend_request(self, request) -> None:
                self._put_back(request, len(request._all_token_ids) - request.num_computed_tokens)

        _KeyedRequestQueue.__name__ = _KeyedRequestQueue.__qualname__ = "KeyedRequestQueue"
        _KeyedRequestQueue.__module__ = __name__
        KeyedRequestQueue = _KeyedRequestQueue
    return KeyedRequestQueue


KeyedRequestQueue = None

#: A stale head of at most this many requests is summed rather than the whole queue's sums rebuilt.
SHORT_HEAD = 32


def route_default_scheduler(choose: Callable[[bool], type]) -> None:
    """Make vLLM use ``choose(async_scheduling)`` as the scheduler class when none was configured
    (``SchedulerConfig.get_scheduler_cls`` patched; the plugin entry point calls this)."""
    from vllm.config.scheduler import SchedulerConfig

    original = SchedulerConfig.get_scheduler_cls

    def get_scheduler_cls(self):
        if self.scheduler_cls is None:
            return choose(self.async_scheduling)
        return original(self)

    SchedulerConfig.get_scheduler_cls = get_scheduler_cls


class _WakeTimer:
    """Puts a WAKEUP message on the engine-core input queue at a deadline (idle expiry)."""

    def __init__(self, engine_ref):
        self._engine_ref = engine_ref
        self._cond = threading.Condition()
        self.deadline: float | None = None
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="ctk-pin-timer", daemon=True)
        self._thread.start()

    def set(self, deadline: float | None) -> None:
        if deadline == self.deadline:
            return
        with self._cond:
            self.deadline = deadline
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def _run(self) -> None:
        from vllm.v1.engine import EngineCoreRequestType

        while True:
            with self._cond:
                while not self._stopped and (self.deadline is None or self.deadline > time.monotonic()):
                    timeout = None if self.deadline is None else self.deadline - time.monotonic()
                    self._cond.wait(timeout)
                if self._stopped:
                    return
                self.deadline = None
            engine = self._engine_ref()
            if engine is None:
                return
            try:
                engine.input_queue.put_nowait((EngineCoreRequestType.WAKEUP, None))
            except Exception:  # the engine is shutting down
                return


def rust_decoder(tokenizer) -> Callable[..., str] | None:
    """The fast (Rust) backend's ``decode`` of a Hugging Face tokenizer when it returns what the
    tokenizer's own ``decode`` does (its Python layer converts the ids element by element first, half the
    time of a 256-token decode); None otherwise (another tokenizer class, or one that overrides decoding or
    cleans up spaces after it)."""
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return None
    cls = type(tokenizer)
    if not isinstance(tokenizer, TokenizersBackend):
        return None
    if cls.decode is not PreTrainedTokenizerBase.decode or cls._decode is not TokenizersBackend._decode:
        return None
    if getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return getattr(backend, "decode", None)


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet as character -> byte (the inverse of its ``bytes_to_unicode``): printable
    Latin-1 bytes stand for themselves, the other 68 bytes for U+0100 onwards."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1)]
    kept += range(ord("\u00ae"), ord("\u00ff") + 1)
    chars = {b: b for b in kept}
    n = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + n
            n += 1
    return {chr(c): b for b, c in chars.items()}


#: Random id sequences :func:`byte_table` checks against the tokenizer's own decode (besides every id alone).
BYTE_TABLE_SAMPLES = 256


def byte_table(tokenizer, samples: int = BYTE_TABLE_SAMPLES, seed: int = 0) -> tuple[bytes, ...] | None:
    """Token id -> the bytes it decodes to, for a byte-level BPE tokenizer whose ``decode`` is its Rust
    backend's (:func:`rust_decoder`) with the plain ``ByteLevel`` decoder; None for any other tokenizer, or
    when the table fails its check.

    Then a decode is ``b"".join(table[i] for i in ids).decode("utf-8", "replace")``: the decoder maps each
    token's characters back through GPT-2's alphabet (a token with a character outside it: its own UTF-8
    bytes), an added token decodes to its content, and the bytes of the whole are decoded with invalid
    sequences replaced (an added token's content is whole UTF-8 text, so decoding the pieces between added
    tokens apart, as the backend does, gives the same text). Ids without a token decode to nothing. Checked
    here, once: every id alone and ``samples`` random sequences (added tokens among them) give the backend's
    text, or the table is not used."""
    import json
    import random

    if rust_decoder(tokenizer) is None:
        return None
    backend = tokenizer.backend_tokenizer
    try:
        decoder = backend.decoder
        if decoder is None or json.loads(decoder.__getstate__()).get("type") != "ByteLevel":
            return None
        added = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}
        size = max(backend.get_vocab_size(with_added_tokens=True), max(added, default=-1) + 1)
        alphabet = _byte_level_alphabet()
        chars = frozenset(alphabet)
        to_latin1 = {ord(c): b for c, b in alphabet.items()}  # str.translate: each character to its byte
        table = []
        for i in range(size):
            content = added.get(i)
            if content is not None:
                table.append(content.encode())
                continue
            token = backend.id_to_token(i)
            if token is None:
                table.append(b"")
            elif chars.issuperset(token):  # every character in the alphabet: its bytes
                table.append(token.translate(to_latin1).encode("latin-1"))
            else:
                table.append(token.encode())
        table = tuple(table)
        texts = backend.decode_batch([[i] for i in range(size)], skip_special_tokens=False)
        if any(t.decode("utf-8", "replace") != text for t, text in zip(table, texts, strict=True)):
            return None
        rng = random.Random(seed)
        specials = sorted(added)
        seqs = []
        for _ in range(samples):
            ids = [rng.randrange(size) for _ in range(rng.randrange(1, 65))]
            if specials and rng.random() < 0.5:
                ids.insert(rng.randrange(len(ids) + 1), rng.choice(specials))
            seqs.append(ids)
        texts = backend.decode_batch(seqs, skip_special_tokens=False)
        for ids, text in zip(seqs, texts, strict=True):
            if b"".join(map(table.__getitem__, ids)).decode("utf-8", "replace") != text:
                return None
        return table
    except Exception as exc:  # an unexpected backend: the tokenizer's own decode
        logger.debug("ctk: no byte table (%s)", exc)
        return None


#: Decoders (``tokenizers``) that neither make nor drop a character of :data:`CALL_CHARS` across token
#: boundaries: a decoded sequence holds such a character only if one of its tokens' own decodes does
#: (byte-level BPE: ASCII bytes survive the lossy UTF-8 decode as they are; SentencePiece's metaspace, byte
#: fallback, fuse). ``Replace`` and ``Strip`` qualify only when their texts hold none of the characters.
_CHAR_KEEPING_DECODERS = ("ByteLevel", "Metaspace", "ByteFallback", "Fuse")


def _keeps_call_chars(decoder: dict | None) -> bool:
    if decoder is None:  # no decoder: the tokens' texts joined with spaces
        return True
    kind = decoder.get("type")
    if kind == "Sequence":
        return all(_keeps_call_chars(d) for d in decoder.get("decoders", ()))
    if kind in _CHAR_KEEPING_DECODERS:
        return True
    if kind == "Replace":
        pattern = decoder.get("pattern") or {}
        texts = (pattern.get("String"), decoder.get("content"))
        return all(isinstance(t, str) and not any(c in t for c in CALL_CHARS) for t in texts)
    if kind == "Strip":
        content = decoder.get("content")
        return isinstance(content, str) and not any(c in content for c in CALL_CHARS)
    return False


def call_char_tokens(tokenizer) -> frozenset[int] | None:
    """Ids of the tokens whose own decode holds a character of :data:`CALL_CHARS`; None when that does not
    tell (not a Rust tokenizer, or a decoder not known to keep those characters, see
    :data:`_CHAR_KEEPING_DECODERS`).
    An output tail with none of these tokens decodes to a text no detector finds a call in: it is not decoded.
    One batch decode of the vocabulary, when the tokenizer is loaded."""
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    decoder = backend.decoder
    if not _keeps_call_chars(json.loads(decoder.__getstate__()) if decoder is not None else None):
        return None
    size = backend.get_vocab_size(with_added_tokens=True)
    texts = backend.decode_batch([[i] for i in range(size)], skip_special_tokens=False)
    chars = CALL_CHARS
    return frozenset(i for i, text in enumerate(texts) if any(c in text for c in chars))


class VllmDoor:
    """:class:`~ctk.policy.driver.EngineView` of a vLLM scheduler, plus the few conversions the mixin
    needs (hints of a request, admissions of a step, how a request ended). See the module doc."""

    def __init__(self, scheduler, engine_core=None):
        from vllm.v1.core.sched.request_queue import FCFSRequestQueue
        from vllm.v1.request import RequestStatus

        self.sched = scheduler
        self.kv = scheduler.kv_cache_manager
        pool = self.kv.block_pool
        self.block_size: int = scheduler.block_size
        self.total_blocks: int = max(1, pool.num_gpu_blocks - 1)  # minus the null block
        self.free_blocks: Callable[[], int] = pool.get_num_free_blocks  # bound: read every step
        self.held: dict[str, object] = {}  # request id -> vllm Request whose blocks are kept
        #: Called when an allocation fails while pins are held: (request id, running, now) -> retry?
        self.valve: Callable[[str, bool, float], bool] | None = None
        self._running = RequestStatus.RUNNING
        self._natural = (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH_CAPPED)
        self._aborted = RequestStatus.FINISHED_ABORTED
        self._allocate = self.kv.allocate_slots
        from vllm.v1.core.kv_cache_coordinator import UnitaryKVCacheCoordinator
        from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager

        # (request id -> blocks, padded with null blocks?), one per KV-cache group (each map built once in its
        # manager's __init__). Only plain full attention never pads (its subclasses may: R-SWA, ...).
        managers = self.kv.coordinator.single_type_managers
        self._block_maps = tuple((m.req_to_blocks, type(m) is not FullAttentionManager) for m in managers)
        # one group of plain full attention without EAGLE/MTP: a next turn reuses every full block
        self._plain_full_attention = (
            type(self.kv.coordinator) is UnitaryKVCacheCoordinator
            and not self._block_maps[0][1]
            and not managers[0].use_eagle
        )
        #: reusable_tokens answers None for every request (the driver need not ask)
        self.reuses_every_full_block: bool = self._plain_full_attention
        self._blocks_can_be_freed = scheduler._request_blocks_can_be_freed
        # the most blocks one step can allocate: its token budget, and per run slot a partial block at each
        # end plus the lookahead (speculative) tokens, in every KV-cache group
        budget = scheduler.vllm_config.scheduler_config.max_num_batched_tokens
        per_slot = 2 + -(-scheduler.num_lookahead_tokens // self.block_size)
        self._step_blocks = len(managers) * (
            -(-budget // self.block_size) + scheduler.max_num_active_reqs * per_slot
        )
        # tokens per prefix-cache block hash (``Request.block_hashes``: one per full block of the sequence,
        # chained, so the k-th stands for the whole prefix up to it) and the block whose hash is the agent
        # class of a request naming no agent (0: none; :meth:`set_agent_prefix`)
        self._hash_block: int = scheduler.hash_block_size
        self._prefix_blocks = 0
        #: the most uncomputed tokens one waiting request can ask for (its whole context)
        self._max_request_tokens: int = scheduler.vllm_config.model_config.max_model_len
        self._tokenizer = None
        self._decoder = None  # the tokenizer's Rust decode, when it gives the tokenizer's own text
        self._bytes: tuple[bytes, ...] | None = None  # byte_table (None: the tokenizer's decode)
        self._call_tokens: frozenset[int] | None = None  # call_char_tokens (None: decode every tail)
        self._tokenizer_failed = False
        waiting = scheduler.waiting
        self.reorders_waiting = type(waiting) is FCFSRequestQueue and not waiting
        if self.reorders_waiting:
            waiting = scheduler.waiting = program_order_queue_class()()
        else:
            logger.warning("ctk: waiting queue %s kept; program order off", type(waiting).__name__)
        # vLLM builds ``self.waiting`` once (in __init__) and never rebinds it: its length is read every step,
        # by a C-level callable bound to the queue: deque's own __len__ (vLLM's queue class defines one in
        # Python), so no Python frame runs (the hook runs with cold caches, where each frame costs about a
        # microsecond). ``EngineView.num_waiting``.
        self._waiting = waiting
        self.num_waiting: Callable[[], int] = functools.partial(
            deque.__len__ if isinstance(waiting, deque) else len, waiting
        )
        # Whether a request id is in the engine already (a streaming update of a known request is not an
        # arrival): the scheduler's ``requests`` dict, built once in its __init__ and never rebound, asked
        # through its own C-level ``__contains__`` (no Python frame per arrival).
        self.is_known: Callable[[str], bool] = scheduler.requests.__contains__
        self._timer = _WakeTimer(weakref.ref(engine_core)) if engine_core is not None else None
        #: parse each request's hints ahead, in vLLM's input thread (the mixin sets it while ctk tracks)
        self.parse_ahead = False
        self.parses_in_input_thread = False  # the engine core has an input thread and parses there
        if engine_core is not None:
            self._parse_in_input_thread(engine_core)

    # -- EngineView --------------------------------------------------------------------------------------

    def num_running(self) -> int:
        return len(self.sched.running)

    def waiting_ids(self) -> list[str]:
        return [r.request_id for r in self.sched.waiting]

    def reorder_waiting(self, order: list[int]) -> None:
        if self.reorders_waiting:
            self.sched.waiting.reorder(order)

    def keep_waiting_order(self, key_of: Callable[[str], tuple | None] | None):
        """``EngineView.keep_waiting_order``: from now on vLLM's waiting queue holds itself in the order of
        ``key_of`` (:class:`KeyedRequestQueue`); None: back to the FIFO :class:`ProgramOrderQueue` the
        driver re-orders (marked changed). The requests waiting move over in their order. Returns the keyed
        queue's ``rekey``; None when ``key_of`` is None or ctk does not order vLLM's queue (its priority
        queue kept)."""
        if not self.reorders_waiting:
            return None
        queue = keyed_queue_class()(key_of) if key_of is not None else program_order_queue_class()()
        for request in self._waiting:
            queue.add_request(request)
        if key_of is None:
            queue.changed = True
        self.sched.waiting = self._waiting = queue
        self.num_waiting = functools.partial(deque.__len__ if isinstance(queue, deque) else len, queue)
        return queue.rekey if key_of is not None else None

    def move_waiting(self, src: int, dst: int) -> None:
        if self.reorders_waiting:
            self._waiting.move(src, dst)

    def waiting_changed(self) -> bool:
        """True when vLLM moved a preempted request in or out of the waiting queue since the last call (or
        the queue is vLLM's own: ctk cannot follow it)."""
        if not self.reorders_waiting:
            return True
        waiting = self._waiting
        changed, waiting.changed = waiting.changed, False
        return changed

    def running_ids(self) -> list[str]:
        return [r.request_id for r in self.sched.running]

    def reorder_running(self, order: list[int]) -> None:
        running = self.sched.running
        running[:] = [running[i] for i in order]

    def waiting_demand(self) -> tuple[int, int]:
        """(requests, uncomputed tokens) of the waiting requests vLLM would admit next if memory allowed:
        the head of the queue, one per free run slot (``max_num_active_reqs``). ctk's own queue keeps running
        sums (two reads a step); vLLM's priority queue is walked (at most one request per free slot). When
        the free memory holds as many whole contexts (``max_model_len``) as there are free slots, the tokens
        are answered as 0 without reading the queue: the demand is covered either way (``EngineView``)."""
        sched = self.sched
        slots = sched.max_num_active_reqs - len(sched.running)
        if slots <= 0:  # every run slot taken: memory keeps nobody out (head_demand's answer, without a walk)
            return 0, 0
        if slots * self._max_request_tokens <= self.free_blocks() * self.block_size:
            # the head fits the free memory whatever it holds: 0 tokens, the price's slack either way, without
            # reading the requests (cold after vLLM's step)
            return min(slots, len(self._waiting)), 0
        if self.reorders_waiting:
            return self._waiting.head_demand(slots)
        uncomputed = (r.num_tokens - r.num_computed_tokens for r in self._waiting)
        return head_demand(uncomputed, slots)

    def blocks_of(self, request_id: str) -> int:
        """KV blocks only this request holds, all KV-cache groups: what pinning it keeps from the others.

        Prefix caching shares prefixes, so the blocks others also reference (``ref_cnt`` > 1: the system
        prompt every program starts with, ...) lead the list; they are skipped, not walked past. Groups
        other than plain full attention (sliding window, chunked local, Mamba, ...) pad their lists with
        vLLM's null block (its ``ref_cnt`` is not maintained) where blocks left the window: those lists are
        counted block by block, null blocks skipped."""
        n = 0
        for group, padded in self._block_maps:
            blocks = group.get(request_id, ())
            if padded:
                n += sum(1 for b in blocks if not b.is_null and b.ref_cnt <= 1)
                continue
            shared = 0
            for b in blocks:
                if b.ref_cnt <= 1:
                    break
                shared += 1
            n += len(blocks) - shared
        return n

    def hold(self, request_id: str) -> None:
        """Keep a finished request's blocks: it leaves ``Scheduler.requests`` without a free."""
        self.held[request_id] = self.sched.requests.pop(request_id)

    def arm_valve(self) -> None:
        """Before vLLM schedules a step: the valve wraps ``allocate_slots`` for this step only if pins are
        held and an allocation can fail in it (fewer free blocks than the step could ask for)."""
        need = bool(self.held) and self.free_blocks() < self._step_blocks
        if need != ("allocate_slots" in vars(self.kv)):
            if need:
                self.kv.allocate_slots = self._allocate_with_valve
            else:
                del self.kv.allocate_slots

    def free_held(self, request_id: str) -> None:
        self.sched._free_request_blocks(self.held.pop(request_id))
        if not self.held and "allocate_slots" in vars(self.kv):
            del self.kv.allocate_slots  # back to the class method: no valve needed

    def output_text(self, request_id: str) -> str | None:
        request = self.sched.requests.get(request_id) or self.held.get(request_id)
        return self.text_of(request) if request is not None else None

    def wake_at(self, deadline: float | None) -> None:
        """Only a deadline earlier than the pending one reaches the timer thread (its lock, a switch of
        threads per pin event at GPU scale): a pending one that is earlier than needed wakes the idle engine
        early, where the driver's ``idle`` arms the next one."""
        timer = self._timer
        if timer is None or deadline is None:
            return
        pending = timer.deadline
        if pending is None or deadline < pending:
            timer.set(deadline)

    # -- conversions for the mixin -------------------------------------------------------------------

    def busy(self) -> bool:
        """Requests wait or run (the engine will step and call ``schedule``)."""
        return self.sched.has_unfinished_requests()

    def set_agent_prefix(self, tokens: int) -> int:
        """Derive the agent class of a request that names none from its prompt's first ``tokens`` tokens:
        the whole prefix-cache blocks within them (at least one; ``tokens`` 0: never). Returns the prefix's
        length in tokens, 0 when no class will be derived: off, or prefix caching off (vLLM then hashes no
        blocks, unless a KV connector asks it to)."""
        blocks = max(1, tokens // self._hash_block) if tokens > 0 else 0
        self._prefix_blocks = blocks
        if not blocks:
            return 0
        if not self.sched.vllm_config.cache_config.enable_prefix_caching:
            logger.info("ctk: prefix caching off: a request naming no agent gets no class from its prompt")
            return 0
        return blocks * self._hash_block

    def _parse_in_input_thread(self, engine_core) -> None:
        """Wrap the engine core's ``preprocess_add_request`` on the instance: vLLM runs it in its input
        thread, in parallel with the model's forward pass (its own request set-up, block hashes included),
        so a request's hints are parsed there (:meth:`hints_ahead`) instead of in the scheduler's step. A
        request that comes without them (in-process engines, a failed parse) is parsed in ``add_request``."""
        original = engine_core.preprocess_add_request
        ahead = self.hints_ahead

        def preprocess_add_request(request):
            req, wave = original(request)
            if self.parse_ahead:
                try:
                    ahead(req)
                except Exception:  # never fail a request here: add_request parses it again
                    logger.debug("ctk: hints not parsed ahead", exc_info=True)
            return req, wave

        engine_core.preprocess_add_request = preprocess_add_request
        self.parses_in_input_thread = True

    def hints_ahead(self, request) -> None:
        """Parse a request's hints before it reaches the scheduler (vLLM's input thread): kept on the request
        until :meth:`take_hints`."""
        request.ctk_hints = self.hints(request)

    def take_hints(self, request) -> RequestHints:
        """The request's hints: parsed ahead (:meth:`hints_ahead`, dropped from the request now), else now."""
        hints = request.__dict__.pop("ctk_hints", None)
        return hints if hints is not None else self.hints(request)

    def hints(self, request) -> RequestHints:
        """The request's hints (``session_id``, ``vllm_xargs``); with no agent named, the agent is the class
        of its prompt's prefix (:meth:`set_agent_prefix`): the hash vLLM computed for the prefix's last block,
        as :func:`~ctk.policy.hints.prefix_agent` labels it. A prompt shorter than the prefix (or one without
        hashes: prefix caching off) gets none."""
        sp = request.sampling_params
        hints = parse_hints(request.session_id, sp.extra_args if sp is not None else None)
        k = self._prefix_blocks
        if k and hints.agent is None:
            hashes = request.block_hashes
            if len(hashes) >= k:
                # (a new RequestHints no one holds yet: its field set in place, as parse_hints builds it)
                hints.__dict__["agent"] = prefix_agent(hashes[k - 1])
        return hints

    def admissions(self, out) -> Iterator[tuple[str, int]]:
        """(request id, prefix-cached tokens) of the requests scheduled for the first time this step: a
        ``map`` of a C-level getter, no Python frame per request (read once, by the driver's ``step_end``)."""
        return map(_ADMISSION, out.scheduled_new_reqs)

    def end_of(self, request) -> RequestEnd | None:
        """How a request left: None when aborted by its client.

        vLLM's front end finds stop strings (``stop=[...]``) in the detokenized text and then aborts the
        request in the engine core, which therefore sees ``FINISHED_ABORTED`` for what is a natural finish.
        An aborted request whose output tail holds one of its stop strings is such a finish: it ends where
        the stop string ends (the tokens the engine computed after it are not part of the next turn's
        prompt)."""
        status = request.status
        # num_tokens, num_output_tokens: vLLM's properties read as what they return (premises), no frames
        num_tokens, output_tokens = len(request._all_token_ids), len(request._output_token_ids)
        if status == self._aborted:
            sp = request.sampling_params
            after = self._tokens_after_stop(request, sp.stop) if sp is not None and sp.stop else None
            if after is None:
                return None
            natural = True
            num_tokens, output_tokens = num_tokens - after, output_tokens - after
        else:
            natural = status in self._natural
        end = _new(RequestEnd)  # RequestEnd(...) without its __init__ frame (a slotted dataclass)
        end.natural = natural
        end.prompt_tokens = request.num_prompt_tokens
        end.num_tokens = num_tokens
        end.output_tokens = output_tokens
        return end

    def _tokens_after_stop(self, request, stops: list[str]) -> int | None:
        """Output tokens after the first of ``stops`` in the output's tail; None when none is there."""
        if self._tokenizer_or_none() is None:
            return None
        n = min(request.num_output_tokens, STOP_TAIL_TOKENS + max(len(s) for s in stops))
        tail = list(request.output_token_ids[-n:]) if n else []
        text = self._decode(tail)
        if not text or not any(s in text for s in stops):
            return None
        # the shortest head of the tail that still holds a stop string (holding one grows with the head)
        lo, hi = 1, len(tail)
        while lo < hi:
            mid = (lo + hi) // 2
            head = self._decode(tail[:mid]) or ""
            if any(s in head for s in stops):
                hi = mid
            else:
                lo = mid + 1
        return len(tail) - lo

    def reusable_tokens(self, request_id: str, num_tokens: int) -> int | None:
        """Prompt tokens of a next turn extending this finished request's first ``num_tokens`` tokens that
        vLLM can take from the prefix cache while the request's blocks are held; None: every full block
        (the core's own rule; plain full attention without EAGLE/MTP, where that is exact).

        Otherwise vLLM's own lookup answers (``KVCacheCoordinator.find_longest_cache_hit`` over the
        request's block hashes, as ``get_computed_blocks`` runs it for the next turn): EAGLE/MTP drop the
        last matched block of every hit, sliding-window and hybrid groups align the hit per group."""
        if self._plain_full_attention:
            return None
        request = self.sched.requests.get(request_id)
        if request is None:
            return None
        _, hit, _ = self.kv.coordinator.find_longest_cache_hit(request.block_hashes, num_tokens)
        return hit

    def frees_now(self, request_id: str) -> bool:
        """Releasing this held request returns its blocks to the pool now (vLLM defers the free while an
        in-flight step of an async KV connector may still write them: such a release does not help an
        allocation that failed now)."""
        request = self.held.get(request_id)
        return request is None or self._blocks_can_be_freed(request)

    def load_tokenizer(self) -> None:
        """Load the tokenizer for tool-call detection (and :func:`call_char_tokens`) ahead of the first finish
        that needs it: loading it there would stall that engine step (milliseconds, a vocabulary decode)."""
        self._tokenizer_or_none()

    def _tokenizer_or_none(self):
        if self._tokenizer is None and not self._tokenizer_failed:
            try:
                from vllm.tokenizers.registry import cached_tokenizer_from_config

                self._tokenizer = cached_tokenizer_from_config(
                    model_config=self.sched.vllm_config.model_config
                )
                self._decoder = rust_decoder(self._tokenizer)
                if self._decoder is not None:
                    self._call_tokens = call_char_tokens(self._tokenizer)
                    self._bytes = byte_table(self._tokenizer)
            except Exception as exc:  # no tokenizer: detection by hints only
                logger.warning("ctk: no tokenizer for tool-call detection (%s); use the 'tool' hint", exc)
                self._tokenizer_failed = True
        return self._tokenizer

    def _decode(self, token_ids: list[int]) -> str | None:
        table = self._bytes
        if table is not None:
            # byte-level BPE: a join of each token's bytes, the backend's text (byte_table checked it at load)
            # in a tenth of its time
            try:
                if len(token_ids) > 1:  # (itemgetter: the table's bytes of every id in one C call)
                    return b"".join(itemgetter(*token_ids)(table)).decode("utf-8", "replace")
                return b"".join(map(table.__getitem__, token_ids)).decode("utf-8", "replace")
            except IndexError:  # an id past the vocabulary (a padded embedding): the backend skips it
                pass
        try:
            if self._decoder is not None:
                return self._decoder(token_ids, skip_special_tokens=False)
            return self._tokenizer.decode(token_ids, skip_special_tokens=False)
        except Exception:
            return None

    def text_of(self, request) -> str | None:
        """The decoded tail of a request's output (tool-call detection); None without a tokenizer.

        Only the tail detection needs is decoded: the last :data:`DETECT_FIRST_TOKENS` tokens, and a tail four
        times longer (up to :data:`DETECT_TAIL_TOKENS`) only while the tail holds no tool call but the end of
        one (a closing fence or tag, a JSON name) whose start it may have cut off. A first tail none of whose
        tokens holds a character a call needs (:func:`call_char_tokens`) is not decoded: "" (no call)."""
        if self._tokenizer is None and self._tokenizer_or_none() is None:
            return None
        ids = request.output_token_ids
        total = len(ids)
        n = min(DETECT_FIRST_TOKENS, DETECT_TAIL_TOKENS)
        tail = ids[-n:]  # a slice: a new list
        if self._call_tokens is not None and self._call_tokens.isdisjoint(tail):
            return ""  # the decoded tail would hold no character of CALL_CHARS: no call, and no decode
        while True:
            text = self._decode(tail)
            if text is None or n >= total or n >= DETECT_TAIL_TOKENS:
                return text
            if not any(m in text for m in _CALL_END_MARKERS) or detect_tool_call(text) is not None:
                return text
            n = min(4 * n, DETECT_TAIL_TOKENS)
            tail = ids[-n:]

    def ctk_settings(self) -> dict:
        """``additional_config["ctk"]`` of the engine ({} when absent)."""
        extra = getattr(self.sched.vllm_config, "additional_config", None) or {}
        ctk = extra.get("ctk") if isinstance(extra, dict) else None
        return ctk if isinstance(ctk, dict) else {}

    def model_name(self) -> str:
        return self.sched.vllm_config.model_config.model

    def close(self) -> None:
        if self._timer is not None:
            self._timer.stop()

    # -- the valve -------------------------------------------------------------------------------------

    def _allocate_with_valve(self, request, *args, **kwargs):
        blocks = self._allocate(request, *args, **kwargs)
        if blocks is None and self.valve is not None:
            rid, running, now = request.request_id, request.status == self._running, time.monotonic()
            while blocks is None and self.held and self.valve(rid, running, now):
                blocks = self._allocate(request, *args, **kwargs)
        return blocks
