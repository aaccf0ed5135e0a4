"""``ctk import``: find trajectory / CSV files, parse them, and add whole programs to the trace store.

Each file (a CSV: each batch of whole programs) is committed in its own transaction, so a process killed
mid-import leaves every committed program intact, and re-running the import adds only what is missing.
A file that cannot be parsed is reported by name with the reason, counted, and skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd

from ctk.datasets import agent_traces_csv, traj_json
from ctk.datasets.agent_traces_csv import FormatError
from ctk.store import RunRecord, TraceStore, flag_impossible_durations, records_frame

Format = Literal["auto", "mswea-traj", "agent-traces-csv"]


@dataclass
class ImportSummary:
    files_read: int = 0
    programs_added: int = 0
    programs_already_present: int = 0
    tool_calls_added: int = 0
    llm_calls_added: int = 0
    rows_skipped: int = 0
    impossible_durations: int = 0  # negative, infinite or > 30 days: stored flagged, never used
    skipped_files: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    run_id: str | None = None  # the import's run record, written with the first batch (none: nothing read)
    interrupted: bool = False  # stopped early on request (Ctrl-C); everything committed so far stays


def discover(paths: Iterable[Path], fmt: Format = "auto") -> list[tuple[Path, str]]:
    """Expand folders (recursively) into ``(file, format)`` pairs; unknown files in folders are ignored."""
    found: list[tuple[Path, str]] = []
    for path in paths:
        if path.is_dir():
            for f in sorted(path.rglob("*")):
                if f.is_file() and (kind := _detect(f, fmt, explicit=False)):
                    found.append((f, kind))
        elif path.exists():
            kind = _detect(path, fmt, explicit=True)
            found.append((path, kind or "unknown"))
        else:
            found.append((path, "missing"))
    return found


def _detect(path: Path, fmt: Format, explicit: bool) -> str | None:
    if fmt == "mswea-traj":
        return "mswea-traj" if explicit or traj_json.is_trajectory_file(path) else None
    if fmt == "agent-traces-csv":
        return "agent-traces-csv" if explicit or path.name.startswith("tool_calls") else None
    if traj_json.is_trajectory_file(path):
        return "mswea-traj"
    if path.name.startswith("llm_calls"):
        return None  # read together with the tool_calls file beside it
    if agent_traces_csv.looks_like_tool_calls_csv(path):
        return "agent-traces-csv"
    return None


def import_paths(
    store: TraceStore,
    paths: Iterable[Path],
    fmt: Format = "auto",
    source: str = "mini-swe-agent",
    on_file: Callable[[Path], None] | None = None,
    batch_programs: int = 200,
    on_commit: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> ImportSummary:
    """Import every file found under ``paths`` into ``store``; see the module docstring.

    ``should_stop`` is asked between files and batches: when it says yes, what is parsed is committed and
    the import returns with ``interrupted`` set (a re-run adds the rest).
    """
    summary = ImportSummary()
    files = discover(paths, fmt)
    run = RunRecord(kind="import", source=source, config={"paths": [str(p) for p in paths], "format": fmt})
    traj_batch: list[tuple] = []
    for path, kind in files:
        if should_stop and should_stop():
            summary.interrupted = True
            break
        if on_file:
            on_file(path)
        if kind in ("missing", "unknown"):
            reason = "no such file" if kind == "missing" else "unknown format (use --format)"
            summary.skipped_files.append((str(path), reason))
            continue
        summary.files_read += 1
        try:
            if kind == "agent-traces-csv":
                frames = agent_traces_csv.read_tool_calls_csv(path)
                summary.rows_skipped += frames.skipped_rows
                frames.programs["run_id"] = run.run_id
                for batch in frames.split(batch_programs):
                    if should_stop and should_stop():
                        summary.interrupted = True
                        break
                    _add(store, summary, run, batch.programs, batch.llm_calls, batch.tool_calls, on_commit)
            else:
                program, llm, tools = traj_json.read_trajectory(path, source=source)
                program.run_id = run.run_id
                traj_batch.append((program, llm, tools))
                if len(traj_batch) >= batch_programs:
                    _flush_trajectories(store, summary, run, traj_batch, on_commit)
        except FormatError as exc:
            summary.skipped_files.append((str(path), str(exc).removeprefix(f"{path}: ")))
        except OSError as exc:
            summary.skipped_files.append((str(path), f"cannot read: {exc.strerror or exc}"))
    _flush_trajectories(store, summary, run, traj_batch, on_commit)
    return summary


def _flush_trajectories(
    store: TraceStore,
    summary: ImportSummary,
    run: RunRecord,
    batch: list[tuple],
    on_commit: Callable[[int], None] | None,
) -> None:
    if not batch:
        return
    programs = records_frame([b[0] for b in batch], "programs")
    llm = records_frame([c for b in batch for c in b[1]], "llm_calls")
    tools = records_frame([c for b in batch for c in b[2]], "tool_calls")
    _add(store, summary, run, programs, llm, tools, on_commit)
    batch.clear()


def _add(
    store: TraceStore,
    summary: ImportSummary,
    run: RunRecord,
    programs: pd.DataFrame,
    llm: pd.DataFrame,
    tools: pd.DataFrame,
    on_commit: Callable[[int], None] | None = None,
) -> None:
    if summary.run_id is None:
        summary.run_id = store.add_run(run)
    ids = set(programs["program_id"])
    new = ids - store.existing_program_ids(ids)
    if len(tools):
        impossible = flag_impossible_durations(tools)
        summary.impossible_durations += int((impossible & tools["program_id"].isin(new)).sum())
    added = store.add_programs(programs, llm, tools)
    summary.programs_added += added
    summary.programs_already_present += len(ids) - len(new)
    summary.tool_calls_added += int(tools["program_id"].isin(new).sum()) if len(tools) else 0
    summary.llm_calls_added += int(llm["program_id"].isin(new).sum()) if len(llm) else 0
    if on_commit:
        on_commit(added)
