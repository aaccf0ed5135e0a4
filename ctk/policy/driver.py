"""The glue between an engine and the policy core: :class:`EngineView` (what the engine shows) and
:class:`PolicyDriver` (what the engine calls at its hook points).

Data flows one way: engine (vLLM or the simulator) -> ``EngineView`` -> ``PolicyDriver`` -> ``PolicyCore``.
Nothing here imports vLLM or reads a clock: the engine passes the time in. The vLLM adapter
(:mod:`ctk.engine_patch.scheduler` + :class:`~ctk.engine_patch.vllm_door.VllmDoor`) and the simulator drive
the same core through the same calls:

==========================================  =================================================================
engine event                                 driver call
==========================================  =================================================================
a request enters the engine                  :meth:`PolicyDriver.request_added`
before the engine schedules a step           :meth:`PolicyDriver.step_begin` (expiry and re-judgement of held
                                             pins, waiting order, preemption order when memory is short)
after it scheduled a step                    :meth:`PolicyDriver.step_end` (first admissions, prefix hits)
an allocation fails (preempt / refuse next)  :meth:`PolicyDriver.allocation_failed` -> True: retry it
a request finishes or is aborted             :meth:`PolicyDriver.request_finished` -> True: blocks held
the engine idles                             :meth:`PolicyDriver.idle` (expiry only); the engine wakes up at
                                             the deadline it is given through :meth:`EngineView.wake_at`
shutdown / cache reset                       :meth:`PolicyDriver.shutdown`
==========================================  =================================================================

With no pin held and nothing to reorder, every per-step call is a few attribute reads: the waiting demand
(a walk over the waiting queue) is computed only while pins exist or a pin is being decided.

The waiting order reaches the engine one of two ways. While the order's keys are fixed (no age bound:
``ttl``'s strict order) and the view offers ``keep_waiting_order``, the engine's queue holds itself in the
order, reading each request's key from the core (``PolicyCore.waiting_keys``): nothing is done per step but
re-keying the requests whose program gained or lost a pin (vLLM's adapter and the simulator both offer it,
with the same :class:`~ctk.policy.keyed_queue.KeyedQueue`). Otherwise (an age bound, or a view without it)
the core mirrors the engine's FIFO queue and each step applies its changes as moves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ctk.policy.events import EngineState, Finished, Release
from ctk.policy.hints import RequestHints

if TYPE_CHECKING:
    from ctk.policy.core import Pending

_new = object.__new__

#: Below this share of free KV blocks, the running list is ordered so that the engine's preemption victim
#: (the last running request) is the one the core chooses (the youngest program not on its last turn).
PREEMPT_ORDER_FREE_SHARE = 0.1


def head_demand(uncomputed: Iterable[int], slots: int) -> tuple[int, int]:
    """``EngineView.waiting_demand``'s rule, for every engine: of the waiting requests' uncomputed token
    counts in queue order, the head that fits ``slots`` free run slots -> (requests, tokens)."""
    n = tokens = 0
    if slots > 0:
        for t in uncomputed:
            tokens += t
            n += 1
            if n >= slots:
                break
    return n, tokens


class EngineView(Protocol):
    """What the driver may see of and do to an engine (vLLM through ``VllmDoor``, or the simulator).

    ``waiting_demand()`` is the demand that memory, not compute, keeps out: the number of waiting requests the
    engine would admit next if memory allowed (the head of the waiting queue, as many as it has free run
    slots; none when every slot is taken) and their uncomputed tokens. It is what the memory price charges
    for; a queue that waits for run slots costs a pin nothing.

    A view may answer 0 tokens for a head it knows fits the free memory without summing it (the price is
    then at rest either way: :meth:`~ctk.policy.price.MemoryPrice.slack`).

    ``reusable_tokens(request_id, num_tokens)``: of a finished request's first ``num_tokens`` tokens, how many
    a next turn extending them takes from the prefix cache while its blocks are held (None: every full block).
    ``waiting_changed()``: whether the engine changed its waiting queue since the last call other than by
    arrivals (:meth:`PolicyDriver.request_added`), first admissions, finishes and aborts the driver is told
    of, and the driver's own moves (a preempted request put back, a resumed one taken): the driver then
    orders the whole queue again. Resets on reading.
    An optional attribute ``reuses_every_full_block`` True says ``reusable_tokens`` answers None for every
    request (the driver does not ask then).
    An optional method ``keep_waiting_order(key_of)``: from now on the engine's queue holds itself in the
    order of ``key_of(request_id)`` (a key; None: unknown, last) and the method returns a
    ``rekey(request_ids)`` to call when keys change (never while the engine walks the queue); None when it
    cannot. ``keep_waiting_order(None)``: back to a FIFO queue the driver re-orders (``waiting_changed``).
    ``frees_now(request_id)``: releasing the held request gives its blocks back at once (an engine may have to
    defer the free while a step in flight still writes them; such a release cannot help a failed allocation).
    """

    block_size: int  # tokens per KV block
    total_blocks: int  # usable KV blocks

    def free_blocks(self) -> int: ...  # free (incl. evictable cached) blocks
    def num_waiting(self) -> int: ...
    def num_running(self) -> int: ...
    def waiting_ids(self) -> list[str]: ...  # scheduling order
    def reorder_waiting(self, order: list[int]) -> None: ...  # indices into waiting_ids()
    def move_waiting(self, src: int, dst: int) -> None: ...  # the waiting request at src to index dst
    def waiting_changed(self) -> bool: ...  # see below
    def running_ids(self) -> list[str]: ...  # the last one is the preemption victim
    def reorder_running(self, order: list[int]) -> None: ...
    def waiting_demand(self) -> tuple[int, int]: ...  # (requests, tokens): see above
    def blocks_of(self, request_id: str) -> int: ...  # blocks only a (just finished) request holds
    def hold(self, request_id: str) -> None: ...  # keep a finished request's blocks
    def free_held(self, request_id: str) -> None: ...  # release kept blocks to the (cached) free queue
    def output_text(self, request_id: str) -> str | None: ...  # tail of a finished request's output
    def reusable_tokens(self, request_id: str, num_tokens: int) -> int | None: ...  # see below
    def frees_now(self, request_id: str) -> bool: ...  # releasing this held request frees its blocks now
    def wake_at(self, deadline: float | None) -> None: ...  # call idle() at this time even if idle


@dataclass(slots=True)
class RequestEnd:
    """What the engine knows about a request that finished (not aborted). Not frozen: a frozen dataclass
    costs twice as much to build, once per finished request."""

    natural: bool  # stopped or hit its length limit (False: an error, ...)
    prompt_tokens: int
    num_tokens: int  # prompt + output: the context the next turn extends
    output_tokens: int


class PolicyDriver:
    """Applies the core's decisions to an engine through its :class:`EngineView` (see module doc)."""

    def __init__(self, core, view: EngineView, preempt_order_free_share: float = PREEMPT_ORDER_FREE_SHARE):
        self.core = core
        self.view = view
        self.held: set[str] = set()  # request ids whose blocks the engine keeps for a pin
        #: the requests the core tracks (waiting or running): its own registry, the one place they are kept
        self.requests: dict[str, Pending] = core.requests
        self._armed = False  # a wake-up deadline is set on the view
        self._preempt_free_blocks = preempt_order_free_share * view.total_blocks
        self._pins = bool(core.pins_enabled)
        # the view says its reusable_tokens answers None for every request (see EngineView)
        self._every_full_block = getattr(view, "reuses_every_full_block", False) is True
        self._reorders = bool(core.reorders)
        self.gate = core.gate  # the rule's admission gate (None: every fitting request is admitted)
        if self.gate is not None:
            self.gate.capacity_tokens = view.total_blocks * view.block_size
        # Stock vLLM (no pins, no reordering, no gate): the driver tracks nothing at all.
        self.tracking = self._pins or self._reorders or self.gate is not None
        # The waiting order: kept by the engine's queue itself while the order's keys are fixed and the view
        # offers it (``keep_waiting_order``); else mirrored by the core and applied as moves each step.
        self._keyed = False
        self._rekeys: set[str] = set()  # requests whose key changed, re-keyed before the next step
        self._queue_rekey: Callable[[Iterable[str]], None] | None = None
        keep = getattr(view, "keep_waiting_order", None)
        if keep is not None:
            if self._reorders and core.keys_stay_fixed():
                # (the engine re-keys before its next step, never while it walks its queue)
                self._queue_rekey = keep(core.order_in_engine(self._rekeys.update).get)
                self._keyed = self._queue_rekey is not None
                if not self._keyed:
                    core.order_in_core()
            else:
                keep(None)

    # -- engine state --------------------------------------------------------------------------------

    def state(self, now: float, demand: bool = False) -> EngineState:
        """The engine as the core sees it. The waiting demand (a walk over the head of the waiting queue) only
        while pins exist or ``demand``; then ``num_waiting`` counts the requests memory keeps out (see
        :class:`EngineView`), otherwise the whole queue with no demand."""
        v = self.view
        if demand or self.held:
            n_waiting, demand_tokens = v.waiting_demand()
        else:
            n_waiting, demand_tokens = v.num_waiting(), 0
        # EngineState(now, free_blocks, total_blocks, num_waiting, block_size, num_running,
        # waiting_demand_tokens, pinned_blocks) without its __init__ frame (once per finished request)
        st = _new(EngineState)
        st.now = now
        st.free_blocks = v.free_blocks()
        st.total_blocks = v.total_blocks
        st.num_waiting = n_waiting
        st.block_size = v.block_size
        st.num_running = v.num_running()
        st.waiting_demand_tokens = demand_tokens
        st.pinned_blocks = self.core.pinned_blocks
        return st

    def _apply(self, releases: Iterable[Release]) -> None:
        """Free the released pins' blocks; the wake-up deadline follows the pins."""
        freed = False
        for rel in releases:
            if rel.request_id in self.held:
                self.held.remove(rel.request_id)
                self.view.free_held(rel.request_id)
                freed = True
        if freed:
            self._rearm()

    def _rearm(self) -> None:
        if self.held or self._armed or self.gate is not None:
            deadline = self.next_deadline()
            self._armed = deadline is not None
            self.view.wake_at(deadline)

    # -- hooks ----------------------------------------------------------------------------------------

    def request_added(self, request_id: str, hints: RequestHints, now: float, prompt_tokens: int = 0) -> None:
        """A request entered the engine (not called again for a preempted request coming back)."""
        if not self.tracking:
            return
        releases = self.core.arrived(request_id, hints, now, prompt_tokens)
        if releases:
            self._apply(releases)

    def step_begin(self, now: float) -> None:
        """Before the engine schedules: held pins are judged, then the waiting and running orders set.
        Called every step: with no pin held, two counts and the free blocks are read, nothing more."""
        free = None  # free blocks, while known to be current
        if self.held:
            v = self.view
            n_waiting, demand_tokens = v.waiting_demand()  # (state()'s reads while pins are held)
            free = v.free_blocks()
            if not self.core.quiet_step(now, n_waiting, demand_tokens, max(0, free) * v.block_size):
                releases = self.core.step(
                    EngineState(
                        now,
                        free,
                        v.total_blocks,
                        n_waiting,
                        v.block_size,
                        v.num_running(),
                        demand_tokens,
                        self.core.pinned_blocks,
                    )
                )
                if releases:
                    self._apply(releases)
                    free = None
        gate = self.gate
        if gate is not None:
            if now >= gate.next_tick:
                self._tick_gate(now)
                free = None
            elif gate.holding and not self._armed:
                self._rearm()  # an idle engine must wake at the tick that may let the held requests in
        if not self._reorders:
            return
        view, core = self.view, self.core
        if self._keyed:
            if self._rekeys:
                self._queue_rekey(self._rekeys)
                self._rekeys.clear()
            if core.keys_stay_fixed():
                moves = []  # the engine's queue is in order
            else:
                self._order_in_core()
                moves = None  # (the whole queue is ordered below, and mirrored from now on)
        else:
            moves = core.waiting_moves(view.num_waiting(), now, view.waiting_changed())
        if moves:
            move = view.move_waiting
            for src, dst in moves:
                move(src, dst)
        elif moves is None:  # the queue changed behind the core's back: order all of it (the core resyncs)
            n_waiting = view.num_waiting()
            if n_waiting < 2 or core.needs_reorder(n_waiting, now):
                order = core.order_waiting(view.waiting_ids(), now)
                if order is not None and any(i != j for i, j in enumerate(order)):
                    view.reorder_waiting(order)
        if free is None:
            free = view.free_blocks()
        if free < self._preempt_free_blocks and view.num_running() > 1:  # rarely true first
            core = self.core
            order = core.order_running(view.running_ids())
            if order is not None and any(i != j for i, j in enumerate(order)):
                view.reorder_running(order)

    def _order_in_core(self) -> None:
        """The order's keys now depend on time (strict order relaxed to an age bound): the engine's queue
        goes back to FIFO in its current order, and the core mirrors it (after a whole order)."""
        self.view.keep_waiting_order(None)
        self.core.order_in_core()
        self._keyed = False
        self._queue_rekey = None
        self._rekeys.clear()

    def may_admit(self, request_id: str) -> bool:
        """The engine's waiting loop asks this for each request it would admit: False holds it back this step
        although it fits (the engine skips it and goes on with the next one, as vLLM skips a blocked one)."""
        return self.gate is None or self.core.may_admit(request_id)

    def _tick_gate(self, now: float) -> None:
        self.gate.tick(self.state(now))
        self._rearm()

    def step_end(self, admitted: Iterable[tuple[str, int]], now: float) -> None:
        """After the engine scheduled: ``admitted`` = (request id, prefix-cached tokens) of the requests
        that got KV blocks this step (a preempted request coming back is not a new admission)."""
        # (the core skips an unknown request, or a second admission: a preempted one back)
        releases = self.core.admitted_all(admitted, now)
        if releases:
            self._apply(releases)

    def allocation_failed(self, request_id: str, running: bool, now: float) -> bool:
        """The engine could not get blocks for ``request_id`` (``running``: it would preempt; otherwise the
        waiting request is refused). Releases one pin; True when it did (retry the allocation)."""
        if not self.held:
            return False
        n_running = self.view.num_running()
        if not self.core.valve_open(n_running):
            return False
        rel = self.core.release_for_pressure(
            now, None if running else request_id, n_running > 0, releasable=self.view.frees_now
        )
        if rel is None:
            return False
        self._apply([rel])
        return True

    def request_finished(self, request_id: str, end: RequestEnd | None, now: float) -> bool:
        """A request left the engine: ``end`` None = aborted. True when its blocks are now held (the
        engine must not free them; :meth:`EngineView.free_held` releases them later)."""
        pend = self.requests.get(request_id)  # (the core forgets it in finished / aborted)
        if pend is None:
            return False
        hints = pend.hints
        core = self.core
        if end is None:
            self._apply(core.aborted(request_id, now))
            return False
        natural = end.natural
        candidate = natural and self._pins
        view = self.view
        text = None
        if candidate and hints.tool is None and hints.program_id is not None and not hints.last_turn:
            text = view.output_text(request_id)  # tool-call detection needs the output
        ev = _new(Finished)  # Finished(...) without its __init__ frame
        ev.__dict__.update(
            request_id=request_id,
            hints=hints,
            output_text=text,
            prompt_tokens=end.prompt_tokens,
            num_tokens=end.num_tokens,
            output_tokens=end.output_tokens,
            blocks=view.blocks_of(request_id) if natural else 0,
            natural=natural,
            # (an engine whose next turn reuses every full block answers None: not asked)
            reusable_tokens=view.reusable_tokens(request_id, end.num_tokens)
            if candidate and not self._every_full_block
            else None,
        )
        pinned, releases = core.finished(ev, self.state(now, demand=candidate))
        if releases:
            self._apply(releases)
        if pinned:
            self.held.add(request_id)
            self.view.hold(request_id)
            self._rearm()
        return pinned

    def idle(self, now: float) -> None:
        """The engine has nothing to run: expire / re-judge held pins (at the deadline it was given)."""
        if self.held:
            self._apply(self.core.step(self.state(now)))
            self._rearm()  # the timer that woke the engine is spent
        gate = self.gate
        if gate is not None and now >= gate.next_tick:
            self._tick_gate(now)

    def next_deadline(self) -> float | None:
        """The next pin expiry or admission-gate tick (caller's clock)."""
        deadline = self.core.next_deadline()
        tick = self.gate.next_tick if self.gate is not None and self.gate.holding else None
        if tick is None:
            return deadline
        return tick if deadline is None else min(deadline, tick)

    def shutdown(self, reason) -> None:
        """Release every pin (shutdown, prefix-cache reset, reconfiguration)."""
        self._apply(self.core.release_all(reason))
