"""Events the policy core consumes and emits (plain dataclasses, no vLLM import, no clock).

Units: time in seconds of the caller's monotonic clock, memory in blocks where the engine counts blocks and
in **tokens** (blocks x ``block_size``) in every price and value, so the block size never changes a decision.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

from ctk.policy.detect import ToolCall
from ctk.policy.hints import RequestHints

if TYPE_CHECKING:
    from ctk.predict.cost import CDF


class ReleaseReason(StrEnum):
    """Why a pin was released (every reason the core emits; the metrics label ``reason``)."""

    HIT = "hit"  # the program's next request was admitted and found the pinned prefix
    MISS = "miss"  # ... and did not find it (e.g. the context changed)
    EXPIRED = "expired"  # the TTL ran out before the program came back
    PRICE = "price"  # re-judged under a higher memory price: holding no longer pays
    PRESSURE = "pressure"  # the valve: memory was needed right now (before any preemption)
    BUDGET = "budget"  # made room for a more valuable pin within max_pin_share
    SUPERSEDED = "superseded"  # a later request of the program finished while the pin was still held
    LAST_TURN = "last_turn"  # the program's last turn finished: its pin will not be used
    ABORT = "abort"  # the request or its program's next request was aborted
    SHUTDOWN = "shutdown"
    RECONFIGURE = "reconfigure"
    RESET = "reset"  # prefix-cache reset


@dataclass(slots=True)
class EngineState:
    """The engine at a decision / step: time and KV-cache occupancy (built by the driver from its view).

    Positional: ``now, free_blocks, total_blocks, num_waiting``; pass the rest by keyword.
    """

    now: float  # monotonic seconds
    free_blocks: int
    total_blocks: int
    num_waiting: int = 0
    block_size: int = 16
    num_running: int = 0
    waiting_demand_tokens: int = 0  # uncomputed prompt tokens the waiting queue asks for (0: nothing waits)
    pinned_blocks: int = 0

    @property
    def pressure(self) -> float:
        """KV usage fraction (0 = empty, 1 = full)."""
        if self.total_blocks <= 0:
            return 1.0
        return min(1.0, max(0.0, 1.0 - self.free_blocks / self.total_blocks))

    @property
    def free_tokens(self) -> int:
        return max(0, self.free_blocks) * self.block_size

    @property
    def total_tokens(self) -> int:
        return max(0, self.total_blocks) * self.block_size


@dataclass
class Finished:
    """A request finished (naturally when ``natural``; aborted / errored otherwise)."""

    request_id: str
    hints: RequestHints
    output_text: str | None
    prompt_tokens: int
    num_tokens: int  # prompt + output: the context the next turn extends
    output_tokens: int
    blocks: int  # KV blocks the request holds
    natural: bool = True
    #: prompt tokens a next turn can take from the held blocks (None: every full block of the context)
    reusable_tokens: int | None = None


@dataclass(slots=True)
class PinCall:
    """What a rule sees when a turn ends in a tool call: decide whether / how long to pin."""

    program_id: str
    request_id: str
    tool: ToolCall
    keys: tuple[str, ...]  # table back-off keys, most specific first
    context_tokens: int  # the context the next turn extends (what a hit saves re-prefilling)
    blocks: int  # KV blocks held if pinned
    block_size: int
    hints: RequestHints  # incl. the oracle's true duration and a client TTL hint

    @property
    def held_tokens(self) -> int:
        """Memory the pin holds, in tokens (what the price is charged on)."""
        return self.blocks * self.block_size


@dataclass(slots=True)
class PinDecision:
    """A rule's answer: ``ttl_s == 0`` means no pin. ``cdf``: the return-time distribution the rule
    believes (from the finish), used to re-judge the pin and to order the valve; None: the rule's
    own order."""

    ttl_s: float
    p_hit: float = 0.0
    key: str = ""
    benefit_s: float = 0.0  # B: JCT-seconds a hit saves
    cdf: CDF | None = None


NO_PIN = PinDecision(0.0)  # shared: never mutate a decision (not frozen only because that is 4x slower)


@dataclass(slots=True)
class Pin:
    request_id: str
    program_id: str
    blocks: int
    context_tokens: int
    ttl_s: float
    created: float
    expires: float
    p_hit: float
    benefit_s: float
    key: str
    tool: ToolCall | None
    next_request_id: str | None = None  # the program's next turn arrived and awaits admission
    held_tokens: int = 0  # blocks x block_size: what the price is charged on
    reusable_tokens: int | None = None  # a hit's cached tokens (None: every full block of the context)
    cdf: CDF | None = None  # the rule's return-time distribution (from ``created``)


@dataclass(frozen=True)
class Release:
    request_id: str
    reason: ReleaseReason
    blocks: int = 0


@dataclass
class ToolObservation:
    """A measured tool call: the program's turn finished at ``finished_s`` and the next arrived."""

    program_id: str
    turn_index: int
    tool: ToolCall | None
    keys: list[str]
    duration_s: float
    finished_unix_s: float  # finished_s + the caller's monotonic -> wall-clock offset
    context_tokens: int
    output_tokens: int
    finished_s: float = 0.0  # the caller's clock


@dataclass
class PolicyStats:
    pins_created: int = 0
    pin_hits: int = 0
    pin_misses: int = 0
    pins_skipped_budget: int = 0
    pins_declined: int = 0  # tool calls the rule chose not to pin
    releases: dict[str, int] = field(default_factory=dict)
    observations: int = 0
    ignored_metadata: int = 0
    valve_deferred: int = 0  # admissions that waited instead of evicting an older program's pin
    rejudged: int = 0  # re-judgements of held pins (price moved)
    price: float = 0.0  # the last memory price (JCT-s per token-s)


class EventSink(Protocol):
    """Receives the core's events (Prometheus metrics, the trace recorder); must not block."""

    def pin_created(self, pin: Pin) -> None: ...
    def pin_released(self, release: Release, pinned_blocks: int) -> None: ...
    def pin_hit(self, pin: Pin) -> None: ...
    def tool_observed(self, obs: ToolObservation) -> None: ...


class NullSink:
    def pin_created(self, pin: Pin) -> None:
        pass

    def pin_released(self, release: Release, pinned_blocks: int) -> None:
        pass

    def pin_hit(self, pin: Pin) -> None:
        pass

    def tool_observed(self, obs: ToolObservation) -> None:
        pass


class FanoutSink:
    def __init__(self, *sinks: EventSink):
        self.sinks = [s for s in sinks if s is not None]

    def pin_created(self, pin: Pin) -> None:
        for s in self.sinks:
            s.pin_created(pin)

    def pin_released(self, release: Release, pinned_blocks: int) -> None:
        for s in self.sinks:
            s.pin_released(release, pinned_blocks)

    def pin_hit(self, pin: Pin) -> None:
        for s in self.sinks:
            s.pin_hit(pin)

    def tool_observed(self, obs: ToolObservation) -> None:
        for s in self.sinks:
            s.tool_observed(obs)
