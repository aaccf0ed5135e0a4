"""The policy core: program identity, pin decisions, release rules, pressure valve, waiting order.

Plain Python (no vLLM import). The vLLM adapter (:mod:`ctk.engine_patch.scheduler`) and the tests drive
it with explicit events and apply what it returns:

- :meth:`PolicyCore.arrived` — a request entered the engine. Registers its program (first arrival), and if
  the program's previous turn ended in a tool call, measures the tool's duration (finish -> this arrival)
  for online adaptation, the metrics and the trace recorder. A pin of the program now awaits admission
  (it no longer expires: the hit is near).
- :meth:`PolicyCore.admitted` — the request got KV blocks (prefix lookup done). Rule (a): the program's pin
  is released (hit when the request found at least the pinned full blocks in the cache). ``continuum``
  instead releases when the next request finishes, as the public Continuum code does.
- :meth:`PolicyCore.finished` — decide whether to pin the request's blocks and for how long: no pin after an
  abort, after the last turn (rule c), without a program id, or when no tool call is hinted / detected;
  otherwise τ from the policy (``ttl``: the TTL table at the current pressure; ``continuum``: 2 s if the
  tool's running mean ≤ 2 s; ``oracle``: the true duration when the cost model says it pays). Pins never
  exceed ``max_pin_share`` of the KV cache: lower-value pins make room, or the new one is skipped.
- :meth:`PolicyCore.aborted` — rule (d): the request's own pin and its program's pin are released.
- :meth:`PolicyCore.tick` — rule (b): expired pins are released (the adapter calls it every step and from
  an idle-engine wake-up).
- :meth:`PolicyCore.release_for_pressure` — rule (e): called before a running request would be preempted
  or a waiting request refused; releases the pin of lowest expected value per block, one at a time (a
  waiting request of a newer program may not evict an older program's pin unless it is overdue or the
  engine has nothing running).
- :meth:`PolicyCore.order_waiting` — program-level FCFS with an age bound (:mod:`ctk.engine_patch.ordering`).

Every method returns the :class:`Release` list the adapter must apply (free those requests' blocks).
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from ctk.engine_patch.config import ServeConfig
from ctk.engine_patch.detect import ToolCall, detect_tool_call
from ctk.engine_patch.events import (
    EngineState,
    EventSink,
    Finished,
    NullSink,
    Pin,
    PolicyStats,
    Release,
    ToolObservation,
)
from ctk.engine_patch.hints import RequestHints
from ctk.engine_patch.online import OnlineDurations
from ctk.engine_patch.ordering import ProgramOrder
from ctk.predict.cost import CostModel
from ctk.predict.features import command_keys
from ctk.predict.tables import TTLTables

logger = logging.getLogger("ctk.engine_patch")


@dataclass
class Program:
    program_id: str
    first_arrival: float
    turns: int = 0  # requests seen
    pending: set[str] = field(default_factory=set)  # request ids in the engine (waiting or running)
    pin: Pin | None = None
    # The last finished turn that ended in a tool call (for the duration measurement).
    last_finish: float | None = None
    last_finish_unix: float | None = None
    last_tool: ToolCall | None = None
    last_keys: list[str] = field(default_factory=list)
    last_context_tokens: int = 0
    last_output_tokens: int = 0
    last_turn_index: int = 0
    done: bool = False  # its last turn finished


@dataclass
class Pending:
    program_id: str | None
    arrival: float
    hints: RequestHints


class PolicyCore:
    """State and decisions of one engine's pin/ordering policy (see module docstring)."""

    def __init__(
        self,
        config: ServeConfig,
        tables: TTLTables | None = None,
        block_size: int = 16,
        sink: EventSink | None = None,
    ):
        self.config = config
        self.policy = config.policy
        self._unix_offset = time.time() - time.monotonic()  # monotonic -> wall clock, for the recorder
        self.tables = tables
        self.cost: CostModel = tables.cost_model if tables is not None else CostModel()
        self.block_size = max(1, block_size)
        self.sink: EventSink = sink or NullSink()
        self.stats = PolicyStats()
        self.programs: OrderedDict[str, Program] = OrderedDict()
        self.requests: dict[str, Pending] = {}
        self.pins: dict[str, Pin] = {}  # request id -> pin
        self.pinned_blocks = 0
        self.online = (
            OnlineDurations(
                tables, config.online_min_samples, config.online_prior_weight, config.online_window
            )
            if (config.online and tables is not None and self.policy == "ttl")
            else None
        )
        self.tool_means: dict[str, tuple[float, int]] = {}  # continuum: running mean per tool name
        age_factor = math.inf if self.policy == "continuum" else config.age_factor
        self.order = ProgramOrder(age_factor, config.age_min_s)
        self.reorders = self.policy != "vllm" and config.program_fcfs
        self._order_dirty = True  # set by every event that can change the waiting order
        self._order_len = 0
        self._order_bound = self.order.age_bound_s
        self._next_overdue = math.inf
        # Continuum has no pin budget; ctk keeps pins under a share of the cache.
        self.max_pin_share = 1.0 if self.policy == "continuum" else config.max_pin_share

    # -- helpers -----------------------------------------------------------------------------------------

    @property
    def pins_enabled(self) -> bool:
        return self.policy != "vllm"

    def _program(self, program_id: str, now: float) -> Program:
        prog = self.programs.get(program_id)
        if prog is None:
            prog = self.programs[program_id] = Program(program_id, now)
            self._trim_programs()
        else:
            self.programs.move_to_end(program_id)
        return prog

    def _trim_programs(self) -> None:
        while len(self.programs) > self.config.max_programs:
            for pid, prog in self.programs.items():  # oldest first
                if prog.pin is None and not prog.pending:
                    del self.programs[pid]
                    break
            else:
                return

    def _release(self, pin: Pin, reason: str) -> Release:
        self.pins.pop(pin.request_id, None)
        self.pinned_blocks -= pin.blocks
        prog = self.programs.get(pin.program_id)
        if prog is not None and prog.pin is pin:
            prog.pin = None
        self._order_dirty = True
        self.stats.releases[reason] = self.stats.releases.get(reason, 0) + 1
        rel = Release(pin.request_id, reason, pin.blocks)
        self.sink.pin_released(rel, self.pinned_blocks)
        return rel

    # -- events ------------------------------------------------------------------------------------------

    def arrived(self, request_id: str, hints: RequestHints, now: float | None = None) -> list[Release]:
        """A request entered the engine."""
        now = time.monotonic() if now is None else now
        self._order_dirty = True
        if hints.warnings:
            self.stats.ignored_metadata += 1
        pid = hints.program_id
        self.requests[request_id] = Pending(pid, now, hints)
        if pid is None:
            return []
        prog = self._program(pid, now)
        prog.turns += 1
        prog.pending.add(request_id)
        prog.done = False
        if prog.last_finish is not None:
            gap = now - prog.last_finish
            if 0.0 <= gap <= self.config.max_observed_gap_s:
                self._observe(prog, gap)
            prog.last_finish = None
        if prog.pin is not None and prog.pin.next_request_id is None:
            prog.pin.next_request_id = request_id
        return []

    def _observe(self, prog: Program, gap: float) -> None:
        self.stats.observations += 1
        obs = ToolObservation(
            program_id=prog.program_id,
            turn_index=prog.last_turn_index,
            tool=prog.last_tool,
            keys=list(prog.last_keys),
            duration_s=gap,
            finished_unix_s=prog.last_finish_unix or time.time() - gap,
            context_tokens=prog.last_context_tokens,
            output_tokens=prog.last_output_tokens,
        )
        if self.online is not None and prog.last_keys:
            self.online.observe(prog.last_keys, gap, time.monotonic())
        if self.policy == "continuum" and prog.last_tool is not None:
            name = _continuum_name(prog.last_tool)
            mean, n = self.tool_means.get(name, (0.0, 0))
            self.tool_means[name] = ((mean * n + gap) / (n + 1), n + 1)
        self.sink.tool_observed(obs)

    def admitted(self, request_id: str, cached_tokens: int, now: float | None = None) -> list[Release]:
        """The request was scheduled for the first time with ``cached_tokens`` prefix-cache hits."""
        now = time.monotonic() if now is None else now
        pend = self.requests.get(request_id)
        if pend is None:
            return []
        self.order.record_wait(now - pend.arrival)
        # Leaving the queue keeps the order of the others; only a moved age bound makes it stale.
        self._order_len -= 1
        bound = self.order.age_bound_s
        if abs(bound - self._order_bound) > 0.1 * self._order_bound:
            self._order_dirty = True
        if pend.program_id is None or self.policy == "continuum":
            return []
        prog = self.programs.get(pend.program_id)
        pin = prog.pin if prog is not None else None
        if pin is None or pin.next_request_id != request_id:
            return []
        full_blocks_tokens = (pin.context_tokens // self.block_size) * self.block_size
        if cached_tokens >= full_blocks_tokens and cached_tokens > 0:
            self.stats.pin_hits += 1
            self.sink.pin_hit(pin)
            return [self._release(pin, "hit")]
        self.stats.pin_misses += 1
        return [self._release(pin, "miss")]

    def finished(self, ev: Finished, state: EngineState) -> tuple[bool, list[Release]]:
        """Decide whether to pin ``ev``'s blocks. Returns (pin?, releases to apply first)."""
        pend = self.requests.pop(ev.request_id, None)
        hints = ev.hints
        pid = hints.program_id
        releases: list[Release] = []
        prog = self.programs.get(pid) if pid is not None else None
        if prog is not None:
            prog.pending.discard(ev.request_id)
            if prog.pin is not None and prog.pin.request_id != ev.request_id:
                # Continuum releases the previous pin when the next request finishes; under ctk it was
                # normally released at admission already.
                reason = "hit" if self.policy == "continuum" and prog.pin.next_request_id else "superseded"
                if reason == "hit":
                    self.stats.pin_hits += 1
                    self.sink.pin_hit(prog.pin)
                releases.append(self._release(prog.pin, reason))
        del pend
        if not self.pins_enabled or prog is None or not ev.natural:
            return False, releases
        if hints.last_turn:
            prog.done = True
            return False, releases
        tool = (
            _hint_tool(hints.tool) if hints.tool else detect_tool_call(ev.output_text, self.config.detectors)
        )
        if tool is None and hints.tool_duration_s is not None:
            tool = ToolCall("hint", None, None)  # the client says a tool runs, not which
        if tool is None:
            return False, releases
        prog.last_finish = state.now
        prog.last_finish_unix = state.now + self._unix_offset
        prog.last_tool = tool
        prog.last_context_tokens = ev.num_tokens
        prog.last_output_tokens = ev.output_tokens
        prog.last_turn_index = hints.turn_index if hints.turn_index is not None else prog.turns - 1
        prog.last_keys = list(_keys_cached(tool))
        ttl, p_hit, key = self._decide(tool, prog.last_keys, ev, hints, state)
        if ttl <= 0 or ev.blocks <= 0:
            return False, releases
        benefit = self.cost.benefit_s(ev.num_tokens)
        pin = Pin(
            ev.request_id,
            prog.program_id,
            ev.blocks,
            ev.num_tokens,
            ttl,
            state.now,
            state.now + ttl,
            p_hit,
            benefit,
            key,
            tool,
        )
        budget = int(self.max_pin_share * state.total_blocks)
        if self.pinned_blocks + pin.blocks > budget:
            releases += self._make_room(pin, budget, state.now)
            if self.pinned_blocks + pin.blocks > budget:
                self.stats.pins_skipped_budget += 1
                return False, releases
        self.pins[pin.request_id] = pin
        self.pinned_blocks += pin.blocks
        prog.pin = pin
        self._order_dirty = True
        self.stats.pins_created += 1
        self.sink.pin_created(pin)
        return True, releases

    def _decide(
        self, tool: ToolCall, keys: list[str], ev: Finished, hints: RequestHints, state: EngineState
    ) -> tuple[float, float, str]:
        """(ttl_s, p_hit, key) of the configured policy."""
        if self.policy == "ttl":
            if self.tables is None:
                return 0.0, 0.0, ""
            d = self.tables.lookup(keys, ev.num_tokens, state.pressure)
            return d.ttl_s, d.p_hit, d.key
        if self.policy == "continuum":
            name = _continuum_name(tool)
            mean, n = self.tool_means.get(name, (0.0, 0))
            ttl = self.config.continuum_ttl_s
            return (ttl, 1.0, name) if (n == 0 or mean <= ttl) else (0.0, 0.0, name)
        if self.policy == "oracle":
            t = hints.tool_duration_s
            if t is None:
                return 0.0, 0.0, ""
            benefit = self.cost.benefit_s(ev.num_tokens)
            hold = self.cost.holding_cost_per_s(ev.num_tokens, state.pressure)
            if hold * t >= benefit:
                return 0.0, 0.0, "oracle"
            return t + self.config.oracle_slack_s, 1.0, "oracle"
        return 0.0, 0.0, ""

    def _make_room(self, new: Pin, budget: int, now: float) -> list[Release]:
        """Release pins worth less per block than ``new`` until it fits the budget (if it can)."""
        value = new.value(now)
        cheaper = sorted((p for p in self.pins.values() if p.value(now) < value), key=lambda p: p.value(now))
        freeable = sum(p.blocks for p in cheaper)
        if self.pinned_blocks - freeable + new.blocks > budget:
            return []
        out = []
        for p in cheaper:
            if self.pinned_blocks + new.blocks <= budget:
                break
            out.append(self._release(p, "budget"))
        return out

    def aborted(self, request_id: str) -> list[Release]:
        """Rule (d): the request was aborted (client gone): free its and its program's pins."""
        pend = self.requests.pop(request_id, None)
        out = []
        own = self.pins.get(request_id)
        if own is not None:
            out.append(self._release(own, "abort"))
        if pend is not None and pend.program_id is not None:
            prog = self.programs.get(pend.program_id)
            if prog is not None:
                prog.pending.discard(request_id)
                prog.last_finish = None
                if prog.pin is not None:
                    out.append(self._release(prog.pin, "abort"))
        return out

    def tick(self, now: float | None = None) -> list[Release]:
        """Rule (b): release pins whose TTL expired (not those whose next turn already arrived)."""
        if not self.pins:
            return []
        now = time.monotonic() if now is None else now
        due = [p for p in self.pins.values() if p.expires <= now and not self._held_for_next(p)]
        return [self._release(p, "expired") for p in due]

    def _held_for_next(self, pin: Pin) -> bool:
        if pin.next_request_id is None:
            return False
        if self.policy == "continuum":
            # Continuum suspends expiry only while the program's next request waits.
            prog = self.programs.get(pin.program_id)
            return prog is not None and pin.next_request_id in prog.pending
        return pin.next_request_id in self.requests

    def next_deadline(self) -> float | None:
        """When the next pin expires (monotonic seconds), for waking an idle engine."""
        times = [p.expires for p in self.pins.values() if p.next_request_id is None]
        return min(times) if times else None

    def release_for_pressure(
        self, now: float | None = None, admitting: str | None = None, engine_busy: bool = False
    ) -> Release | None:
        """Rule (e): release the pin of lowest expected value per block; None when no pin may go.

        For a running request that would be preempted (``admitting`` None) every pin may go. For a waiting
        request being admitted (``admitting`` = its id) program FCFS decides: it may take only the pins of
        programs younger than its own, unless it is overdue (past the age bound) or the engine has nothing
        running (``engine_busy`` False) — then any pin, so pins can never deadlock the engine. Otherwise it
        waits: the running requests will free memory, and a newer program does not evict an older one's cache.
        """
        if not self.pins:
            return None
        now = time.monotonic() if now is None else now
        candidates: Sequence[Pin] = list(self.pins.values())
        if admitting is not None and engine_busy:
            pend = self.requests.get(admitting)
            overdue = pend is not None and now - pend.arrival >= self.order.age_bound_s
            if not overdue:
                mine = self.programs.get(pend.program_id) if pend and pend.program_id else None
                start = mine.first_arrival if mine is not None else (pend.arrival if pend else now)
                candidates = [p for p in candidates if self._first_arrival(p.program_id) > start]
                if not candidates:
                    self.stats.valve_deferred += 1
                    return None
        victim = min(candidates, key=lambda p: p.value(now))
        return self._release(victim, "pressure")

    def _first_arrival(self, program_id: str) -> float:
        prog = self.programs.get(program_id)
        return prog.first_arrival if prog is not None else math.inf

    def release_all(self, reason: str = "shutdown") -> list[Release]:
        return [self._release(p, reason) for p in list(self.pins.values())]

    # -- ordering ----------------------------------------------------------------------------------------

    def order_running(self, request_ids: Sequence[str]) -> list[int] | None:
        """Order of the running list so that vLLM's preemption victim (the last one) is the youngest
        program not on its last turn (Continuum's rule; programs on their last turn are about to finish).
        None keeps vLLM's order. The adapter applies it only when memory is short."""
        if not self.reorders or len(request_ids) < 2:
            return None
        keys = []
        for i, rid in enumerate(request_ids):
            pend = self.requests.get(rid)
            prog = self.programs.get(pend.program_id) if pend is not None and pend.program_id else None
            first = (
                prog.first_arrival if prog is not None else (pend.arrival if pend is not None else math.inf)
            )
            last = pend is not None and pend.hints.last_turn
            keys.append((0 if last else 1, first, i))
        keys.sort()
        return [k[2] for k in keys]

    def needs_reorder(self, n_waiting: int, now: float) -> bool:
        """False when the last order still holds: nothing changed and nobody became overdue since."""
        if not self.reorders or n_waiting < 2:
            return False
        return self._order_dirty or n_waiting != self._order_len or now >= self._next_overdue

    def order_waiting(self, request_ids: Sequence[str], now: float | None = None) -> list[int] | None:
        """Scheduling order of the waiting requests as indices, or None to keep vLLM's order."""
        if not self.reorders or len(request_ids) < 2:
            return None
        now = time.monotonic() if now is None else now
        requests, progs = self.requests, self.programs
        items = []
        for rid in request_ids:
            pend = requests.get(rid)
            if pend is None:
                items.append((now, None, False))
                continue
            prog = progs.get(pend.program_id) if pend.program_id is not None else None
            if prog is None:
                items.append((pend.arrival, None, False))
            else:
                items.append((pend.arrival, prog.first_arrival, prog.pin is not None))
        order, self._next_overdue = self.order.order(items, now)
        self._order_bound = self.order.age_bound_s
        self._order_dirty = False
        self._order_len = len(request_ids)
        return order


@lru_cache(maxsize=4096)
def _hint_tool(command: str) -> ToolCall:
    return ToolCall("hint", None, command)


@lru_cache(maxsize=4096)
def _keys_cached(tool: ToolCall) -> tuple[str, ...]:
    return tuple(_keys(tool))


def _keys(tool: ToolCall) -> list[str]:
    if tool.command is None and tool.name is None:
        return ["*"]
    if tool.kind in ("bash", "hint"):
        return command_keys(tool.command)
    return command_keys(tool.command, tool.name)


def _continuum_name(tool: ToolCall) -> str:
    """Continuum's tool name: the first word of the command (the function name for API tool calls)."""
    if tool.kind in ("bash", "hint") and tool.command:
        words = tool.command.split()
        return words[0] if words else "?"
    return tool.name or "?"
