"""The policy core: bookkeeping of programs, pending requests and pins; every decision is the rule's.

Plain Python, no vLLM import and no clock: every method takes the time (the caller's monotonic seconds, or a
simulator's virtual clock). A :class:`~ctk.policy.driver.PolicyDriver` calls it from the engine's hooks
and applies the :class:`~ctk.policy.events.Release` list each method returns (free those blocks).

- :meth:`PolicyCore.arrived` — a request entered the engine. Registers its program; if the program's previous
  turn ended in a tool call, the tool's duration (finish -> this arrival) is observed (the rule learns, the
  sink records). A pin of the program now awaits this request's admission and no longer expires.
- :meth:`PolicyCore.admitted` (:meth:`~PolicyCore.admitted_all`: a step's admissions in one call) — the
  request got KV blocks: the program's pin is released (hit when the request found the pinned full blocks
  in the cache, else miss) — unless the rule releases on the next request's finish (Continuum).
- :meth:`PolicyCore.finished` — the rule decides at the live price whether and how long to pin; never after
  an abort, the last turn, without a program id or without a detected / hinted tool call. Pins stay within
  the rule's ``max_pin_share`` of the cache: less valuable pins make room, or the new one is skipped.
- :meth:`PolicyCore.aborted` — the request's own pin and its program's pin are released.
- :meth:`PolicyCore.step` — expiry, the price update, and (only when the price moved) re-judgement of every
  held pin by the rule.
- :meth:`PolicyCore.release_for_pressure` — the valve, called before any preemption or refused admission:
  the pin of lowest value per token-second still to hold goes first (never one whose program is back);
  under program ordering a waiting request takes pins only once overdue or when nothing runs.
- :meth:`PolicyCore.order_waiting` / :meth:`PolicyCore.order_running` — the rule's ``waiting_order`` (program
  FCFS with the age bound, or ttl's :class:`~ctk.policy.ordering.ResumeFirstOrder`); the youngest program is
  preempted first.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache

from ctk.policy.config import ServeConfig
from ctk.policy.detect import ToolCall, detect_tool_call
from ctk.policy.events import (
    EngineState,
    EventSink,
    Finished,
    NullSink,
    Pin,
    PinCall,
    PolicyStats,
    Release,
    ReleaseReason,
    ToolObservation,
)
from ctk.policy.hints import RequestHints
from ctk.policy.ordering import SizeFirstOrder, SizeSource, build_order, resumed_turn
from ctk.policy.price import MemoryPrice
from ctk.policy.rules import PinRule
from ctk.policy.waitlist import WaitingList
from ctk.predict.features import command_keys

_new = object.__new__


@dataclass(slots=True)
class Program:
    program_id: str
    first_arrival: float
    rank: int = 0  # programs seen before it (ties of first arrival, as in a simulator's batch start)
    turns: int = 0  # requests seen
    pending: set[str] = field(default_factory=set)  # request ids in the engine (waiting or running)
    pin: Pin | None = None
    # The last finished turn that ended in a tool call (for the duration measurement).
    last_finish: float | None = None
    last_tool: ToolCall | None = None
    last_keys: tuple[str, ...] = ()
    last_context_tokens: int = 0
    last_output_tokens: int = 0
    last_turn_index: int = 0
    done: bool = False  # its last turn finished
    agent: str | None = None  # the agent running it (admit_order="agent")
    work: float = 0.0  # its turns' contexts so far, thousands of tokens (admit_order="agent")


@dataclass(slots=True)
class Pending:
    arrival: float
    hints: RequestHints
    admitted: bool = False
    #: its program, None without a program id (kept while a request of it is pending: a program with pending
    #: requests is never trimmed)
    program: Program | None = None


class PolicyCore:
    """State of one engine's pin / ordering policy; decisions come from ``rule`` (see module docstring)."""

    def __init__(
        self,
        config: ServeConfig,
        rule: PinRule,
        block_size: int = 16,
        sink: EventSink | None = None,
        unix_offset_s: float = 0.0,
    ):
        self.config = config
        self.rule = rule
        self.policy = rule.policy
        self.block_size = max(1, block_size)
        self.sink: EventSink = sink or NullSink()
        self.unix_offset_s = unix_offset_s  # caller's clock -> wall clock, for the recorder
        self.stats = PolicyStats()
        self.programs: OrderedDict[str, Program] = OrderedDict()
        self._programs_seen = 0
        self.requests: dict[str, Pending] = {}
        self.pins: dict[str, Pin] = {}  # request id -> pin
        self.pinned_blocks = 0
        # expiry without a walk over the pins: (expires, creation number, pin), stale entries skipped
        self._expiries: list[tuple[float, int, Pin]] = []
        self._pins_made = 0
        self._returned: dict[str, Pin] = {}  # pins whose program's next request arrived (next_request_id set)
        self.price = MemoryPrice(config.price_decay_s, config.price_tolerance)
        self.order = build_order(
            rule.waiting_order,
            config.age_factor if rule.age_bound else math.inf,
            config.age_min_s,
            config.age_quantile,
            min_waits=config.age_min_waits,
            admit_order=config.admit_order,
            resume_order=config.resume_order,
            admit_aging=config.admit_aging,
            admit_round=config.admit_round,
        )
        sized = isinstance(self.order, SizeFirstOrder)
        # program rank -> size, read by the size order's key, and where sizes come from (None: by arrival)
        self._sizes: dict[int, float] | None = self.order.sizes if sized else None
        self._sizing: SizeSource | None = self.order.sizing if sized else None
        self._attained: dict[int, float] | None = self.order.attained if sized else None
        #: a new program's agent is read (``admit_order="agent"``): an engine adapter may derive one for a
        #: request naming none (``agent_prefix_tokens``)
        self.reads_agent = self._sizing is not None and self._sizing.reads_agent
        # programs' work is kept (a size source learning from it, or least attained service)
        self._work = (self._sizing is not None and self._sizing.learns) or self._attained is not None
        self.reorders = rule.program_fcfs
        self.gate = rule.gate  # holds back fitting waiting requests (None: never; see may_admit)
        self._strict_needs_returns = not rule.age_bound and rule.strict_needs_returns
        # waiting (not yet admitted) request id -> arrival, oldest first: the head's age, read only under an
        # age bound. None until first read with a finite bound (strict order never reads it: nothing is
        # overdue), then built from ``requests`` (arrival order) and kept (_head_overdue)
        self._queue: dict[str, float] | None = None
        self._charging = False  # the price was last charged to the held pins (the queue's head is overdue)
        self.returns = ReturnShare()
        self.contention = BudgetContention()
        self._order_dirty = True  # set by every event that can change the waiting order
        self._order_len = 0
        self._order_bound = self.order.age_bound_s
        self._next_overdue = math.inf
        # the waiting queue in scheduling order, kept between steps (waiting_moves); None: no program order,
        # or the engine's queue keeps the order itself (order_in_engine)
        self.waitlist = WaitingList(self.order.key, self._order_inputs) if self.reorders else None
        self._rekey: Callable[[Iterable[str]], None] | None = None  # the engine queue's (order_in_engine)
        #: while the engine keeps the order (order_in_engine): request id -> its order key, for every request
        #: the core tracks (made at arrival, remade when its program gains or loses a pin), read by the
        #: engine's queue (``waiting_keys.get``)
        self.waiting_keys: dict[str, tuple] | None = None
        self._key_seq = 0  # tie-breaks of waiting_keys

    # -- helpers -----------------------------------------------------------------------------------------

    @property
    def pins_enabled(self) -> bool:
        return self.rule.pins

    def _program(self, program_id: str, now: float) -> Program:
        prog = self.programs.get(program_id)
        if prog is None:
            self._programs_seen += 1
            prog = self.programs[program_id] = Program(program_id, now, self._programs_seen)
            if len(self.programs) > self.config.max_programs:
                self._trim_programs()
        else:
            self.programs.move_to_end(program_id)
        return prog

    def _trim_programs(self) -> None:
        while len(self.programs) > self.config.max_programs:
            for pid, prog in self.programs.items():  # oldest first
                if prog.pin is None and not prog.pending:
                    del self.programs[pid]
                    if self._sizes is not None:
                        self._sizes.pop(prog.rank, None)
                        if self._attained is not None:
                            self._attained.pop(prog.rank, None)
                    break
            else:
                return

    def _release(self, pin: Pin, reason: ReleaseReason, admitting: str | None = None) -> Release:
        """``admitting``: the program's request whose admission ends the pin (just taken from the queue)."""
        self.pins.pop(pin.request_id, None)
        self._returned.pop(pin.request_id, None)
        self.pinned_blocks -= pin.blocks
        prog = self.programs.get(pin.program_id)
        if prog is not None and prog.pin is pin:
            prog.pin = None
            if prog.pending:
                self._touch(prog.pending, admitting)
        self._order_dirty = True
        self.stats.releases[reason] = self.stats.releases.get(reason, 0) + 1
        self.returns.pin_ended(pin, reason)
        rel = Release(pin.request_id, reason, pin.blocks)
        self.sink.pin_released(rel, self.pinned_blocks)
        return rel

    def _touch(self, request_ids: set[str], admitting: str | None = None) -> None:
        """These pending requests' program gained or lost a pin: their waiting order key changed (each is
        remade: a running request preempted later goes back at its new key). The engine's queue re-keys
        them all but ``admitting``, the request being admitted (just taken from the queue: a pin hit's own,
        the usual case; then nothing is left to re-key)."""
        if self.waitlist is not None:
            self.waitlist.touch(request_ids)
        elif self.waiting_keys is not None:
            for rid in request_ids:
                self._key_of(rid)
            queued = [rid for rid in request_ids if rid != admitting]
            if queued:
                self._rekey(queued)

    def _key_of(self, request_id: str) -> None:
        """(Re)make a pending request's :attr:`waiting_keys` entry from its order inputs now (the engine keeps
        the order: no mirror)."""
        inputs = self._order_inputs(request_id)
        if inputs is not None:
            self._enter_order(request_id, inputs)

    def _enter_order(self, request_id: str, inputs: tuple[float, float | None, bool, int]) -> None:
        """A request enters the waiting order with ``inputs`` (:meth:`_order_inputs`'s shape): the mirror's
        tail, or, when the engine keeps the order, its :attr:`waiting_keys` entry with a new tie-break."""
        if self.waitlist is not None:
            self.waitlist.add(request_id, inputs)
        elif self.waiting_keys is not None:
            self._key_seq += 1
            self.waiting_keys[request_id] = self.order.key(*inputs, self._key_seq)

    def _hit(self, pin: Pin, admitting: str | None = None) -> Release:
        self.stats.pin_hits += 1
        self.sink.pin_hit(pin)
        return self._release(pin, ReleaseReason.HIT, admitting)

    def _held_for_next(self, pin: Pin) -> bool:
        """The program's next request waits for admission: the pin does not expire meanwhile (its hit is
        near). Once admitted, ctk rules have released the pin; Continuum's expiry clock runs again."""
        if pin.next_request_id is None:
            return False
        pend = self.requests.get(pin.next_request_id)
        return pend is not None and not pend.admitted

    # -- events ------------------------------------------------------------------------------------------

    def arrived(
        self, request_id: str, hints: RequestHints, now: float, prompt_tokens: int = 0
    ) -> list[Release]:
        """A request entered the engine. Releases nothing: a pin of its program now awaits its admission."""
        self._order_dirty = True
        if hints.warnings:
            self.stats.ignored_metadata += 1
        pid = hints.program_id
        pend = _new(Pending)  # Pending(now, hints) without its __init__ frame (once per arrival)
        pend.arrival, pend.hints, pend.admitted, pend.program = now, hints, False, None
        self.requests[request_id] = pend
        reorders = self.reorders
        if reorders:
            self.order.arrived(now)
            if self._queue is not None:
                self._queue[request_id] = now
        if pid is None:
            if reorders:
                self._enter_order(request_id, (now, None, False, 0))  # (_order_inputs's answer)
            return []
        if self.gate is not None:
            self.gate.arrived(pid, prompt_tokens, now)
        programs = self.programs
        prog = programs.get(pid)  # (_program, inline: a program seen before)
        if prog is None:
            prog = self._program(pid, now)
            if self._sizing is not None:
                prog.agent = hints.agent
                size = self._sizing.size_of(hints)
                if size is not None:
                    self._sizes[prog.rank] = size
        else:
            programs.move_to_end(pid)
        pend.program = prog
        prog.turns += 1
        prog.pending.add(request_id)
        prog.done = False
        if reorders:  # (_order_inputs's answer now; made again if the program gains or loses a pin)
            self._enter_order(request_id, (now, prog.first_arrival, prog.pin is not None, prog.rank))
        if prog.last_finish is not None:
            gap = now - prog.last_finish
            if 0.0 <= gap <= self.config.max_observed_gap_s:
                self._observe(prog, gap, now)
            prog.last_finish = None
        if prog.pin is not None and prog.pin.next_request_id is None:
            prog.pin.next_request_id = request_id
            self._returned[prog.pin.request_id] = prog.pin
        return []

    def _observe(self, prog: Program, gap: float, now: float) -> None:
        self.stats.observations += 1
        finished = now - gap
        obs = ToolObservation(
            program_id=prog.program_id,
            turn_index=prog.last_turn_index,
            tool=prog.last_tool,
            keys=list(prog.last_keys),
            duration_s=gap,
            finished_unix_s=finished + self.unix_offset_s,
            context_tokens=prog.last_context_tokens,
            output_tokens=prog.last_output_tokens,
            finished_s=finished,
        )
        self.rule.observe(obs, now)
        self.sink.tool_observed(obs)

    def admitted(self, request_id: str, cached_tokens: int, now: float) -> list[Release]:
        """The request was scheduled for the first time with ``cached_tokens`` prefix-cache hits."""
        return self.admitted_all(((request_id, cached_tokens),), now)

    def admitted_all(self, admissions: Iterable[tuple[str, int]], now: float) -> list[Release]:
        """:meth:`admitted` for each of an engine step's first admissions, (request id, prefix-cached tokens),
        in order: one call per step (each Python frame costs about a microsecond in the engine's step, with
        the caches cold after vLLM's own work)."""
        out: list[Release] = []
        requests, waitlist, order = self.requests, self.waitlist, self.order
        reorders, release_on_next_finish = self.reorders, self.rule.release_on_next_finish
        for request_id, cached_tokens in admissions:
            pend = requests.get(request_id)
            if waitlist is not None:
                waitlist.discard(request_id)
            if pend is None or pend.admitted:
                continue
            pend.admitted = True
            if reorders:
                order.admitted(now)
                if self._queue is not None:
                    self._queue.pop(request_id, None)
            # Leaving the queue keeps the order of the others; only a moved age bound makes it stale.
            self._order_len -= 1
            bound = order.age_bound_s
            old = self._order_bound
            # (an unmoved bound, inf under strict order, is the usual case: one comparison)
            if bound != old and (math.isinf(bound) != math.isinf(old) or abs(bound - old) > 0.1 * old):
                self._order_dirty = True
            prog = pend.program
            if prog is None or release_on_next_finish:
                continue
            pin = prog.pin
            if pin is None or pin.next_request_id != request_id:
                continue
            # What the engine can reuse of the held blocks (EAGLE/MTP, sliding-window groups: less than every
            # full block); by default every full block: the last sampled token's KV is never computed.
            reusable = pin.reusable_tokens
            if reusable is None:
                reusable = ((pin.context_tokens - 1) // self.block_size) * self.block_size
            if cached_tokens >= reusable and cached_tokens > 0:
                out.append(self._hit(pin, request_id))
            else:
                self.stats.pin_misses += 1
                out.append(self._release(pin, ReleaseReason.MISS, request_id))
        return out

    def finished(self, ev: Finished, state: EngineState) -> tuple[bool, list[Release]]:
        """Decide whether to pin ``ev``'s blocks. Returns (pin?, releases to apply first)."""
        pend = self.requests.pop(ev.request_id, None)
        if pend is not None and not pend.admitted:  # (_left_unadmitted's test, without its frame)
            self._left_unadmitted(ev.request_id, pend)
        if self.waitlist is not None:
            self.waitlist.discard(ev.request_id)
        elif self.waiting_keys is not None:
            self.waiting_keys.pop(ev.request_id, None)
        hints = ev.hints
        pid = hints.program_id
        releases: list[Release] = []
        # (a request the core never saw arrive: its program, if known)
        prog = pend.program if pend is not None else (self.programs.get(pid) if pid is not None else None)
        if prog is not None:
            prog.pending.discard(ev.request_id)
            if self._work:
                prog.work += ev.num_tokens / 1000
                if self._attained is not None:
                    self._attained[prog.rank] = prog.work
                if hints.last_turn and self._sizing is not None:
                    self._sizing.finished(prog.agent, prog.work)
            if self.gate is not None:
                self.gate.finished(prog.program_id, ev.num_tokens, hints.last_turn, state.now)
            old = prog.pin
            if old is not None and old.request_id != ev.request_id:
                if self.rule.release_on_next_finish and old.next_request_id == ev.request_id:
                    releases.append(self._hit(old))  # Continuum: the next request finished
                elif hints.last_turn:
                    releases.append(self._release(old, ReleaseReason.LAST_TURN))
                else:
                    releases.append(self._release(old, ReleaseReason.SUPERSEDED))
        if not self.rule.pins or prog is None or not ev.natural:
            return False, releases
        if hints.last_turn:
            prog.done = True
            return False, releases
        tool = (
            _hint_tool(hints.tool) if hints.tool else detect_tool_call(ev.output_text, self.config.detectors)
        )
        if tool is None and hints.tool_duration_s is not None:
            tool = _ANY_TOOL  # the client says a tool runs, not which
        if tool is None:
            return False, releases
        now = state.now
        prog.last_finish = now
        prog.last_tool = tool
        prog.last_context_tokens = ev.num_tokens
        prog.last_output_tokens = ev.output_tokens
        prog.last_turn_index = hints.turn_index if hints.turn_index is not None else prog.turns - 1
        prog.last_keys = _keys(tool)
        if ev.blocks <= 0:
            return False, releases
        call = PinCall(
            prog.program_id,
            ev.request_id,
            tool,
            prog.last_keys,
            ev.num_tokens,
            ev.blocks,
            self.block_size,
            hints,
        )
        releases += self._reprice(state)  # the driver may not have stepped the core while no pin was held
        d = self.rule.decide(call, state, self._charged_price(now))
        if d.ttl_s <= 0:
            self.stats.pins_declined += 1
            return False, releases
        pin = Pin(
            ev.request_id,
            prog.program_id,
            ev.blocks,
            ev.num_tokens,
            d.ttl_s,
            now,
            now + d.ttl_s,
            d.p_hit,
            d.benefit_s,
            d.key,
            tool,
            held_tokens=call.held_tokens,
            cdf=d.cdf,
            reusable_tokens=ev.reusable_tokens,
        )
        budget = int(self.rule.max_pin_share * state.total_blocks)
        # (a share of 1: no budget, memory only)
        meets_budget = self.rule.max_pin_share < 1.0 and self.pinned_blocks + pin.blocks > budget
        self.contention.pin_made(meets_budget)
        if meets_budget:
            releases += self._make_room(pin, budget, now)
            if self.pinned_blocks + pin.blocks > budget:
                self.stats.pins_skipped_budget += 1
                return False, releases
        self.pins[pin.request_id] = pin
        self._pins_made += 1
        heapq.heappush(self._expiries, (pin.expires, self._pins_made, pin))
        if len(self._expiries) > 2 * len(self.pins) + 64:  # released pins' entries: drop them now and then
            self._expiries = [e for e in self._expiries if self.pins.get(e[2].request_id) is e[2]]
            heapq.heapify(self._expiries)
        self.pinned_blocks += pin.blocks
        prog.pin = pin
        if prog.pending:
            self._touch(prog.pending)
        self._order_dirty = True
        self.stats.pins_created += 1
        self.sink.pin_created(pin)
        return True, releases

    def _victim_key(self, pin: Pin, now: float) -> tuple[bool, float]:
        """Valve order, smallest first: pins whose program is not back yet, by the rule's value."""
        return (pin.next_request_id is not None, self.rule.victim_value(pin, now))

    def _make_room(self, new: Pin, budget: int, now: float) -> list[Release]:
        """Release pins worth less than ``new`` until it fits the budget (if it can)."""
        value_of = self.rule.budget_value
        value = value_of(new, now)
        valued = ((value_of(p, now), p) for p in self.pins.values() if p.next_request_id is None)
        cheaper = [p for v, p in sorted(valued, key=lambda vp: vp[0]) if v < value]  # each value once
        freeable = sum(p.blocks for p in cheaper)
        if self.pinned_blocks - freeable + new.blocks > budget:
            return []
        out = []
        for p in cheaper:
            if self.pinned_blocks + new.blocks <= budget:
                break
            out.append(self._release(p, ReleaseReason.BUDGET))
        return out

    def _left_unadmitted(self, request_id: str, pend: Pending | None) -> None:
        """A request left the engine before its admission (aborted, or ended while waiting): it leaves the
        waiting queue, and FCFS would not have admitted it either (its arrival is not paired)."""
        if pend is not None and not pend.admitted and self.reorders:  # (every arrival was queued)
            if self._queue is not None:
                self._queue.pop(request_id, None)
            self.order.dropped()

    def aborted(self, request_id: str, now: float) -> list[Release]:
        """The request was aborted (client gone): free its and its program's pins."""
        pend = self.requests.pop(request_id, None)
        self._left_unadmitted(request_id, pend)
        if self.waitlist is not None:
            self.waitlist.discard(request_id)
        elif self.waiting_keys is not None:
            self.waiting_keys.pop(request_id, None)
        out = []
        own = self.pins.get(request_id)
        if own is not None:
            out.append(self._release(own, ReleaseReason.ABORT))
        if pend is not None:
            prog = pend.program
            if prog is not None:
                prog.pending.discard(request_id)
                prog.last_finish = None
                if self.gate is not None:
                    self.gate.aborted(prog.program_id, now)
                if prog.pin is not None:
                    out.append(self._release(prog.pin, ReleaseReason.ABORT))
        self._order_dirty = True
        return out

    def may_admit(self, request_id: str) -> bool:
        """May the engine admit this waiting request now (memory permitting)? False only for a request the
        rule's admission gate holds back (its program paused); a request admitted before (preempted, coming
        back) or unknown to the core always may."""
        pend = self.requests.get(request_id)
        if self.gate is None or pend is None or pend.admitted or pend.program is None:
            return True
        return self.gate.may_admit(pend.program.program_id)

    def step(self, state: EngineState) -> list[Release]:
        """Once per engine step: expiry, the price update, and re-judgement of held pins (price moved)."""
        if not self.rule.pins:
            return []
        heap = self._expiries
        out = self.expire(state.now) if heap and heap[0][0] <= state.now else []  # (expire's own test first)
        return out + self._reprice(state)

    def quiet_step(self, now: float, num_waiting: int, demand_tokens: int, free_tokens: int) -> bool:
        """:meth:`step` at ``now`` without an engine state, when it would release nothing and leave the price
        at rest: nothing due, the price 0 and not charged, and its target 0 (nothing waits for memory, or
        the free memory covers the waiting demand: ``num_waiting``, ``demand_tokens`` and ``free_tokens`` are
        the state's). Then it does :meth:`step`'s bookkeeping and answers True; False: call :meth:`step`.
        (The usual step of a busy engine while pins are held: no :class:`EngineState` is built, three Python
        frames fewer.)"""
        if not self.rule.pins:
            return True  # step() does nothing
        if self._charging:
            return False
        heap = self._expiries
        if heap and heap[0][0] <= now:
            return False
        # (the priced state's demand is at most ``demand_tokens``: slack here is slack there)
        if not self.price.rest(now, num_waiting, demand_tokens, free_tokens):
            return False
        self.stats.price = 0.0
        return True

    def _head_overdue(self, now: float) -> bool:
        """The oldest waiting request has waited the age bound: it goes before any pinned program's return."""
        bound = self.order.age_bound_s
        if bound == math.inf:
            return False
        queue = self._queue
        if queue is None:  # the first read under a bound (see __init__)
            queue = self._queue = {rid: p.arrival for rid, p in self.requests.items() if not p.admitted}
        for arrival in queue.values():
            return now - arrival >= bound
        return False

    def _charged_price(self, now: float) -> float:
        """The price a pin pays: what its memory costs the requests that would be served before its
        program's return. Under program ordering a returning pinned program goes before every waiting
        request but the overdue ones, so its memory keeps nobody out that would not wait for it anyway: the
        pin pays only while the queue's head is overdue. Without program ordering the return queues behind
        everyone: the pin always pays."""
        price = self.price.value
        if price <= 0.0:
            return 0.0
        r = self.returns.share
        if not self.reorders or self._head_overdue(now):
            return price / r
        return price * (1.0 - r) / r

    def _reprice(self, state: EngineState) -> list[Release]:
        """Update the price; when the price charged to pins moved, re-judge every held pin (those whose
        program is back excepted)."""
        priced = state if state.num_waiting <= 0 or not self._returned else self._priced_state(state)
        moved = self.price.update(priced)
        self.stats.price = self.price.value
        if not moved and not self._charging and self.price.value <= 0.0:
            return []  # (what follows answers [] then: nothing charged before or now)
        price = self._charged_price(state.now)
        charging = price > 0.0
        if charging != self._charging:
            self._charging = charging
            moved = charging  # starting to charge re-judges; stopping cannot drop a pin
        if not moved or not self.pins or not charging:
            return []
        rule = self.rule
        self.stats.rejudged += len(self.pins)
        drop = [
            p for p in self.pins.values() if not self._held_for_next(p) and not rule.keep(p, state, price)
        ]
        return [self._release(p, ReleaseReason.PRICE) for p in drop]

    def _priced_state(self, state: EngineState) -> EngineState:
        """The state the price sees: a waiting request whose program holds a pin will hit it, so the pinned
        tokens are not demand it adds (the engine counts its whole prompt as uncomputed until admission)."""
        if not self._returned or state.num_waiting <= 0:
            return state
        covered = sum(p.held_tokens for p in self._returned.values() if self._held_for_next(p))
        if covered <= 0:
            return state
        return replace(state, waiting_demand_tokens=max(0, state.waiting_demand_tokens - covered))

    def _due(self, now: float) -> list[Pin]:
        """Held pins whose TTL ran out by ``now``, in creation order (the order of ``pins``), those whose
        program's next request is in the engine excepted: from the expiry heap, without a walk over the pins.
        Entries of released pins are dropped; a due pin held for its next request stays in the heap."""
        heap, pins = self._expiries, self.pins
        due: list[tuple[int, Pin]] = []
        kept = []
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            pin = entry[2]
            if pins.get(pin.request_id) is not pin:
                continue
            if self._held_for_next(pin):
                kept.append(entry)
            else:
                due.append((entry[1], pin))
        for entry in kept:
            heapq.heappush(heap, entry)
        due.sort(key=lambda np: np[0])
        return [pin for _, pin in due]

    def expire(self, now: float) -> list[Release]:
        """Release pins whose TTL ran out (not those whose program's next request is in the engine)."""
        heap = self._expiries
        if not self.pins or not heap or heap[0][0] > now:  # nothing due (most steps): no further frame
            return []
        return [self._release(p, ReleaseReason.EXPIRED) for p in self._due(now)]

    def next_deadline(self) -> float | None:
        """When the next pin expires (caller's clock), for waking an idle engine."""
        heap, pins = self._expiries, self.pins
        while heap and pins.get(heap[0][2].request_id) is not heap[0][2]:
            heapq.heappop(heap)  # released
        if not heap:
            return None
        if not self._held_for_next(heap[0][2]):
            return heap[0][0]
        times = [p.expires for p in pins.values() if not self._held_for_next(p)]  # rare: the head returned
        return min(times) if times else None

    def valve_open(self, n_running: int) -> bool:
        """May the valve release pins now? Always, except for a last-resort valve (Continuum's public code
        has none): only when at most one request runs, i.e. nothing else will give memory back."""
        return not self.rule.valve_last_resort or n_running <= 1

    def release_for_pressure(
        self,
        now: float,
        admitting: str | None = None,
        engine_busy: bool = False,
        releasable: Callable[[str], bool] | None = None,
    ) -> Release | None:
        """The valve: release the pin of lowest value per token-second still to hold; None when none may go.

        ``admitting``: the waiting request being admitted (None: a running request would be preempted).
        ``engine_busy``: something runs (it will give memory back without the valve); ask :meth:`valve_open`
        first. Under program ordering a waiting request takes a pin only once it is overdue (waited the age
        bound, FCFS's measured tail wait) or when nothing runs; before that it waits for the running requests
        to give memory back (rather than letting older programs' requests take younger programs' pins).
        With nothing running every pin may go, so pins never deadlock the engine. ``releasable(request_id)``
        False: releasing that pin would not free its blocks now (vLLM's "a deferred free will not help with
        immediate allocation"); it is not a victim.
        """
        if not self.pins:
            return None
        defers = self.rule.valve_last_resort or self.returns.share >= RETURNS_TO_DEFER
        if admitting is not None and engine_busy and self.reorders and defers:
            pend = self.requests.get(admitting)
            if pend is not None and now - pend.arrival < self._valve_bound(pend):
                self.stats.valve_deferred += 1  # it waits for the running requests to give memory back
                return None
        pins = self.pins.values()
        if releasable is not None:
            pins = [p for p in pins if releasable(p.request_id)]
            if not pins:
                return None
        victim = min(pins, key=lambda p: self._victim_key(p, now))
        return self._release(victim, ReleaseReason.PRESSURE)

    def _valve_bound(self, pend: Pending) -> float:
        """How long a waiting request waits for running requests to give memory back before the valve may
        release pins for it: the age bound; for a resumed turn, while the resume valve applies
        (:meth:`_resume_valve_open`), the age bound measured even under strict order (FCFS's tail wait, inf
        until measured). Pins then keep the programs that return
        first, but a resumed turn that missed its pin does not wait past the wait FCFS would have given it
        (the real CPU engine: such turns queued 2.2 s against stock's 1.7 s while finishing turns took the
        freed memory as new pins)."""
        bound = self.order.age_bound_s
        prog = pend.program
        if self.rule.valve_last_resort or prog is None or not self._resume_valve_open():
            return bound
        if not resumed_turn(pend.arrival, prog.first_arrival):
            return bound
        return min(bound, self.order.bound_for(self.config.age_factor))

    def _resume_valve_open(self) -> bool:
        """The resume valve applies: as set (``resume_valve``), else while the pin budget binds
        (:class:`BudgetContention` at ``resume_valve_contention`` or more)."""
        forced = self.config.resume_valve
        if forced is not None:
            return forced
        return self.contention.share >= self.config.resume_valve_contention

    def release_all(self, reason: ReleaseReason = ReleaseReason.SHUTDOWN) -> list[Release]:
        return [self._release(p, ReleaseReason(reason)) for p in list(self.pins.values())]

    # -- ordering ----------------------------------------------------------------------------------------

    def order_running(self, request_ids: Sequence[str]) -> list[int] | None:
        """Order of the running list so that the preemption victim (the last one) is the youngest program
        not on its last turn (programs on their last turn are about to finish). None keeps the order."""
        if not self.reorders or len(request_ids) < 2:
            return None
        keys = []
        for i, rid in enumerate(request_ids):
            pend = self.requests.get(rid)
            prog = pend.program if pend is not None else None
            first = (
                prog.first_arrival if prog is not None else (pend.arrival if pend is not None else math.inf)
            )
            last = pend is not None and pend.hints.last_turn
            keys.append((0 if last else 1, first, prog.rank if prog is not None else 0, i))
        keys.sort()
        return [k[3] for k in keys]

    def needs_reorder(self, n_waiting: int, now: float) -> bool:
        """False when the last order still holds: nothing changed and nobody became overdue since."""
        if not self.reorders or n_waiting < 2:
            return False
        return self._order_dirty or n_waiting != self._order_len or now >= self._next_overdue

    def _order_inputs(self, request_id: str) -> tuple[float, float | None, bool, int] | None:
        """(arrival, program first arrival, program pinned, program rank) of a waiting request, as
        :meth:`order_waiting` passes it to the order; None for a request the core does not know."""
        pend = self.requests.get(request_id)
        if pend is None:
            return None
        prog = pend.program
        if prog is None:
            return (pend.arrival, None, False, 0)
        return (pend.arrival, prog.first_arrival, prog.pin is not None, prog.rank)

    def _relax_if_returns_elsewhere(self) -> None:
        if self._strict_needs_returns and self.returns.share < RETURNS_TO_DEFER:
            self._strict_needs_returns = False  # programs mostly return elsewhere: strict order keeps nothing
            self.order.relax(self.config.age_factor)
            self._order_bound = self.order.age_bound_s

    # -- the waiting order kept by the engine's queue (no age bound) -------------------------------------

    def order_in_engine(self, rekey: Callable[[Iterable[str]], None]) -> dict[str, tuple]:
        """The engine's waiting queue keeps itself in order (only while :meth:`keys_stay_fixed`): it reads
        each request's key from the returned :attr:`waiting_keys` (the keys :meth:`order_waiting` sorts by,
        each with its own tie-break); ``rekey(request_ids)`` is told whose key changed. No mirror is kept."""
        self.waitlist = None
        self._rekey = rekey
        self.waiting_keys = {}
        for rid in self.requests:
            self._key_of(rid)
        return self.waiting_keys

    def order_in_core(self) -> None:
        """Back to the mirror (:meth:`waiting_moves`): the engine's queue is plain FIFO again."""
        self._rekey = None
        self.waiting_keys = None
        self.waitlist = WaitingList(self.order.key, self._order_inputs) if self.reorders else None
        self._order_dirty = True

    def keys_stay_fixed(self) -> bool:
        """Whether the order's keys change only when a program gains or loses a pin, never with time (no age
        bound), so that an engine queue can keep the order itself (:meth:`order_in_engine`). Asked per step
        while it does: strict order may relax (programs mostly return elsewhere, as in
        :meth:`waiting_moves`); False from then on (:meth:`order_in_core`)."""
        if self._strict_needs_returns and self.returns.share < RETURNS_TO_DEFER:
            self._relax_if_returns_elsewhere()
        return self.reorders and math.isinf(self.order.age_factor)

    def waiting_moves(
        self, n_waiting: int, now: float, changed: bool = False
    ) -> list[tuple[int, int]] | None:
        """The moves (from index, to index, one after the other) that put the engine's waiting queue of
        ``n_waiting`` requests in :meth:`order_waiting`'s order at ``now``, from what changed since the last
        step (:class:`~ctk.policy.waitlist.WaitingList`). None when the core cannot tell (the engine changed
        its queue behind the core's back: ``changed``, or a length that does not match): order the whole
        queue with :meth:`order_waiting` then."""
        if not self.reorders:
            return []
        wl = self.waitlist
        if changed:
            wl.valid = False
            return None
        if self._strict_needs_returns and self.returns.share < RETURNS_TO_DEFER:
            self._relax_if_returns_elsewhere()
        return wl.sync(n_waiting, now, self.order.age_bound_s)

    def order_waiting(self, request_ids: Sequence[str], now: float) -> list[int] | None:
        """Scheduling order of the waiting requests as indices, or None to keep the engine's order. The
        result is also where :meth:`waiting_moves` starts from."""
        if not self.reorders:
            return None
        if len(request_ids) < 2:
            self.waitlist.rebuild(request_ids, now, self.order.age_bound_s)
            return None
        inputs = self._order_inputs
        unknown = (now, None, False, 0)  # a request the core does not know: ordered by the time of this order
        items = [inputs(rid) or unknown for rid in request_ids]
        self._relax_if_returns_elsewhere()
        order, self._next_overdue = self.order.order(items, now)
        self._order_bound = self.order.age_bound_s
        self._order_dirty = False
        self._order_len = len(request_ids)
        self.waitlist.rebuild([request_ids[i] for i in order], now, self._order_bound)
        return order


_ANY_TOOL = ToolCall("hint", None, None)

#: A young waiting request defers to the running ones (leaves the pins alone) only while at least this share
#: of the pins' expected returns come back to this engine; behind round-robin most do not, and a pin whose
#: program returns elsewhere only keeps the queue out.
RETURNS_TO_DEFER = 0.8


class ReturnShare:
    """How many of the returns the pins expected came back to this engine: realised hits over the hits the
    pins' own distributions promised (``p_hit``), exponentially weighted over pins that ended by a return
    (hit or miss: 1) or by expiry (0); releases that cut a pin short (price, pressure, budget, ...) say
    nothing. About 1 behind session affinity; about 1/N behind round-robin over N replicas, where a pin's
    program mostly returns elsewhere. Clamped to [0.05, 1]."""

    __slots__ = ("alpha", "_seen", "_promised", "share")

    def __init__(self, alpha: float = 0.02):
        self.alpha = alpha
        self._seen = 1.0
        self._promised = 1.0
        self.share = 1.0  # kept as the two sums move (read every step: no property frame)

    def pin_ended(self, pin: Pin, reason: ReleaseReason) -> None:
        if reason is ReleaseReason.HIT or reason is ReleaseReason.MISS:
            seen = 1.0
        elif reason is ReleaseReason.EXPIRED:
            seen = 0.0
        else:
            return
        a = self.alpha
        self._seen += a * (seen - self._seen)
        self._promised += a * (min(1.0, max(0.0, pin.p_hit)) - self._promised)
        self.share = 1.0 if self._promised <= 0.0 else min(1.0, max(0.05, self._seen / self._promised))


class BudgetContention:
    """How often the pin budget binds: the share of recent pins (those the rule chose to make) that did not
    fit ``max_pin_share`` as they came (each displaced less valuable pins or was skipped), exponentially
    weighted (``alpha`` 0.02: about the last 50 pins). High where the KV cache holds only a few programs'
    contexts, so the admitted programs trade pins and a turn that lost its pin waits for memory others hold
    (the real CPU engine at 16 programs in flight: 25–30% of pins end by the budget); about 1% at GPU scale
    (simulated H100 × 8B and H100×4 × 70B past the knee, README). Never above 0 without a budget
    (``max_pin_share`` 1)."""

    __slots__ = ("alpha", "share")

    def __init__(self, alpha: float = 0.02):
        self.alpha = alpha
        self.share = 0.0

    def pin_made(self, meets_budget: bool) -> None:
        self.share += self.alpha * ((1.0 if meets_budget else 0.0) - self.share)


@lru_cache(maxsize=4096)
def _hint_tool(command: str) -> ToolCall:
    return ToolCall("hint", None, command)


@lru_cache(maxsize=4096)
def _keys(tool: ToolCall) -> tuple[str, ...]:
    """The table back-off keys of a tool call."""
    if tool.command is None and tool.name is None:
        return ("*",)
    if tool.kind in ("bash", "hint"):
        return tuple(command_keys(tool.command))
    return tuple(command_keys(tool.command, tool.name))
