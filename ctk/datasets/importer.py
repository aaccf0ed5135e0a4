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
from ctk.datasets.agent_traces_csv import FormatError, TraceFrames
from ctk.store import _COLUMNS, RunRecord, TraceStore, flag_impossible_durations, records_frame

Format = Literal["auto", "mswea-traj", "agent-traces-csv"]


@dataclass
class ImportSummary:
    files_read: int = 0
    programs_added: int = 0
    programs_already_present: int = 0
    tool_calls_added: int = 0
    llm_calls_added: int = 0
    runs_added: int = 0  # rows of a runs table (``ctk export --table runs``) read back
    rows_skipped: int = 0
    impossible_durations: int = 0  # tool durations < 0, infinite or > 30 days: stored flagged, never used
    impossible_latencies: int = 0  # LLM latencies / TTFTs by the same rule
    skipped_files: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    run_id: str | None = None  # the import's run record, written with the first batch (none: nothing read)
    interrupted: bool = False  # stopped early on request (Ctrl-C); everything committed so far stays


@dataclass(frozen=True)
class Found:
    """A file to import: its kind (``mswea-traj``, a trace table of :data:`agent_traces_csv.KINDS`,
    ``missing`` or ``unknown``) and, when it cannot be imported, why."""

    path: Path
    kind: str
    reason: str = ""


def discover(paths: Iterable[Path], fmt: Format = "auto") -> list[Found]:
    """Expand folders (recursively) into files with their kind; files in folders that hold no trace are
    ignored, a file named on the command line that holds none is reported with the reason."""
    found: list[Found] = []
    for path in paths:
        if path.is_dir():
            for f in sorted(path.rglob("*")):
                if f.is_file() and (item := _detect(f, fmt, explicit=False)):
                    found.append(item)
        elif path.exists():
            found.append(_detect(path, fmt, explicit=True) or Found(path, "unknown"))
        else:
            found.append(Found(path, "missing", "no such file"))
    return found


def _detect(path: Path, fmt: Format, explicit: bool) -> Found | None:
    """A file's kind from its content: a trajectory by its suffix, a trace table by its columns."""
    if fmt == "mswea-traj" or (fmt == "auto" and traj_json.is_trajectory_file(path)):
        ok = explicit or traj_json.is_trajectory_file(path)
        return Found(path, "mswea-traj") if ok else None
    if not (agent_traces_csv.is_table_file(path) or (explicit and fmt == "agent-traces-csv")):
        if not explicit:
            return None
        return Found(path, "unknown", "unknown format: not a *.traj.json, CSV or Parquet file (use --format)")
    try:
        kind, reason = agent_traces_csv.detect(path)
    except FormatError as exc:
        return Found(path, "unknown", str(exc).removeprefix(f"{path}: ")) if explicit else None
    except OSError as exc:
        return Found(path, "unknown", f"cannot read: {exc.strerror or exc}") if explicit else None
    if kind is None:
        return Found(path, "unknown", reason) if explicit else None
    return Found(path, kind)


def _with_companions(found: list[Found], summary: ImportSummary) -> list[Found]:
    """Add the LLM-calls table beside each ``tool_calls*`` table (``llm_calls*``), when its columns say it
    is one; a companion that is something else is reported and not read."""
    have = {f.path.resolve() for f in found}
    out = list(found)
    for f in found:
        if f.kind != "tool_calls":
            continue
        companion = agent_traces_csv.companion_llm_path(f.path)
        if companion is None or not companion.is_file() or companion.resolve() in have:
            continue
        have.add(companion.resolve())
        item = _detect(companion, "agent-traces-csv", explicit=True)
        if item is not None and item.kind == "llm_calls":
            out.append(item)
        else:
            reason = (item.reason if item else "") or f"holds {item.kind if item else 'no trace table'}"
            summary.skipped_files.append((str(companion), f"beside {f.path.name} but {reason}"))
    return out


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

    Trace tables are told apart by their columns. LLM-calls and programs tables join the tool calls of
    the same import by ``program_id`` (LLM calls of programs without tool calls become programs of their
    own); a runs table's rows are added as they are. ``should_stop`` is asked between files and batches:
    when it says yes, what is parsed is committed and the import returns with ``interrupted`` set.
    """
    paths = list(paths)
    summary = ImportSummary()
    files = _with_companions(discover(paths, fmt), summary)
    run = RunRecord(kind="import", source=source, config={"paths": [str(p) for p in paths], "format": fmt})
    side = _SideTables()
    for item in files:  # LLM calls, programs and runs first: the tool calls join them
        if item.kind in ("llm_calls", "programs", "runs"):
            if on_file:
                on_file(item.path)
            side.read(item, summary)
    if len(side.runs):
        summary.runs_added += store.add_runs(side.runs)
    traj_batch: list[tuple] = []
    for item in files:
        path, kind = item.path, item.kind
        if kind in ("llm_calls", "programs", "runs"):
            continue
        if should_stop and should_stop():
            summary.interrupted = True
            break
        if on_file:
            on_file(path)
        if kind in ("missing", "unknown"):
            summary.skipped_files.append((str(path), item.reason or "unknown format (use --format)"))
            continue
        summary.files_read += 1
        try:
            if kind == "tool_calls":
                frames = agent_traces_csv.tool_frames(agent_traces_csv.read_table(path))
                summary.rows_skipped += frames.skipped_rows
                frames = side.complete(agent_traces_csv.with_llm_calls(frames, side.llm), run.run_id)
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
        if summary.interrupted:
            break
    _flush_trajectories(store, summary, run, traj_batch, on_commit)
    if not summary.interrupted:
        rest = side.leftover(run.run_id)
        for batch in rest.split(batch_programs) if len(rest.programs) else []:
            _add(store, summary, run, batch.programs, batch.llm_calls, batch.tool_calls, on_commit)
    return summary


class _SideTables:
    """The LLM-calls, programs and runs tables of one import, joined to its tool calls by program."""

    def __init__(self) -> None:
        self.llm = agent_traces_csv.EMPTY_LLM.copy()
        self.programs = pd.DataFrame(columns=_COLUMNS["programs"])
        self.runs = pd.DataFrame(columns=_COLUMNS["runs"])
        self.used: set[str] = set()  # programs already imported with a tool-calls table

    def read(self, item: Found, summary: ImportSummary) -> None:
        try:
            raw = agent_traces_csv.read_table(item.path)
        except FormatError as exc:
            summary.skipped_files.append((str(item.path), str(exc).removeprefix(f"{item.path}: ")))
            return
        except OSError as exc:
            summary.skipped_files.append((str(item.path), f"cannot read: {exc.strerror or exc}"))
            return
        summary.files_read += 1
        if item.kind == "llm_calls":
            frame = agent_traces_csv.llm_frame(raw)
            self.llm = _concat(self.llm, frame).drop_duplicates(["program_id", "turn_index"])
        elif item.kind == "programs":
            self.programs = _concat(self.programs, agent_traces_csv.programs_frame(raw)).drop_duplicates(
                "program_id"
            )
        else:
            self.runs = _concat(self.runs, agent_traces_csv.runs_frame(raw)).drop_duplicates("run_id")

    def complete(self, frames: TraceFrames, run_id: str) -> TraceFrames:
        """Rows of a programs table replace those derived from calls; the rest get this import's run."""
        programs = frames.programs.copy()
        programs["run_id"] = run_id
        ids = set(programs["program_id"])
        self.used |= ids
        given = self.programs[self.programs["program_id"].isin(ids)]
        if len(given):
            programs = _concat(given, programs[~programs["program_id"].isin(set(given["program_id"]))])
        return TraceFrames(programs, frames.llm_calls, frames.tool_calls, frames.skipped_rows)

    def leftover(self, run_id: str) -> TraceFrames:
        """Programs no tool-calls table of the import held: from their LLM calls, or a programs row alone."""
        llm = self.llm[~self.llm["program_id"].isin(self.used)]
        no_tools = pd.DataFrame(columns=_COLUMNS["tool_calls"])
        frames = TraceFrames(agent_traces_csv.llm_programs(llm), llm, no_tools)
        frames = self.complete(frames, run_id)
        alone = self.programs[~self.programs["program_id"].isin(self.used)]
        return TraceFrames(_concat(frames.programs, alone), frames.llm_calls, frames.tool_calls)


def _concat(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """Rows of ``a`` then ``b`` (an empty side adds nothing, and no dtype warning)."""
    if a.empty:
        return b.reset_index(drop=True)
    if b.empty:
        return a.reset_index(drop=True)
    return pd.concat([a, b], ignore_index=True)


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
        impossible = flag_impossible_durations(tools, "tool_calls")
        summary.impossible_durations += int((impossible & tools["program_id"].isin(new)).sum())
    if len(llm):
        llm = llm.copy()
        impossible = flag_impossible_durations(llm, "llm_calls")
        summary.impossible_latencies += int((impossible & llm["program_id"].isin(new)).sum())
    added = store.add_programs(programs, llm, tools)
    summary.programs_added += added
    summary.programs_already_present += len(ids) - len(new)
    summary.tool_calls_added += int(tools["program_id"].isin(new).sum()) if len(tools) else 0
    summary.llm_calls_added += int(llm["program_id"].isin(new).sum()) if len(llm) else 0
    if on_commit:
        on_commit(added)
