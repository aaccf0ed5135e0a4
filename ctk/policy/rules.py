"""Pin rules: one small class per policy behind the :class:`PinRule` protocol (no vLLM, no clock).

A rule decides at a turn's finish whether and how long to pin (:meth:`PinRule.decide`, given the live memory
price), learns from a program's return (:meth:`PinRule.observe`), re-judges a held pin when the price moved
(:meth:`PinRule.keep`), and orders the valve (:meth:`PinRule.victim_value`, lowest goes first) and the pin
budget (:meth:`PinRule.budget_value`). Every policy
difference is a class attribute or method here; :class:`~ctk.policy.core.PolicyCore` only keeps books.

Units: price in JCT-seconds per token-second (:mod:`ctk.policy.price`), benefit ``B`` in JCT-seconds,
memory in tokens. Rules that carry a return-time distribution (``PinDecision.cdf``) share one valve order:
expected benefit per token-second still to hold, ``(F(x) − F(e))·B / (N·(H(x) − H(e)))``
(:meth:`ctk.predict.cost.CDF.value`): with true durations the program returning last goes first (Belady),
never the pin about to hit.

The module is the one registry of serve policies (config, ``ctk serve``, measure, simulate and bench read it):
:class:`Policy` names them, :data:`RULES` maps each to its rule class, whose class attributes answer what the
rest of ctk asks of a policy (``needs_model_file``, ``uses_model_file``, ``needs_ctk_scheduler``), and
:func:`make_rule` at the end builds one.
"""

from __future__ import annotations

import math
from collections import deque
from enum import StrEnum
from typing import TYPE_CHECKING, ClassVar, Protocol, Self

from ctk.policy.detect import ToolCall
from ctk.policy.events import NO_PIN, EngineState, Pin, PinCall, PinDecision, ToolObservation
from ctk.policy.ordering import ProgramOrder, ResumeFirstOrder
from ctk.predict.cost import CDF, CONTINUUM_PIN_S, CostModel, live_ttl
from ctk.predict.features import continuum_tool_name

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ctk.predict.online import OnlineDurations
    from ctk.predict.tables import TTLTables


class Policy(StrEnum):
    VLLM = "vllm"  # stock vLLM: no pins, FCFS
    CONTINUUM = "continuum"  # the public Continuum code: 2 s pin if the tool's running mean <= 2 s
    PROGRESS_TTL = "progress-ttl"  # vllm-router 0.1.16+ Program Scheduling's Progress-TTL
    TTL = "ttl"  # ctk: TTL from the learned duration distribution under the live memory price
    ORACLE = "oracle"  # the true tool duration, clairvoyant eviction: an upper bound
    THUNDERAGENT = "thunderagent"  # NVIDIA Dynamo's ThunderAgent: programs paused / resumed by KV usage


POLICY_NAMES: tuple[str, ...] = tuple(p.value for p in Policy)


class RuleSettings(Protocol):
    """The serve settings a rule is built from (:class:`~ctk.policy.config.ServeConfig` has them all)."""

    max_pin_share: float
    admit_fill: float
    admit_horizon_s: float
    program_fcfs: bool | None
    age_bound: bool | None
    online: bool
    online_min_samples: int
    online_prior_weight: int
    online_window: int
    continuum_ttl_s: float
    oracle_slack_s: float
    progress_window: int
    valve_horizon_s: float


class PinRule(Protocol):
    policy: ClassVar[Policy]
    needs_model_file: ClassVar[bool]  # cannot run without the TTL model file (its tables)
    uses_model_file: ClassVar[bool]  # served with the model file when given (its tables / cost profile)
    needs_ctk_scheduler: ClassVar[bool]  # False: vLLM's own scheduler serves it (no pins, no reordering)
    pins: bool  # False: stock vLLM (no pins)
    program_fcfs: bool  # order the waiting queue by program first arrival
    release_on_next_finish: bool  # Continuum: a pin is released when the program's NEXT request finishes
    age_bound: bool  # False: strict program FCFS, a waiting request may be overtaken without bound
    valve_last_resort: bool  # True: pins go only when nothing running can free memory (Continuum)
    strict_needs_returns: bool  # strict order only while pinned programs come back here (else the age bound)
    max_pin_share: float  # pinned blocks never exceed this share of the KV cache
    waiting_order: type[ProgramOrder]  # the waiting queue's order (ctk.policy.ordering), when program_fcfs

    gate: AdmissionGate | None  # holds back waiting requests that would fit memory (None: never)

    def decide(self, call: PinCall, state: EngineState, price: float) -> PinDecision: ...
    def observe(self, obs: ToolObservation, now: float) -> None: ...
    def keep(self, pin: Pin, state: EngineState, price: float) -> bool: ...
    def victim_value(self, pin: Pin, now: float) -> float: ...  # the valve's order (lowest goes first)
    def budget_value(self, pin: Pin, now: float) -> float: ...  # a held pin against a new one (pin budget)
    @classmethod
    def from_settings(cls, settings: RuleSettings, tables: TTLTables | None, cost: CostModel) -> Self: ...


class AdmissionGate(Protocol):
    """Holds back a program's waiting requests although they fit memory (ThunderAgent's paused programs,
    working-set admission). The core feeds it the program events; the engine asks :meth:`may_admit` for each
    waiting request it would admit (a request already admitted once, e.g. preempted, is never asked)."""

    capacity_tokens: int  # the engine's KV cache in tokens (set by the driver)

    def arrived(self, program_id: str, prompt_tokens: int, now: float) -> None: ...
    def finished(self, program_id: str, context_tokens: int, last_turn: bool, now: float) -> None: ...
    def aborted(self, program_id: str, now: float) -> None: ...
    def may_admit(self, program_id: str) -> bool: ...

    next_tick: float  # the driver calls :meth:`tick` at its first step from then on

    def tick(self, state: EngineState) -> None: ...
    @property
    def holding(self) -> bool: ...  # something is held back: an idle engine must wake at ``next_tick``


def pinned_program_order(age_bound: bool) -> type[ProgramOrder]:
    """The waiting order of ``ttl`` and ``oracle`` (one rule, so they differ only in what they know).
    Strict: program order admits new programs, resumed turns are served FCFS among themselves
    (:class:`ResumeFirstOrder`: no admitted program's turn waits behind an older program's run of turns);
    with the age bound (``--age-bound``): program FCFS under the bound (:class:`ProgramOrder`)."""
    return ProgramOrder if age_bound else ResumeFirstOrder


# -- shared by the rules that carry a distribution ------------------------------------------------------


def keep_by_cdf(pin: Pin, now: float, price: float) -> bool:
    """Keep while some further holding still gains: max over τ in (e, ttl] of
    ``(F(τ) − F(e))·B − price·N·(H(τ) − H(e)) > 0`` (the hazard rule ``h(e)·B ≥ price·N``, integrated ahead,
    so a dip in the hazard does not drop a pin whose returns are still to come)."""
    if price <= 0.0 or pin.cdf is None:
        return True
    e = now - pin.created
    _, _, gain = pin.cdf.best_ttl(pin.benefit_s, price * pin.held_tokens, after=e, until=pin.ttl_s)
    return gain > 0.0


def value_by_cdf(pin: Pin, now: float, horizon_s: float = math.inf) -> float:
    """Expected benefit per token-second still to hold (lowest is dropped first), judged over the next
    ``horizon_s`` of the hold (``min(ttl, e + horizon_s)``): a pin whose program is due within the horizon is
    worth keeping through a shortage that clears sooner than a pin due later, however cheap the later one is
    per token-second over its whole TTL. A pin with nothing due within the horizon is worth less than any
    pin with something due: ``-1 / (its whole value)``, so among such pins the lowest whole value goes
    first."""
    e = now - pin.created
    cdf = pin.cdf
    if cdf is not None:
        whole = cdf.value(pin.benefit_s, pin.held_tokens, e, pin.ttl_s)
        if horizon_s == math.inf:
            return whole
        if whole <= 0.0:
            return -math.inf  # nothing left to gain: first of all
        until = e + horizon_s
        if until >= pin.ttl_s:
            return whole
        near = cdf.value(pin.benefit_s, pin.held_tokens, e, until)
        if near > 0.0:
            return near
        return -1.0 / whole
    left = pin.expires - now
    if left <= 0.0:
        return 0.0
    return pin.p_hit * pin.benefit_s / (max(1, pin.held_tokens) * left)


def continuum_tool(tool: ToolCall) -> str:
    """Continuum's tool name of a detected or hinted call (a shell command for ``bash`` and ``hint``)."""
    return continuum_tool_name(tool.command, tool.name, tool.kind in ("bash", "hint"))


# -- the rules --------------------------------------------------------------------------------------------


class NoPins:
    """Stock vLLM: no pins (program FCFS only when the config asks for it, for the factorial)."""

    policy = Policy.VLLM
    needs_model_file = False
    uses_model_file = False
    needs_ctk_scheduler = False
    gate = None
    pins = False
    release_on_next_finish = False
    age_bound = True
    valve_last_resort = False
    strict_needs_returns = False
    max_pin_share = 0.0
    waiting_order = ProgramOrder

    def __init__(self) -> None:
        self.program_fcfs = False

    @classmethod
    def from_settings(cls, settings: RuleSettings, tables: TTLTables | None, cost: CostModel) -> Self:
        return cls()

    def decide(self, call: PinCall, state: EngineState, price: float) -> PinDecision:
        return NO_PIN

    def observe(self, obs: ToolObservation, now: float) -> None:
        pass

    def keep(self, pin: Pin, state: EngineState, price: float) -> bool:
        return False

    def victim_value(self, pin: Pin, now: float) -> float:
        return 0.0

    budget_value = victim_value


class ContinuumRule:
    """The public Continuum code: a running mean of the tool's durations per tool name (first word of
    the command); a fixed ``ttl_s`` pin when the mean is at most ``ttl_s`` (or the tool is new), else none.
    No cost model, no price, no pin budget. The pin is released when the program's NEXT request finishes (not
    at its admission); expiry is suspended while that request is in the engine. Strict program FCFS with
    pinned programs first and no age bound; pins give memory back only when nothing running can (no
    valve), oldest pin first."""

    policy = Policy.CONTINUUM
    needs_model_file = False
    uses_model_file = False
    needs_ctk_scheduler = True
    gate = None
    pins = True
    release_on_next_finish = True
    age_bound = False
    valve_last_resort = True
    strict_needs_returns = False  # the public behaviour: strict whatever the routing
    max_pin_share = 1.0
    waiting_order = ProgramOrder

    def __init__(self, ttl_s: float = CONTINUUM_PIN_S):
        self.ttl_s = ttl_s
        self.program_fcfs = True
        self.means: dict[str, tuple[float, int]] = {}

    @classmethod
    def from_settings(cls, settings: RuleSettings, tables: TTLTables | None, cost: CostModel) -> Self:
        return cls(settings.continuum_ttl_s)

    def decide(self, call: PinCall, state: EngineState, price: float) -> PinDecision:
        name = continuum_tool(call.tool)
        mean, n = self.means.get(name, (0.0, 0))
        if n == 0 or mean <= self.ttl_s:
            return PinDecision(self.ttl_s, 1.0, name)
        return PinDecision(0.0, 0.0, name)

    def observe(self, obs: ToolObservation, now: float) -> None:
        if obs.tool is None:
            return
        name = continuum_tool(obs.tool)
        mean, n = self.means.get(name, (0.0, 0))
        self.means[name] = ((mean * n + obs.duration_s) / (n + 1), n + 1)

    def keep(self, pin: Pin, state: EngineState, price: float) -> bool:
        return True

    def victim_value(self, pin: Pin, now: float) -> float:
        return pin.created  # oldest first

    budget_value = victim_value


# vllm-router's re-prefill cost model (Progress-TTL): C = (a + b·x + c·x²)·(2 − α), x = tokens / 1000.
ROUTER_COST_A, ROUTER_COST_B, ROUTER_COST_C, ROUTER_ALPHA = 0.066, 0.057, 0.0044, 0.15
ROUTER_MAX_TTL_S = 10.0
ROUTER_MIN_CANDIDATE_S = 0.05
ROUTER_LOG_CANDIDATES = 32


def router_reprefill_cost_s(tokens: int) -> float:
    """C: vllm-router's estimate of re-prefilling ``tokens`` uncached tokens (seconds)."""
    x = tokens / 1000.0
    return (ROUTER_COST_A + ROUTER_COST_B * x + ROUTER_COST_C * x * x) * (2.0 - ROUTER_ALPHA)


def _phi(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def lognormal_fit(gaps) -> tuple[float, float]:
    """(μ, σ) of ln(gap), gaps floored at 1 ms; σ floored at 1e-3."""
    logs = [math.log(max(g, 1e-3)) for g in gaps]
    mu = sum(logs) / len(logs)
    var = sum((v - mu) ** 2 for v in logs) / len(logs)
    return mu, max(1e-3, math.sqrt(var))


def progress_ttl_objective(d: float, mu: float, sigma: float, cost_s: float) -> float:
    """``C·P(T<d) − E[T; T<d] − d·P(T≥d)`` for T log-normal(μ, σ): the router's expected gain of holding
    ``d`` seconds (a hit saves C; the wait is paid until the return or until d)."""
    if d <= 0.0:
        return 0.0
    z = (math.log(d) - mu) / sigma
    p = _phi(z)
    partial = math.exp(mu + 0.5 * sigma * sigma) * _phi(z - sigma)  # E[T; T < d]
    return cost_s * p - partial - d * (1.0 - p)


def progress_ttl_candidates(cost_s: float) -> list[float]:
    """0, 0.05 s and 32 log-spaced values from 0.05 s (exclusive) up to min(10 s, C)."""
    top = min(ROUTER_MAX_TTL_S, cost_s)
    out = [0.0, ROUTER_MIN_CANDIDATE_S]
    if top > ROUTER_MIN_CANDIDATE_S:
        ratio = (top / ROUTER_MIN_CANDIDATE_S) ** (1.0 / ROUTER_LOG_CANDIDATES)
        out += [ROUTER_MIN_CANDIDATE_S * ratio**k for k in range(1, ROUTER_LOG_CANDIDATES + 1)]
    return out


def progress_ttl(mu: float, sigma: float, cost_s: float) -> float:
    """The candidate d maximising :func:`progress_ttl_objective` (0: do not hold)."""
    best_d, best_v = 0.0, 0.0
    for d in progress_ttl_candidates(cost_s):
        v = progress_ttl_objective(d, mu, sigma, cost_s)
        if v > best_v:
            best_d, best_v = d, v
    return best_d


class ProgressTTLRule:
    """vllm-router 0.1.16+ Program Scheduling's Progress-TTL, as pins: per engine, a log-normal fit of the
    last ``window`` finish -> next-arrival gaps (of every program); TTL 0 until the window is full; then the
    candidate maximising :func:`progress_ttl_objective` with C from :func:`router_reprefill_cost_s`. A
    client's ``kv_retention_ttl_seconds`` overrides the TTL (as in the router). No re-judgement under the
    price."""

    policy = Policy.PROGRESS_TTL
    needs_model_file = False
    uses_model_file = False
    needs_ctk_scheduler = True
    gate = None
    pins = True
    release_on_next_finish = False
    age_bound = True
    valve_last_resort = False
    strict_needs_returns = False
    waiting_order = ProgramOrder

    def __init__(self, window: int = 100, max_pin_share: float = 0.5):
        self.program_fcfs = True
        self.max_pin_share = max_pin_share
        self.gaps: deque[float] = deque(maxlen=window)
        self._fit: tuple[float, float] | None = None

    @classmethod
    def from_settings(cls, settings: RuleSettings, tables: TTLTables | None, cost: CostModel) -> Self:
        return cls(settings.progress_window, settings.max_pin_share)

    def decide(self, call: PinCall, state: EngineState, price: float) -> PinDecision:
        cost_s = router_reprefill_cost_s(call.context_tokens)
        hint = call.hints.ttl_hint_s
        full = len(self.gaps) == self.gaps.maxlen
        if hint is not None:
            d = hint
        elif not full:
            return NO_PIN
        else:
            if self._fit is None:
                self._fit = lognormal_fit(self.gaps)
            d = progress_ttl(*self._fit, cost_s)
        if d <= 0.0:
            return PinDecision(0.0, 0.0, "progress-ttl", cost_s)
        p = _phi((math.log(d) - self._fit[0]) / self._fit[1]) if full and self._fit else 1.0
        return PinDecision(d, p, "progress-ttl", cost_s, CDF.linear(d, p))

    def observe(self, obs: ToolObservation, now: float) -> None:
        self.gaps.append(obs.duration_s)
        self._fit = None

    def keep(self, pin: Pin, state: EngineState, price: float) -> bool:
        return True

    def victim_value(self, pin: Pin, now: float) -> float:
        return value_by_cdf(pin, now)

    budget_value = victim_value


#: :class:`TTLRule`: observed calls queued for learning, at most (a batch is learned at the next decision)
MAX_UNLEARNED = 256


class TTLRule:
    """ctk: τ from the key's return-time distribution (the tables' quantiles, online-adapted) under the live
    price: maximise ``F(τ)·B − price·N·H(τ)`` with ``B`` the re-prefill time of the context plus the re-queue
    delay (cost profile), ``N`` the held tokens; a held pin is kept while holding on still gains
    (:func:`keep_by_cdf`). A hand-set fixed pin (``TTLTables.fixed_pins``) is read as returns spread evenly
    over its TTL with its p_hit and priced the same way (pin for its TTL or not at all); online adaptation
    never rewrites it. Keys learned online, and every key of trained tables, are priced from their
    quantiles. A client TTL hint (``kv_retention_ttl_seconds``) replaces τ when the price allows it.

    Waiting order: strict, with no age bound (issue 22): program order admits new programs, and resumed
    turns of admitted programs are served FCFS among themselves, pinned ones first (:class:`ResumeFirstOrder`;
    strict program FCFS over every turn made a younger admitted program's next turn wait behind older
    programs' whole runs: 4.2x stock's p99 resume TTFT on the CPU engine). The cost is the wait of a new
    program's first request, reported as the admission wait (README: "What ctk optimises").
    ``ctk serve --age-bound`` bounds that wait at FCFS's tail under program FCFS (for chat-like deployments
    whose service level is the first turn's latency)."""

    policy = Policy.TTL
    needs_model_file = True
    uses_model_file = True
    needs_ctk_scheduler = True
    gate = None
    pins = True
    release_on_next_finish = False
    age_bound = False  # strict program FCFS by default; --age-bound for a bounded first-turn wait
    valve_last_resort = False
    strict_needs_returns = True  # strict only while programs come back here (else the age bound)

    @property
    def waiting_order(self) -> type[ProgramOrder]:
        return pinned_program_order(self.age_bound)

    def __init__(
        self,
        tables: TTLTables | None,
        cost: CostModel,
        max_pin_share: float = 0.5,
        online: OnlineDurations | None = None,
    ):
        self.tables = tables
        self.cost = cost
        self.max_pin_share = max_pin_share
        self.online = online
        self.program_fcfs = True
        self.valve_horizon_s = math.inf  # the valve judges a pin's value over this much of its hold ahead
        self._cdfs: dict[str, tuple[list[float], CDF]] = {}
        #: observed tool calls not learned yet: (keys, duration, time), learned in a batch, in order and each
        #: at its own time, by the first decision once the oldest is the learner's refresh interval old
        #: (:meth:`decide`)
        self._unlearned: deque[tuple[Sequence[str], float, float]] = deque()
        self._learn_after_s = online.min_interval_s if online is not None else 0.0

    def _cdf(self, keys) -> tuple[str, CDF | None] | None:
        """The first key the tables know, with its return-time distribution (None: a fixed pin of 0 s)."""
        tables = self.tables
        fixed, quantiles = tables.fixed_pins, tables.quantiles_s
        for key in keys:
            if key in fixed:
                return key, tables.cdf(key)
            q = quantiles.get(key)
            if q is not None:
                hit = self._cdfs.get(key)
                if hit is None or hit[0] is not q:  # new key, or online adaptation replaced its quantiles
                    hit = self._cdfs[key] = (q, CDF.from_quantiles(tables.quantile_levels, q))
                return key, hit[1]
        return None

    @classmethod
    def from_settings(cls, settings: RuleSettings, tables: TTLTables | None, cost: CostModel) -> Self:
        rule = cls(tables, cost, settings.max_pin_share, online_for(settings, tables))
        rule.gate = working_set_gate(settings)
        rule.valve_horizon_s = settings.valve_horizon_s or math.inf
        return rule

    def decide(self, call: PinCall, state: EngineState, price: float) -> PinDecision:
        if self.tables is None:
            return NO_PIN
        unlearned = self._unlearned
        if unlearned and (
            state.now - unlearned[0][2] >= self._learn_after_s or len(unlearned) >= MAX_UNLEARNED
        ):
            self._learn()
        found = self._cdf(call.keys)
        if found is None:
            return NO_PIN
        key, cdf = found
        if cdf is None:
            return PinDecision(0.0, 0.0, key)
        benefit = self.cost.benefit_s(call.context_tokens)
        c = price * call.held_tokens
        hint = call.hints.ttl_hint_s
        if hint is not None:
            f, h = cdf.at(hint)
            if hint <= 0.0 or (price > 0.0 and f * benefit - c * h <= 0.0):
                return PinDecision(0.0, 0.0, key, benefit)
            return PinDecision(hint, f, key, benefit, cdf)
        ttl, f = live_ttl(cdf, benefit, price, call.held_tokens)
        if ttl <= 0.0:
            return PinDecision(0.0, 0.0, key, benefit)
        return PinDecision(ttl, f, key, benefit, cdf)

    def observe(self, obs: ToolObservation, now: float) -> None:
        """Queue the call for online learning. The learning (15-60 us a call, each touching the learner's
        state cold in the engine's step) runs in batches, where the tables are read (:meth:`decide`), at most
        the learner's refresh interval (``OnlineDurations.min_interval_s``, 0.5 s; a key's quantiles are
        refreshed at most that often anyway) after the oldest call came. The batch learns what learning each
        call at its arrival would: the same state, in the same order."""
        if self.online is not None and obs.keys:
            self._unlearned.append((obs.keys, obs.duration_s, now))

    def _learn(self) -> None:
        """Learn the queued calls, oldest first, each at its own time."""
        observe, queue = self.online.observe, self._unlearned
        while queue:
            observe(*queue.popleft())

    def keep(self, pin: Pin, state: EngineState, price: float) -> bool:
        return keep_by_cdf(pin, state.now, price)

    def victim_value(self, pin: Pin, now: float) -> float:
        return value_by_cdf(pin, now, self.valve_horizon_s)

    def budget_value(self, pin: Pin, now: float) -> float:
        """Under the pin budget a new pin displaces held ones for as long as it holds: the whole TTL (the
        valve's horizon judged there made a new program's p99 TTFT below the knee worse, docs/measurements.md,
        "The valve's horizon")."""
        return value_by_cdf(pin, now)


class OracleRule:
    """The upper bound: the true tool duration ``T`` (``hints.tool_duration_s``), the same cost profile as
    ``ttl``, no pin budget but memory. The return is expected in ``[T + o, T + o + slack]`` with ``o`` the
    client's measured round trip (finish -> next arrival minus T, learned online), so the pin lasts exactly
    that long, is taken only when ``B > price·N·E[hold]``, is kept while ``B`` still exceeds the price of the
    rest of the hold, and the valve drops the program returning last first (Belady). Its waiting order is
    ``ttl``'s (:func:`pinned_program_order`: resumed turns first, new programs in program order, no age bound
    unless asked): it bounds what clairvoyant pins can do under ttl's order."""

    policy = Policy.ORACLE
    needs_model_file = False
    uses_model_file = True
    needs_ctk_scheduler = True
    gate = None
    pins = True
    release_on_next_finish = False
    age_bound = False  # ttl's strict order (no age bound) ...
    valve_last_resort = False
    strict_needs_returns = True  # ... while programs come back here (not behind round-robin)
    max_pin_share = 1.0

    @property
    def waiting_order(self) -> type[ProgramOrder]:
        return pinned_program_order(self.age_bound)

    def __init__(self, cost: CostModel, slack_s: float = 0.25, overhead_alpha: float = 0.2):
        self.cost = cost
        self.slack_s = slack_s
        self.program_fcfs = True
        self.overhead_s = 0.0
        self._alpha = overhead_alpha
        self._n = 0
        self._true: dict[str, float] = {}

    @classmethod
    def from_settings(cls, settings: RuleSettings, tables: TTLTables | None, cost: CostModel) -> Self:
        rule = cls(cost, settings.oracle_slack_s)
        rule.gate = working_set_gate(settings)
        return rule

    def decide(self, call: PinCall, state: EngineState, price: float) -> PinDecision:
        t = call.hints.tool_duration_s
        if t is None:
            return NO_PIN
        if len(self._true) >= 100_000:  # programs that never came back: forget them
            self._true.clear()
        self._true[call.program_id] = t
        start = t + self.overhead_s
        cdf = CDF.window(start, start + self.slack_s)
        benefit = self.cost.benefit_s(call.context_tokens)
        ttl, f, _ = cdf.best_ttl(benefit, price * call.held_tokens)
        return PinDecision(ttl, f, "oracle", benefit, cdf if ttl > 0 else None)

    def observe(self, obs: ToolObservation, now: float) -> None:
        t = self._true.pop(obs.program_id, None)
        if t is None:
            return
        over = max(0.0, obs.duration_s - t)
        self._n += 1
        a = max(self._alpha, 1.0 / self._n)
        self.overhead_s += a * (over - self.overhead_s)

    def keep(self, pin: Pin, state: EngineState, price: float) -> bool:
        return keep_by_cdf(pin, state.now, price)

    def victim_value(self, pin: Pin, now: float) -> float:
        return value_by_cdf(pin, now)

    budget_value = victim_value


class ThunderAgentRule(NoPins):
    """NVIDIA Dynamo's ThunderAgent router, inside the engine: no pins, the engine's FCFS order, and whole
    programs paused and resumed by its usage accounting every 5 s
    (:class:`~ctk.policy.pause.ThunderAgentGate`, Dynamo's defaults: pause at 0.95, drain to 0.80, resume
    under 0.85, forced resume after 1,800 s). A paused program's next turn is held back in the waiting queue
    although it fits."""

    policy = Policy.THUNDERAGENT
    needs_ctk_scheduler = True

    def __init__(self) -> None:
        super().__init__()
        from ctk.policy.pause import ThunderAgentGate

        self.gate = ThunderAgentGate()


def working_set_gate(settings: RuleSettings) -> AdmissionGate | None:
    """The admission gate of ``ttl`` and ``oracle`` (one rule, so they differ only in what they know)."""
    if settings.admit_fill <= 0.0:
        return None
    from ctk.policy.admit import WorkingSetGate

    return WorkingSetGate(settings.admit_fill, settings.admit_horizon_s)


def online_for(settings: RuleSettings, tables: TTLTables | None) -> OnlineDurations | None:
    """The online adapter of the ``ttl`` rule (None when disabled or without tables)."""
    if not settings.online or tables is None:
        return None
    from ctk.predict.online import OnlineDurations

    return OnlineDurations(
        tables, settings.online_min_samples, settings.online_prior_weight, settings.online_window
    )


# -- the registry -----------------------------------------------------------------------------------------

#: The rule class of each policy: the only place a policy's name decides anything.
RULES: dict[Policy, type[PinRule]] = {
    Policy.VLLM: NoPins,
    Policy.CONTINUUM: ContinuumRule,
    Policy.PROGRESS_TTL: ProgressTTLRule,
    Policy.TTL: TTLRule,
    Policy.ORACLE: OracleRule,
    Policy.THUNDERAGENT: ThunderAgentRule,
}


def make_rule(
    policy: Policy | str,
    settings: RuleSettings,
    tables: TTLTables | None = None,
    cost: CostModel | None = None,
) -> PinRule:
    """The pin rule of ``policy``; ``cost`` defaults to the tables' profile (else the default profile).
    ``ttl`` and ``oracle`` get the same tables / cost profile, so they differ only in what they know."""
    if cost is None:
        cost = tables.cost_model if tables is not None else CostModel()
    rule = RULES[Policy(policy)].from_settings(settings, tables, cost)
    if settings.program_fcfs is not None:
        rule.program_fcfs = settings.program_fcfs
    if settings.age_bound is not None:  # e.g. the oracle held to ttl's tail bound, or ttl in strict order
        rule.age_bound = settings.age_bound
    return rule
