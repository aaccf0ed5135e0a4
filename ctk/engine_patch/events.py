"""Events the policy core consumes and emits (plain dataclasses, no vLLM import)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from ctk.engine_patch.detect import ToolCall
from ctk.engine_patch.hints import RequestHints


@dataclass
class EngineState:
    """What the core needs to know about the engine at a decision: time and KV-cache occupancy."""

    now: float  # monotonic seconds
    free_blocks: int
    total_blocks: int
    num_waiting: int = 0

    @property
    def pressure(self) -> float:
        """KV usage fraction (0 = empty, 1 = full), the pressure axis of the TTL tables."""
        if self.total_blocks <= 0:
            return 1.0
        return min(1.0, max(0.0, 1.0 - self.free_blocks / self.total_blocks))


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


@dataclass
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

    def value(self, now: float) -> float:
        """Expected saving per held block, scaled by the share of the TTL still ahead (valve order)."""
        left = 1.0 if self.ttl_s <= 0 else max(0.0, min(1.0, (self.expires - now) / self.ttl_s))
        if self.next_request_id is not None:
            left = 2.0  # the next turn is here: releasing now forfeits a near-certain hit
        return self.p_hit * self.benefit_s * left / max(1, self.blocks)


@dataclass(frozen=True)
class Release:
    request_id: str
    reason: str  # hit | miss | expired | last_turn | abort | pressure | budget | superseded | shutdown
    blocks: int = 0


@dataclass
class ToolObservation:
    """A measured tool call: the program's turn finished at ``finished_unix_s`` and the next arrived."""

    program_id: str
    turn_index: int
    tool: ToolCall | None
    keys: list[str]
    duration_s: float
    finished_unix_s: float
    context_tokens: int
    output_tokens: int


@dataclass
class PolicyStats:
    pins_created: int = 0
    pin_hits: int = 0
    pin_misses: int = 0
    pins_skipped_budget: int = 0
    releases: dict[str, int] = field(default_factory=dict)
    observations: int = 0
    ignored_metadata: int = 0
    valve_deferred: int = 0  # admissions that waited instead of evicting an older program's pin


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
