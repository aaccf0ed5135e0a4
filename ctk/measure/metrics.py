"""The job-level figures: one definition of each, used by the replay results and the simulator alike.

What ctk optimises is how fast agent programs finish (issue 22); interactivity is guarded by the wait of a
turn that resumes after a tool call, and a program's wait to start is reported on its own.

- **JCT** (``mean_jct_s``, ``p50_jct_s``, ``p99_jct_s``): a program's first request sent -> its last response
  received.
- **admission wait** (``p50/p99/max_admission_wait_s``): the time to first token of a program's *first*
  request (turn 0): the wait for the engine to admit a new program, plus that request's own prefill. Under
  program ordering a new program waits here while older programs finish.
- **resume TTFT** (``p99_resume_ttft_s``, ``mean_resume_ttft_s``): the time to first token of every later
  turn, each sent after a tool call, in a program already running: the wait an agent's user feels mid-task.
- **throughput** (``programs_per_hour``): finished programs per hour of engine time, from the first program's
  start to the last program's finish.
- **hit rate** (``hit_rate``): prefix-cached prompt tokens over prompt tokens, every turn.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

#: The keys :func:`job_figures` always returns (None when nothing was measured).
JOB_KEYS = (
    "mean_jct_s",
    "p50_jct_s",
    "p99_jct_s",
    "p50_admission_wait_s",
    "p99_admission_wait_s",
    "max_admission_wait_s",
    "mean_resume_ttft_s",
    "p99_resume_ttft_s",
    "programs_per_hour",
    "hit_rate",
)


@dataclass
class ProgramTiming:
    """What one program measured: its start and finish (None: did not finish), and each turn's TTFT in turn
    order (None: that turn had no first token)."""

    start_s: float
    finish_s: float | None
    ttfts: Sequence[float | None] = field(default_factory=list)

    @property
    def jct_s(self) -> float | None:
        return None if self.finish_s is None else self.finish_s - self.start_s


def job_figures(
    programs: Iterable[ProgramTiming], prompt_tokens: int, cached_tokens: int | None
) -> dict[str, float | None]:
    """The figures of :data:`JOB_KEYS` over ``programs`` (only finished programs count for JCT and
    throughput; every measured turn counts for the waits). ``cached_tokens`` None: the hit rate is unknown."""
    progs = list(programs)
    done = [p for p in progs if p.finish_s is not None]
    jct = np.array([p.jct_s for p in done], dtype=float)
    first = np.array([p.ttfts[0] for p in progs if p.ttfts and p.ttfts[0] is not None], dtype=float)
    resume = np.array([t for p in progs for t in p.ttfts[1:] if t is not None], dtype=float)
    span = (max(p.finish_s for p in done) - min(p.start_s for p in done)) if done else 0.0
    return {
        "mean_jct_s": _stat(jct, np.mean),
        "p50_jct_s": _pct(jct, 50),
        "p99_jct_s": _pct(jct, 99),
        "p50_admission_wait_s": _pct(first, 50),
        "p99_admission_wait_s": _pct(first, 99),
        "max_admission_wait_s": _stat(first, np.max),
        "mean_resume_ttft_s": _stat(resume, np.mean),
        "p99_resume_ttft_s": _pct(resume, 99),
        "programs_per_hour": len(done) * 3600.0 / span if span > 0 else None,
        "hit_rate": cached_tokens / prompt_tokens if prompt_tokens and cached_tokens is not None else None,
    }


def _stat(a: np.ndarray, fn) -> float | None:
    return float(fn(a)) if len(a) else None


def _pct(a: np.ndarray, q: float) -> float | None:
    return float(np.percentile(a, q)) if len(a) else None
