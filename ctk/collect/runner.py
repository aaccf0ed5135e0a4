"""The collection skeleton every collector shares: options, planning, resume, workers, arrivals, summary.

A collector (:mod:`ctk.collect.swebench`, :mod:`ctk.collect.bfcl`) says only how to run one program, through
the small :class:`Collector` protocol; :func:`collect` does the rest:

1. plan the program ids (``SOURCE/TASK`` and ``#k`` with ``repeats > 1``) and their arrival offsets;
2. ``--resume`` rules: without it, programs already in the store stop the collection; with it, complete
   programs are skipped and unfinished ones are discarded and run again (:func:`plan_programs`);
3. record the run, then run the programs on ``workers`` threads at their arrival times; every step goes
   through one :class:`~ctk.collect.writer.StoreWriter` process, so a killed collector loses nothing it
   handed over and Ctrl-C stops programs before their next LLM call (they stay incomplete);
4. fold the results into a :class:`CollectSummary`.
"""

from __future__ import annotations

import contextlib
import platform
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol, Self

from ctk.collect.arrival import JobResult, arrival_offsets, run_jobs
from ctk.collect.recorder import ProgramRecorder
from ctk.collect.writer import StoreWriter, open_store
from ctk.errors import CtkError
from ctk.store import ProgramRecord, RunRecord, TraceStore
from ctk.wire import session_body, turn_xargs


class CollectError(CtkError, RuntimeError):
    """A collection cannot start; the message says why."""


class CollectionInterrupted(CtkError):
    """Raised inside a program when the collection is stopping (Ctrl-C): the program stays incomplete."""


@dataclass
class CollectOptions:
    """What every collection has: where it records, which server it talks to, when programs start."""

    db: Path
    base_url: str | None = None
    model: str = "default"
    api_key: str | None = None
    workers: int = 1
    arrival: str = "fixed"  # fixed (concurrency = workers) or poisson (``rate`` programs per second)
    rate: float | None = None
    seed: int = 0
    resume: bool = False
    repeats: int = 1  # runs per task; program ids get ``#k`` when more than one
    source: str = "collect"
    send_metadata: bool = True  # session_id / vllm_xargs on every request (off for non-vLLM APIs)

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Self:
        """The options among ``params`` (a CLI command's parameters, named like the fields); the rest
        (e.g. which tasks to select) is not an option and is left out."""
        names = {f.name for f in fields(cls) if f.init}
        return cls(**{k: v for k, v in params.items() if k in names})


@dataclass
class CollectSummary:
    """What a collection did: programs planned, skipped, redone, completed, failed, stopped; calls made."""

    planned: int = 0
    skipped_complete: int = 0
    redone_incomplete: int = 0
    completed: int = 0
    failed: int = 0
    interrupted: bool = False
    stopped: int = 0  # programs left unfinished by an interruption (marked incomplete)
    outcomes: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    n_llm_calls: int = 0
    n_tool_calls: int = 0


@dataclass
class _Run:
    """What the programs of one collection share while they run."""

    opts: CollectOptions
    agent: str
    run_id: str
    writer: StoreWriter
    stop: threading.Event
    summary: CollectSummary
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class Program:
    """One program as its collector sees it: its id, its task and the calls that record it."""

    program_id: str
    task_id: str
    task: dict[str, Any]
    run: _Run = field(repr=False)
    recorder: ProgramRecorder | None = None

    def record(self, dataset: str | None) -> ProgramRecorder:
        """Start recording: the program's row is written now, with this moment as its start."""
        opts = self.run.opts
        self.recorder = ProgramRecorder(
            self.run.writer,
            ProgramRecord(
                program_id=self.program_id,
                source=opts.source,
                run_id=self.run.run_id,
                task_id=self.task_id,
                dataset=dataset,
                agent=self.run.agent,
                model=opts.model,
            ),
            provenance="ctk-monotonic-wrap",
        )
        return self.recorder

    def check_stop(self) -> None:
        """Call before every LLM call: raises :class:`CollectionInterrupted` once the collection stops."""
        if self.run.stop.is_set():
            raise CollectionInterrupted("collection interrupted before this LLM call")

    def finish(self, outcome: str) -> str:
        """Mark the program complete with ``outcome`` (only when the agent ended on its own terms)."""
        if self.recorder is None:
            raise CollectError(f"{self.program_id}: finished before anything was recorded")
        self.recorder.finish(outcome)
        with self.run.lock:
            self.run.summary.outcomes[outcome] += 1
        return outcome


class Collector(Protocol):
    """How to run one program of one benchmark; :func:`collect` plans, schedules and summarizes."""

    options: CollectOptions
    kind: str  # the run record's kind, e.g. "collect-swebench"
    agent: str  # the agent stored with every program

    def task_id(self, task: dict[str, Any]) -> str:
        """The task's id: program ids are ``SOURCE/TASK_ID``."""
        ...

    def prepare(self) -> None:
        """Check the options before anything is written; raise :class:`CollectError` to refuse. (The
        runner then checks that a server answers at ``base_url``.)"""
        ...

    def run_config(self) -> dict[str, Any]:
        """The collector's own settings the run record keeps (next to base_url, workers, arrival, rate)."""
        ...

    def session(self) -> contextlib.AbstractContextManager[Any]:
        """What programs need while they run (a working-copy root, an HTTP client); entered once, after
        planning, and only when there is something to run."""
        ...

    def run_program(self, program: Program) -> str:
        """The override point: run one program and return its outcome.

        Call ``program.record(dataset)`` when the program starts, ``program.check_stop()`` before every
        LLM call and ``program.finish(outcome)`` when the agent ends on its own terms. Raise to fail the
        program: it stays incomplete with every step recorded so far, and ``--resume`` runs it again.
        """
        ...


def session_fields(
    program_id: str, turn: int, last_turn: bool, xargs: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The body fields a collector adds to every LLM request (with ``--send-metadata``) so ``ctk serve``
    knows the program: ``session_id`` and ``vllm_xargs`` (``program_id``, ``turn_index``, and ``last_turn``
    when this turn is known to be the last, on top of ``xargs``). Sent with :func:`session_headers`."""
    own = turn_xargs(program_id, turn, True if last_turn else None)
    return session_body(program_id, {**(xargs or {}), **own})


def program_id_for(source: str, task_id: str, repeat: int, repeats: int) -> str:
    """``SOURCE/TASK_ID``, and ``#k`` for the k-th of several repeats."""
    return f"{source}/{task_id}" + (f"#{repeat}" if repeats > 1 else "")


def plan_programs(store: TraceStore, keys: list[str], resume: bool, summary: CollectSummary) -> list[str]:
    """Which program ids to run; with ``resume`` drop complete ones and discard incomplete ones."""
    todo, existing = [], []
    for pid in keys:
        status = store.program_status(pid)
        if status is None:
            todo.append(pid)
        elif not resume:
            existing.append(pid)
        elif status == "complete":
            summary.skipped_complete += 1
        else:
            store.discard_program(pid)
            summary.redone_incomplete += 1
            todo.append(pid)
    if existing:
        raise CollectError(
            f"{len(existing)} of these programs are already in {store.path} (e.g. {existing[0]!r}); "
            "pass --resume to skip complete ones and redo unfinished ones, or use another --source"
        )
    return todo


def register_run(
    db: str | Path, program_ids: list[str], run: RunRecord, resume: bool, summary: CollectSummary
) -> list[str]:
    """Which programs to run (``--resume`` rules) and the run's record; the store is closed again after,
    because the writer process owns it while programs run."""
    store = open_store(db)
    try:
        todo = plan_programs(store, program_ids, resume, summary)
        summary.planned = len(todo)
        if todo:
            store.add_run(run)
    finally:
        store.close()
    return todo


def check_endpoint(base_url: str, api_key: str | None = None, timeout_s: float = 2.0) -> None:
    """Fail in a second, in one line, when no OpenAI-compatible server answers at ``base_url`` (as
    ``ctk replay`` and ``ctk profile`` do) instead of retrying every program's first LLM call for minutes."""
    import httpx

    url = base_url.rstrip("/") + "/models"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(url, headers=headers, timeout=timeout_s)
    except httpx.InvalidURL as exc:
        raise CollectError(f"--url {base_url!r} is not a URL ({exc})") from None
    except httpx.HTTPError as exc:
        raise CollectError(
            f"{base_url}: no server answers ({type(exc).__name__}: {exc}); start one (`ctk serve`) "
            "or fix --url"
        ) from None
    if r.status_code in (401, 403):
        raise CollectError(
            f"{base_url}: the server refuses the API key (HTTP {r.status_code}); pass --api-key"
        )
    if r.status_code == 404:
        raise CollectError(f"{url}: HTTP 404, not an OpenAI-compatible API (does --url end in /v1?)")


def was_stopped(res: JobResult) -> bool:
    """A program that ended because the collection is stopping (Ctrl-C), not because it failed."""
    error = res.error or ""
    return not res.ok and ("CollectionInterrupted" in error or "interrupted" in error)


def summarize(results: list[JobResult], interrupted: bool, summary: CollectSummary) -> None:
    """Fold job results into ``summary``; programs stopped by Ctrl-C count as interrupted, not failed."""
    summary.interrupted = interrupted
    for res in results:
        if res.ok:
            summary.completed += 1
        elif interrupted and was_stopped(res):
            summary.stopped += 1
        else:
            summary.failed += 1
            summary.errors.append(f"{res.key}: {res.error}")


def _run_one(collector: Collector, program: Program) -> str:
    try:
        return collector.run_program(program)
    finally:  # a program's committed calls count whether it finished, failed or stopped
        if program.recorder is not None:
            with program.run.lock:
                program.run.summary.n_llm_calls += program.recorder.turn + 1
                program.run.summary.n_tool_calls += program.recorder.n_tool_calls


def collect(
    collector: Collector,
    tasks: list[dict[str, Any]],
    *,
    on_start: Callable[[str], None] | None = None,
    on_done: Callable[[JobResult], None] | None = None,
    stop: threading.Event | None = None,
) -> CollectSummary:
    """Run and record every task ``repeats`` times; raises :class:`CollectError` for bad options."""
    opts = collector.options
    for name in ("repeats", "workers"):
        if getattr(opts, name) < 1:
            raise CollectError(f"--{name} must be at least 1")
    by_pid: dict[str, tuple[str, dict[str, Any]]] = {}
    for task in tasks:
        task_id = collector.task_id(task)
        for r in range(opts.repeats):
            by_pid[program_id_for(opts.source, task_id, r, opts.repeats)] = (task_id, task)
    offsets = arrival_offsets(len(by_pid), opts.arrival, opts.rate, opts.seed)  # validate before any write
    collector.prepare()
    if opts.base_url:
        check_endpoint(opts.base_url, opts.api_key)
    run = RunRecord(
        kind=collector.kind,
        source=opts.source,
        agent=collector.agent,
        model=opts.model,
        host=platform.node(),
        config={
            "base_url": opts.base_url,
            "workers": opts.workers,
            "arrival": opts.arrival,
            "rate": opts.rate,
            **collector.run_config(),
        },
    )
    summary = CollectSummary()
    todo = register_run(opts.db, list(by_pid), run, opts.resume, summary)
    if not todo:
        return summary
    stop = stop or threading.Event()
    with collector.session(), StoreWriter(opts.db) as writer:
        shared = _Run(opts, collector.agent, run.run_id, writer, stop, summary)
        programs = [Program(pid, *by_pid[pid], shared) for pid in todo]
        results, interrupted = run_jobs(
            [(p.program_id, (lambda p=p: _run_one(collector, p))) for p in programs],
            workers=opts.workers,
            offsets=offsets[: len(programs)],
            stop=stop,
            on_start=on_start,
            on_done=on_done,
        )
    summarize(results, interrupted, summary)
    summary.errors += writer.errors
    return summary
