"""The live price of held KV memory, measured from the engine every step (no clock: time is passed in).

Unit: **JCT-seconds per token-second** — how many seconds of other programs' completion time one held token
costs per second of holding. A pin of ``N`` tokens costs ``price · N`` JCT-seconds per second; it pays while
its return hazard times its benefit ``B`` (JCT-seconds) is at least that.

Target price (what memory is worth to the waiting queue right now)::

    p* = 0         if nothing waits or the free memory covers the waiting demand
    p* = b / K     otherwise, with
         n = waiting requests, D = their uncomputed prompt tokens (demand), S = max(0, D − free tokens),
         b = n · min(1, S / D)   the requests memory keeps out (the blocked share of the queue),
         K = the cache size in tokens

Each blocked request loses one JCT-second per second: the queue loses ``b`` JCT-seconds per second because
memory is short, and that loss is charged evenly on every token of the cache, so holding ``N`` tokens costs
``p*·N`` JCT-seconds per second (the held share of the loss). ``p*`` is zero when nothing waits or when
memory is not what blocks the queue, and grows with the blocked demand (with S for a given queue, with the
queue length for a given request size). The block size does not appear (everything is in tokens). (A
steeper ``b·n / K`` — every blocked request also holding up the whole queue — and ``n / D`` were tried in the
simulator (H100 8B profile, 32 programs in flight, 40k-token cache): ``b·n / K`` made the oracle decline
most pins and lose 2% mean JCT; ``b / K``, ``n / D`` and a zero price were within noise of each other there,
because the valve, not the price, decides most releases.)

Dynamics (an asymmetric dual price): the price jumps up to ``p*`` at once (a shortage hurts now), and decays
towards a lower ``p*`` as ``p ← p* + (p − p*)·exp(−Δt / decay_s)`` (a shortage that cleared a moment ago is
likely to return); it is exactly 0 whenever nothing waits. :meth:`MemoryPrice.update` returns True when the
price moved by more than ``tolerance`` (relative) or to / from zero, which is when held pins are re-judged.
"""

from __future__ import annotations

import math

from ctk.policy.events import EngineState


class MemoryPrice:
    """``value``: JCT-seconds per token-second (see module docstring)."""

    __slots__ = ("value", "decay_s", "tolerance", "_last_now", "_judged")

    def __init__(self, decay_s: float = 1.0, tolerance: float = 0.1):
        self.value = 0.0
        self.decay_s = decay_s
        self.tolerance = tolerance
        self._last_now: float | None = None
        self._judged = 0.0  # the price the held pins were last judged at

    @staticmethod
    def slack(num_waiting: int, demand_tokens: int, free_tokens: int) -> bool:
        """``p* = 0``: nothing waits for memory, or the free memory covers the waiting demand."""
        return num_waiting <= 0 or demand_tokens <= 0 or demand_tokens <= free_tokens

    @staticmethod
    def target(state: EngineState) -> float:
        """``p*`` of the module docstring for one engine state."""
        n, demand = state.num_waiting, state.waiting_demand_tokens
        if MemoryPrice.slack(n, demand, state.free_tokens):
            return 0.0
        blocked = n * min(1.0, (demand - state.free_tokens) / demand)
        return blocked / max(1, state.total_tokens)

    def rest(self, now: float, num_waiting: int, demand_tokens: int, free_tokens: int) -> bool:
        """:meth:`update` at ``now`` for an engine state with these counts, when the price is at rest (0, and
        the pins judged at 0) and its target is 0: the price stays 0 and nothing is re-judged. True then
        (the clock moved); False: call :meth:`update`. (No :class:`EngineState` needed.)"""
        if self.value != 0.0 or self._judged != 0.0:
            return False
        if not self.slack(num_waiting, demand_tokens, free_tokens):
            return False
        self._last_now = now
        return True

    def update(self, state: EngineState) -> bool:
        """Move the price to the engine's state at ``state.now``; True when pins should be re-judged."""
        if self.rest(state.now, state.num_waiting, state.waiting_demand_tokens, state.free_tokens):
            return False  # (the usual step) stays 0
        target = self.target(state)
        last, self._last_now = self._last_now, state.now
        if state.num_waiting <= 0:
            self.value = 0.0
        elif target >= self.value:
            self.value = target
        else:
            dt = 0.0 if last is None else max(0.0, state.now - last)
            self.value = target + (self.value - target) * math.exp(-dt / self.decay_s)
        judged = self._judged
        if self.value == judged:
            return False
        if judged == 0.0 or self.value == 0.0 or abs(self.value - judged) > self.tolerance * judged:
            self._judged = self.value
            return True
        return False
