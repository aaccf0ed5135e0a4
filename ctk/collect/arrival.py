"""When programs start: fixed concurrency or a Poisson arrival process, and the job driver.

``run_jobs`` starts each job at its arrival offset on a thread pool of ``workers`` threads. Ctrl-C sets
the shared stop event (running programs stop before their next LLM call, so only the step in flight is
lost) and waits for the running jobs; a second Ctrl-C stops waiting.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ctk.errors import CtkError

ARRIVALS = ("fixed", "poisson")


class ArrivalError(CtkError, ValueError):
    """Bad arrival options; the message says why."""


def arrival_offsets(n: int, kind: str = "fixed", rate: float | None = None, seed: int = 0) -> list[float]:
    """Start offsets in seconds for ``n`` programs.

    ``fixed``: all at 0 (the worker pool bounds concurrency). ``poisson``: exponential gaps with mean
    ``1/rate`` (``rate`` programs per second), the first program at 0.
    """
    if kind not in ARRIVALS:
        raise ArrivalError(f"--arrival {kind!r}: choose one of {', '.join(ARRIVALS)}")
    if n <= 0:
        return []
    if kind == "fixed":
        return [0.0] * n
    if rate is None or not rate > 0:
        raise ArrivalError("--arrival poisson needs --rate R > 0 (programs per second)")
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n - 1)
    return [0.0, *np.cumsum(gaps).tolist()]


@dataclass
class JobResult:
    key: str
    ok: bool
    value: Any = None
    error: str | None = None


def run_jobs(
    jobs: Sequence[tuple[str, Callable[[], Any]]],
    *,
    workers: int,
    offsets: Sequence[float] | None = None,
    stop: threading.Event | None = None,
    on_start: Callable[[str], None] | None = None,
    on_done: Callable[[JobResult], None] | None = None,
) -> tuple[list[JobResult], bool]:
    """Run ``(key, fn)`` jobs; returns the results and whether the run was interrupted."""
    if workers < 1:
        raise ArrivalError("--workers must be at least 1")
    stop = stop or threading.Event()
    offsets = list(offsets) if offsets is not None else [0.0] * len(jobs)
    done: dict[int, JobResult] = {}

    def wrapped(key: str, fn: Callable[[], Any]) -> JobResult:
        if stop.is_set():
            return JobResult(key, False, error="not started (interrupted)")
        if on_start:
            on_start(key)
        try:
            res = JobResult(key, True, fn())
        except Exception as exc:
            res = JobResult(key, False, error=f"{type(exc).__name__}: {exc}")
        if on_done:
            on_done(res)
        return res

    interrupted = False
    t0 = time.monotonic()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ctk-program")
    futures: list[concurrent.futures.Future] = []
    try:
        for (key, fn), offset in zip(jobs, offsets, strict=True):
            while (wait := t0 + offset - time.monotonic()) > 0:
                if stop.wait(min(wait, 0.5)):
                    break
            if stop.is_set():
                break
            futures.append(pool.submit(wrapped, key, fn))
        for f in concurrent.futures.as_completed(futures):
            done[id(f)] = f.result()
    except KeyboardInterrupt:
        interrupted = True
        stop.set()
        for f in futures:
            f.cancel()
        try:
            for f in futures:
                if not f.cancelled() and id(f) not in done:
                    done[id(f)] = f.result()
        except KeyboardInterrupt:
            pass
    finally:
        pool.shutdown(wait=not interrupted, cancel_futures=True)
    order = {id(f): i for i, f in enumerate(futures)}
    results = [done[k] for k in sorted(done, key=order.__getitem__)]
    return results, interrupted or stop.is_set()
