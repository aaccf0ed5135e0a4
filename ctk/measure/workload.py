"""Replay workloads: recorded programs from a trace store turned into token-exact synthetic programs.

A recorded program is a sequence of turns (one LLM request, then usually a tool call). The replay keeps its
shape: how many turns, how many tokens each turn adds (the model's output plus the tool's observation) and how
long each tool pause lasts. The content itself is synthetic token ids drawn from a seeded generator, so the
same seed gives the same prompts, and turn k's prompt is exactly turn k-1's prompt + its output + the
observation (the prefix cache sees what it would see in the original run).

Sizes come from the trace: token counts when the store has them, else characters / ``chars_per_token``.
``token_scale`` and the caps shrink them so a tiny CPU model stays practical.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ctk.errors import CtkError
from ctk.store import EXCLUDED_QUALITY_FLAGS, TraceStore
from ctk.wire import turn_xargs


class WorkloadError(CtkError, ValueError):
    """The store holds nothing that can be replayed, or the configuration is inconsistent."""


@dataclass
class WorkloadConfig:
    """How recorded programs become synthetic ones (sizes in tokens, times in seconds)."""

    n_programs: int | None = 16  # None: every replayable program
    seed: int = 0
    sources: list[str] | None = None  # only programs of these sources
    min_turns: int = 2
    max_turns: int | None = 24
    chars_per_token: float = 4.0
    token_scale: float = 1.0  # multiply every size taken from the trace
    system_prompt_tokens: int = 512  # the agent's system prompt, at the start of every program's first prompt
    # one system prompt per agent (trace source), as real agents' differ (False: one for all programs, as
    # replays before 2026-12-07 sent; :func:`system_prompts`)
    system_prompt_per_source: bool = True
    task_prompt_tokens: int = 512  # per program, when the trace has no first prompt size
    default_output_tokens: int = 64
    default_observation_tokens: int = 32
    max_output_tokens: int = 96
    min_output_tokens: int = 4
    max_observation_tokens: int = 512
    max_context_tokens: int = 6144  # a program is cut (its last kept turn becomes the last) past this
    max_pause_s: float = 120.0  # tool pauses longer than this are cut (before time scaling)
    # None: a seeded random sample of programs; else the n_programs with the most pause time in pauses
    # longer than this many seconds (recorded clock, after max_turns and max_pause_s), longest first
    long_pause_s: float | None = None
    token_id_low: int = 300  # synthetic ids are drawn from [low, high): ordinary tokens of any vocabulary
    token_id_high: int = 3800

    def validate(self) -> None:
        if self.token_id_low < 0 or self.token_id_high <= self.token_id_low:
            raise WorkloadError("token_id_low must be >= 0 and below token_id_high")
        if self.token_scale <= 0 or self.chars_per_token <= 0:
            raise WorkloadError("token_scale and chars_per_token must be positive")
        if self.n_programs is not None and self.n_programs < 1:
            raise WorkloadError("n_programs must be at least 1")
        if self.long_pause_s is not None and self.long_pause_s < 0:
            raise WorkloadError("long_pause_s must be >= 0")
        if self.max_context_tokens <= self.system_prompt_tokens + self.task_prompt_tokens:
            raise WorkloadError("max_context_tokens must exceed the first prompt (system + task tokens)")


@dataclass
class TurnSpec:
    """One turn of a synthetic program: the request, then the tool pause and its observation."""

    turn_index: int
    output_tokens: int
    observation_tokens: int  # appended after the output (0 on the last turn)
    tool_duration_s: float  # recorded pause after this turn (0 on the last turn or without a tool)
    tool: str | None  # command or tool name run after this turn
    last_turn: bool = False


@dataclass
class ProgramSpec:
    """A synthetic program: its first prompt size and its turns."""

    program_id: str  # the recorded program it mirrors
    source: str
    first_prompt_tokens: int
    turns: list[TurnSpec] = field(default_factory=list)

    @property
    def total_tool_s(self) -> float:
        return sum(t.tool_duration_s for t in self.turns)

    def long_pause_total_s(self, threshold_s: float) -> float:
        """Seconds spent in pauses longer than ``threshold_s``."""
        return sum(t.tool_duration_s for t in self.turns if t.tool_duration_s > threshold_s)

    @property
    def final_context_tokens(self) -> int:
        return self.first_prompt_tokens + sum(t.output_tokens + t.observation_tokens for t in self.turns)


def _tokens(value, chars, cfg: WorkloadConfig, default: int) -> int:
    if value is not None and not _isnan(value):
        n = float(value)
    elif chars is not None and not _isnan(chars):
        n = float(chars) / cfg.chars_per_token
    else:
        return default
    return int(round(n * cfg.token_scale))


def _isnan(x) -> bool:
    try:
        return x is pd.NA or (isinstance(x, float) and math.isnan(x))
    except TypeError:
        return False


def stable_seed(*parts: object) -> int:
    h = hashlib.blake2b("\x1f".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little")


def synthetic_ids(cfg: WorkloadConfig, n: int, *key: object) -> list[int]:
    """``n`` token ids, a pure function of ``cfg.seed`` and ``key`` (same key, same ids)."""
    if n <= 0:
        return []
    rng = np.random.default_rng(stable_seed(cfg.seed, *key))
    return rng.integers(cfg.token_id_low, cfg.token_id_high, size=n).tolist()


def first_prompt_ids(cfg: WorkloadConfig, spec: ProgramSpec) -> list[int]:
    """A replayed program's first prompt: its agent's system prompt (keyed by the program's source, so the
    programs of one agent share it and agents differ, as real agents' system prompts do; one for all with
    ``system_prompt_per_source`` off), then its task."""
    task = spec.first_prompt_tokens - cfg.system_prompt_tokens
    key = ("system", spec.source) if cfg.system_prompt_per_source else ("system",)
    return synthetic_ids(cfg, cfg.system_prompt_tokens, *key) + synthetic_ids(
        cfg, task, spec.program_id, "task"
    )


def system_prompts(cfg: WorkloadConfig, programs: Iterable[ProgramSpec]) -> int:
    """How many distinct system prompts a replay of ``programs`` sends (:func:`first_prompt_ids`): the
    prefixes a server keeps cached for all programs, which the simulator holds resident."""
    if not cfg.system_prompt_per_source:
        return 1
    return max(1, len({p.source for p in programs}))


@dataclass
class _Turn:
    """One recorded turn, aggregated over its LLM call and tool calls (None: not recorded)."""

    out_tokens: float | None = None
    out_chars: float | None = None
    prompt_tokens: float | None = None
    has_tools: bool = False
    obs_chars: float | None = None
    duration_s: float = 0.0
    tool: str | None = None


def _num(x) -> float | None:
    return None if x is None or _isnan(x) else float(x)


def _recorded_turns(llm: pd.DataFrame, tools: pd.DataFrame) -> dict[str, dict[int, _Turn]]:
    """``{program_id: {turn_index: _Turn}}`` in one pass over each table."""
    out: dict[str, dict[int, _Turn]] = {}
    for r in llm.itertuples(index=False):
        out.setdefault(r.program_id, {})[int(r.turn_index)] = _Turn(
            out_tokens=_num(r.completion_tokens),
            out_chars=_num(r.response_chars),
            prompt_tokens=_num(r.prompt_tokens),
        )
    if len(tools):
        t = tools.sort_values(["program_id", "turn_index", "call_index"])
        t = t.assign(
            duration_s=pd.to_numeric(t["duration_s"], errors="coerce").fillna(0.0).clip(lower=0.0),
            tool=t["command_or_args"].where(
                t["command_or_args"].fillna("").str.strip() != "", t["tool_name"]
            ),
        )
        g = t.groupby(["program_id", "turn_index"], sort=False)
        agg = pd.DataFrame(
            {
                "duration_s": g["duration_s"].sum(),
                "obs_chars": g["output_chars"].sum(min_count=1),
                "out_tokens": g["llm_output_tokens"].max(),
                "out_chars": g["llm_output_chars"].max(),
                "tool": g["tool"].first(),
            }
        ).reset_index()
        for r in agg.itertuples(index=False):
            turn = out.setdefault(r.program_id, {}).setdefault(int(r.turn_index), _Turn())
            turn.has_tools, turn.duration_s = True, float(r.duration_s)
            turn.obs_chars = _num(r.obs_chars)
            if turn.out_tokens is None:
                turn.out_tokens = _num(r.out_tokens)
            if turn.out_chars is None:
                turn.out_chars = _num(r.out_chars)
            turn.tool = None if r.tool is None or _isnan(r.tool) else str(r.tool)[:500]
    return out


def _program_turns(pid: str, source: str, turns: dict[int, _Turn], cfg: WorkloadConfig) -> ProgramSpec | None:
    turn_ids = sorted(turns)
    if cfg.max_turns is not None:
        turn_ids = turn_ids[: cfg.max_turns]
    if len(turn_ids) < cfg.min_turns:
        return None
    first_prompt = cfg.system_prompt_tokens + cfg.task_prompt_tokens
    recorded_first = turns[turn_ids[0]].prompt_tokens
    if recorded_first is not None:
        first_prompt = max(first_prompt, int(round(recorded_first * cfg.token_scale)))
        first_prompt = min(first_prompt, cfg.max_context_tokens // 2)
    spec = ProgramSpec(program_id=pid, source=source, first_prompt_tokens=first_prompt)

    context = first_prompt
    for t in turn_ids:
        rec = turns[t]
        output = _tokens(rec.out_tokens, rec.out_chars, cfg, cfg.default_output_tokens)
        output = max(cfg.min_output_tokens, min(cfg.max_output_tokens, output))
        # a turn without a tool call (e.g. a format error): the agent answers at once
        observation = _tokens(None, rec.obs_chars, cfg, cfg.default_observation_tokens)
        observation = max(1, min(cfg.max_observation_tokens, observation))
        duration = min(rec.duration_s, cfg.max_pause_s)
        if spec.turns and context + output > cfg.max_context_tokens:
            break
        spec.turns.append(TurnSpec(int(t), output, observation, duration, rec.tool))
        context += output + observation
        if context + cfg.min_output_tokens > cfg.max_context_tokens:
            break
    if len(spec.turns) < cfg.min_turns:
        return None
    last = spec.turns[-1]
    last.last_turn, last.observation_tokens, last.tool_duration_s, last.tool = True, 0, 0.0, None
    return spec


def load_programs(store: TraceStore, cfg: WorkloadConfig) -> list[ProgramSpec]:
    """Pick ``cfg.n_programs`` recorded programs (seeded sample, stable order; or those with the most
    long-pause time, see ``long_pause_s``) and synthesise them."""
    cfg.validate()
    tools = store.table("tool_calls", cfg.sources)
    tools = tools[~tools["quality_flag"].isin(EXCLUDED_QUALITY_FLAGS)]
    llm = store.table("llm_calls", cfg.sources)
    if tools.empty and llm.empty:
        where = f" for sources {cfg.sources}" if cfg.sources else ""
        raise WorkloadError(f"{store.path}: no LLM or tool calls to replay{where}")
    complete = store.program_ids(complete=True)
    recorded = _recorded_turns(llm, tools)
    sources = dict(zip(llm["program_id"], llm["source"], strict=True))
    sources.update(zip(tools["program_id"], tools["source"], strict=True))
    specs = []
    for pid in sorted(set(recorded) & complete):
        spec = _program_turns(pid, str(sources.get(pid) or ""), recorded[pid], cfg)
        if spec is not None:
            specs.append(spec)
    if not specs:
        raise WorkloadError(
            f"{store.path}: no program has {cfg.min_turns}+ turns "
            f"within {cfg.max_context_tokens} context tokens"
        )
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(specs))
    if cfg.long_pause_s is not None:  # stable sort: ties keep the seeded order
        order = sorted(order, key=lambda i: -specs[i].long_pause_total_s(cfg.long_pause_s))
    if cfg.n_programs is not None:
        order = order[: cfg.n_programs]
    return [specs[i] for i in order]


def replay_xargs(
    replay_id: str,
    turn: TurnSpec,
    time_scale: float,
    send_oracle_duration: bool,
    *,
    first_turn: bool = False,
    program_size: float | None = None,
    agent: str | None = None,
) -> dict[str, Any]:
    """The ``vllm_xargs`` of a replayed turn (also what the simulator's programs carry): program, turn, last
    turn, the tool it will run and, for the oracle, the true (scaled) duration; on the program's first
    request (``first_turn``: a trace's turn indices need not start at 0) also ``program_size`` (the
    program's true total work, read only by the size-order admission probe; sent with the oracle's
    durations) and ``agent`` (the agent running it: its size predictor's class)."""
    duration = None
    if send_oracle_duration and not turn.last_turn:
        duration = round(turn.tool_duration_s * time_scale, 6)
    size = program_size if send_oracle_duration and first_turn else None
    agent = agent if first_turn else None
    return turn_xargs(replay_id, turn.turn_index, turn.last_turn, turn.tool, duration, size, agent)
