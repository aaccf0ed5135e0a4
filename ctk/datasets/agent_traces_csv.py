"""Trace tables in files (CSV, ``.csv.gz``, Parquet) as trace-store frames: what a file holds is read from
its columns, never from its name.

Two namings are read, and a file may mix them (the store's name wins where both are present):

- the shared agent-traces CSV (``shared/data/agent-traces``, see its README): ``duration_s`` /
  ``start_wallclock_utc`` / ``observation_chars`` / ``duration_method`` / ``cached_prompt_tokens``;
- the store's own columns, as ``ctk export`` writes every table: ``latency_s``, ``sent_unix_s``,
  ``call_index``, ``start_unix_s`` ... so every exported table imports back identically.

Kinds (:func:`table_kind`): tool calls, LLM calls, programs and runs. Quality flags are kept as they are: a
``timeout_censored`` row stays censored (its duration is a lower bound).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ctk.errors import CtkError
from ctk.store import _COLUMNS

CENSORED_FLAGS = ("timeout_censored",)
TABLE_SUFFIXES = (".csv", ".csv.gz", ".parquet")

#: Per kind: the columns a file must have, and (LLM calls) one of which it must have.
REQUIRED_COLUMNS = {
    "tool_calls": ("source", "program_id", "turn_index", "duration_s", "tool_name"),
    "llm_calls": ("program_id", "turn_index"),
    "programs": ("program_id", "source", "n_turns", "complete"),
    "runs": ("run_id", "kind", "created_unix_s"),
}
#: An LLM-calls table has at least one of these (and no ``tool_name``): a timing or a token count.
LLM_MARKERS = (
    "latency_s",
    "ttft_s",
    "sent_unix_s",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "cached_prompt_tokens",
    "finish_reason",
)
KINDS = tuple(REQUIRED_COLUMNS)
_NAMED = {
    "tool_calls": "a tool-calls",
    "llm_calls": "an LLM-calls",
    "programs": "a programs",
    "runs": "a runs",
}
EMPTY_LLM = pd.DataFrame(columns=_COLUMNS["llm_calls"])


#: Columns read as text whatever they hold (an exit status ``0``, a command ``NA``, a numeric task id).
TEXT_COLUMNS = (
    "source", "program_id", "run_id", "task_id", "dataset", "agent", "model", "outcome", "kind", "host",
    "config", "tool_name", "main_program", "command_or_args", "exit_status", "quality_flag", "provenance",
    "duration_method", "finish_reason",
)  # fmt: skip


class FormatError(CtkError, ValueError):
    """The file is not in the expected format; the message names the file and the reason."""


@dataclass
class TraceFrames:
    """A batch of whole programs, ready for :meth:`ctk.store.TraceStore.add_programs`."""

    programs: pd.DataFrame
    llm_calls: pd.DataFrame
    tool_calls: pd.DataFrame
    skipped_rows: int = 0  # rows dropped for a missing key or an unreadable duration

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


def is_table_file(path: Path) -> bool:
    return path.name.lower().endswith(TABLE_SUFFIXES)


def read_table(path: Path, nrows: int | None = None) -> pd.DataFrame:
    """A CSV / ``.csv.gz`` / Parquet file as a frame; only an empty cell is missing (a command ``NA`` stays
    text). Raises :class:`FormatError` for an unreadable file."""
    try:
        if path.name.lower().endswith(".parquet"):
            df = pd.read_parquet(path)
            return df if nrows is None else df.head(nrows)
        return pd.read_csv(
            path,
            nrows=nrows,
            keep_default_na=False,
            na_values=[""],
            dtype=dict.fromkeys(TEXT_COLUMNS, "string"),
        )
    except OSError:
        raise
    except Exception as exc:  # pandas / pyarrow raise many kinds on a truncated or binary file
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise FormatError(f"{path}: not a readable CSV or Parquet file ({detail})") from None


def table_kind(columns: Iterable[str]) -> str | None:
    """Which trace table a file holds, from its columns alone (None: none of them)."""
    cols = set(columns)
    if all(c in cols for c in REQUIRED_COLUMNS["tool_calls"]):
        return "tool_calls"
    llm_like = "tool_name" not in cols and all(c in cols for c in REQUIRED_COLUMNS["llm_calls"])
    if llm_like and cols & set(LLM_MARKERS):
        return "llm_calls"
    if "turn_index" not in cols and all(c in cols for c in REQUIRED_COLUMNS["programs"]):
        return "programs"
    if all(c in cols for c in REQUIRED_COLUMNS["runs"]):
        return "runs"
    return None


def why_not_a_table(columns: Iterable[str]) -> str:
    """For a file of no kind: the missing columns of the kind it comes closest to (tool calls on a tie)."""
    cols = [str(c) for c in columns]
    if not cols:
        return "no columns (empty file?)"

    def missing(kind: str) -> list[str]:
        lacking = [c for c in REQUIRED_COLUMNS[kind] if c not in cols]
        if kind == "llm_calls" and not set(cols) & set(LLM_MARKERS):
            lacking.append(f"one of {', '.join(LLM_MARKERS)}")
        return lacking

    candidates = [k for k in KINDS if not (k == "llm_calls" and "tool_name" in cols)]
    closest = min(candidates, key=lambda k: (len(missing(k)) / len(REQUIRED_COLUMNS[k]), KINDS.index(k)))
    return f"not {_NAMED[closest]} table: missing column(s) {', '.join(missing(closest))}"


def detect(path: Path) -> tuple[str | None, str]:
    """``(kind, reason)``: the kind of a table file from its header, or None and why not."""
    header = read_table(path, nrows=0) if not path.name.lower().endswith(".parquet") else None
    if header is None:
        import pyarrow.parquet as pq

        try:
            names = pq.read_schema(path).names
        except OSError:
            raise
        except Exception as exc:
            raise FormatError(f"{path}: not a readable Parquet file ({exc})") from None
    else:
        names = list(header.columns)
    kind = table_kind(names)
    return kind, "" if kind else why_not_a_table(names)


def _unix_seconds(col: pd.Series) -> pd.Series:
    ts = pd.to_datetime(col, utc=True, errors="coerce", format="ISO8601")
    return (ts - pd.Timestamp("1970-01-01", tz="UTC")).dt.total_seconds()


def _opt(df: pd.DataFrame, name: str, default=None) -> pd.Series:
    return df[name] if name in df.columns else pd.Series(default, index=df.index, dtype="object")


def _first(df: pd.DataFrame, *names: str) -> pd.Series:
    """The first of ``names`` the file has (the store's name before the shared CSV's), else all missing."""
    for name in names:
        if name in df.columns:
            return df[name]
    return pd.Series(None, index=df.index, dtype="object")


def _float(col: pd.Series) -> pd.Series:
    return pd.to_numeric(col, errors="coerce").astype(float)


def _int_or_none(col: pd.Series) -> pd.Series:
    return pd.to_numeric(col, errors="coerce").round().astype("Int64")


def _text(col: pd.Series) -> pd.Series:
    """A text column as text (a CSV reads every known text column as strings already: no copy then)."""
    if col.dtype == object or isinstance(col.dtype, pd.StringDtype):
        return col
    return col.astype("string")


def _bool(col: pd.Series, default: bool = False) -> pd.Series:
    """True/False/1/0 (any case) as booleans; a missing cell is ``default``."""
    text = col.astype("string").str.strip().str.lower()
    return text.isin(["true", "1", "1.0", "yes"]).where(col.notna(), default).astype(bool)


def tool_frames(raw: pd.DataFrame) -> TraceFrames:
    """Tool-call rows as store frames, with one derived ``programs`` row per program."""
    duration = pd.to_numeric(raw["duration_s"], errors="coerce")
    turn = pd.to_numeric(raw["turn_index"], errors="coerce")
    unreadable = raw["duration_s"].notna() & duration.isna()  # text that is not a number; empty is kept
    ok = raw["source"].notna() & raw["program_id"].notna() & turn.notna() & ~unreadable
    skipped = int((~ok).sum())
    raw, duration, turn = raw[ok], duration[ok], turn[ok].astype(int)

    flag = _opt(raw, "quality_flag", "ok").fillna("ok").astype(str)
    start = _float(_first(raw, "start_unix_s"))
    start = start.where(start.notna(), _unix_seconds(_opt(raw, "start_wallclock_utc")))
    end = _float(_first(raw, "end_unix_s"))
    end = end.where(end.notna() | ("end_unix_s" in raw.columns), start + duration)
    call_index = pd.to_numeric(_first(raw, "call_index"), errors="coerce")
    call_index = call_index.where(call_index.notna(), raw.groupby(["program_id", turn]).cumcount())
    tools = pd.DataFrame(
        {
            "program_id": raw["program_id"].astype(str),
            "turn_index": turn,
            "source": raw["source"].astype(str),
            "tool_name": _text(_opt(raw, "tool_name")),
            "main_program": _text(_opt(raw, "main_program")),
            "command_or_args": _text(_opt(raw, "command_or_args")),
            "duration_s": duration,
            "call_index": call_index.astype(int),
            "start_unix_s": start,
            "end_unix_s": end,
            "exit_status": _text(_opt(raw, "exit_status")),
            "output_chars": _int_or_none(_first(raw, "output_chars", "observation_chars")),
            "censored": flag.isin(CENSORED_FLAGS) | _bool(_opt(raw, "censored")),
            "quality_flag": flag,
            "provenance": _text(_first(raw, "provenance", "duration_method")),
            "injected": _bool(_opt(raw, "injected")),
            "is_final": _bool(_opt(raw, "is_final")),
            "context_tokens": _int_or_none(_opt(raw, "context_tokens")),
            "llm_output_tokens": _int_or_none(_opt(raw, "llm_output_tokens")),
            "llm_output_chars": _int_or_none(_opt(raw, "llm_output_chars")),
        }
    ).drop_duplicates(["program_id", "turn_index", "call_index"])
    return TraceFrames(_derived_programs(raw, tools), EMPTY_LLM.copy(), tools, skipped)


def _derived_programs(raw: pd.DataFrame, tools: pd.DataFrame) -> pd.DataFrame:
    """One ``programs`` row per program of a tool-calls table without a programs table beside it."""
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
    programs["n_turns"] = programs["program_id"].map(per_program["turn_index"].nunique())
    programs["outcome"] = None
    programs["run_id"] = None
    programs["complete"] = True
    return programs.reindex(columns=_COLUMNS["programs"])


def llm_frame(raw: pd.DataFrame) -> pd.DataFrame:
    """LLM-call rows as the store's ``llm_calls`` frame (rows without a program or turn are dropped)."""
    turn = pd.to_numeric(raw["turn_index"], errors="coerce")
    keep = raw["program_id"].notna() & turn.notna()
    raw, turn = raw[keep], turn[keep].astype(int)
    latency = _float(_first(raw, "latency_s", "duration_s"))
    sent = _float(_first(raw, "sent_unix_s"))
    sent = sent.where(sent.notna(), _unix_seconds(_opt(raw, "start_wallclock_utc")))
    finished = _float(_first(raw, "finished_unix_s"))
    finished = finished.where(finished.notna() | ("finished_unix_s" in raw.columns), sent + latency)
    llm = pd.DataFrame(
        {
            "program_id": raw["program_id"].astype(str),
            "turn_index": turn,
            "source": _text(_opt(raw, "source")),
            "sent_unix_s": sent,
            "first_token_unix_s": _float(_first(raw, "first_token_unix_s")),
            "finished_unix_s": finished,
            "latency_s": latency,
            "ttft_s": _float(_first(raw, "ttft_s")),
            "prompt_tokens": _int_or_none(_opt(raw, "prompt_tokens")),
            "completion_tokens": _int_or_none(_opt(raw, "completion_tokens")),
            "cached_tokens": _int_or_none(_first(raw, "cached_tokens", "cached_prompt_tokens")),
            "finish_reason": _text(_opt(raw, "finish_reason")),
            "response_chars": _int_or_none(_opt(raw, "response_chars")),
            "quality_flag": _opt(raw, "quality_flag", "ok").fillna("ok").astype(str),
            "provenance": _text(_first(raw, "provenance", "duration_method")),
        },
        index=raw.index,
    )
    return llm.drop_duplicates(["program_id", "turn_index"]).reset_index(drop=True)


def llm_programs(llm: pd.DataFrame) -> pd.DataFrame:
    """One ``programs`` row per program of LLM calls that no tool-calls table of the import holds."""
    per_program = llm.groupby("program_id", sort=False)
    programs = pd.DataFrame({"program_id": list(per_program.groups.keys())})
    programs["source"] = programs["program_id"].map(per_program["source"].first())
    programs["dataset"] = programs["source"]
    programs["start_unix_s"] = programs["program_id"].map(per_program["sent_unix_s"].min())
    programs["end_unix_s"] = programs["program_id"].map(per_program["finished_unix_s"].max())
    programs["n_turns"] = programs["program_id"].map(per_program["turn_index"].nunique())
    programs["complete"] = True
    return programs.reindex(columns=_COLUMNS["programs"])


def programs_frame(raw: pd.DataFrame) -> pd.DataFrame:
    """A ``programs`` table (as ``ctk export --table programs`` writes it) in the store's types."""
    raw = raw[raw["program_id"].notna()]
    out = pd.DataFrame(index=raw.index)
    for col in _COLUMNS["programs"]:
        value = _opt(raw, col)
        if col in ("start_unix_s", "end_unix_s"):
            out[col] = _float(value)
        elif col == "n_turns":
            out[col] = _int_or_none(value)
        elif col == "complete":
            out[col] = _bool(value, default=True)
        else:
            out[col] = _text(value)
    return out.drop_duplicates("program_id").reset_index(drop=True)


def runs_frame(raw: pd.DataFrame) -> pd.DataFrame:
    """A ``runs`` table (as ``ctk export --table runs`` writes it) in the store's types."""
    raw = raw[raw["run_id"].notna()]
    out = pd.DataFrame(index=raw.index)
    for col in _COLUMNS["runs"]:
        value = _opt(raw, col)
        out[col] = _float(value) if col == "created_unix_s" else _text(value)
    return out.drop_duplicates("run_id").reset_index(drop=True)


def companion_llm_path(path: Path) -> Path | None:
    """``tool_calls.csv`` -> ``llm_calls.csv`` beside it (``.csv.gz``, ``.parquet`` alike), or None when the
    name says nothing (a file named otherwise has no companion: pass its LLM calls as a second path)."""
    if "tool_calls" not in path.name:
        return None
    return path.with_name(path.name.replace("tool_calls", "llm_calls", 1))


def with_llm_calls(frames: TraceFrames, llm: pd.DataFrame) -> TraceFrames:
    """``frames`` with the LLM calls of its programs; a program's turn count covers both kinds of call."""
    llm = llm[llm["program_id"].isin(set(frames.programs["program_id"]))]
    turns = pd.concat([frames.tool_calls[["program_id", "turn_index"]], llm[["program_id", "turn_index"]]])
    programs = frames.programs.copy()
    programs["n_turns"] = programs["program_id"].map(turns.groupby("program_id")["turn_index"].nunique())
    return TraceFrames(programs, llm, frames.tool_calls, frames.skipped_rows)
