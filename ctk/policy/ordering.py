"""Program-level FCFS with an age bound: the order of the waiting queue (:class:`ProgramOrder`), and ttl's
strict order, :class:`ResumeFirstOrder` (resumed turns FCFS, new programs admitted in program order).

Key of a waiting request, smallest first:

1. overdue requests (waited longer than the age bound), oldest arrival first — nobody starves;
2. requests whose program holds a pin (their prefix is in memory: admitting them frees the pin), by
   program first arrival;
3. everyone else by their program's first arrival, then their own arrival (older programs finish first).

The age bound is ``max(age_min_s, age_factor × W_q)``, with ``W_q`` the ``age_quantile`` (0.99) of the waits
plain FCFS would give, measured online (:class:`FCFSWaits`): FCFS admits the k-th arrival k-th, so pairing
the k-th admission with the k-th arrival measures, at the engine's real throughput, the wait the k-th
request would have had under FCFS. A request may be overtaken by younger programs until it has waited as long
as FCFS's own tail wait, and then it goes first: program ordering is bounded by FCFS's own tail (pins, which
hold memory, can still lengthen the waits: docs/measurements.md has the measured tails), and there is no
constant floor (``age_min_s`` 0 by default) — when nothing queues the bound is ~0 and the order is plain FCFS.
Continuum's strict program FCFS is ``age_factor = inf``.

Why a tail quantile and not the mean: under overload most requests wait about the mean, so a bound at the
mean makes half the queue overdue, and overdue requests take pinned memory (the valve) from the programs about
to return.

The bound is on the wait and stock's p99 TTFT on the TTFT: a request at the bound still waits behind the
other overdue ones and, its pin gone, pays its whole prefill, so the tail lands near stock's, not under it.
``bench/tail_frontier.py`` measures the frontier of mean JCT against p99 TTFT over ``age_factor``;
docs/measurements.md ("Where ctk stands") has the figures.
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections import deque
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

from ctk.policy.hints import RequestHints


class WaitingItem(NamedTuple):
    """A waiting request as the ordering sees it (times in monotonic seconds)."""

    arrival: float
    program_first_arrival: float | None  # None: no program id
    has_pin: bool = False
    program_rank: int = 0  # the order the engine first saw the programs: breaks ties of first arrival


class FCFSWaits:
    """The waits plain FCFS would give, measured online: the k-th admission paired with the k-th arrival.

    ``quantile(q)`` over the last ``window`` waits (0 before any admission). Aborted requests that never got
    admitted are :meth:`dropped` (FCFS would not admit them either).
    """

    def __init__(self, window: int = 512):
        self.window = window
        self._arrivals: deque[float] = deque()
        self.arrived = self._arrivals.append  # (the method below, without its frame)
        self._recent: deque[float] = deque()
        # the recent waits sorted: built at the first quantile() and kept from then on (a strict order never
        # asks, and its admissions skip two bisections)
        self._sorted: list[float] | None = None

    def arrived(self, now: float) -> None:
        self._arrivals.append(now)

    def dropped(self) -> None:
        if self._arrivals:
            self._arrivals.pop()  # the newest: FCFS would still admit the older ones first

    def admitted(self, now: float) -> None:
        if not self._arrivals:
            return
        wait = max(0.0, now - self._arrivals.popleft())
        recent, s = self._recent, self._sorted
        recent.append(wait)
        if s is not None:
            insort(s, wait)
        if len(recent) > self.window:
            old = recent.popleft()
            if s is not None:
                del s[bisect_left(s, old)]

    def quantile(self, q: float) -> float:
        s = self._sorted
        if s is None:
            s = self._sorted = sorted(self._recent)
        if not s:
            return 0.0
        return s[min(len(s) - 1, int(q * len(s)))]

    def __len__(self) -> int:
        return len(self._recent)


def overdue_key(arrival: float, i: int) -> tuple:
    """The scheduling key of an overdue request (smallest of all keys: ``0`` first, then the oldest arrival;
    ``i`` breaks ties). :meth:`ProgramOrder.order` and :class:`~ctk.policy.waitlist.WaitingList` share it."""
    return (0, arrival, 0, 0.0, i)


class ProgramOrder:
    def __init__(
        self,
        age_factor: float = 1.0,
        age_min_s: float = 0.0,
        age_quantile: float = 0.99,
        window: int = 512,
        min_waits: int = 100,
    ):
        self.age_factor = age_factor
        self.min_waits = min(window, max(1, min_waits))
        self.age_min_s = age_min_s
        self.age_quantile = age_quantile
        self.fcfs = FCFSWaits(window)
        #: The age bound (seconds): a plain attribute, read on the engine's hot path (no property frame).
        #: Strict until FCFS's tail wait is measured (a fresh server is no exception).
        self.age_bound_s = math.inf
        if type(self).arrived is ProgramOrder.arrived:  # an arrival is FCFSWaits's append: no Python frame
            self.arrived = self.fcfs.arrived
        self._bind_admitted()

    def _bind_admitted(self) -> None:
        """Without an age bound to measure (strict order), an admission is FCFSWaits's alone: bound on the
        instance (one Python frame less per admission); the method otherwise."""
        self.__dict__.pop("admitted", None)
        if type(self).admitted is ProgramOrder.admitted and math.isinf(self.age_factor):
            self.admitted = self.fcfs.admitted

    def arrived(self, now: float) -> None:
        self.fcfs.arrived(now)

    def admitted(self, now: float) -> None:
        self.fcfs.admitted(now)
        if not math.isinf(self.age_factor):
            self.age_bound_s = self._measured_bound()

    def dropped(self) -> None:
        self.fcfs.dropped()

    def relax(self, age_factor: float) -> None:
        """From strict program FCFS to the age bound with this factor (the waits measured so far count)."""
        self.age_factor = age_factor
        self.age_bound_s = self._measured_bound()
        self._bind_admitted()

    def _measured_bound(self) -> float:
        return self.bound_for(self.age_factor)

    def bound_for(self, age_factor: float) -> float:
        """``max(age_min_s, age_factor × W_q)`` once ``W_q`` is measured (``min_waits`` waits, 100 by
        default: what a p99 needs). Before that no request is overdue: with no measured wait the bound would
        be 0, every waiting request overdue, and a flood of new programs would take the pins of programs
        about to return (issue 22)."""
        if len(self.fcfs) < self.min_waits:
            return math.inf
        return max(self.age_min_s, age_factor * self.fcfs.quantile(self.age_quantile))

    def order(self, items: Sequence[WaitingItem | tuple], now: float) -> tuple[list[int], float]:
        """Indices of ``items`` in scheduling order (stable), and when the order next changes by age alone.
        Overdue requests first, oldest arrival first; the others by :meth:`key` (the class's order)."""
        bound = self.age_bound_s
        key = self.key
        keys = []
        next_overdue = math.inf
        for i, (arrival, first, pinned, rank) in enumerate(items):
            overdue_at = arrival + bound
            if now >= overdue_at:
                keys.append(overdue_key(arrival, i))
                continue
            if overdue_at < next_overdue:
                next_overdue = overdue_at
            keys.append(key(arrival, first, pinned, rank, i))
        keys.sort()
        return [k[4] for k in keys], next_overdue

    @staticmethod
    def key(arrival: float, first: float | None, pinned: bool, rank: int, i: int) -> tuple:
        """A request that is not overdue: pinned programs first, then by program first arrival (its own
        arrival when it has no program or the first arrival is later), rank, arrival."""
        prog_t = arrival if first is None or first > arrival else first
        return (1 if pinned else 2, prog_t, rank, arrival, i)


class ResumeFirstOrder(ProgramOrder):
    """Program order for admission, FCFS for resumed turns (``ttl``'s default waiting order since issue 22's
    resume-TTFT guard).

    Key of a waiting request, smallest first:

    1. overdue requests (the age bound, when one applies), oldest arrival first;
    2. resumed turns whose program holds a pin (their prefix is in memory), by arrival;
    3. other resumed turns (a program already seen before this request), by arrival: admitted programs are
       served first come, first served among themselves, so no admitted program's next turn waits behind an
       older program's whole run of turns;
    4. a program's first turn, by program first arrival (then rank): a new program is admitted only when no
       resumed turn waits ahead of it, the oldest new program first.

    Why: under :class:`ProgramOrder`'s strict order a resumed turn of a younger admitted program is overtaken
    by every turn of every older program, and with tool pauses shorter than a turn the older programs are back
    before it is served (the real CPU engine at 16 in flight: p99 resume TTFT 4.2× stock vLLM's; simulated:
    the youngest programs' resumes wait 4–5 s while older programs take 5–15 turns each). Here the wait of
    program order falls on the first turn, reported as the admission wait.
    """

    @staticmethod
    def key(arrival: float, first: float | None, pinned: bool, rank: int, i: int) -> tuple:
        if not resumed_turn(arrival, first):  # a program's first turn (or a request without a program)
            return (3, arrival if first is None else first, rank, arrival, i)
        return (1 if pinned else 2, arrival, 0, arrival, i)


class SizeFirstOrder(ResumeFirstOrder):
    """:class:`ResumeFirstOrder` with new programs admitted by size (a probe of issue 22's admission wait;
    ``admit_order="size"``): resumed turns as there; a program's first turn by ``size + aging × first
    arrival``, smallest first (shortest job first when ``aging`` is 0). The size is what the core registered
    for the program (:attr:`sizes`, by program rank: the true total work ``program_size`` a benchmark client
    sends); a program without one goes after every sized one, in program order.

    A request without a program id (a plain chat request) is a one-turn program, the smallest job there is:
    it keys as a new program of size 0, so it goes ahead of every new agent program, after the resumed turns,
    and plain requests keep arrival order among themselves (stock vLLM's FCFS for a chat-only deployment).

    ``aging`` (seconds of work per second of arrival) bounds the overtaking: a program of size ``S`` arriving
    at ``t`` is overtaken only by programs arriving before ``t + (S - S') / aging``, so no program waits
    behind arrivals later than ``max size / aging`` after its own (the key stays fixed while it waits, so the
    incremental waiting list needs no re-keying by age)."""

    def __init__(
        self, *args, aging: float = 0.0, attained: bool = False, sizing: SizeSource | None = None, **kwargs
    ):
        super().__init__(*args, **kwargs)
        self.aging = aging
        #: where a new program's size comes from (the core asks it at the program's first request)
        self.sizing: SizeSource = sizing if sizing is not None else HintedSizes()
        self.sizes: dict[int, float] = {}  # program rank -> its size (registered by the core)
        #: least attained service for resumed turns (``resume_order="attained"``): program rank -> its work
        #: so far (kept by the core; fixed while a turn of the program waits). None: resumed turns by arrival.
        self.attained: dict[int, float] | None = {} if attained else None

    def key(self, arrival: float, first: float | None, pinned: bool, rank: int, i: int) -> tuple:  # type: ignore[override]
        if resumed_turn(arrival, first):
            if self.attained is None:
                return ResumeFirstOrder.key(arrival, first, pinned, rank, i)
            return (1 if pinned else 2, self.attained.get(rank, 0.0), 0, arrival, i)
        if first is None:  # no program: a one-turn program of size 0 (see the class doc)
            return (3, self.aging * arrival, 0, arrival, i)
        prog_t = first
        size = self.sizes.get(rank)
        if size is None:
            return (4, prog_t, rank, arrival, i)
        return (3, size + self.aging * prog_t, rank, arrival, i)


class SizeSource(Protocol):
    """Where :class:`SizeFirstOrder` gets a new program's size: ``size_of`` its first request's hints (None:
    unknown, after every sized program); ``finished`` is told each finished program's work (Σ its turns'
    contexts / 1000) when ``learns``; ``reads_agent``: the size is the agent's (an engine adapter may derive
    the agent of a request naming none)."""

    learns: bool
    reads_agent: bool

    def size_of(self, hints: RequestHints) -> float | None: ...
    def finished(self, agent: str | None, work: float) -> None: ...


class HintedSizes:
    """``admit_order="size"`` (a probe): the true total work a benchmark client sends (``program_size``)."""

    learns = False
    reads_agent = False

    def size_of(self, hints: RequestHints) -> float | None:
        return hints.program_size

    def finished(self, agent: str | None, work: float) -> None:
        pass


class AgentSizes:
    """The size predictor of ``admit_order="agent"``: a new program's size is the mean work of the finished
    programs of its agent (the ``agent`` hint), learned online from this engine's own programs; an agent with
    none finished yet gets the mean over every agent's finished programs, and before any finished program
    every size is 0 (arrival order). A program's work is the sum of its turns' contexts in thousands of
    tokens (``Σ num_tokens / 1000``: what its prefills and decode attention read), so the estimate needs no
    cost profile; only the order of the sizes matters unless an ``admit_aging`` weighs them against age.

    With ``rounded`` the estimate is rounded to a power of 2: a mean that drifts as programs finish orders
    the waiting programs of one agent by when they arrived relative to each finish, not by arrival (equal
    keys keep program order); rounded, agents whose means differ less than about 2x form one class."""

    __slots__ = ("_sum", "_n", "_all_sum", "_all_n", "rounded")
    learns = True
    reads_agent = True

    def __init__(self, rounded: bool = False) -> None:
        self.rounded = rounded
        self._sum: dict[str | None, float] = {}
        self._n: dict[str | None, int] = {}
        self._all_sum = 0.0
        self._all_n = 0

    def size_of(self, hints: RequestHints) -> float:
        return self.estimate(hints.agent)

    def estimate(self, agent: str | None) -> float:
        n, all_n = self._n.get(agent), self._all_n
        mean = self._sum[agent] / n if n else (self._all_sum / all_n if all_n else 0.0)
        if not self.rounded or mean <= 0.0:
            return mean
        return 2.0 ** round(math.log2(mean))

    def finished(self, agent: str | None, work: float) -> None:
        if len(self._n) >= 10_000 and agent not in self._n:
            agent = None  # a bounded table: unseen agents beyond it share one entry
        self._sum[agent] = self._sum.get(agent, 0.0) + work
        self._n[agent] = self._n.get(agent, 0) + 1
        self._all_sum += work
        self._all_n += 1


#: ``admit_order`` -> how :class:`SizeFirstOrder` sizes new programs. ``"arrival"`` is not here: the order is
#: then :class:`ResumeFirstOrder`, or, with ``resume_order="attained"``, a size order by the ``program_size``
#: hint when a client sends one (the probe as docs/measurements.md, "Admission by program size, measured", has
#: it) and program order otherwise.
SIZE_SOURCES: dict[str, Callable[[bool], SizeSource]] = {
    "size": lambda rounded: HintedSizes(),
    "agent": lambda rounded: AgentSizes(rounded),
}


def build_order(
    order_cls: type[ProgramOrder],
    age_factor: float,
    age_min_s: float = 0.0,
    age_quantile: float = 0.99,
    min_waits: int = 100,
    admit_order: str = "arrival",
    resume_order: str = "arrival",
    admit_aging: float = 0.0,
    admit_round: bool = True,
) -> ProgramOrder:
    """The waiting order a policy core keeps: the rule's ``order_cls``; a :class:`ResumeFirstOrder` that
    admits new programs by size (``admit_order`` "size" / "agent") or serves resumed turns by attained service
    (``resume_order="attained"``) is a :class:`SizeFirstOrder` with its size source."""
    if order_cls is ResumeFirstOrder and (admit_order != "arrival" or resume_order != "arrival"):
        make_sizing = SIZE_SOURCES.get(admit_order)
        return SizeFirstOrder(
            age_factor,
            age_min_s,
            age_quantile,
            min_waits=min_waits,
            aging=admit_aging,
            attained=resume_order == "attained",
            sizing=make_sizing(admit_round) if make_sizing is not None else None,
        )
    return order_cls(age_factor, age_min_s, age_quantile, min_waits=min_waits)


def resumed_turn(arrival: float, first: float | None) -> bool:
    """A request arriving after its program's first arrival: a turn after a tool call (``first`` None: no
    program). What the resume TTFT reports and what :class:`ResumeFirstOrder` serves first."""
    return first is not None and first < arrival
