"""Scheduler overhead of the ctk plugin with zero pins versus stock vLLM, measured in the same run.

One in-process vLLM CPU engine (tiny model) runs the same kind of agent-like workload in alternating phases:
``stock`` (the scheduler object dispatches every hook to vLLM's own ``Scheduler`` methods) and ``ctk``
(the ``CTKScheduler`` hooks with policy ``ttl`` and a TTL table that never pins, so every hook runs —
metadata parsing, program ordering, tool-call keys and TTL lookups — but nothing is held). Only the time spent
inside the scheduler (``add_request``, ``schedule``, ``update_from_output``, which frees finished requests)
is counted, per engine step. Phases alternate to cancel drift on a shared machine. The stock phases run with
vLLM's own ``FCFSRequestQueue`` as the waiting queue, the ctk phases with ctk's queue. Every
request is a program's first turn (ttl's order serves a program's later turns first, so turns of one program
queued together would be reordered), so the program order is FCFS's: both variants run the same schedule
(same step count) and the ratio is the plugin's own cost (the order is still computed).

    .venv/bin/python bench/sched_overhead.py [--model PATH] [--phases 4] [--requests 32] [--outputs real]
                                              [--clock wall|cpu] [--without step,finish,arrival]
    .venv/bin/python bench/sched_overhead.py --scale [--phases 4] [--steps 200] [--by-call]  # GPU scale
                                              [--workload agents|one-turn]

Prints the per-step scheduler time of both and the ratio ctk / stock of the scheduler time spent on the same
workload (target: <= 1.02). ctk's cost is per request (metadata, decision at finish), vLLM's per request
and step, so the ratio depends on output lengths: ``--outputs real`` samples them from real agent LLM calls
(default), ``--outputs short`` is the worst case. Then, per entry point, ctk's time minus stock's (us/step,
median over phases): where a difference is. Differences of about 1 us/step are inside this box's noise (an
A/A run of stock against stock gives up to ±2% on the ratio).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from ctk.engine_patch.metrics import FLUSH_S


def build_inputs(tmp: Path, model: str | None) -> tuple[str, str]:
    from ctk.engine_patch.serve.tiny_model import build_tiny_model
    from ctk.predict.modelfile import save_model
    from ctk.predict.tables import FixedPin, TTLTables

    model_dir = model or str(build_tiny_model(tmp / "tiny"))
    tables = TTLTables(
        quantile_levels=[0.5],
        fixed_pins={"*": FixedPin(0.0), "make": FixedPin(0.0)},
        quantiles_s={"*": [10.0], "make": [10.0]},
        n_samples={"*": 1, "make": 1},
    )
    model_file = save_model({"ttl_tables": tables.to_dict()}, tmp / "never-pins.pkl")
    return model_dir, str(model_file)


def build_pin_table(tmp: Path) -> Path:
    """TTL tables for ``--scale``: the hinted tool ``make`` is pinned 30 s, nothing else. Each key also has
    quantiles at ``ctk train``'s default levels, which the online adaptation (on, as ``ctk serve``'s default)
    learns from the observed tool calls as it does on a trained file (it never rewrites a fixed pin)."""
    from ctk.predict.commands import DEFAULT_LEVELS_TEXT
    from ctk.predict.modelfile import save_model
    from ctk.predict.tables import FixedPin, TTLTables

    ttls = {"make": 30.0, "*": 0.0}
    levels = [float(x) for x in DEFAULT_LEVELS_TEXT.split(",")]
    tables = TTLTables(
        quantile_levels=levels,
        fixed_pins={k: FixedPin(v, 0.9 if v else 0.0) for k, v in ttls.items()},
        quantiles_s={k: [(v or 10.0) * (0.2 + lv) for lv in levels] for k, v in ttls.items()},
        n_samples={k: 10 for k in ttls},
    )
    return save_model({"ttl_tables": tables.to_dict()}, tmp / "pins-make.pkl")


HOOKS = ("add_request", "schedule", "update_from_output", "_free_blocks", "has_requests")
TIMED = ("add_request", "schedule", "update_from_output")


class Switch:
    """Instance-level dispatch of the scheduler hooks to vLLM's or ctk's methods, timing the entry points."""

    def __init__(self, sched, stock_cls, ctk_cls, clock=time.perf_counter):
        from vllm.v1.core.sched.request_queue import FCFSRequestQueue

        self.sched = sched
        self.clock = clock
        self.total = 0.0
        self.per_hook = dict.fromkeys(TIMED, 0.0)  # the same time, by entry point (where a difference is)
        self.impl = {
            "stock": {h: getattr(stock_cls, h) for h in HOOKS},
            "ctk": {h: getattr(ctk_cls, h) for h in HOOKS},
        }
        # stock vLLM's own waiting queue for the stock phases, ctk's (KeyedRequestQueue) for the ctk phases
        self.queues = {"stock": FCFSRequestQueue(), "ctk": sched.waiting}
        self.variant = "ctk"
        for name in HOOKS:
            setattr(sched, name, self._wrap(name, timed=name in TIMED))

    def use(self, variant: str) -> None:
        # (with zero pins the ctk adapter leaves the KV manager's allocate_slots unwrapped too)
        assert not self.sched.waiting, "switch variants between phases only"
        self.sched.waiting = self.queues[variant]
        self.variant = variant

    def _wrap(self, name, timed):
        sched, clock = self.sched, self.clock

        def call(*args, **kwargs):
            fn = self.impl[self.variant][name]
            if not timed:
                return fn(sched, *args, **kwargs)
            t = clock()
            try:
                return fn(sched, *args, **kwargs)
            finally:
                dt = clock() - t
                self.total += dt
                self.per_hook[name] += dt

        return call


def _shared_llm_calls() -> Path:
    """The shared traces' LLM calls: the first ``shared/data/agent-traces`` above the repository (a git
    worktree sits deeper than the main checkout; the old fixed path fell back to synthetic lengths there)."""
    for up in Path(__file__).resolve().parents[1].parents:
        if (up / "shared/data/agent-traces").is_dir():
            return up / "shared/data/agent-traces/llm_calls.csv"
    return Path(__file__).resolve().parents[2] / "shared/data/agent-traces/llm_calls.csv"


SHARED_LLM_CALLS = _shared_llm_calls()


def output_lengths(kind: str) -> list[int]:
    """Output lengths to sample from: ``real`` = real agent LLM calls (mini-swe-agent, response characters
    / 4, clipped to 8..256 tokens to keep CPU time bounded; a log-normal with the same median when the
    shared traces are absent), ``short`` = 8..24 tokens (worst case: a request finishes every other step)."""
    if kind == "short":
        return list(range(8, 24))
    if SHARED_LLM_CALLS.exists():
        import csv

        with SHARED_LLM_CALLS.open() as fh:
            chars = [int(r["response_chars"]) for r in csv.DictReader(fh) if r.get("response_chars")]
        return [min(256, max(8, c // 4)) for c in chars]
    rng = random.Random(0)
    return [min(256, max(8, int(rng.lognormvariate(4.4, 1.0)))) for _ in range(2000)]


def run_phase(
    llm,
    timer: Switch,
    shape_seed: int,
    content_seed: int,
    n_requests: int,
    tag: str,
    lengths: list[int] | None = None,
):
    """One workload; returns (scheduler seconds of add_request, [scheduler seconds per engine step],
    {entry point: scheduler seconds}).

    The shape (prompt lengths, output lengths, programs) comes from ``shape_seed`` and is the same in every
    phase, so step i does the same work in every phase; the token contents come from ``content_seed`` so
    no phase hits another's prefix cache."""
    from vllm import SamplingParams

    eng = llm.llm_engine
    shape, content = random.Random(shape_seed), random.Random(content_seed)
    timer.total = 0.0
    timer.per_hook = dict.fromkeys(TIMED, 0.0)
    for i in range(n_requests):
        # each request a new program's first turn: ttl's order is then FCFS, both variants schedule alike
        # (three turns of one program queued at once: its later turns went first, a different schedule)
        prog = f"{tag}-p{i}"
        prompt = [content.randrange(10, 4000) for _ in range(shape.randrange(200, 800))]
        sp = SamplingParams(
            max_tokens=shape.choice(lengths) if lengths else shape.randrange(8, 24),
            ignore_eos=True,
            extra_args={"program_id": prog, "turn_index": i, "tool": "make all"},
        )
        eng.add_request(f"{tag}-{i}", {"prompt_token_ids": prompt}, sp)
    add_s = timer.total
    steps = []
    while eng.has_unfinished_requests():
        timer.total = 0.0
        eng.step()
        steps.append(timer.total)
    return add_s, steps, dict(timer.per_hook)


def robust_total(runs: list[tuple[float, list[float]]]) -> tuple[float, int]:
    """Scheduler time of one phase with interference removed: for each step index (and for the
    add_request batch) the minimum over the repeated phases, summed. Returns (seconds, steps)."""
    n = min(len(steps) for _, steps in runs)
    total = min(add for add, _ in runs) + sum(min(steps[i] for _, steps in runs) for i in range(n))
    return total, n


SKIPPABLE = ("step", "finish", "arrival")


def skip_driver_calls(driver, parts: list[str]) -> None:
    """Diagnostics: replace driver calls by no-ops on this instance (``step``, ``finish``, ``arrival``)."""
    tracked = driver.requests
    noops = {
        "step": ("step_begin", lambda now: None),
        "finish": ("request_finished", lambda request_id, end, now: tracked.pop(request_id, None) and False),
        "arrival": ("request_added", lambda request_id, h, now: None),
    }
    for part in parts:
        setattr(driver, *noops[part])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="model folder (default: build the tiny model)")
    ap.add_argument("--phases", type=int, default=4, help="phases per variant (alternating)")
    ap.add_argument("--requests", type=int, default=32, help="requests per phase")
    ap.add_argument(
        "--outputs",
        choices=("real", "short"),
        default="real",
        help="output lengths: real agent LLM calls, or short (8-24 tokens, worst case)",
    )
    ap.add_argument(
        "--ctk",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra ctk setting for the ctk variant (diagnostics), e.g. program_fcfs=0",
    )
    ap.add_argument(
        "--without",
        default="",
        metavar="PARTS",
        help="diagnostics: the ctk variant skips these driver calls (comma-separated: step = step_begin, "
        "finish = the decision at finish, arrival = request_added), to see what each costs in the engine",
    )
    ap.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: perf_counter; cpu: this thread's CPU time (time other processes take is not counted; "
        "each reading costs ~0.75 us, added to both variants alike)",
    )
    ap.add_argument(
        "--scale",
        action="store_true",
        help="instead: the hot path at GPU scale (1,024 running + 1,024 waiting, no model; see run_scale)",
    )
    ap.add_argument("--steps", type=int, default=200, help="--scale: measured steps per round")
    ap.add_argument(
        "--workload",
        choices=WORKLOADS,
        default="agents",
        help="--scale: agents = programs of several turns, each coming back after a tool pause with its "
        "context extended (resumed turns, pin hits); one-turn = every request a new program (the bench "
        "before 2026-12-07)",
    )
    ap.add_argument(
        "--no-gc-freeze",
        action="store_true",
        help="--scale: leave the startup heap to the garbage collector (vLLM's engine core freezes it once "
        "built; the bench before 2026-12-07 did not)",
    )
    ap.add_argument(
        "--hints-in-step",
        action="store_true",
        help="--scale: parse each request's hints in the scheduler's add_request, as an in-process engine "
        "does; by default they are parsed where the engine core process parses them, in vLLM's input thread "
        "(preprocess_add_request, in parallel with the model's forward pass): off the step, timed apart",
    )
    ap.add_argument(
        "--by-call",
        action="store_true",
        help="--scale diagnostics: per ctk hook, the median time of its first call in a step and of the "
        "later ones (the first runs with cold caches after vLLM's own work)",
    )
    args = ap.parse_args()
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    extra = dict(kv.split("=", 1) for kv in args.ctk)
    without = [p for p in args.without.split(",") if p]
    if set(without) - set(SKIPPABLE):
        ap.error(f"--without: one or more of {', '.join(SKIPPABLE)}")
    with tempfile.TemporaryDirectory(prefix="ctk-bench-") as tmp:
        model_dir, model_file = build_inputs(Path(tmp), args.model)
        if args.scale:
            pins_file = str(build_pin_table(Path(tmp)))
            return run_scale(
                model_dir,
                pins_file,
                max(2, args.phases),
                args.steps,
                1024,
                1024,
                args.by_call,
                args.workload,
                extra,
                not args.no_gc_freeze,
                not args.hints_in_step,
            )
        from vllm import LLM
        from vllm.v1.core.sched.scheduler import Scheduler

        from ctk.engine_patch.scheduler import CTKScheduler

        llm = LLM(
            model_dir,
            enforce_eager=True,
            kv_cache_memory_bytes=64 << 20,
            max_model_len=4096,
            enable_prefix_caching=True,
            max_num_seqs=8,
            seed=0,
            scheduler_cls=CTKScheduler,
            additional_config={"ctk": {"policy": "ttl", "ttl_model": model_file, "online": False, **extra}},
        )
        sched = llm.llm_engine.engine_core.engine_core.scheduler
        if without:
            skip_driver_calls(sched.ctk_driver, without)
            print(f"DIAGNOSTIC: the ctk variant skips {', '.join(without)} (its decisions are off)")
        timer = Switch(
            sched, Scheduler, CTKScheduler, time.thread_time if args.clock == "cpu" else time.perf_counter
        )
        use = timer.use
        lengths = output_lengths(args.outputs)
        source = SHARED_LLM_CALLS if SHARED_LLM_CALLS.exists() else "synthetic log-normal"
        print(f"output lengths: {args.outputs} ({source if args.outputs == 'real' else '8..24 tokens'})")

        for variant in ("stock", "ctk"):  # warm-up, not counted
            use(variant)
            run_phase(llm, timer, 1, 1, args.requests, f"warm-{variant}", lengths)
        runs: dict[str, list] = {"stock": [], "ctk": []}
        hooks: dict[str, list[dict[str, float]]] = {"stock": [], "ctk": []}
        for phase in range(args.phases):
            order = ("stock", "ctk") if phase % 2 == 0 else ("ctk", "stock")
            for variant in order:
                use(variant)
                add_s, steps, per_hook = run_phase(
                    llm,
                    timer,
                    7,
                    100 + 2 * phase + (variant == "ctk"),
                    args.requests,
                    f"{variant}-{phase}",
                    lengths,
                )
                runs[variant].append((add_s, steps))
                hooks[variant].append(per_hook)
                us = 1e6 * (add_s + sum(steps)) / len(steps)
                print(f"phase {phase} {variant:5s}: {len(steps):4d} steps, scheduler {us:7.1f} us/step")
        assert sched.ctk.stats.pins_created == 0, "the bench table must never pin"
        (stock, n_stock), (ctk, n_ctk) = robust_total(runs["stock"]), robust_total(runs["ctk"])
        if n_stock != n_ctk:
            print(f"WARNING: different schedules ({n_stock} vs {n_ctk} steps): not pure overhead")
        mean = {v: statistics.mean(a + sum(st) for a, st in runs[v]) for v in runs}
        # each phase's two variants run back to back, under about the same load from other processes
        paired = sorted(
            (c_add + sum(c_steps)) / (s_add + sum(s_steps))
            for (s_add, s_steps), (c_add, c_steps) in zip(runs["stock"], runs["ctk"], strict=True)
        )
        print(
            f"\n{args.phases} alternating phases x {args.requests} requests, outputs: {args.outputs}, "
            f"clock: {args.clock}"
        )
        print("(for each step index the minimum over the phases: load from other processes drops out)")
        print(f"  stock vLLM Scheduler : {1e6 * stock / n_stock:7.1f} us/step over {n_stock} steps")
        print(f"  ctk, zero pins       : {1e6 * ctk / n_ctk:7.1f} us/step over {n_ctk} steps")
        verdict = "(target <= 1.02)" if n_stock == n_ctk else "INVALID: different schedules, not the overhead"
        print(f"  ratio ctk / stock (scheduler time, same workload): {ctk / stock:.3f}  {verdict}")
        print(f"  (plain means, noisy: ratio {mean['ctk'] / mean['stock']:.3f})")
        print(
            f"  (per phase, the two variants back to back: median ratio {statistics.median(paired):.3f}, "
            f"range {paired[0]:.3f}-{paired[-1]:.3f}: the spread is the machine's noise)"
        )
        print(f"  where: ctk - stock per entry point, us/step (median over phases; {n_stock} steps)")
        for hook in TIMED:
            s_med, c_med = (statistics.median(h[hook] for h in hooks[v]) for v in ("stock", "ctk"))
            diff, stock_us = 1e6 * (c_med - s_med) / n_stock, 1e6 * s_med / n_stock
            print(f"    {hook:20s} {diff:+7.2f}  (stock {stock_us:6.1f})")


# -- --scale: the hot path at GPU scale (issue 23 item 8 / issue 22 item 6) ---------------------------------


#: ``--scale``'s targets: ctk's own time per scheduler step and per finished request (issue 22 item 6).
SCALE_TARGET_US = 50.0
#: ``--scale``: the text of the one token every request samples. It holds a character of
#: ``ctk.policy.detect.CALL_CHARS``, so an unhinted finish's output tail is decoded (the costlier case).
SAMPLED_TEXT = '"'


WORKLOADS = ("agents", "one-turn")


class ScaleWorkload:
    """``--scale``'s requests. Every request belongs to a program; every fourth request ends in the hinted
    tool ``make`` (pinned 30 s by :func:`build_pin_table`), the others carry no tool hint (the door decodes
    their tails for tool-call detection). ``agents``: a program runs 4-20 turns (fewer if its context would
    pass :data:`MAX_CONTEXT`); a finished turn's program comes back after a tool pause of 0-40 engine steps
    with its prompt extended by the turn's output and a 64-token observation (a resumed turn: the prefix is
    cached, or held by its pin), its last turn says so (``last_turn``); new programs keep ``waiting``
    requests queued. ``one-turn``: each finished request is replaced by a new one-turn program."""

    def __init__(self, make, rng: random.Random, kind: str, waiting: int):
        self.make, self.rng, self.kind, self.waiting = make, rng, kind, waiting
        self.made = 0
        self.programs = 0
        # request id -> (program, prompt, output tokens, turns left after it)
        self.turns: dict[str, tuple[str, list[int], int, int]] = {}
        self.due: dict[int, list] = {}  # engine step -> requests coming back then
        self.step = 0  # engine steps so far

    def _request(self, program: str, prompt: list[int], left: int):
        self.made += 1
        rid, out = f"r{self.made}", self.rng.randrange(40, 400)
        xargs = {"program_id": program, "tool": "make"} if self.made % 4 == 0 else {"program_id": program}
        if self.kind == "agents" and left == 0:
            xargs["last_turn"] = True
        self.turns[rid] = (program, prompt, out, left)
        return self.make(rid, prompt, out, extra_args=xargs)

    def new_program(self):
        self.programs += 1
        prompt = [self.rng.randrange(10, 1000) for _ in range(256)]
        left = self.rng.randrange(3, 20) if self.kind == "agents" else 0
        return self._request(f"p{self.programs}", prompt, left)

    def arrivals(self, finished: list[str], token: int, n_waiting: int) -> list:
        """The requests to add after an engine step, given the request ids that finished in it and the
        number of requests now waiting."""
        self.step += 1
        step = self.step
        if self.kind == "one-turn":
            return [self.new_program() for _ in finished]
        rng = self.rng
        for rid in finished:
            program, prompt, out, left = self.turns.pop(rid)
            context = prompt + [token] * out + [rng.randrange(10, 1000) for _ in range(64)]
            if left > 0 and len(context) + 400 <= MAX_CONTEXT:
                self.due.setdefault(step + rng.randrange(0, 41), []).append((program, context, left - 1))
        out = [self._request(*turn) for turn in self.due.pop(step, [])]
        out += [self.new_program() for _ in range(max(0, self.waiting - n_waiting - len(out)))]
        return out


#: ``--scale agents``: a program's context stays under this many tokens (the engine's max_model_len 4,096).
MAX_CONTEXT = 4000
#: ``--scale``: engine steps run before the measured ones besides the first admissions (agents: until the
#: programs' next turns come back after their tool pauses)
WARM_STEPS = {"agents": 60, "one-turn": 0}


def run_scale(
    model_dir: str,
    pins_file: str,
    rounds: int,
    steps: int,
    waiting: int,
    running: int,
    by_call: bool = False,
    workload: str = "agents",
    extra: dict | None = None,
    freeze_gc: bool = True,
    hints_ahead: bool = True,
) -> None:
    """vLLM's scheduler at H100 scale without a model (``ctk.engine_patch.emulation``): ``running`` requests
    decoding, ``waiting`` more queued (``max_num_seqs`` = ``running``), 8,192 batched tokens, 16-token
    blocks. The requests are :class:`ScaleWorkload`'s (``workload``): every request belongs to a program; a
    quarter end in a hinted tool call and are pinned (30 s), so pins are held every step and the waiting
    demand is read each step; the rest finish without a hint, so tool-call detection decodes their output:
    every sampled token is :data:`SAMPLED_TEXT`, a character a tool call needs, so the door cannot skip the
    decode as it does for a tail without any of ``ctk.policy.detect.CALL_CHARS`` (plain text: the cheaper
    case). With ``agents`` (the default) programs come back after tool pauses: resumed turns are placed ahead
    of new programs and pinned ones hit their pins at admission; ``one-turn`` replaces each finished request
    by a new program. The queue stays full. Stock vLLM's ``Scheduler`` and ``CTKScheduler`` run the same
    requests in alternating rounds; per step, the time in ``schedule`` + ``update_from_output`` +
    ``add_request`` outside the free; per finish, the time in ``_free_blocks`` (where ctk decides a pin).
    Prints ctk minus stock (inside the noise of a 40 ms CPU step), and ctk's own time, per step and per
    finished request: the time in ctk's hooks (the mixin's overrides of ``add_request``, ``schedule``,
    ``_free_blocks``: their frames, the door's conversions, the driver's calls) less the vLLM method each
    calls inside (:func:`_time_hooks`), with a PASS/FAIL line each against the targets (<= 50 us each,
    :data:`SCALE_TARGET_US`), and the per-step time by the step's events (:func:`by_events`). ctk's time
    includes the waiting queue's methods vLLM calls (ctk's queue keeps the policy's order there) and the
    writes of its metrics flusher thread (off the step, counted per step). ctk runs ``ctk serve``'s
    defaults: online learning of the tool durations on (the table has ``ctk train``'s quantile levels). With
    ``hints_ahead`` (the default) each ctk request's hints are parsed when it is made, as an engine core
    process parses them in vLLM's input thread in parallel with the model's forward pass
    (``VllmDoor.hints_ahead``): off the step, timed and printed apart; without, in ``add_request`` (as an
    in-process engine does)."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.gc_utils import freeze_gc_heap
    from vllm.v1.core.sched.request_queue import RequestQueue
    from vllm.v1.core.sched.scheduler import Scheduler

    from ctk.engine_patch import emulation as em
    from ctk.engine_patch.scheduler import CTKScheduler

    block = 16
    base = EngineArgs(
        model=model_dir,
        max_num_seqs=running,
        max_num_batched_tokens=8192,
        max_model_len=4096,
        enable_prefix_caching=True,
        enforce_eager=True,
    ).create_engine_config()
    settings = {
        "policy": "ttl",
        "ttl_model": pins_file,
        "max_pin_share": 0.5,
        **(extra or {}),
    }
    cfg = em.engine_config(base, async_scheduling=False, ctk=settings)
    from transformers import AutoTokenizer

    (token,) = AutoTokenizer.from_pretrained(model_dir).encode(SAMPLED_TEXT, add_special_tokens=False)
    per_step: dict[str, list[float]] = {"stock": [], "ctk": []}
    per_finish: dict[str, list[float]] = {"stock": [], "ctk": []}
    own_step: list[float] = []
    ahead = [0.0, 0]  # hints parsed ahead (vLLM's input thread): time, requests
    queue_us: dict[str, list[float]] = {"stock": [], "ctk": []}  # the waiting queue's methods, per step
    own_finish: list[float] = []
    flush_us: list[float] = []  # the metrics flusher thread's writes, per step
    gc_step: list[float] = []  # of ctk's own time, the cyclic garbage collector's runs inside its calls
    gc_finish: list[float] = []
    gc_runs: list[int] = []  # collections during ctk's measured steps, inside its calls or not
    # ctk rounds: per measured step, ctk's own time (us), the arrivals added after it, its first admissions
    step_events: list[list[tuple[float, int, int]]] = []
    calls = _CallRanks() if by_call else None
    for r in range(rounds):
        for name in ("stock", "ctk") if r % 2 == 0 else ("ctk", "stock"):
            cls = Scheduler if name == "stock" else CTKScheduler
            s = em.build_scheduler(cls, cfg, em.kv_layout(200_000, block), block)
            load = ScaleWorkload(em.RequestMaker(cfg, block), random.Random(r), workload, waiting)
            if name == "ctk" and hints_ahead:  # as vLLM's input thread does (VllmDoor's preprocess wrapper)
                load.make = _parsed_ahead(load.make, s.ctk_door.hints_ahead, ahead)
            if freeze_gc:
                freeze_gc_heap()  # as vLLM's engine core does once it is built: the startup heap is static

            # in vLLM's free; the part of ctk's hook running now; in ctk's own code (not in vLLM's inside it)
            ctx = {"in_free": False, "part": "step", "inside": False}
            gc_clock = GcClock(ctx)
            own = {"step": 0.0, "finish": 0.0}  # ctk's own time: in its hooks, less vLLM's methods they call
            if name == "ctk":  # (before the free is timed below: that timer wraps this one)
                _time_hooks(s, own, ctx)
            free_time = [0.0, 0]
            original_free = s._free_blocks

            def timed_free(request, _orig=original_free, _acc=free_time, _ctx=ctx):
                t0 = time.perf_counter()
                _ctx["in_free"] = True
                try:
                    _orig(request)
                finally:
                    _ctx["in_free"] = False
                _acc[0] += time.perf_counter() - t0
                _acc[1] += 1

            s._free_blocks = timed_free
            # ctk's metrics flusher thread (PrometheusSink): its writes count as ctk's own time per step
            flushed = [0.0]
            if name == "ctk":
                sink = s._ctk_metrics
                sink.flush = _flush_timed(sink.flush, flushed)
            # vLLM's free of a pinned request's blocks when its pin ends: the free stock vLLM makes at the
            # finish, made later. Counted with the frees (per finish), out of the step and of ctk's own time.
            moved = {"step": 0.0, "finish": 0.0, "n": 0}
            if name == "ctk":
                original_release = s._free_request_blocks

                def timed_release(request, _orig=original_release, _acc=free_time, _moved=moved, _ctx=ctx):
                    if _ctx["in_free"]:
                        return _orig(request)  # inside vLLM's _free_blocks: timed there
                    t0 = time.perf_counter()
                    _orig(request)
                    dt = time.perf_counter() - t0
                    _acc[0] += dt
                    _moved[_ctx["part"]] += dt
                    _moved["n"] += 1

                s._free_request_blocks = timed_release
                if calls is not None:  # --by-call: the driver's calls and the door's conversions, one by one
                    for obj, method in (
                        (s.ctk_driver, "step_begin"),
                        (s.ctk_driver, "step_end"),
                        (s.ctk_driver, "request_added"),
                        (s.ctk_door, "arm_valve"),
                        (s.ctk_driver, "request_finished"),
                        (s.ctk_door, "end_of"),
                    ):
                        setattr(obj, method, _timed(getattr(obj, method), calls, method))
            # the waiting queue's methods vLLM calls (ctk's keeps the policy's order: counted as ctk's own
            # time, whole, outside ctk's other calls; stock's FCFS deque timed the same way, for reference)
            queue_time = {"step": 0.0}
            for method in sorted(m for m in RequestQueue.__abstractmethods__ if not m.startswith("__")):
                queue_calls = calls if name == "ctk" else None
                timed_method = _queue_timed(getattr(s.waiting, method), queue_time, ctx, queue_calls, method)
                setattr(s.waiting, method, timed_method)
            loop = em.EngineLoop(s, token=token)
            loop.add(load.new_program() for _ in range(waiting + running))
            warm = 0
            while len(s.running) < running or len(s.waiting) > waiting or warm < WARM_STEPS[workload]:
                n = len(loop.stats.finished)  # admissions (prefills) first; agents: until programs come back
                loop.step()
                warm += 1
                loop.add(load.arrivals(loop.stats.finished[n:], token, len(s.waiting)))
            total = 0.0
            free_time[:] = [0.0, 0]
            own.update(step=0.0, finish=0.0)
            moved.update(step=0.0, finish=0.0, n=0)
            gc_clock.reset()
            queue_time["step"] = 0.0
            flushed[0] = 0.0
            gc.callbacks.append(gc_clock)
            done = len(loop.stats.finished)
            if calls is not None:
                calls.on = name == "ctk"
            events: list[tuple[float, int, int]] = []
            for _ in range(steps):
                if calls is not None:
                    calls.rank.clear()  # a new step: the next call of each hook is its first
                own_before = own["step"] - moved["step"] + (queue_time["step"] if name == "ctk" else 0.0)
                admitted_before = loop.stats.admitted
                t0 = time.perf_counter()
                loop.step()
                finished = loop.stats.finished[done:]
                done += len(finished)
                t1 = time.perf_counter()
                arrivals = load.arrivals(finished, token, len(s.waiting))  # (the bench's own work)
                t2 = time.perf_counter()
                for request in arrivals:
                    s.add_request(request)
                total += time.perf_counter() - t0 - (t2 - t1)
                own_us = (own["step"] - moved["step"] + queue_time["step"] - own_before) * 1e6
                events.append((own_us, len(arrivals), loop.stats.admitted - admitted_before))
            gc.callbacks.remove(gc_clock)
            if calls is not None:
                calls.on = False
            per_step[name].append((total - free_time[0]) / steps * 1e6)
            per_finish[name].append(free_time[0] / max(1, free_time[1]) * 1e6)
            queue_us[name].append(queue_time["step"] / steps * 1e6)
            if name == "ctk":
                step_events.append(events)
                own_step.append((own["step"] - moved["step"] + queue_time["step"] + flushed[0]) / steps * 1e6)
                flush_us.append(flushed[0] / steps * 1e6)
                own_finish.append((own["finish"] - moved["finish"]) / max(1, free_time[1]) * 1e6)
                gc_step.append(gc_clock.total["step"] / steps * 1e6)
                gc_runs.append(gc_clock.runs)
                gc_finish.append(gc_clock.total["finish"] / max(1, free_time[1]) * 1e6)
            held = len(s.ctk_pinned_request_ids()) if name == "ctk" else 0
            print(
                f"round {r} {name:5s}: {per_step[name][-1]:8.1f} us/step outside frees, "
                f"{per_finish[name][-1]:6.1f} us/finish ({free_time[1]} finishes, {len(s.running)} running, "
                f"{len(s.waiting)} waiting, {held} pins held, {moved['n']} held frees)",
                flush=True,
            )
    step_diff = [c - s for c, s in zip(per_step["ctk"], per_step["stock"], strict=True)]
    fin_diff = [c - s for c, s in zip(per_finish["ctk"], per_finish["stock"], strict=True)]
    print(
        f"ctk - stock, median over {rounds} rounds (spread): "
        f"{statistics.median(step_diff):+.1f} us/step ({min(step_diff):+.1f}..{max(step_diff):+.1f}; "
        f"stock {statistics.median(per_step['stock']):.0f} us/step), "
        f"{statistics.median(fin_diff):+.1f} us/finish ({min(fin_diff):+.1f}..{max(fin_diff):+.1f}); "
        "targets <= 50 us each"
    )
    print(
        f"ctk's own time (in its hooks, less vLLM's methods they call), median over {rounds} rounds: "
        f"{statistics.median(own_step):.1f} us/step ({min(own_step):.1f}..{max(own_step):.1f}), "
        f"{statistics.median(own_finish):.1f} us/finish ({min(own_finish):.1f}..{max(own_finish):.1f}); "
        "targets <= 50 us each"
    )
    ctk_queue, stock_queue = statistics.median(queue_us["ctk"]), statistics.median(queue_us["stock"])
    print(
        f"  of which the waiting queue's methods vLLM calls: {ctk_queue:.1f} us/step "
        f"(stock's FCFS queue: {stock_queue:.1f} us/step)"
    )
    print(
        f"  of which the metrics flusher thread's writes (every {FLUSH_S} s, off the step): "
        f"{statistics.median(flush_us):.1f} us/step"
    )
    if ahead[1]:
        print(
            f"  not counted: hints parsed ahead, in vLLM's input thread (off the step): "
            f"{ahead[0] / ahead[1] * 1e6:.1f} us per request ({ahead[1]} requests; --hints-in-step: counted)"
        )
    print(
        f"  of which Python's cyclic garbage collector, run inside ctk's calls: "
        f"{statistics.median(gc_step):.1f} us/step ({min(gc_step):.1f}..{max(gc_step):.1f}), "
        f"{statistics.median(gc_finish):.1f} us/finish ({min(gc_finish):.1f}..{max(gc_finish):.1f}); "
        f"collections in a round's measured steps: median {statistics.median(gc_runs):.0f}"
    )
    print("  " + by_events(step_events))
    if calls is not None:
        print("by call (ctk rounds, median us): first call of the hook in a step / later calls")
        for name in sorted({n for n, _ in calls.times}):
            first, later = calls.times.get((name, True), []), calls.times.get((name, False), [])
            med = [f"{1e6 * statistics.median(v):6.1f} (n={len(v)})" if v else "-" for v in (first, later)]
            print(f"  {name:18s} {med[0]} / {med[1]}")
    for what, values in (("step", own_step), ("finish", own_finish)):
        med = statistics.median(values)
        verdict = "PASS" if med <= SCALE_TARGET_US else "FAIL"
        print(
            f"{verdict}: ctk's own time per {what} {med:.1f} us "
            f"(target <= {SCALE_TARGET_US:.0f} us; median over {rounds} rounds)"
        )


#: ``--scale``: the steps are grouped by their events (arrivals after the step + first admissions in it)
EVENT_GROUPS = ((0, 0), (1, 3), (4, 6), (7, 9), (10, math.inf))


def by_events(step_events: list[list[tuple[float, int, int]]]) -> str:
    """ctk's own time per step by the step's events (arrivals added after it + its first admissions): median
    and count of the ctk rounds' steps in each of :data:`EVENT_GROUPS`. A step with no event pays the
    per-step work alone (the pins' deadlines, the waiting order's check); each event adds its own work, and
    the first event of each kind in a step pays for touching its code again after vLLM's step."""
    steps = [(us, arrivals + admissions) for ev in step_events for us, arrivals, admissions in ev]
    parts = []
    for lo, hi in EVENT_GROUPS:
        group = [us for us, n in steps if lo <= n <= hi]
        if group:
            label = str(lo) if lo == hi else (f">={lo}" if math.isinf(hi) else f"{lo}-{hi}")
            parts.append(f"{label} events {statistics.median(group):.0f} us (n={len(group)})")
    return "by events in the step (arrivals + first admissions), median: " + ", ".join(parts)


class GcClock:
    """``gc.callbacks`` entry: the time the cyclic garbage collector runs inside a timed ctk call, by part.
    A collection starts when everyone's allocations since the last one pass a threshold, so the call that
    allocates next pays for vLLM's garbage too."""

    def __init__(self, ctx: dict):
        self.ctx = ctx
        self.t0 = 0.0
        self.total = {"step": 0.0, "finish": 0.0}
        self.runs = 0

    def reset(self) -> None:
        self.total = {"step": 0.0, "finish": 0.0}
        self.runs = 0  # collections while the steps are measured (inside ctk's calls or not)

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self.runs += 1
        if not self.ctx["inside"]:
            return
        if phase == "start":
            self.t0 = time.perf_counter()
        else:
            self.total[self.ctx["part"]] += time.perf_counter() - self.t0


class _CallRanks:
    """``--by-call``: the measured steps' timed calls, by hook and whether it was the hook's first call in its
    step (``on`` while the steps are measured)."""

    def __init__(self):
        self.on = False
        self.rank: set[str] = set()  # hooks called so far in this step
        self.times: dict[tuple[str, bool], list[float]] = {}

    def add(self, name: str, dt: float) -> None:
        if not self.on:
            return
        first = name not in self.rank
        self.rank.add(name)
        self.times.setdefault((name, first), []).append(dt)


def _parsed_ahead(make, hints_ahead, acc: list):
    """``make`` whose requests get their hints parsed as vLLM's input thread parses them in an engine core
    process (``VllmDoor.hints_ahead``), timed into ``acc`` (time, requests)."""
    clock = time.perf_counter

    def made(*args, **kwargs):
        request = make(*args, **kwargs)
        t0 = clock()
        hints_ahead(request)
        acc[0] += clock() - t0
        acc[1] += 1
        return request

    return made


def _flush_timed(flush, acc: list[float]):
    """The metrics sink's ``flush`` (called by its thread), timed into ``acc[0]``."""
    clock = time.perf_counter

    def timed():
        t0 = clock()
        try:
            return flush()
        finally:
            acc[0] += clock() - t0

    return timed


def _queue_timed(fn, acc: dict[str, float], ctx: dict, calls: _CallRanks | None = None, name: str = ""):
    """A waiting-queue method timed into ``acc["step"]``, unless called inside a timed ctk call (counted
    there: the driver re-keys through the queue in ``step_begin``)."""
    clock = time.perf_counter

    def timed(*args):
        if ctx["inside"]:
            return fn(*args)
        t0 = clock()
        try:
            return fn(*args)
        finally:
            dt = clock() - t0
            acc["step"] += dt
            if calls is not None:
                calls.add("queue." + name, dt)

    return timed


def _timed(fn, calls: _CallRanks, name: str):
    """``--by-call``: ``fn`` timed into ``calls`` (inside a hook, whose own timing counts it already)."""
    clock = time.perf_counter

    def timed(*args, **kwargs):
        t0 = clock()
        try:
            return fn(*args, **kwargs)
        finally:
            calls.add(name, clock() - t0)

    return timed


#: ctk's hooks (the mixin's overrides of vLLM's scheduler methods), the bound vLLM method each calls inside
#: (``CTKSchedulerMixin.__init__`` binds them), and the part of ctk's time they count in
HOOKS_TIMED = (
    ("add_request", "_ctk_add_request", "step"),
    ("schedule", "_ctk_schedule", "step"),
    ("_free_blocks", "_ctk_free_blocks", "finish"),
)


def _time_hooks(sched, own: dict[str, float], ctx: dict) -> None:
    """ctk's own time, whole: the time in each of ctk's hooks (the mixin's frame, the door's conversions, the
    driver's calls) less the time in the vLLM method it calls inside (``HOOKS_TIMED``), into ``own[part]``.
    ``ctx["inside"]`` is True while ctk's own code runs (the queue methods timed apart skip those calls: the
    hook counts them), ``ctx["part"]`` names the hook's part (vLLM's free of a held request made in it is
    subtracted)."""
    clock = time.perf_counter
    for hook, inner, part in HOOKS_TIMED:

        def outer(*args, _fn=getattr(sched, hook), _part=part):
            ctx["part"], ctx["inside"] = _part, True
            t0 = clock()
            try:
                return _fn(*args)
            finally:
                own[_part] += clock() - t0
                ctx["part"], ctx["inside"] = "step", False

        def vllm_own(*args, _fn=getattr(sched, inner), _part=part):
            ctx["inside"] = False
            t0 = clock()
            try:
                return _fn(*args)
            finally:
                own[_part] -= clock() - t0
                ctx["inside"] = True

        setattr(sched, hook, outer)
        setattr(sched, inner, vllm_own)


if __name__ == "__main__":
    main()
