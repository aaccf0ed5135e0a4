"""The vLLM 0.32.0 scheduler plugin: a thin mixin that maps vLLM's hooks onto :class:`PolicyDriver` calls
through a :class:`~ctk.engine_patch.vllm_door.VllmDoor` (the only place touching vLLM internals).

Load it with ``--scheduler-cls ctk.engine_patch.scheduler.matching_scheduler`` (``ctk serve`` does: the class
that matches vLLM's final async-scheduling mode, which vLLM settles only in the engine process), with one of
the two classes by name, or through the ``vllm.general_plugins`` entry point with ``CTK_POLICY`` set
(:mod:`ctk.engine_patch.plugin`). A class that does not match the mode, or a data-parallel size above 1, is
refused at construction with one line (:func:`~ctk.engine_patch.vllm_door.check_engine_fit`). Settings
come from ``CTK_*`` environment variables and ``additional_config["ctk"]``
(:class:`~ctk.policy.config.ServeConfig`).

=========================  ===========================================================================
vLLM hook                  driver call
=========================  ===========================================================================
``add_request``            :meth:`~PolicyDriver.request_added` (hints from ``session_id`` + ``vllm_xargs``,
                           parsed in vLLM's input thread when the engine core has one)
``schedule``               :meth:`~PolicyDriver.step_begin`, vLLM schedules, :meth:`~PolicyDriver.step_end`
allocation failure         :meth:`~PolicyDriver.allocation_failed` (the door's valve, armed for a step
                           only when pins are held and memory could run short in it; retried per pin)
``_free_blocks``           :meth:`~PolicyDriver.request_finished`; True: the door holds the blocks
``_handle_blocked_waiting_request``  :meth:`~PolicyDriver.may_admit`; False: vLLM skips the waiting request
                           this step (deferred, requeued at the front), as it skips one still loading KV
``has_requests``           :meth:`~PolicyDriver.idle` (pins held); the door wakes an idle engine at a deadline
``reset_prefix_cache``     :meth:`~PolicyDriver.shutdown` (held blocks would fail the reset)
``shutdown``               :meth:`~PolicyDriver.shutdown`, the trace recorder flushed
=========================  ===========================================================================

Both vLLM schedulers get the same mixin: ``CTKScheduler`` (sync; CPU forces it) and ``CTKAsyncScheduler``
(the GPU default). The clock is read here, once per hook, and passed down.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time

from ctk.engine_patch.logs import follow_vllm_logging
from ctk.engine_patch.vllm_door import (  # noqa: F401 (re-exported for callers of the old module)
    AHEAD_LINE,
    SUPPORTED_VLLM,
    VllmContractError,
    VllmDoor,
    check_engine_fit,
    check_vllm_contract,
    find_engine_core,
    require_vllm_contract,
)
from ctk.policy.config import ServeConfig
from ctk.policy.driver import PolicyDriver
from ctk.policy.events import FanoutSink, ReleaseReason

logger = logging.getLogger("ctk.engine_patch")
_now = time.monotonic  # read once per hook (a module global: one lookup on the hot path)


class CTKSchedulerMixin:
    """Pins and program-level ordering for vLLM's ``Scheduler`` / ``AsyncScheduler`` (see module doc)."""

    ctk_door: VllmDoor
    ctk_driver: PolicyDriver
    ctk_async: bool  # built on vLLM's AsyncScheduler

    def __init__(self, *args, **kwargs):
        follow_vllm_logging()  # the start-up line below reaches the server's log
        require_vllm_contract()
        check_engine_fit(self.ctk_async, kwargs.get("vllm_config", args[0] if args else None))
        super().__init__(*args, **kwargs)
        # vLLM's own hooks, bound once: the hooks run with cold caches, where a ``super()`` lookup per call
        # (a new super object, a walk of the MRO) costs about a microsecond each step.
        base = super()
        self._ctk_schedule = base.schedule
        self._ctk_add_request = base.add_request
        self._ctk_free_blocks = base._free_blocks
        self._ctk_blocked = base._handle_blocked_waiting_request
        self.ctk_door = VllmDoor(self, find_engine_core())
        self._ctk_recorder = None
        cfg = ServeConfig.from_env()
        settings = self.ctk_door.ctk_settings()
        self._ctk_configure(ServeConfig.from_mapping(settings, base=cfg) if settings else cfg)

    # -- configuration ---------------------------------------------------------------------------------

    @property
    def ctk(self):
        """The policy core (stats, pins; tests and benchmarks read it)."""
        return self.ctk_driver.core

    def _ctk_configure(self, cfg: ServeConfig) -> None:
        from ctk.engine_patch.metrics import PrometheusSink
        from ctk.policy.core import PolicyCore
        from ctk.policy.rules import make_rule

        cfg.validate()
        tables = None
        if cfg.ttl_model:
            from ctk.predict.modelfile import load_ttl_tables

            tables = load_ttl_tables(cfg.ttl_model)
        self._ctk_metrics = PrometheusSink(cfg.policy)
        sinks = [self._ctk_metrics]
        if cfg.record:
            from ctk.engine_patch.recorder import TraceRecorder

            self._ctk_recorder = TraceRecorder(
                cfg.record, model=self.ctk_door.model_name(), config={"policy": str(cfg.policy)}
            )
            sinks.append(self._ctk_recorder)
        door = self.ctk_door
        rule = make_rule(cfg.policy, cfg, tables)
        core = PolicyCore(
            cfg,
            rule,
            block_size=door.block_size,
            sink=sinks[0] if len(sinks) == 1 else FanoutSink(*sinks),  # one sink: no fan-out frame
            unix_offset_s=time.time() - time.monotonic(),  # the recorder's wall-clock timestamps
        )
        self.ctk_driver = PolicyDriver(core, door)
        door.parse_ahead = self.ctk_driver.tracking  # (stock vLLM reads no hints)
        if door.parse_ahead and door.parses_in_input_thread:
            logger.info(AHEAD_LINE)
        door.valve = self.ctk_driver.allocation_failed
        agent_prefix = door.set_agent_prefix(cfg.agent_prefix_tokens if core.reads_agent else 0)
        if core.pins_enabled:
            door.load_tokenizer()  # now, not in the step of the first finish that needs tool-call detection
        logger.info(
            "ctk scheduler: policy=%s ttl_model=%s record=%s max_pin_share=%.2f blocks=%d program order=%s "
            "agent prefix=%d tokens",
            cfg.policy,
            cfg.ttl_model,
            cfg.record,
            cfg.max_pin_share,
            door.total_blocks,
            door.reorders_waiting,
            agent_prefix,
        )

    def ctk_reconfigure(self, **settings) -> None:
        """Switch policy / settings on a live engine (tests, benchmarks): pins are released first."""
        self.ctk_driver.shutdown(ReleaseReason.RECONFIGURE)
        self._ctk_metrics.close()
        if self._ctk_recorder is not None:
            self._ctk_recorder.close()
            self._ctk_recorder = None
        self._ctk_configure(ServeConfig.from_mapping(settings, base=dataclasses.replace(self.ctk.config)))

    # -- hooks -------------------------------------------------------------------------------------------

    def add_request(self, request) -> None:
        driver = self.ctk_driver
        if not driver.tracking:
            return self._ctk_add_request(request)
        door = self.ctk_door
        rid = request.request_id
        if not door.is_known(rid):  # (a streaming update of a known request is not an arrival)
            # told before vLLM queues it: a queue that keeps the policy's order asks the core for its key
            driver.request_added(rid, door.take_hints(request), _now(), request.num_prompt_tokens)
        self._ctk_add_request(request)

    def schedule(self, throttle_prefills: bool = False):
        # (vLLM's SchedulerInterface signature: no *args/**kwargs to pack and unpack every step)
        driver = self.ctk_driver
        if not driver.tracking:  # stock vLLM: nothing to order, nothing held
            return self._ctk_schedule(throttle_prefills)
        now = _now()
        driver.step_begin(now)
        if driver.held:
            self.ctk_door.arm_valve()
        out = self._ctk_schedule(throttle_prefills)
        if out.scheduled_new_reqs and driver.requests:
            driver.step_end(self.ctk_door.admissions(out), now)
        return out

    def _handle_blocked_waiting_request(self, request) -> bool:
        # vLLM's waiting loop asks this of each request it would admit; False skips the request for this step
        # the way vLLM skips one still loading KV (deferred, put back at the queue's front after the loop).
        # The rule's admission gate (a paused program) holds a fitting request back here.
        driver = self.ctk_driver
        if driver.gate is not None and not driver.may_admit(request.request_id):
            return False
        return self._ctk_blocked(request)

    def _free_blocks(self, request) -> None:
        driver = self.ctk_driver
        if driver.requests and driver.request_finished(
            request.request_id, self.ctk_door.end_of(request), _now()
        ):
            return  # pinned: the door holds the blocks (the request left ``requests``)
        self._ctk_free_blocks(request)

    def has_requests(self) -> bool:
        # Asked by the idle engine loop (woken at the pin deadline): expiry. A busy engine steps the core
        # in schedule() instead.
        if self.ctk_driver.held and not self.ctk_door.busy():
            self.ctk_driver.idle(time.monotonic())
        return super().has_requests()

    def reset_prefix_cache(self, *args, **kwargs) -> bool:
        self.ctk_driver.shutdown(ReleaseReason.RESET)  # held blocks would make the reset fail
        return super().reset_prefix_cache(*args, **kwargs)

    def shutdown(self) -> None:
        self.ctk_driver.shutdown(ReleaseReason.SHUTDOWN)
        self._ctk_metrics.close()
        self.ctk_door.close()
        if self._ctk_recorder is not None:
            self._ctk_recorder.close()
        super().shutdown()

    # -- introspection (tests, benchmarks) ---------------------------------------------------------------

    def ctk_pinned_request_ids(self) -> list[str]:
        return sorted(self.ctk_driver.held)


def _make_classes():
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler

    class CTKScheduler(CTKSchedulerMixin, Scheduler):
        """vLLM's synchronous Scheduler with ctk pins and program-level ordering."""

        ctk_async = False

    class CTKAsyncScheduler(CTKSchedulerMixin, AsyncScheduler):
        """vLLM's AsyncScheduler (the GPU default) with ctk pins and program-level ordering."""

        ctk_async = True

    for cls in (CTKScheduler, CTKAsyncScheduler):
        cls.__module__ = __name__
        cls.__qualname__ = cls.__name__
    return CTKScheduler, CTKAsyncScheduler


def scheduler_class(async_scheduling: bool) -> type:
    """The ctk class for vLLM's scheduling mode: ``CTKAsyncScheduler`` when async, else ``CTKScheduler``."""
    sched, async_sched = _classes()
    return async_sched if async_scheduling else sched


def matching_scheduler(*args, **kwargs):
    """What ``ctk serve`` passes as ``--scheduler-cls``: builds the class that matches the engine's final
    async-scheduling mode (vLLM's engine core calls ``get_scheduler_cls()(vllm_config=..., ...)``)."""
    follow_vllm_logging()
    vllm_config = kwargs.get("vllm_config", args[0] if args else None)
    cls = scheduler_class(bool(vllm_config.scheduler_config.async_scheduling))
    logger.info(CLASS_LINE, cls.__name__, "on" if cls.ctk_async else "off")
    return cls(*args, **kwargs)


#: The engine's log line naming the class :func:`matching_scheduler` built (read by :func:`class_in_log`).
CLASS_LINE = "ctk scheduler: %s (vLLM's async scheduling is %s)"
_CLASS_LINE_RE = re.compile(re.escape(CLASS_LINE).replace("%s", r"(\w+)", 1).replace("%s", "(on|off)", 1))


def class_in_log(text: str) -> tuple[str, bool] | None:
    """(class name, async scheduling on?) from an engine log's :data:`CLASS_LINE`; None when absent."""
    m = _CLASS_LINE_RE.search(text)
    return (m.group(1), m.group(2) == "on") if m else None


def _classes() -> tuple[type, type]:
    return __getattr__("CTKScheduler"), __getattr__("CTKAsyncScheduler")


def __getattr__(name: str):
    # The concrete classes import vLLM; build them on first use so the core stays importable without it.
    if name in ("CTKScheduler", "CTKAsyncScheduler"):
        if name in globals():
            return globals()[name]
        sched, async_sched = _make_classes()
        globals()["CTKScheduler"], globals()["CTKAsyncScheduler"] = sched, async_sched
        return globals()[name]
    raise AttributeError(name)
