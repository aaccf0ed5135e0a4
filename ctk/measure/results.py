"""Replay results: per-turn and per-program records, summaries, JSON files and the trace store."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ctk.errors import CtkError
from ctk.measure.metrics import ProgramTiming, job_figures
from ctk.store import LLMCallRecord, ProgramRecord, RunRecord, TraceStore


class ResultsError(CtkError, ValueError):
    """A results file cannot be read; the message says which and why."""


@dataclass
class TurnResult:
    turn_index: int
    sent_unix_s: float
    ttft_s: float | None = None
    latency_s: float | None = None
    queue_s: float | None = None  # server-side queue wait (per-request metrics), when the server reports it
    # the engine's own times (per-request metrics, the engine core's clock)
    server_prefill_s: float | None = None  # scheduled -> first token
    server_decode_s: float | None = None  # first -> last token
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    completion_tokens: int | None = None
    pause_s: float = 0.0  # tool pause slept after this turn
    error: str | None = None


@dataclass
class ProgramResult:
    program_id: str  # the recorded program replayed
    replay_id: str  # the identity sent to the server
    arrival_unix_s: float
    finish_unix_s: float | None = None
    turns: list[TurnResult] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.finish_unix_s is not None

    @property
    def jct_s(self) -> float | None:
        return None if self.finish_unix_s is None else self.finish_unix_s - self.arrival_unix_s


@dataclass
class ReplayResult:
    """Everything one replay run measured."""

    label: str  # policy name or a user label
    config: dict[str, Any] = field(default_factory=dict)
    programs: list[ProgramResult] = field(default_factory=list)
    server_metrics: dict[str, float] = field(default_factory=dict)  # /metrics deltas over the run
    timeline: list[dict[str, float]] = field(default_factory=list)  # /metrics gauges sampled during the run
    started_unix_s: float = field(default_factory=time.time)
    finished_unix_s: float | None = None
    interrupted: bool = False

    # -- summaries ---------------------------------------------------------------------------------

    def jcts(self) -> np.ndarray:
        return np.array([p.jct_s for p in self.programs if p.ok], dtype=float)

    def ttfts(self) -> np.ndarray:
        return np.array(
            [t.ttft_s for p in self.programs for t in p.turns if t.ttft_s is not None and t.error is None],
            dtype=float,
        )

    def timings(self) -> list[ProgramTiming]:
        """Each program's start, finish (None unless it ended well) and turn TTFTs in turn order."""
        return [
            ProgramTiming(
                p.arrival_unix_s,
                p.finish_unix_s if p.ok else None,
                [t.ttft_s if t.error is None else None for t in sorted(p.turns, key=lambda t: t.turn_index)],
            )
            for p in self.programs
        ]

    def summary(self) -> dict[str, float | int | None]:
        """The figures of the comparison table (times in seconds)."""
        jct, ttft = self.jcts(), self.ttfts()
        turns = [t for p in self.programs for t in p.turns if t.error is None]
        prompt = sum(t.prompt_tokens or 0 for t in turns)
        cached = sum(t.cached_tokens or 0 for t in turns if t.cached_tokens is not None)
        queue = [t.queue_s for t in turns if t.queue_s is not None]
        m = self.server_metrics
        known = any(t.cached_tokens is not None for t in turns)
        out: dict[str, float | int | None] = {
            "programs": len(jct),
            "failed_programs": sum(1 for p in self.programs if not p.ok),
            "turns": len(turns),
            **job_figures(self.timings(), prompt, cached if known else None),
            "max_jct_s": _stat(jct, np.max),
            "mean_ttft_s": _stat(ttft, np.mean),
            "p50_ttft_s": _pct(ttft, 50),
            "p99_ttft_s": _pct(ttft, 99),
            "max_ttft_s": _stat(ttft, np.max),
            "mean_queue_s": float(np.mean(queue)) if queue else None,
            "prompt_tokens": prompt,
            "cached_tokens": cached,
            "wall_s": (self.finished_unix_s - self.started_unix_s) if self.finished_unix_s else None,
        }
        if "prefix_cache_queries" in m and m["prefix_cache_queries"] > 0:
            out["server_hit_rate"] = m.get("prefix_cache_hits", 0.0) / m["prefix_cache_queries"]
        # ctk's counters (ctk:pins_created_total -> pins_created, see server_metrics.delta)
        names = {
            "preemptions": "preemptions",
            "pins": "pins_created",
            "pin_hits": "pin_hits",
            "pin_expirations": "pin_expirations",
            "pin_pressure_releases": "pin_pressure_releases",
        }
        for key, name in names.items():
            if name in m:
                out[key] = m[name]
        for name, value in m.items():  # where the pins went: pin_releases_hit, pin_releases_pressure, ...
            if name.startswith("pin_releases_"):
                out[name] = value
        return out

    # -- files -------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["summary"] = self.summary()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReplayResult:
        progs = []
        for p in d.get("programs", []):
            turns = [TurnResult(**t) for t in p.get("turns", [])]
            progs.append(ProgramResult(**{**p, "turns": turns}))
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**{k: v for k, v in d.items() if k in fields}, "programs": progs})

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1, default=str))
        tmp.replace(path)
        return path

    def to_store(self, store: TraceStore) -> int:
        """Write the programs as ``source = 'replay:<label>'`` (no tool calls, so training ignores them)."""
        run = RunRecord(kind="replay", source=f"replay:{self.label}", config=self.config)
        store.add_run(run)
        progs, calls = [], []
        for p in self.programs:
            pid = f"replay/{run.run_id}/{p.replay_id}"
            progs.append(
                ProgramRecord(
                    program_id=pid,
                    source=run.source,
                    run_id=run.run_id,
                    task_id=p.program_id,
                    start_unix_s=p.arrival_unix_s,
                    end_unix_s=p.finish_unix_s,
                    outcome="ok" if p.ok else (p.error or "unfinished"),
                    n_turns=len(p.turns),
                    complete=p.ok,
                )
            )
            for t in p.turns:
                calls.append(
                    LLMCallRecord(
                        program_id=pid,
                        turn_index=t.turn_index,
                        source=run.source,
                        sent_unix_s=t.sent_unix_s,
                        first_token_unix_s=None if t.ttft_s is None else t.sent_unix_s + t.ttft_s,
                        finished_unix_s=None if t.latency_s is None else t.sent_unix_s + t.latency_s,
                        latency_s=t.latency_s,
                        ttft_s=t.ttft_s,
                        prompt_tokens=t.prompt_tokens,
                        completion_tokens=t.completion_tokens,
                        cached_tokens=t.cached_tokens,
                        finish_reason="error" if t.error else "length",
                        quality_flag="ok" if not t.error else "error",
                        provenance="ctk replay (streamed, client clock)",
                    )
                )
        return store.add_programs(progs, calls)


def load_results(path: str | Path) -> list[ReplayResult]:
    """Read a replay JSON (one result) or a comparison JSON (``{"results": [...]}``)."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ResultsError(f"{path}: cannot read replay results ({exc})") from None
    items = d.get("results") if isinstance(d, dict) and "results" in d else [d]
    try:
        return [ReplayResult.from_dict(x) for x in items]
    except (TypeError, AttributeError) as exc:
        raise ResultsError(f"{path}: not a ctk replay results file ({exc})") from None


def _stat(a: np.ndarray, fn) -> float | None:
    return float(fn(a)) if len(a) else None


def _pct(a: np.ndarray, q: float) -> float | None:
    return float(np.percentile(a, q)) if len(a) else None
