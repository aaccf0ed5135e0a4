"""Simulated clients: the programs ``ctk replay`` builds, their arrivals, and what each turn asks for.

A program's turn k asks for ``first_prompt + Σ_{j<k}(output_j + observation_j)`` prompt tokens and exactly
``output_k`` output tokens (``ignore_eos``), then the client sleeps the recorded tool pause × ``time_scale``
and sends turn k+1 — the replay's behaviour (``ctk.measure.replay``). A request carries the hints the replay
sends (parsed by the same ``parse_hints`` the vLLM adapter uses). Programs start all at once gated by a
concurrency (closed loop) or as a seeded Poisson process at ``rate`` programs per second.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ctk.measure.workload import ProgramSpec, replay_xargs
from ctk.policy.hints import parse_hints
from ctk.simulate.engine import SimRequest


@dataclass
class Arrivals:
    """How programs start: ``rate`` (Poisson, programs/s) and/or ``concurrency`` (programs in flight)."""

    rate: float | None = None
    concurrency: int | None = 8
    time_scale: float = 1.0  # tool pause = recorded duration x this
    rtt_s: float = 0.005  # client <-> engine round trip (half each way)
    seed: int = 0
    #: Seed of the per-turn client draws below (None: ``seed``); another value re-draws the client timing over
    #: the same program start times (``bench/sim_fidelity.py --draws``: a Poisson workload stays the replay's)
    client_seed: int | None = None
    #: Measured round trips (a real run's, :mod:`ctk.simulate.client_timing`): each turn draws one (seeded per
    #: program, so every policy sees the same draws); empty: every turn takes ``rtt_s``.
    rtt_samples_s: tuple[float, ...] = ()
    #: Measured client time between a response and the next request beyond the tool pause (empty: none).
    gap_samples_s: tuple[float, ...] = ()
    send_oracle_duration: bool = True

    def validate(self) -> None:
        if self.rate is None and not self.concurrency:
            raise ValueError("give a Poisson rate, a concurrency, or both")
        if self.rate is not None and self.rate <= 0:
            raise ValueError("rate must be positive")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")

    def start_times(self, n: int) -> np.ndarray:
        if self.rate is None:
            return np.zeros(n)
        gaps = np.random.default_rng(self.seed).exponential(1.0 / self.rate, size=n)
        return np.cumsum(gaps) - gaps[0]


@dataclass
class Client:
    """One program being driven: which turn is next and what it measured."""

    index: int
    spec: ProgramSpec
    replay_id: str
    start_s: float = 0.0
    finish_s: float | None = None
    turn: int = 0
    context: int = 0  # prompt tokens of the next turn
    ttfts: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    failed: str | None = None
    replica: int | None = None
    rtt_s: float = 0.0  # the round trip of the current turn (see :meth:`start`)
    size_s: float | None = None  # the program's true total engine work (sent on its first turn; see run.py)
    _rng: np.random.Generator | None = None

    def __post_init__(self) -> None:
        self.context = self.spec.first_prompt_tokens

    def _draw(self, samples: tuple[float, ...], default: float, arrivals: Arrivals) -> float:
        if not samples:
            return default
        if self._rng is None:
            seed = arrivals.seed if arrivals.client_seed is None else arrivals.client_seed
            self._rng = np.random.default_rng([seed, self.index])
        return float(samples[self._rng.integers(len(samples))])

    def start(self, arrivals: Arrivals) -> float:
        """The program starts: the delay until its first request reaches the engine (half a round trip)."""
        self.rtt_s = self._draw(arrivals.rtt_samples_s, arrivals.rtt_s, arrivals)
        return self.rtt_s / 2

    @property
    def jct_s(self) -> float | None:
        return None if self.finish_s is None or self.failed else self.finish_s - self.start_s

    def request(self, arrivals: Arrivals) -> SimRequest:
        """The next turn's request (its hints exactly as ``ctk replay`` sends them)."""
        t = self.spec.turns[self.turn]
        xargs = replay_xargs(
            self.replay_id,
            t,
            arrivals.time_scale,
            arrivals.send_oracle_duration,
            first_turn=self.turn == 0,
            program_size=self.size_s,
            agent=self.spec.source,
        )
        hints = parse_hints(self.replay_id, xargs)
        req = SimRequest(
            f"{self.replay_id}-t{self.turn}", self.replay_id, self.context, t.output_tokens, hints
        )
        req.client = self
        return req

    def turn_done(self, req: SimRequest, arrivals: Arrivals) -> float | None:
        """Record the finished turn; the time from its end in the engine to the next request's arrival there
        (half this turn's round trip back, the client's gap, the tool pause, half the next round trip), or
        None when the program is done (its response reaches the client ``rtt_s / 2`` later)."""
        t = self.spec.turns[self.turn]
        back = self.rtt_s / 2
        if req.first_token_s is not None:
            self.ttfts.append(req.first_token_s - req.arrival + self.rtt_s)
        self.prompt_tokens += req.prompt_tokens
        self.cached_tokens += req.cached_tokens or 0
        self.context += t.output_tokens + t.observation_tokens
        self.turn += 1
        if t.last_turn or self.turn >= len(self.spec.turns):
            return None
        gap = self._draw(arrivals.gap_samples_s, 0.0, arrivals)
        self.rtt_s = self._draw(arrivals.rtt_samples_s, arrivals.rtt_s, arrivals)
        return back + gap + t.tool_duration_s * arrivals.time_scale + self.rtt_s / 2


def repeat_programs(specs: list[ProgramSpec], n: int) -> list[ProgramSpec]:
    """``n`` programs: ``specs`` in order, cycled when ``n`` exceeds them (each copy runs as its own program,
    with its own identity and cache; the trace store rarely holds the thousands a GPU fleet serves)."""
    return [specs[i % len(specs)] for i in range(n)] if specs else []


def make_clients(programs: list[ProgramSpec], label: str = "sim") -> list[Client]:
    return [Client(i, p, f"{label}-{i:05d}") for i, p in enumerate(programs)]
