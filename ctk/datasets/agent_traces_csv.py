"""The agent-traces CSV format (``tool_calls.csv`` + optional ``llm_calls.csv``) as trace-store frames.

Column names are those of ``shared/data/agent-traces`` (see its README); ``ctk export`` writes the same
names, so a CSV exported by ctk imports again. Quality flags are kept as they are: a ``timeout_censored``
row stays censored (its duration is a lower bound).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ctk.errors import CtkError
from ctk.store import _COLUMNS

REQUIRED_TOOL_COLUMNS = ("source", "program_id", "turn_index", "duration_s")
CENSORED_FLAGS = ("timeout_censored",)


class FormatError(CtkError, ValueError):
    """The file is not in the expected format; the message names the file and the reason."""


@dataclass
class TraceFrames:
    """A batch of whole programs, ready for :meth:`ctk.store.TraceStore.add_programs`."""

    programs: pd.DataFrame
    llm_calls: pd.DataFrame
    tool_calls: pd.DataFrame
    skipped_rows: int = 0  # rows dropped for a missing key or unparsable duration

    def split(self, max_programs: int) -> list[TraceFrames]:
        """Cut into batches of whole programs (each batch is committed in its own transaction)."""
        ids = self.programs["program_id"].tolist()
        if len(ids) <= max_programs:
            return [self]
        out = []
        for i in range(0, len(ids), max_programs):
            chunk = set(ids[i : i + max_programs])
            out.append(
                TraceFrames(
                    self.programs[self.programs["program_id"].isin(chunk)],
                    self.llm_calls[self.llm_calls["program_id"].isin(chunk)],
                    self.tool_calls[self.tool_calls["program_id"].isin(chunk)],
                )
            )
        out[0].skipped_rows = self.skipped_rows
        return out


def looks_like_tool_calls_csv(path: Path) -> bool:
    name = path.name.lower()
    if not (name.endswith(".csv") or name.endswith(".csv.gz")):
        return False
    try:
        header = pd.read_csv(path, nrows=0).columns
    except Exception:
        return False
    return all(c in header for c in REQUIRED_TOOL_COLUMNS) and "tool_name" in header


def _unix_seconds(col: pd.Series) -> pd.Series:
    ts = pd.to_datetime(col, utc=True, errors="coerce", format="ISO8601")
    return (ts - pd.Timestamp("1970-01-01", tz="UTC")).dt.total_seconds()


def _opt(df: pd.DataFrame, name: str, default=None) -> pd.Series:
    return df[name] if name in df.columns else pd.Series(default, index=df.index, dtype="object")


def _int_or_none(col: pd.Series) -> pd.Series:
    return pd.to_numeric(col, errors="coerce").round().astype("Int64")


def read_tool_calls_csv(path: Path, llm_path: Path | None = None) -> TraceFrames:
    """Read ``tool_calls.csv`` (and ``llm_calls.csv`` beside it, or ``llm_path``) into store frames."""
    try:
        raw = pd.read_csv(path, dtype={"exit_status": "string", "program_id": "string", "source": "string"})
    except Exception as exc:  # pandas raises many kinds on a truncated / binary file
        raise FormatError(f"{path}: not a readable CSV ({type(exc).__name__}: {exc})") from None
    missing = [c for c in REQUIRED_TOOL_COLUMNS if c not in raw.columns]
    if missing:
        raise FormatError(f"{path}: missing column(s) {', '.join(missing)}")

    duration = pd.to_numeric(raw["duration_s"], errors="coerce")
    turn = pd.to_numeric(raw["turn_index"], errors="coerce")
    ok = raw["source"].notna() & raw["program_id"].notna() & turn.notna() & duration.notna()
    skipped = int((~ok).sum())
    raw, duration, turn = raw[ok], duration[ok], turn[ok].astype(int)

    flag = _opt(raw, "quality_flag", "ok").fillna("ok").astype(str)
    start = _unix_seconds(_opt(raw, "start_wallclock_utc"))
    call_index = raw.groupby(["program_id", turn]).cumcount()
    tools = pd.DataFrame(
        {
            "program_id": raw["program_id"].astype(str),
            "turn_index": turn,
            "source": raw["source"].astype(str),
            "tool_name": _opt(raw, "tool_name"),
            "main_program": _opt(raw, "main_program"),
            "command_or_args": _opt(raw, "command_or_args"),
            "duration_s": duration,
            "call_index": call_index.astype(int),
            "start_unix_s": start,
            "end_unix_s": start + duration,
            "exit_status": _opt(raw, "exit_status").astype("string"),
            "output_chars": _int_or_none(_opt(raw, "observation_chars")),
            "censored": flag.isin(CENSORED_FLAGS) | _opt(raw, "censored", False).fillna(False).astype(bool),
            "quality_flag": flag,
            "provenance": _opt(raw, "duration_method"),
            "injected": _opt(raw, "injected", False).fillna(False).astype(bool),
            "is_final": _opt(raw, "is_final", False).fillna(False).astype(bool),
            "context_tokens": _int_or_none(_opt(raw, "context_tokens")),
            "llm_output_tokens": _int_or_none(_opt(raw, "llm_output_tokens")),
            "llm_output_chars": _int_or_none(_opt(raw, "llm_output_chars")),
        }
    ).drop_duplicates(["program_id", "turn_index", "call_index"])

    if llm_path is None:  # tool_calls.csv -> llm_calls.csv, tool_calls.csv.gz -> llm_calls.csv.gz
        llm_path = path.with_name(path.name.replace("tool_calls", "llm_calls", 1))
    llm = _read_llm_calls(llm_path, path)
    llm = llm[llm["program_id"].isin(set(tools["program_id"]))]

    per_program = tools.groupby("program_id", sort=False)
    first = raw.assign(_pid=raw["program_id"].astype(str)).groupby("_pid", sort=False).first()
    programs = pd.DataFrame({"program_id": list(per_program.groups.keys())})
    programs["source"] = programs["program_id"].map(first["source"]).astype(str)
    programs["task_id"] = programs["program_id"].map(_opt(first, "task_id"))
    programs["agent"] = programs["program_id"].map(_opt(first, "agent"))
    programs["model"] = programs["program_id"].map(_opt(first, "model"))
    programs["dataset"] = programs["source"]
    programs["start_unix_s"] = programs["program_id"].map(per_program["start_unix_s"].min())
    programs["end_unix_s"] = programs["program_id"].map(per_program["end_unix_s"].max())
    turns = pd.concat([tools[["program_id", "turn_index"]], llm[["program_id", "turn_index"]]])
    programs["n_turns"] = programs["program_id"].map(turns.groupby("program_id")["turn_index"].nunique())
    programs["outcome"] = None
    programs["run_id"] = None
    programs["complete"] = True
    return TraceFrames(programs.reindex(columns=_COLUMNS["programs"]), llm, tools, skipped)


def _read_llm_calls(llm_path: Path, tool_path: Path) -> pd.DataFrame:
    empty = pd.DataFrame(columns=_COLUMNS["llm_calls"])
    if not llm_path.exists():
        return empty
    try:
        raw = pd.read_csv(llm_path, dtype={"program_id": "string", "source": "string"})
    except Exception as exc:
        raise FormatError(f"{llm_path}: not a readable CSV ({type(exc).__name__}: {exc})") from None
    if not {"program_id", "turn_index"} <= set(raw.columns):
        raise FormatError(f"{llm_path}: missing program_id/turn_index (next to {tool_path.name})")
    turn = pd.to_numeric(raw["turn_index"], errors="coerce")
    raw = raw[raw["program_id"].notna() & turn.notna()]
    turn = turn[raw.index].astype(int)
    latency = pd.to_numeric(_opt(raw, "duration_s"), errors="coerce")
    sent = _unix_seconds(_opt(raw, "start_wallclock_utc"))
    llm = pd.DataFrame(
        {
            "program_id": raw["program_id"].astype(str),
            "turn_index": turn,
            "source": _opt(raw, "source").astype("string"),
            "sent_unix_s": sent,
            "first_token_unix_s": None,
            "finished_unix_s": sent + latency,
            "latency_s": latency,
            "ttft_s": None,
            "prompt_tokens": _int_or_none(_opt(raw, "prompt_tokens")),
            "completion_tokens": _int_or_none(_opt(raw, "completion_tokens")),
            "cached_tokens": _int_or_none(_opt(raw, "cached_prompt_tokens")),
            "finish_reason": _opt(raw, "finish_reason"),
            "response_chars": _int_or_none(_opt(raw, "response_chars")),
            "quality_flag": _opt(raw, "quality_flag", "ok").fillna("ok").astype(str),
            "provenance": _opt(raw, "duration_method"),
        }
    )
    return llm.drop_duplicates(["program_id", "turn_index"])
