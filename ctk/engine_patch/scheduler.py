"""The thin vLLM 0.32.0 adapter: a scheduler mixin that maps vLLM's hooks onto the policy core.

Load it with ``--scheduler-cls ctk.engine_patch.scheduler.CTKScheduler`` (``ctk serve`` does), or through
the ``vllm.general_plugins`` entry point with ``CTK_POLICY`` set (:mod:`ctk.engine_patch.plugin`). Settings
come from ``CTK_*`` environment variables and ``additional_config["ctk"]``
(:class:`~ctk.engine_patch.config.ServeConfig`).

Hook -> core mapping (vllm/v1/core/sched/scheduler.py, 0.32.0):

- ``add_request(request)`` -> :meth:`PolicyCore.arrived` with the hints parsed from ``request.session_id``
  and ``request.sampling_params.extra_args`` (``vllm_xargs``).
- ``schedule()`` -> first :meth:`PolicyCore.tick` (rule b: expired pins are freed), then the waiting queue
  (an ``FCFSRequestQueue`` deque) is re-ordered by :meth:`PolicyCore.order_waiting`, then vLLM schedules;
  when memory is short the running list is ordered by :meth:`PolicyCore.order_running` (vLLM preempts its
  last element: the youngest program not on its last turn); every request admitted for the first time
  (``scheduled_new_reqs``, whose ``num_computed_tokens`` is its prefix-cache hit) goes to
  :meth:`PolicyCore.admitted` (rule a).
- ``kv_cache_manager.allocate_slots`` (wrapped on the instance) -> when vLLM cannot get blocks, i.e. right
  before it would preempt a running request or refuse a waiting one, pins are released one at a time by
  :meth:`PolicyCore.release_for_pressure` (rule e, lowest expected value first) and the allocation is
  retried. A waiting request being admitted may take only younger programs' pins (program FCFS) unless it
  is overdue or nothing runs; otherwise it waits for running requests to free memory. Nothing can deadlock
  on pins: with nothing running every pin may go, and once no pin is left vLLM behaves as stock.
- ``_free_blocks(request)`` (the single place a finished request's blocks are freed; aborts reach it
  through ``finish_requests``) -> :meth:`PolicyCore.aborted` for aborts (rule d), otherwise
  :meth:`PolicyCore.finished`: when it pins, the request leaves ``self.requests`` as usual but its blocks
  are kept (ref_cnt > 0, never evicted) until a release frees them with ``_free_request_blocks``.
- ``has_requests()`` -> also runs :meth:`PolicyCore.tick`; an idle engine-core process is woken at the
  next pin deadline by a timer thread that puts a ``WAKEUP`` message on the engine's input queue, so idle
  engines release expired pins too (rule b).
- ``shutdown()`` -> pins released, the trace recorder flushed.

The core's releases are applied by :meth:`CTKSchedulerMixin._ctk_apply`. Output text for tool-call
detection is detokenized here (tail only, and only when the client gave no ``tool`` hint).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
import time
import weakref
from collections.abc import Iterable

from ctk.engine_patch.config import ServeConfig
from ctk.engine_patch.events import EngineState, FanoutSink, Finished, Release
from ctk.engine_patch.hints import RequestHints, parse_hints
from ctk.engine_patch.policy import PolicyCore
from ctk.errors import CtkError

logger = logging.getLogger("ctk.engine_patch")

SUPPORTED_VLLM = "0.32.0"
#: Below this share of free KV blocks, the running list is ordered so that vLLM preempts the youngest
#: program not on its last turn (instead of the most recently admitted request).
PREEMPT_ORDER_FREE_SHARE = 0.1
#: Output tokens decoded for tool-call detection (a tool call ends the turn).
DETECT_TAIL_TOKENS = 2048


class VllmContractError(CtkError, RuntimeError):
    """The installed vLLM lacks a hook the adapter relies on; the message names it."""


def check_vllm_contract() -> list[str]:
    """Names of the vLLM internals the adapter needs that the installed vLLM lacks (empty: all there)."""
    missing: list[str] = []
    try:
        import vllm
        from vllm.v1.core.kv_cache_manager import KVCacheManager
        from vllm.v1.core.sched.async_scheduler import AsyncScheduler
        from vllm.v1.core.sched.output import NewRequestData, SchedulerOutput
        from vllm.v1.core.sched.request_queue import FCFSRequestQueue
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.engine import EngineCoreRequestType
        from vllm.v1.request import Request, RequestStatus
    except ImportError as exc:
        return [f"import: {exc}"]
    if getattr(vllm, "__version__", None) != SUPPORTED_VLLM:
        missing.append(f"vllm version {SUPPORTED_VLLM} (installed: {getattr(vllm, '__version__', '?')})")
    for name in (
        "add_request",
        "schedule",
        "_free_blocks",
        "_free_request_blocks",
        "finish_requests",
        "has_requests",
        "shutdown",
        "_preempt_request",
        "get_kv_cache_usage",
    ):
        if not callable(getattr(Scheduler, name, None)):
            missing.append(f"Scheduler.{name}")
    if not issubclass(AsyncScheduler, Scheduler):
        missing.append("AsyncScheduler subclass of Scheduler")
    for name in ("allocate_slots", "free", "get_block_ids"):
        if not callable(getattr(KVCacheManager, name, None)):
            missing.append(f"KVCacheManager.{name}")
    for name in ("scheduled_new_reqs",):
        if name not in getattr(SchedulerOutput, "__dataclass_fields__", {}):
            missing.append(f"SchedulerOutput.{name}")
    for name in ("req_id", "num_computed_tokens"):
        if name not in getattr(NewRequestData, "__dataclass_fields__", {}):
            missing.append(f"NewRequestData.{name}")
    if not issubclass(FCFSRequestQueue, __import__("collections").deque):
        missing.append("FCFSRequestQueue as a deque")
    for name in ("FINISHED_STOPPED", "FINISHED_LENGTH_CAPPED", "FINISHED_ABORTED"):
        if not hasattr(RequestStatus, name):
            missing.append(f"RequestStatus.{name}")
    if not hasattr(EngineCoreRequestType, "WAKEUP"):
        missing.append("EngineCoreRequestType.WAKEUP")
    import inspect

    init_src = inspect.signature(Request.__init__).parameters
    if "session_id" not in init_src:
        missing.append("Request(session_id=...)")
    return missing


class _WakeTimer:
    """Puts a WAKEUP message on the engine-core input queue at the next pin deadline (idle expiry)."""

    def __init__(self, engine_ref):
        self._engine_ref = engine_ref
        self._cond = threading.Condition()
        self._deadline: float | None = None
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="ctk-pin-timer", daemon=True)
        self._thread.start()

    def set(self, deadline: float | None) -> None:
        if deadline == self._deadline:
            return
        with self._cond:
            self._deadline = deadline
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def _run(self) -> None:
        from vllm.v1.engine import EngineCoreRequestType

        while True:
            with self._cond:
                while not self._stopped and (self._deadline is None or self._deadline > time.monotonic()):
                    timeout = None if self._deadline is None else self._deadline - time.monotonic()
                    self._cond.wait(timeout)
                if self._stopped:
                    return
                self._deadline = None
            engine = self._engine_ref()
            if engine is None:
                return
            try:
                engine.input_queue.put_nowait((EngineCoreRequestType.WAKEUP, None))
            except Exception:  # the engine is shutting down
                return


def _find_engine_core():
    """The EngineCoreProc constructing this scheduler (it owns the input queue), if any."""
    f = sys._getframe(2)
    while f is not None:
        obj = f.f_locals.get("self")
        if obj is not None and hasattr(obj, "input_queue") and hasattr(obj, "model_executor"):
            return obj
        f = f.f_back
    return None


class CTKSchedulerMixin:
    """Pins and program-level ordering for vLLM's ``Scheduler`` / ``AsyncScheduler`` (see module doc)."""

    ctk: PolicyCore

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        engine = _find_engine_core()
        self._ctk_setup(engine)

    # -- setup -------------------------------------------------------------------------------------------

    def _ctk_setup(self, engine=None) -> None:
        missing = check_vllm_contract()
        if missing:
            raise VllmContractError(
                "ctk scheduler: the installed vLLM lacks what the adapter needs: "
                + "; ".join(missing)
                + f". ctk supports vLLM {SUPPORTED_VLLM}."
            )
        cfg = ServeConfig.from_env()
        extra = getattr(self.vllm_config, "additional_config", None) or {}
        if isinstance(extra, dict) and isinstance(extra.get("ctk"), dict):
            cfg = ServeConfig.from_mapping(extra["ctk"], base=cfg)
        self._ctk_pinned: dict = {}  # request id -> vllm Request whose blocks are kept
        self._ctk_hints: dict[str, RequestHints] = {}
        self._ctk_admitted: set[str] = set()
        self._ctk_total_blocks = max(1, self.kv_cache_manager.block_pool.num_gpu_blocks - 1)
        self._ctk_tokenizer = None
        self._ctk_tokenizer_failed = False
        self._ctk_recorder = None
        # The pressure valve wraps allocate_slots only while pins exist (zero cost otherwise).
        self._ctk_orig_allocate = self.kv_cache_manager.allocate_slots
        self._ctk_timer = _WakeTimer(weakref.ref(engine)) if engine is not None else None
        self._ctk_configure(cfg)

    def _ctk_configure(self, cfg: ServeConfig) -> None:
        cfg.validate()
        tables = None
        if cfg.ttl_model:
            from ctk.predict.modelfile import load_ttl_tables

            tables = load_ttl_tables(cfg.ttl_model)
        from ctk.engine_patch.metrics import PrometheusSink

        sinks = [PrometheusSink(cfg.policy)]
        if cfg.record:
            from ctk.engine_patch.recorder import TraceRecorder

            self._ctk_recorder = TraceRecorder(
                cfg.record, model=self.vllm_config.model_config.model, config={"policy": cfg.policy}
            )
            sinks.append(self._ctk_recorder)
        self.ctk = PolicyCore(cfg, tables, block_size=self.block_size, sink=FanoutSink(*sinks))
        logger.info(
            "ctk scheduler: policy=%s ttl_model=%s record=%s max_pin_share=%.2f blocks=%d",
            cfg.policy,
            cfg.ttl_model,
            cfg.record,
            cfg.max_pin_share,
            self._ctk_total_blocks,
        )

    def ctk_reconfigure(self, **settings) -> None:
        """Switch policy / settings on a live engine (tests, benchmarks): pins are released first."""
        self._ctk_apply(self.ctk.release_all("reconfigure"))
        if self._ctk_recorder is not None:
            self._ctk_recorder.close()
            self._ctk_recorder = None
        self._ctk_hints.clear()
        self._ctk_admitted.clear()
        self._ctk_configure(ServeConfig.from_mapping(settings, base=dataclasses.replace(self.ctk.config)))

    # -- helpers -----------------------------------------------------------------------------------------

    def _ctk_state(self, now: float) -> EngineState:
        return EngineState(
            now,
            self.kv_cache_manager.block_pool.get_num_free_blocks(),
            self._ctk_total_blocks,
            len(self.waiting),
        )

    def _ctk_apply(self, releases: Iterable[Release]) -> None:
        for rel in releases:
            req = self._ctk_pinned.pop(rel.request_id, None)
            if req is not None:
                self._free_request_blocks(req)
        if not self._ctk_pinned and "allocate_slots" in vars(self.kv_cache_manager):
            del self.kv_cache_manager.allocate_slots  # back to the class method: no valve needed

    def _ctk_hold(self, request) -> None:
        """Keep a finished request's blocks (the request leaves ``self.requests`` as usual)."""
        self._ctk_pinned[request.request_id] = request
        del self.requests[request.request_id]
        self.kv_cache_manager.allocate_slots = self._ctk_allocate_slots

    def _ctk_rearm(self) -> None:
        if self._ctk_timer is not None and (self._ctk_pinned or self._ctk_timer._deadline is not None):
            self._ctk_timer.set(self.ctk.next_deadline())

    def _ctk_blocks(self, request_id: str) -> int:
        """KV blocks the request holds (all KV-cache groups)."""
        try:
            managers = self.kv_cache_manager.coordinator.single_type_managers
            return sum(len(m.req_to_blocks.get(request_id, ())) for m in managers)
        except AttributeError:
            return sum(len(ids) for ids in self.kv_cache_manager.get_block_ids(request_id))

    def _ctk_text(self, request) -> str | None:
        if self._ctk_tokenizer is None and not self._ctk_tokenizer_failed:
            try:
                from vllm.tokenizers.registry import cached_tokenizer_from_config

                self._ctk_tokenizer = cached_tokenizer_from_config(self.vllm_config.model_config)
            except Exception as exc:  # no tokenizer: detection by hints only
                logger.warning("ctk: no tokenizer for tool-call detection (%s); use the 'tool' hint", exc)
                self._ctk_tokenizer_failed = True
        if self._ctk_tokenizer is None:
            return None
        ids = list(request.output_token_ids[-DETECT_TAIL_TOKENS:])
        try:
            return self._ctk_tokenizer.decode(ids, skip_special_tokens=False)
        except Exception:
            return None

    # -- hooks -------------------------------------------------------------------------------------------

    def add_request(self, request) -> None:
        rid = request.request_id
        is_new = rid not in self.requests
        super().add_request(request)
        if not is_new or not self.ctk.pins_enabled and not self.ctk.reorders:
            return
        sp = request.sampling_params
        hints = parse_hints(getattr(request, "session_id", None), sp.extra_args if sp is not None else None)
        self._ctk_hints[rid] = hints
        self._ctk_apply(self.ctk.arrived(rid, hints, time.monotonic()))

    def schedule(self, *args, **kwargs):
        now = time.monotonic()
        if self._ctk_pinned:
            self._ctk_apply(self.ctk.tick(now))
        waiting = self.waiting
        if self.ctk.needs_reorder(len(waiting), now) and hasattr(waiting, "rotate"):
            reqs = list(waiting)
            order = self.ctk.order_waiting([r.request_id for r in reqs], now)
            if order is not None and order != list(range(len(reqs))):
                waiting.clear()
                waiting.extend(reqs[i] for i in order)
        running = self.running
        if (
            self.ctk.reorders
            and len(running) > 1
            and self.kv_cache_manager.block_pool.get_num_free_blocks()
            < PREEMPT_ORDER_FREE_SHARE * self._ctk_total_blocks
        ):
            order = self.ctk.order_running([r.request_id for r in running])
            if order is not None:
                running[:] = [running[i] for i in order]
        out = super().schedule(*args, **kwargs)
        if self._ctk_hints:
            for new in out.scheduled_new_reqs:
                rid = new.req_id
                if rid in self._ctk_hints and rid not in self._ctk_admitted:
                    self._ctk_admitted.add(rid)
                    self._ctk_apply(self.ctk.admitted(rid, new.num_computed_tokens, now))
        self._ctk_rearm()
        return out

    def _ctk_allocate_slots(self, *args, **kwargs):
        blocks = self._ctk_orig_allocate(*args, **kwargs)
        if blocks is None and self._ctk_pinned and self._ctk_valve_open():
            request = args[0] if args else kwargs.get("request")
            status = getattr(getattr(request, "status", None), "name", "RUNNING")
            # A request not yet running is being admitted: program FCFS decides which pins it may take.
            admitting = request.request_id if status != "RUNNING" else None
            engine_busy = len(self.running) > 0
            while blocks is None and self._ctk_pinned:
                rel = self.ctk.release_for_pressure(admitting=admitting, engine_busy=engine_busy)
                if rel is None:
                    break
                self._ctk_apply([rel])
                blocks = self._ctk_orig_allocate(*args, **kwargs)
        return blocks

    def _ctk_valve_open(self) -> bool:
        if self.ctk.policy == "continuum":
            # Continuum has no valve: it preempts running requests first. Releasing pins only when
            # nothing else can give memory back keeps it deadlock-free.
            return len(self.running) <= 1
        return True

    def _free_blocks(self, request) -> None:
        from vllm.v1.request import RequestStatus

        rid = request.request_id
        self._ctk_admitted.discard(rid)
        hints = self._ctk_hints.pop(rid, None)
        if hints is None:
            super()._free_blocks(request)
            return
        if request.status == RequestStatus.FINISHED_ABORTED:
            self._ctk_apply(self.ctk.aborted(rid))
            super()._free_blocks(request)
            self._ctk_rearm()
            return
        natural = request.status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH_CAPPED)
        now = time.monotonic()
        text = None
        if (
            natural
            and hints.tool is None
            and hints.program_id is not None
            and not hints.last_turn
            and self.ctk.pins_enabled
        ):
            text = self._ctk_text(request)
        ev = Finished(
            request_id=rid,
            hints=hints,
            output_text=text,
            prompt_tokens=request.num_prompt_tokens,
            num_tokens=request.num_tokens,
            output_tokens=request.num_output_tokens,
            blocks=self._ctk_blocks(rid) if natural else 0,
            natural=natural,
        )
        pinned, releases = self.ctk.finished(ev, self._ctk_state(now))
        self._ctk_apply(releases)
        if pinned:
            self._ctk_hold(request)
        else:
            super()._free_blocks(request)
        self._ctk_rearm()

    def has_requests(self) -> bool:
        if self._ctk_pinned:
            self._ctk_apply(self.ctk.tick())
            self._ctk_rearm()
        return super().has_requests()

    def reset_prefix_cache(self, *args, **kwargs) -> bool:
        # Pinned blocks would make the reset fail: release them first.
        self._ctk_apply(self.ctk.release_all("reset"))
        return super().reset_prefix_cache(*args, **kwargs)

    def shutdown(self) -> None:
        self._ctk_apply(self.ctk.release_all("shutdown"))
        if self._ctk_timer is not None:
            self._ctk_timer.stop()
        if self._ctk_recorder is not None:
            self._ctk_recorder.close()
        super().shutdown()

    # -- introspection (tests, benchmarks) ---------------------------------------------------------------

    def ctk_pinned_request_ids(self) -> list[str]:
        return sorted(self._ctk_pinned)


def _make_classes():
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler

    class CTKScheduler(CTKSchedulerMixin, Scheduler):
        """vLLM's synchronous Scheduler with ctk pins and program-level ordering."""

    class CTKAsyncScheduler(CTKSchedulerMixin, AsyncScheduler):
        """vLLM's AsyncScheduler (the GPU default) with ctk pins and program-level ordering."""

    for cls in (CTKScheduler, CTKAsyncScheduler):
        cls.__module__ = __name__
        cls.__qualname__ = cls.__name__
    return CTKScheduler, CTKAsyncScheduler


def __getattr__(name: str):
    # The concrete classes import vLLM; build them on first use so the core stays importable without it.
    if name in ("CTKScheduler", "CTKAsyncScheduler"):
        sched, async_sched = _make_classes()
        globals()["CTKScheduler"], globals()["CTKAsyncScheduler"] = sched, async_sched
        return globals()[name]
    raise AttributeError(name)
