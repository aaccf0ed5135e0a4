"""The event loop: programs (clients) and engines in virtual time, one policy, one result.

Two heaps: client arrivals (a turn's request reaching the router) and engine events (a step's end, or a
wake-up an idle engine asked for at a pin deadline). The earliest event runs next; an engine starts its next
step as soon as the previous one ends, and decode steps are fused up to the next arrival (see
:mod:`ctk.simulate.engine`). Every replica gets its own ``PolicyCore`` behind a ``PolicyDriver``: the very
classes ``ctk serve`` runs inside vLLM (:func:`attach_policy`).
"""

from __future__ import annotations

import copy
import dataclasses
import heapq
import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ctk.measure.metrics import ProgramTiming, job_figures
from ctk.measure.workload import ProgramSpec
from ctk.simulate.client_timing import ClientTiming
from ctk.simulate.engine import EngineConfig, SimEngine
from ctk.simulate.fleet import make_router
from ctk.simulate.profiles import HardwareProfile
from ctk.simulate.workload import Arrivals, Client, make_clients


@dataclass
class SimConfig:
    """One simulation: the engines, the fleet and the client behaviour (the policy is passed apart)."""

    replicas: int = 1
    routing: str = "consistent-hash"
    arrivals: Arrivals = field(default_factory=Arrivals)
    kv_blocks: int | None = None  # None: the profile's
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    shared_prefix_tokens: int = 512  # the workload's system prompt
    shared_prefixes: int = 1  # how many distinct ones stay resident (``ctk.measure.workload.system_prompts``)
    max_fused_steps: int = 64
    serve: dict[str, Any] = field(default_factory=dict)  # ServeConfig settings (ctk serve's knobs)


#: The KV cache the bundled ``cpu--tiny`` profile was measured with (``bench/policies.py``'s server).
CPU_PROFILE_KV_BYTES = 16 * 2**20


def comparison_sim_config(
    cfg, profile: HardwareProfile, timing: ClientTiming | None = None, programs: Sequence | None = None
) -> SimConfig:
    """The simulation of a policy comparison's configuration (``ctk.measure.compare.CompareConfig``): its
    arrivals, the server's KV cache (scaled from the profile's measured one) and ``max_num_seqs``; with
    ``timing`` (measured in the real run), every turn's round trip and client gap drawn from it; with the
    replayed ``programs``, as many resident system prompts as the replay sent."""
    from ctk.measure.workload import system_prompts

    kv = cfg.server.kv_cache_bytes
    return SimConfig(
        arrivals=Arrivals(
            rate=cfg.replay.rate,
            concurrency=cfg.replay.concurrency,
            time_scale=cfg.replay.time_scale,
            rtt_s=profile.rtt_s,
            seed=cfg.replay.seed,
            rtt_samples_s=timing.rtt_samples_s if timing is not None else (),
            gap_samples_s=timing.gap_samples_s if timing is not None else (),
        ),
        kv_blocks=None if kv == CPU_PROFILE_KV_BYTES else int(profile.kv_blocks * kv / CPU_PROFILE_KV_BYTES),
        max_num_seqs=cfg.server.max_num_seqs,
        shared_prefix_tokens=cfg.workload.system_prompt_tokens,
        shared_prefixes=system_prompts(cfg.workload, programs) if programs is not None else 1,
    )


def attach_policy(engine: SimEngine, policy: str, serve: dict[str, Any], tables, cost) -> Any:
    """Give ``engine`` the policy exactly as ``ctk serve`` builds it: rule, core, driver."""
    from ctk.policy.config import ServeConfig
    from ctk.policy.core import PolicyCore
    from ctk.policy.driver import PolicyDriver
    from ctk.policy.rules import make_rule

    cfg = ServeConfig.from_mapping({**serve, "policy": policy})
    rule = make_rule(cfg.policy, cfg, tables, cost)
    core = PolicyCore(cfg, rule, block_size=engine.block_size)
    engine.driver = PolicyDriver(core, engine)
    return engine.driver


@dataclass
class SimResult:
    policy: str
    clients: list[Client]
    engines: list[SimEngine]
    sim_time_s: float
    wall_s: float
    config: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        jct = np.array([c.jct_s for c in self.clients if c.jct_s is not None], dtype=float)
        ttft = np.array([t for c in self.clients for t in c.ttfts], dtype=float)
        prompt = sum(c.prompt_tokens for c in self.clients)
        cached = sum(c.cached_tokens for c in self.clients)
        pins, hits = 0, 0
        for e in self.engines:
            stats = getattr(getattr(e.driver, "core", None), "stats", None)
            if stats is not None:
                pins += stats.pins_created
                hits += stats.pin_hits
        span = self.sim_time_s or 1.0
        timings = [
            ProgramTiming(c.start_s, None if c.jct_s is None else c.finish_s, c.ttfts) for c in self.clients
        ]
        return {
            "programs": int(len(jct)),
            "failed_programs": sum(1 for c in self.clients if c.jct_s is None),
            "turns": int(len(ttft)),
            **job_figures(timings, prompt, cached),
            "mean_ttft_s": float(ttft.mean()) if len(ttft) else None,
            "p99_ttft_s": float(np.percentile(ttft, 99)) if len(ttft) else None,
            "preemptions": sum(e.preemptions for e in self.engines),
            "pins": pins,
            "pin_hits": hits,
            "kv_usage_mean": float(np.mean([e.kv_used_time / span for e in self.engines])),
            "busy_share": float(np.mean([e.busy_time / span for e in self.engines])),
            "steps": sum(e.steps for e in self.engines),
            "sim_time_s": self.sim_time_s,
            "wall_s": self.wall_s,
        }


def make_engines(profile: HardwareProfile, cfg: SimConfig) -> list[SimEngine]:
    ecfg = EngineConfig(
        num_blocks=cfg.kv_blocks or profile.kv_blocks,
        block_size=profile.block_size,
        max_num_batched_tokens=cfg.max_num_batched_tokens or profile.max_num_batched_tokens,
        max_num_seqs=cfg.max_num_seqs or profile.max_num_seqs,
        shared_prefix_tokens=cfg.shared_prefix_tokens,
        shared_prefixes=cfg.shared_prefixes,
        max_fused_steps=cfg.max_fused_steps,
    )
    return [SimEngine(ecfg, profile, name=f"engine-{i}") for i in range(cfg.replicas)]


def simulate_arm(
    programs: list[ProgramSpec],
    profile: HardwareProfile,
    arm: str,
    cfg: SimConfig,
    tables=None,
    ttl_model: str | None = None,
    cost=None,
    progress: Callable[[int], None] | None = None,
) -> SimResult:
    """:func:`simulate` one arm of the policy comparison (``ttl``, ``ttl@age_factor=2``,
    ``vllm/program-fcfs``, ``oracle@age_bound=true``): its serve settings over ``cfg.serve``; only a rule
    that needs the model file (``ttl``) gets the TTL model and a copy of ``tables`` of its own (online
    adaptation rewrites the tables it runs on: an arm must not start from another arm's or rate's
    adaptation)."""
    from ctk.policy.arms import Arm

    parsed = Arm.parse(arm)
    needs_model = parsed.needs_model_file
    serve = {**cfg.serve, **parsed.settings()}
    if needs_model and ttl_model:
        serve["ttl_model"] = str(ttl_model)
    return simulate(
        programs,
        profile,
        parsed.policy.value,
        dataclasses.replace(cfg, serve=serve),
        tables=copy.deepcopy(tables) if needs_model else None,
        cost=cost,
        progress=progress,
    )


def simulate(
    programs: list[ProgramSpec],
    profile: HardwareProfile,
    policy: str,
    cfg: SimConfig,
    tables=None,
    cost=None,
    progress: Callable[[int], None] | None = None,
) -> SimResult:
    """Run ``programs`` through ``cfg.replicas`` simulated engines under ``policy``; virtual time."""
    arr = cfg.arrivals
    arr.validate()
    t_wall = time.perf_counter()
    engines = make_engines(profile, cfg)
    cost = cost if cost is not None else profile.cost_model()
    for e in engines:
        attach_policy(e, policy, cfg.serve, tables, cost)
    router = make_router(cfg.routing, len(engines))
    clients = make_clients(programs)  # the same program ids under every policy: the same replica per program
    for c in clients:  # the true size, for the size-order admission probe (admit_order="size")
        c.size_s = round(profile.program_work_s(c.spec.first_prompt_tokens, c.spec.turns), 6)
    seq = itertools.count()
    arrivals: list[tuple[float, int, Client]] = []  # a request reaches the router
    events: list[tuple[float, int, int, int]] = []  # (time, seq, engine, kind) kind 0: step end, 1: wake
    wake_pushed: list[float | None] = [None] * len(engines)
    starts = arr.start_times(len(clients))
    pending = list(range(len(clients)))[::-1]  # programs not started yet (popped from the end)
    in_flight = 0
    limit = arr.concurrency or math.inf

    def start_programs(now: float) -> None:
        nonlocal in_flight
        while pending and in_flight < limit:
            c = clients[pending[-1]]
            t0 = max(now, float(starts[c.index]))
            pending.pop()
            in_flight += 1
            c.start_s = t0
            heapq.heappush(arrivals, (t0 + c.start(arr), next(seq), c))

    def kick(i: int, now: float) -> None:
        """Start engine ``i``'s next step if it is free and has work; else arm its wake-up."""
        e = engines[i]
        if e.busy_until is not None:
            return
        if not e.idle:
            horizon = arrivals[0][0] if arrivals else math.inf
            dt = e.begin_step(now, horizon)
            if dt is not None:
                heapq.heappush(events, (now + dt, next(seq), i, 0))
                return
        d = e.wake_deadline
        if d is not None and d > now and wake_pushed[i] != d:
            wake_pushed[i] = d
            heapq.heappush(events, (d, next(seq), i, 1))

    start_programs(0.0)
    now = 0.0
    done = 0
    while arrivals or events:
        if arrivals and (not events or arrivals[0][0] <= events[0][0]):
            now, _, c = heapq.heappop(arrivals)
            req = c.request(arr)
            i = router.route(c.replay_id, engines)
            e = engines[i]
            c.replica = i
            if not e.fits(req):
                c.failed = f"request of {req.num_tokens} tokens exceeds the KV cache"
                c.finish_s = now
                done += 1
                in_flight -= 1
                start_programs(now)
                continue
            e.add(req, now)
            kick(i, now)
            continue
        now, _, i, kind = heapq.heappop(events)
        e = engines[i]
        if kind == 1:
            wake_pushed[i] = None
            if e.busy_until is None:
                if e.idle:
                    e.driver.idle(now)
                kick(i, now)
            continue
        for r in e.end_step(now):
            c = r.client
            delay = c.turn_done(r, arr)
            if delay is None:
                c.finish_s = now + c.rtt_s / 2
                done += 1
                in_flight -= 1
                if progress is not None:
                    progress(1)
                start_programs(c.finish_s)
            else:
                heapq.heappush(arrivals, (now + delay, next(seq), c))
        kick(i, now)
    for c in clients:
        if c.finish_s is None:
            c.failed = c.failed or "did not finish (the engine could not place its request)"
    cfg_dict = dataclasses.asdict(cfg)
    for key in ("rtt_samples_s", "gap_samples_s"):  # the samples' size and mean, not every sample
        xs = cfg_dict["arrivals"][key]
        cfg_dict["arrivals"][key] = {"n": len(xs), "mean_s": float(np.mean(xs))} if xs else None
    cfg_dict["profile"] = profile.name
    return SimResult(policy, clients, engines, now, time.perf_counter() - t_wall, cfg_dict)
