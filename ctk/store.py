"""The DuckDB trace store: the one module that owns the schema and all SQL.

Every other part of ctk reads and writes agent traces through :class:`TraceStore`.

Data model (one row per ...):

- ``runs``: a collection or import run (who/what/where: agent, model, source, host, config).
- ``programs``: an agent trajectory (task, dataset, start/end, outcome, number of turns, complete flag).
- ``llm_calls``: an LLM request of a program (send / first-token / finish times, tokens, finish reason).
- ``tool_calls``: a tool call of a program (tool, command, start/end, duration, exit status, censoring).

Times: ``*_unix_s`` columns are wall-clock seconds since the epoch (for alignment across processes);
``duration_s`` / ``latency_s`` come from a monotonic clock wherever the recorder controls the clock.

Writes are transactional. A program written with :meth:`TraceStore.add_programs` lands whole or not at
all; collectors that write a program step by step (:meth:`begin_program`, :meth:`add_llm_call`,
:meth:`add_tool_call`, :meth:`finish_program`) commit every step, and an unfinished program is marked
``complete = false`` so ``--resume`` can discard and redo it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd

from ctk.errors import CtkError

SCHEMA_VERSION = 1

#: A tool call longer than this is a broken clock or a broken file, not a measurement (30 days).
MAX_PLAUSIBLE_DURATION_S = 30 * 86400.0
#: Quality flag given at write time to a negative, non-finite or absurdly long ``duration_s``.
IMPOSSIBLE_DURATION_FLAG = "impossible_duration"
#: Quality flags whose durations are not usable at all (clock steps, impossible values).
EXCLUDED_QUALITY_FLAGS = ("implausible_lt_2ms", IMPOSSIBLE_DURATION_FLAG)
#: The same rule in SQL: a duration a predictor or a statistic may use.
_USABLE_DURATION_SQL = (
    f"duration_s IS NOT NULL AND isfinite(duration_s) AND duration_s >= 0 "
    f"AND duration_s <= {MAX_PLAUSIBLE_DURATION_S}"
)


def usable_duration(durations: pd.Series) -> pd.Series:
    """True where a duration is a number a predictor may learn from: finite, >= 0, at most 30 days."""
    d = pd.to_numeric(durations, errors="coerce").astype(float)
    return d.notna() & np.isfinite(d) & (d >= 0) & (d <= MAX_PLAUSIBLE_DURATION_S)


def is_usable_duration(duration: float) -> bool:
    """:func:`usable_duration` for one number (the step-wise writers' path)."""
    return math.isfinite(duration) and 0 <= duration <= MAX_PLAUSIBLE_DURATION_S


#: The timing columns of each table that the rule checks: a tool call's duration, an LLM call's latency and
#: time to first token. A value given but not usable flags the whole row :data:`IMPOSSIBLE_DURATION_FLAG`.
TIMING_COLUMNS = {"tool_calls": ("duration_s",), "llm_calls": ("latency_s", "ttft_s")}


def flag_impossible_durations(frame: pd.DataFrame, table: str = "tool_calls") -> pd.Series:
    """Flag rows whose timing (:data:`TIMING_COLUMNS` of ``table``) is given but impossible (negative,
    infinite, > 30 days) as :data:`IMPOSSIBLE_DURATION_FLAG`, in place; returns the mask of flagged rows."""
    bad = pd.Series(False, index=frame.index)
    for column in TIMING_COLUMNS[table]:
        if frame.empty or column not in frame:
            continue
        values = frame[column]
        given = values.notna()  # a missing value is "not measured", not an impossible one
        bad |= given & ~usable_duration(values)
    if bad.any():
        frame.loc[bad, "quality_flag"] = IMPOSSIBLE_DURATION_FLAG
    return bad


def flag_impossible_record(record: Any, table: str) -> Any:
    """The same rule for one record written step by step (collectors, the proxy): returns it flagged."""
    for column in TIMING_COLUMNS.get(table, ()):
        value = getattr(record, column, None)
        if value is not None and not is_usable_duration(float(value)):
            return dataclasses.replace(record, quality_flag=IMPOSSIBLE_DURATION_FLAG)
    return record


class StoreError(CtkError):
    """A trace store cannot be opened or written; the message says why."""


def _is_lock_conflict(exc: duckdb.Error) -> bool:
    return "lock" in str(exc).lower() and "conflicting" in str(exc).lower()


def _lock_holder(exc: duckdb.Error) -> str:
    """``PID 1234`` from DuckDB's lock message, or ``another process``."""
    import re

    m = re.search(r"PID (\d+)", str(exc))
    return f"PID {m.group(1)}" if m else "another process"


#: DuckDB errors that mean the file itself is damaged (truncated, a table dropped, a block unreadable), not a
#: bug in ctk: they become a :class:`StoreError` naming the store.
_DAMAGE_ERRORS = (
    duckdb.IOException,
    duckdb.CatalogException,
    duckdb.TransactionException,
    duckdb.InternalException,
    duckdb.SerializationException,
)


def damaged(path: Path, exc: BaseException) -> StoreError:
    """The one-line error for a store DuckDB cannot read: the user's path and DuckDB's first line."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return StoreError(f"{path}: damaged or truncated trace store, left as it was ({first})")


class _Connection:
    """A store's DuckDB connection: a damage error (:data:`_DAMAGE_ERRORS`) becomes a :class:`StoreError`
    naming the store instead of a traceback; anything else (a bug) is raised as it is."""

    def __init__(self, con: duckdb.DuckDBPyConnection, path: Path):
        self._con, self.path = con, path

    def execute(self, sql: str, params: Sequence[Any] | None = None) -> duckdb.DuckDBPyConnection:
        try:
            return self._con.execute(sql, params) if params is not None else self._con.execute(sql)
        except _DAMAGE_ERRORS as exc:
            raise damaged(self.path, exc) from None

    def register(self, name: str, frame: pd.DataFrame) -> None:
        try:
            self._con.register(name, frame)
        except _DAMAGE_ERRORS as exc:
            raise damaged(self.path, exc) from None

    def unregister(self, name: str) -> None:
        """Clean-up after a query: never hides the query's own error (an aborted transaction refuses it)."""
        with contextlib.suppress(duckdb.Error):
            self._con.unregister(name)

    def close(self) -> None:
        self._con.close()


@dataclass
class RunRecord:
    kind: str  # import | collect-swebench | collect-bfcl | proxy | serve | replay
    source: str
    agent: str | None = None
    model: str | None = None
    host: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    created_unix_s: float = field(default_factory=time.time)


@dataclass
class ProgramRecord:
    program_id: str
    source: str
    run_id: str | None = None
    task_id: str | None = None
    dataset: str | None = None
    agent: str | None = None
    model: str | None = None
    start_unix_s: float | None = None
    end_unix_s: float | None = None
    outcome: str | None = None  # submitted | limits_exceeded | error | ...
    n_turns: int | None = None
    complete: bool = True


@dataclass
class LLMCallRecord:
    program_id: str
    turn_index: int
    source: str
    sent_unix_s: float | None = None
    first_token_unix_s: float | None = None
    finished_unix_s: float | None = None
    latency_s: float | None = None
    ttft_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    finish_reason: str | None = None
    response_chars: int | None = None
    quality_flag: str = "ok"
    provenance: str | None = None


@dataclass
class ToolCallRecord:
    program_id: str
    turn_index: int
    source: str
    tool_name: str | None
    main_program: str | None
    command_or_args: str | None
    duration_s: float | None
    call_index: int = 0
    start_unix_s: float | None = None
    end_unix_s: float | None = None
    exit_status: str | None = None
    output_chars: int | None = None
    censored: bool = False  # true duration is at least duration_s (harness timeout)
    quality_flag: str = "ok"
    provenance: str | None = None  # how duration_s was measured
    injected: bool = False  # latency injected by ctk (bfcl), not measured
    is_final: bool = False  # the submit step that ends the program
    context_tokens: int | None = None  # prompt tokens of the turn that issued the call
    llm_output_tokens: int | None = None
    llm_output_chars: int | None = None


_DDL = """
CREATE TABLE IF NOT EXISTS ctk_meta (key VARCHAR PRIMARY KEY, value VARCHAR);
CREATE TABLE IF NOT EXISTS runs (
    run_id VARCHAR PRIMARY KEY, kind VARCHAR, source VARCHAR, agent VARCHAR, model VARCHAR,
    host VARCHAR, config VARCHAR, created_unix_s DOUBLE
);
CREATE TABLE IF NOT EXISTS programs (
    program_id VARCHAR PRIMARY KEY, source VARCHAR, run_id VARCHAR, task_id VARCHAR, dataset VARCHAR,
    agent VARCHAR, model VARCHAR, start_unix_s DOUBLE, end_unix_s DOUBLE, outcome VARCHAR,
    n_turns INTEGER, complete BOOLEAN
);
CREATE TABLE IF NOT EXISTS llm_calls (
    program_id VARCHAR, turn_index INTEGER, source VARCHAR, sent_unix_s DOUBLE,
    first_token_unix_s DOUBLE, finished_unix_s DOUBLE, latency_s DOUBLE, ttft_s DOUBLE,
    prompt_tokens BIGINT, completion_tokens BIGINT, cached_tokens BIGINT, finish_reason VARCHAR,
    response_chars BIGINT, quality_flag VARCHAR, provenance VARCHAR,
    PRIMARY KEY (program_id, turn_index)
);
CREATE TABLE IF NOT EXISTS tool_calls (
    program_id VARCHAR, turn_index INTEGER, source VARCHAR, tool_name VARCHAR, main_program VARCHAR,
    command_or_args VARCHAR, duration_s DOUBLE, call_index INTEGER, start_unix_s DOUBLE,
    end_unix_s DOUBLE, exit_status VARCHAR, output_chars BIGINT, censored BOOLEAN,
    quality_flag VARCHAR, provenance VARCHAR, injected BOOLEAN, is_final BOOLEAN,
    context_tokens BIGINT, llm_output_tokens BIGINT, llm_output_chars BIGINT,
    PRIMARY KEY (program_id, turn_index, call_index)
);
"""

_COLUMNS = {
    "runs": [f.name for f in dataclasses.fields(RunRecord)],
    "programs": [f.name for f in dataclasses.fields(ProgramRecord)],
    "llm_calls": [f.name for f in dataclasses.fields(LLMCallRecord)],
    "tool_calls": [f.name for f in dataclasses.fields(ToolCallRecord)],
}
# Column order as created by the DDL (INSERT ... SELECT names columns explicitly, so order is free).
TABLES = ("runs", "programs", "llm_calls", "tool_calls")

#: Column order of ``ctk export --table tool_calls``: the names of the shared agent-traces CSV first.
TOOL_CALL_EXPORT_COLUMNS = [
    "source",
    "program_id",
    "turn_index",
    "tool_name",
    "main_program",
    "command_or_args",
    "duration_s",
    "quality_flag",
    "exit_status",
    "call_index",
    "censored",
    "injected",
    "is_final",
    "start_unix_s",
    "end_unix_s",
    "start_wallclock_utc",
    "observation_chars",
    "context_tokens",
    "llm_output_tokens",
    "llm_output_chars",
    "duration_method",
]


def records_frame(records: Iterable[Any], table: str) -> pd.DataFrame:
    """Turn dataclass records into a frame with exactly the table's columns."""
    rows = [dataclasses.asdict(r) for r in records]
    df = pd.DataFrame(rows, columns=_COLUMNS[table])
    if table == "runs" and len(df):
        df["config"] = df["config"].map(lambda c: json.dumps(c, sort_keys=True, default=str))
    return df


class TraceStore:
    """A DuckDB file of agent traces. Thread-safe: one connection guarded by a lock."""

    def __init__(self, path: str | Path, read_only: bool = False):
        self.path = Path(path)
        self.read_only = read_only
        self._lock = threading.RLock()
        if read_only and not self.path.exists():
            raise StoreError(f"{self.path}: no such trace store")
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        #: Set when the store was locked by a writer and this reader opened a copy taken now instead.
        self.snapshot: Path | None = None
        try:
            con = duckdb.connect(str(self.path), read_only=read_only)
        except duckdb.Error as exc:
            if not _is_lock_conflict(exc):
                raise StoreError(f"{self.path}: cannot open as a DuckDB trace store ({exc})") from None
            if not read_only:
                raise StoreError(
                    f"{self.path}: being written by another process ({_lock_holder(exc)}, e.g. `ctk proxy`"
                    " or `ctk collect`); stop it first or write to another --db"
                ) from None
            con = self._connect_snapshot()
        self._con = _Connection(con, self.path)
        try:
            self._check_or_create_schema()
        except BaseException:
            self.close()
            raise

    def _connect_snapshot(self) -> duckdb.DuckDBPyConnection:
        """Read a copy of a store that a writer holds locked (DuckDB allows one writing process, and no
        reader beside it): the file and its write-ahead log are copied, and the copy is opened read-only."""
        import shutil
        import tempfile

        folder = Path(tempfile.mkdtemp(prefix="ctk-snapshot-"))
        copy = folder / self.path.name
        for attempt in range(3):  # a checkpoint between the two copies tears the pair: take it again
            shutil.copyfile(self.path, copy)
            wal = self.path.with_name(self.path.name + ".wal")
            if wal.exists():
                shutil.copyfile(wal, copy.with_name(copy.name + ".wal"))
            try:
                con = duckdb.connect(str(copy), read_only=False)  # replays the copied log into the copy
                con.execute("CHECKPOINT")
                break
            except duckdb.Error as exc:
                if attempt == 2:
                    shutil.rmtree(folder, ignore_errors=True)
                    raise StoreError(
                        f"{self.path}: locked by a writer, and a copy cannot be read ({exc})"
                    ) from None
        self.snapshot = folder
        return con

    # -- lifecycle ---------------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._con.close()
        if self.snapshot is not None:
            import shutil

            shutil.rmtree(self.snapshot, ignore_errors=True)

    def __enter__(self) -> TraceStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_or_create_schema(self) -> None:
        tables = {
            r[0] for r in self._con.execute("SELECT table_name FROM information_schema.tables").fetchall()
        }
        if "ctk_meta" in tables:
            row = self._con.execute("SELECT value FROM ctk_meta WHERE key = 'schema_version'").fetchone()
            try:
                version = int(row[0]) if row else None
            except ValueError:
                version = None
            if version is None:
                raise StoreError(f"{self.path}: trace store has no readable schema version")
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path}: written by a newer ctk (schema v{version}); this ctk reads up to "
                    f"v{SCHEMA_VERSION}. Upgrade ctk."
                )
            if version < 1:
                raise StoreError(f"{self.path}: unknown schema version {version}")
            self._check_tables()
            return
        if tables:
            raise StoreError(
                f"{self.path}: a DuckDB file but not a ctk trace store (tables: {sorted(tables)})"
            )
        if self.read_only:
            raise StoreError(f"{self.path}: empty file, not a ctk trace store")
        with self._transaction():
            self._con.execute(_DDL)
            self._con.execute(
                "INSERT INTO ctk_meta VALUES ('schema_version', ?), ('created_unix_s', ?)",
                [str(SCHEMA_VERSION), str(time.time())],
            )

    def _check_tables(self) -> None:
        """Every table with every column this ctk reads: a store with a table dropped or altered is refused
        on opening, before anything reads or writes it."""
        rows = self._con.execute(
            "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = 'main'"
        ).fetchall()
        present: dict[str, set[str]] = {}
        for table, column in rows:
            present.setdefault(table, set()).add(column)
        for table in TABLES:
            if table not in present:
                raise StoreError(f"{self.path}: damaged trace store: table {table} is missing")
            missing = [c for c in _COLUMNS[table] if c not in present[table]]
            if missing:
                raise StoreError(
                    f"{self.path}: damaged trace store: table {table} lacks column(s) {', '.join(missing)}"
                )

    def verify(self) -> None:
        """Read every value of every table once; a damaged file raises :class:`StoreError` here (so
        ``ctk import`` refuses it before writing a byte, and the file stays as it was)."""
        with self._lock:
            for table in TABLES:
                self._con.execute(f"SELECT bit_xor(hash(COLUMNS(*))) FROM {table}").fetchall()

    def _transaction(self):
        store = self

        class _Tx:
            def __enter__(self_inner):
                store._lock.acquire()
                store._con.execute("BEGIN TRANSACTION")

            def __exit__(self_inner, exc_type, exc, tb):
                try:
                    if exc_type is None:
                        store._con.execute("COMMIT")
                    else:
                        store._con.execute("ROLLBACK")
                finally:
                    store._lock.release()
                return False

        return _Tx()

    # -- writing -----------------------------------------------------------------------------------

    def add_run(self, run: RunRecord) -> str:
        with self._transaction():
            self._insert_frame("runs", records_frame([run], "runs"), skip_existing_on="run_id")
        return run.run_id

    def add_programs(
        self,
        programs: Sequence[ProgramRecord] | pd.DataFrame,
        llm_calls: Sequence[LLMCallRecord] | pd.DataFrame = (),
        tool_calls: Sequence[ToolCallRecord] | pd.DataFrame = (),
    ) -> int:
        """Insert whole programs with their calls in one transaction; returns how many were new.

        Programs whose id is already stored are skipped with all their calls (re-importing is idempotent).
        """
        progs = programs if isinstance(programs, pd.DataFrame) else records_frame(programs, "programs")
        llm = llm_calls if isinstance(llm_calls, pd.DataFrame) else records_frame(llm_calls, "llm_calls")
        tools = (
            tool_calls if isinstance(tool_calls, pd.DataFrame) else records_frame(tool_calls, "tool_calls")
        )
        if progs.empty:
            return 0
        if len(tools):
            tools = tools.copy()
            flag_impossible_durations(tools, "tool_calls")
        if len(llm):
            llm = llm.copy()
            flag_impossible_durations(llm, "llm_calls")
        with self._transaction():
            self._con.register("_new_programs", progs)
            try:
                new_ids = self._con.execute(
                    "SELECT DISTINCT n.program_id FROM _new_programs n "
                    "ANTI JOIN programs p ON p.program_id = n.program_id"
                ).df()
            finally:
                self._con.unregister("_new_programs")
            if new_ids.empty:
                return 0
            keep = set(new_ids["program_id"])
            self._insert_frame("programs", progs[progs["program_id"].isin(keep)])
            if len(llm):
                self._insert_frame("llm_calls", llm[llm["program_id"].isin(keep)])
            if len(tools):
                self._insert_frame("tool_calls", tools[tools["program_id"].isin(keep)])
        return len(keep)

    def add_runs(self, runs: pd.DataFrame) -> int:
        """Add run rows (a ``runs`` table read back from ``ctk export``); a stored run_id is kept as it is.
        Returns how many were new."""
        if runs.empty:
            return 0
        with self._transaction():
            before = self._con.execute("SELECT count(*) FROM runs").fetchall()[0][0]
            self._insert_frame("runs", runs, skip_existing_on="run_id")
            return self._con.execute("SELECT count(*) FROM runs").fetchall()[0][0] - before

    def _insert_frame(self, table: str, df: pd.DataFrame, skip_existing_on: str | None = None) -> None:
        if df.empty:
            return
        cols = _COLUMNS[table]
        df = df.reindex(columns=cols)
        col_list = ", ".join(cols)
        self._con.register("_frame", df)
        try:
            where = ""
            if skip_existing_on:
                where = f" WHERE {skip_existing_on} NOT IN (SELECT {skip_existing_on} FROM {table})"
            self._con.execute(f"INSERT INTO {table} ({col_list}) SELECT {col_list} FROM _frame{where}")
        finally:
            self._con.unregister("_frame")

    def begin_program(self, program: ProgramRecord) -> None:
        """Start a program written step by step (``complete = false`` until :meth:`finish_program`)."""
        program = dataclasses.replace(program, complete=False)
        with self._transaction():
            if self._program_row(program.program_id) is not None:
                raise StoreError(f"program {program.program_id!r} is already in {self.path}")
            self._insert_records("programs", [program])

    def add_llm_call(self, call: LLMCallRecord) -> None:
        with self._transaction():
            self._insert_records("llm_calls", [call])

    def add_tool_call(self, call: ToolCallRecord) -> None:
        with self._transaction():
            self._insert_records("tool_calls", [call])

    def add_tool_calls(self, calls: Sequence[ToolCallRecord]) -> None:
        with self._transaction():
            self._insert_records("tool_calls", calls)

    def _insert_records(self, table: str, records: Sequence[Any]) -> None:
        """A few records: parameterised INSERT (≈3x cheaper than a frame for one row); many: a frame."""
        records = [flag_impossible_record(r, table) for r in records]
        if len(records) > 64:
            self._insert_frame(table, records_frame(records, table))
            return
        cols = _COLUMNS[table]
        sql = f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
        for rec in records:
            self._con.execute(sql, [getattr(rec, c) for c in cols])

    def finish_program(
        self,
        program_id: str,
        outcome: str | None,
        end_unix_s: float | None = None,
        n_turns: int | None = None,
    ) -> None:
        with self._transaction():
            if n_turns is None:
                n_turns = self._con.execute(
                    "SELECT count(*) FROM llm_calls WHERE program_id = ?", [program_id]
                ).fetchone()[0]
            self._con.execute(
                "UPDATE programs SET complete = true, outcome = ?, end_unix_s = coalesce(?, end_unix_s), "
                "n_turns = ? WHERE program_id = ?",
                [outcome, end_unix_s if end_unix_s is not None else time.time(), n_turns, program_id],
            )

    def discard_program(self, program_id: str) -> None:
        """Delete a program and all its calls (used by ``--resume`` for unfinished programs)."""
        with self._transaction():
            for table in ("tool_calls", "llm_calls", "programs"):
                self._con.execute(f"DELETE FROM {table} WHERE program_id = ?", [program_id])

    # -- reading -----------------------------------------------------------------------------------

    def _program_row(self, program_id: str):
        return self._con.execute(
            "SELECT complete FROM programs WHERE program_id = ?", [program_id]
        ).fetchone()

    def program_status(self, program_id: str) -> str | None:
        """``'complete'``, ``'incomplete'`` or None when the program is not stored."""
        with self._lock:
            row = self._program_row(program_id)
        if row is None:
            return None
        return "complete" if row[0] else "incomplete"

    def existing_program_ids(self, program_ids: Iterable[str]) -> set[str]:
        """Which of ``program_ids`` are already stored."""
        ids = pd.DataFrame({"program_id": list(program_ids)})
        with self._lock:
            self._con.register("_ids", ids)
            try:
                rows = self._con.execute(
                    "SELECT p.program_id FROM programs p SEMI JOIN _ids i USING (program_id)"
                )
                return {r[0] for r in rows.fetchall()}
            finally:
                self._con.unregister("_ids")

    def program_ids(self, complete: bool | None = None) -> set[str]:
        sql = "SELECT program_id FROM programs"
        if complete is not None:
            sql += f" WHERE complete = {'true' if complete else 'false'}"
        with self._lock:
            return {r[0] for r in self._con.execute(sql).fetchall()}

    def query(self, sql: str, params: Sequence[Any] = ()) -> pd.DataFrame:
        """Run a read query and return a frame (for analyses that need more than the helpers below)."""
        with self._lock:
            return self._con.execute(sql, list(params)).df()

    def table(self, table: str, sources: Sequence[str] | None = None) -> pd.DataFrame:
        if table not in TABLES:
            raise StoreError(f"unknown table {table!r}; choose one of {', '.join(TABLES)}")
        sql = f"SELECT * FROM {table}"
        params: list[Any] = []
        if sources and table != "runs":
            sql += " WHERE source IN (" + ", ".join("?" * len(sources)) + ")"
            params = list(sources)
        order = {
            "programs": "program_id",
            "llm_calls": "program_id, turn_index",
            "tool_calls": "program_id, turn_index, call_index",
            "runs": "created_unix_s",
        }[table]
        return self.query(f"{sql} ORDER BY {order}", params)

    def tool_calls(self, sources: Sequence[str] | None = None, usable_only: bool = True) -> pd.DataFrame:
        """Tool calls ordered by program and turn; ``usable_only`` drops rows flagged as clock errors and
        any duration that is not :func:`usable_duration` (also in stores written before that flag existed)."""
        df = self.table("tool_calls", sources)
        if usable_only:
            df = df[~df["quality_flag"].isin(EXCLUDED_QUALITY_FLAGS) & usable_duration(df["duration_s"])]
        return df.reset_index(drop=True)

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {t: self._con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}

    def fingerprint(self) -> str:
        """A hash of the usable tool-call rows (row count + content) identifying training data."""
        with self._lock:
            n, h = self._con.execute(
                "SELECT count(*), coalesce(bit_xor(hash(program_id, turn_index, call_index, duration_s, "
                "command_or_args, censored)), 0) FROM tool_calls"
            ).fetchone()
        return f"{n}:{int(h):016x}"

    def stats(self, by: Sequence[str] = ("source", "main_program")) -> pd.DataFrame:
        """Per group: count, p50/p90/p99 (linear interpolation, as pandas), shares under 1/2/10 s, censored.

        Rows flagged as clock errors or impossible (:data:`EXCLUDED_QUALITY_FLAGS`) are left out, and so is
        any duration that is not usable (negative, non-finite, > 30 days) in stores written before the flag.
        """
        keys = ", ".join(by)
        excluded = ", ".join(f"'{f}'" for f in EXCLUDED_QUALITY_FLAGS)
        sql = f"""
            SELECT {keys}, count(*) AS n,
                   quantile_cont(duration_s, 0.5) AS p50_s,
                   quantile_cont(duration_s, 0.9) AS p90_s,
                   quantile_cont(duration_s, 0.99) AS p99_s,
                   avg(CASE WHEN duration_s < 1 THEN 1.0 ELSE 0.0 END) AS share_lt_1s,
                   avg(CASE WHEN duration_s < 2 THEN 1.0 ELSE 0.0 END) AS share_lt_2s,
                   avg(CASE WHEN duration_s < 10 THEN 1.0 ELSE 0.0 END) AS share_lt_10s,
                   avg(CASE WHEN censored THEN 1.0 ELSE 0.0 END) AS censored_share
            FROM tool_calls
            WHERE {_USABLE_DURATION_SQL} AND quality_flag NOT IN ({excluded})
            GROUP BY {keys} ORDER BY {keys}
        """
        return self.query(sql)

    def export_frame(self, table: str) -> pd.DataFrame:
        """A table with documented column names (tool calls: the shared agent-traces CSV names first)."""
        df = self.table(table)
        if table == "tool_calls":
            df["start_wallclock_utc"] = pd.to_datetime(df["start_unix_s"], unit="s", utc=True).map(
                lambda t: t.isoformat() if pd.notna(t) else None
            )
            df["observation_chars"] = df["output_chars"]
            df["duration_method"] = df["provenance"]
            df = df.reindex(columns=TOOL_CALL_EXPORT_COLUMNS)
        return df
