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
  empty) ``FCFSRequestQueue`` by :class:`ProgramOrderQueue`, an ``FCFSRequestQueue`` that can re-order
  itself in place. vLLM only ever calls the ``RequestQueue`` API on it. With
  ``--scheduling-policy priority`` the priority queue is kept and ctk does not re-order.
- **Pressure valve**: ``kv_cache_manager.allocate_slots`` is wrapped on the instance, only while pins are
  held (the class method otherwise: zero cost): vLLM calls it right before it would preempt a running
  request or refuse a waiting one, which is when a pin must go first. vLLM 0.32 has no other point that
  sees a failed allocation before the preemption.
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
import logging
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from ctk.errors import CtkError
from ctk.policy.driver import RequestEnd, head_demand
from ctk.policy.hints import RequestHints, parse_hints

logger = logging.getLogger("ctk.engine_patch")

SUPPORTED_VLLM = "0.32.0"
#: Output tokens decoded for tool-call detection (a tool call ends the turn).
DETECT_TAIL_TOKENS = 2048

_SCHED = "vllm.v1.core.sched.scheduler:Scheduler"
_KV = "vllm.v1.core.kv_cache_manager:KVCacheManager"
_REQ = "vllm.v1.request:Request"
_STATUS = "vllm.v1.request:RequestStatus"
_QUEUE = "vllm.v1.core.sched.request_queue:FCFSRequestQueue"
_COORD = "vllm.v1.core.kv_cache_coordinator:KVCacheCoordinator"
_TYPE_MGR = "vllm.v1.core.single_type_kv_cache_manager:SingleTypeKVCacheManager"


@dataclass(frozen=True)
class Internal:
    """One vLLM name the door relies on. ``kind``: ``hook`` (a method the mixin overrides), ``method``,
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
    Internal(_SCHED, "waiting", "attribute", "replaced (empty) by ProgramOrderQueue; its length, ids"),
    Internal(_SCHED, "running", "attribute", "ordered so the preemption victim (last) is the core's"),
    Internal(_SCHED, "kv_cache_manager", "attribute", "free blocks, block ids, the valve"),
    Internal(_SCHED, "block_size", "attribute", "tokens per block"),
    Internal(_SCHED, "max_num_active_reqs", "attribute", "run slots: the waiting demand memory keeps out"),
    Internal(_SCHED, "vllm_config", "attribute", "additional_config['ctk'], the tokenizer's model config"),
    Internal(_SCHED, "waiting = create_request_queue(", "source", "self.waiting is built from the policy"),
    Internal(_QUEUE, "collections.deque", "base", "ProgramOrderQueue re-orders it with deque operations"),
    Internal(_QUEUE, "vllm.v1.core.sched.request_queue.RequestQueue", "base", "vLLM's queue seam"),
    # KV cache
    Internal(_KV, "allocate_slots", "method", "wrapped on the instance while pins are held: the valve"),
    Internal(_KV, "coordinator", "attribute", "its single-type managers: blocks a finished request holds"),
    Internal(_COORD, "single_type_managers", "attribute", "one manager per KV-cache group"),
    Internal(_TYPE_MGR, "req_to_blocks", "attribute", "request id -> blocks (counted, not copied)"),
    Internal("vllm.v1.core.kv_cache_utils:KVCacheBlock", "ref_cnt", "attribute", "shared blocks a pin skips"),
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
    Internal(_REQ, "output_token_ids", "attribute", "tool-call detection (decoded tail)"),
    Internal(_STATUS, "RUNNING", "member", "valve: preempting vs admitting"),
    Internal(_STATUS, "FINISHED_STOPPED", "member", "natural finish"),
    Internal(_STATUS, "FINISHED_LENGTH_CAPPED", "member", "natural finish"),
    Internal(_STATUS, "FINISHED_ABORTED", "member", "abort"),
    Internal("vllm.v1.core.sched.output:SchedulerOutput", "scheduled_new_reqs", "attribute", "admissions"),
    Internal("vllm.v1.core.sched.output:NewRequestData", "req_id", "attribute", "admissions"),
    Internal("vllm.v1.core.sched.output:NewRequestData", "num_computed_tokens", "attribute", "prefix hit"),
    # idle wake-up
    Internal("vllm.v1.engine.core:EngineCoreProc", "input_queue", "before-super", "idle wake-up"),
    Internal("vllm.v1.engine:EngineCoreRequestType", "WAKEUP", "member", "idle wake-up message"),
    # tokenizer (tool-call detection when the client gives no 'tool' hint)
    Internal("vllm.tokenizers.registry:cached_tokenizer_from_config", "model_config", "param", "decode"),
    # plugin entry point (ctk.engine_patch.plugin)
    Internal("vllm.config.scheduler:SchedulerConfig", "get_scheduler_cls", "method", "plugin hook"),
    Internal("vllm.config.scheduler:SchedulerConfig", "scheduler_cls", "attribute", "plugin"),
    Internal("vllm.config.scheduler:SchedulerConfig", "async_scheduling", "attribute", "plugin"),
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
    if kind in ("hook", "method"):
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


def check_vllm_contract(internals: tuple[Internal, ...] = VLLM_INTERNALS) -> list[str]:
    """What the installed vLLM lacks of ``internals`` (empty: all there), one entry per missing name."""
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
    return missing


def require_vllm_contract() -> None:
    missing = check_vllm_contract()
    if missing:
        raise VllmContractError(
            "ctk scheduler: the installed vLLM lacks what ctk relies on: "
            + "; ".join(missing)
            + f". ctk supports vLLM {SUPPORTED_VLLM}."
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

        class _ProgramOrderQueue(FCFSRequestQueue):
            """vLLM's FCFS waiting queue that the policy can re-order in place (program FCFS)."""

            def ids(self) -> list[str]:
                return [r.request_id for r in self]

            def reorder(self, order: list[int]) -> None:
                items = list(self)
                self.clear()
                self.extend([items[i] for i in order])

        _ProgramOrderQueue.__name__ = _ProgramOrderQueue.__qualname__ = "ProgramOrderQueue"
        _ProgramOrderQueue.__module__ = __name__
        ProgramOrderQueue = _ProgramOrderQueue
    return ProgramOrderQueue


ProgramOrderQueue = None


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
        # request id -> blocks, one map per KV-cache group (each built once in its manager's __init__)
        self._block_maps = tuple(m.req_to_blocks for m in self.kv.coordinator.single_type_managers)
        self._tokenizer = None
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
        self._timer = _WakeTimer(weakref.ref(engine_core)) if engine_core is not None else None

    # -- EngineView --------------------------------------------------------------------------------------

    def num_running(self) -> int:
        return len(self.sched.running)

    def waiting_ids(self) -> list[str]:
        return [r.request_id for r in self.sched.waiting]

    def reorder_waiting(self, order: list[int]) -> None:
        if self.reorders_waiting:
            self.sched.waiting.reorder(order)

    def running_ids(self) -> list[str]:
        return [r.request_id for r in self.sched.running]

    def reorder_running(self, order: list[int]) -> None:
        running = self.sched.running
        running[:] = [running[i] for i in order]

    def waiting_demand(self) -> tuple[int, int]:
        """(requests, uncomputed tokens) of the waiting requests vLLM would admit next if memory allowed:
        the head of the queue, one per free run slot (``max_num_active_reqs``)."""
        sched = self.sched
        slots = sched.max_num_active_reqs - len(sched.running)
        if slots <= 0:  # every run slot taken: memory keeps nobody out (head_demand's answer, without a walk)
            return 0, 0
        uncomputed = (r.num_tokens - r.num_computed_tokens for r in self._waiting)
        return head_demand(uncomputed, slots)

    def blocks_of(self, request_id: str) -> int:
        """KV blocks only this request holds, all KV-cache groups: what pinning it keeps from the others.

        Prefix caching shares prefixes, so the blocks others also reference (``ref_cnt`` > 1: the system
        prompt every program starts with, ...) lead the list; they are skipped, not walked past."""
        n = 0
        for group in self._block_maps:
            blocks = group.get(request_id, ())
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
        if len(self.held) == 1:
            self.kv.allocate_slots = self._allocate_with_valve

    def free_held(self, request_id: str) -> None:
        self.sched._free_request_blocks(self.held.pop(request_id))
        if not self.held and "allocate_slots" in vars(self.kv):
            del self.kv.allocate_slots  # back to the class method: no valve needed

    def output_text(self, request_id: str) -> str | None:
        request = self.sched.requests.get(request_id) or self.held.get(request_id)
        return self.text_of(request) if request is not None else None

    def wake_at(self, deadline: float | None) -> None:
        if self._timer is not None:
            self._timer.set(deadline)

    # -- conversions for the mixin -------------------------------------------------------------------

    def busy(self) -> bool:
        """Requests wait or run (the engine will step and call ``schedule``)."""
        return self.sched.has_unfinished_requests()

    def is_known(self, request_id: str) -> bool:
        return request_id in self.sched.requests

    def hints(self, request) -> RequestHints:
        sp = request.sampling_params
        return parse_hints(request.session_id, sp.extra_args if sp is not None else None)

    def admissions(self, out) -> list[tuple[str, int]]:
        """(request id, prefix-cached tokens) of the requests scheduled for the first time this step."""
        return [(new.req_id, new.num_computed_tokens) for new in out.scheduled_new_reqs]

    def end_of(self, request) -> RequestEnd | None:
        """How a request left: None when aborted."""
        status = request.status
        if status == self._aborted:
            return None
        return RequestEnd(
            natural=status in self._natural,
            prompt_tokens=request.num_prompt_tokens,
            num_tokens=request.num_tokens,
            output_tokens=request.num_output_tokens,
        )

    def text_of(self, request) -> str | None:
        """The decoded tail of a request's output (tool-call detection); None without a tokenizer."""
        if self._tokenizer is None and not self._tokenizer_failed:
            try:
                from vllm.tokenizers.registry import cached_tokenizer_from_config

                self._tokenizer = cached_tokenizer_from_config(
                    model_config=self.sched.vllm_config.model_config
                )
            except Exception as exc:  # no tokenizer: detection by hints only
                logger.warning("ctk: no tokenizer for tool-call detection (%s); use the 'tool' hint", exc)
                self._tokenizer_failed = True
        if self._tokenizer is None:
            return None
        ids = list(request.output_token_ids[-DETECT_TAIL_TOKENS:])
        try:
            return self._tokenizer.decode(ids, skip_special_tokens=False)
        except Exception:
            return None

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
