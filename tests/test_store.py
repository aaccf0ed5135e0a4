"""The DuckDB trace store: schema versioning, atomic/idempotent writes, step-wise programs."""

from __future__ import annotations

import duckdb
import pytest

from ctk.store import (
    SCHEMA_VERSION,
    LLMCallRecord,
    ProgramRecord,
    StoreError,
    ToolCallRecord,
    TraceStore,
)


def _program(pid: str, n: int = 3) -> tuple[ProgramRecord, list[LLMCallRecord], list[ToolCallRecord]]:
    prog = ProgramRecord(program_id=pid, source="s", n_turns=n)
    llm = [LLMCallRecord(program_id=pid, turn_index=t, source="s", latency_s=0.5) for t in range(n)]
    tools = [
        ToolCallRecord(
            program_id=pid,
            turn_index=t,
            source="s",
            tool_name="ls",
            main_program="ls",
            command_or_args="ls",
            duration_s=0.1 * (t + 1),
        )
        for t in range(n)
    ]
    return prog, llm, tools


def test_add_programs_is_idempotent(tmp_path):
    store = TraceStore(tmp_path / "new" / "folder" / "t.duckdb")  # folders are created
    p, llm, tools = _program("a")
    assert store.add_programs([p], llm, tools) == 1
    assert store.add_programs([p], llm, tools) == 0
    q, llm2, tools2 = _program("b", 2)
    assert store.add_programs([p, q], llm + llm2, tools + tools2) == 1
    assert store.counts() == {"runs": 0, "programs": 2, "llm_calls": 5, "tool_calls": 5}


def test_failed_batch_leaves_nothing_half_written(tmp_path):
    store = TraceStore(tmp_path / "t.duckdb")
    p, llm, tools = _program("a")
    dup = tools + [tools[0]]  # violates the (program, turn, call) key inside the batch
    with pytest.raises(duckdb.Error):
        store.add_programs([p], llm, dup)
    assert store.counts()["programs"] == 0 and store.counts()["tool_calls"] == 0
    assert store.add_programs([p], llm, tools) == 1


def test_stepwise_program_and_discard(tmp_path):
    path = tmp_path / "t.duckdb"
    store = TraceStore(path)
    p, llm, tools = _program("a")
    store.begin_program(p)
    store.add_llm_call(llm[0])
    store.add_tool_call(tools[0])
    assert store.program_status("a") == "incomplete"
    with pytest.raises(StoreError, match="already"):
        store.begin_program(p)
    store.close()
    store = TraceStore(path)  # a new process sees the committed steps
    assert store.counts()["tool_calls"] == 1
    store.discard_program("a")
    assert store.program_status("a") is None and store.counts()["tool_calls"] == 0
    store.begin_program(p)
    for c in llm:
        store.add_llm_call(c)
    store.finish_program("a", outcome="Submitted")
    assert store.program_status("a") == "complete"
    assert store.table("programs").loc[0, "n_turns"] == 3


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "t.duckdb"
    TraceStore(path).close()
    con = duckdb.connect(str(path))
    con.execute("UPDATE ctk_meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION + 1)])
    con.close()
    with pytest.raises(StoreError, match="newer ctk"):
        TraceStore(path)


def test_foreign_and_garbage_files_are_refused(tmp_path):
    foreign = tmp_path / "other.duckdb"
    con = duckdb.connect(str(foreign))
    con.execute("CREATE TABLE x (a INT)")
    con.close()
    with pytest.raises(StoreError, match="not a ctk trace store"):
        TraceStore(foreign)
    garbage = tmp_path / "garbage.duckdb"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="cannot open"):
        TraceStore(garbage)
    with pytest.raises(StoreError, match="no such"):
        TraceStore(tmp_path / "missing.duckdb", read_only=True)


def test_fingerprint_changes_with_content(tmp_path):
    store = TraceStore(tmp_path / "t.duckdb")
    p, llm, tools = _program("a")
    store.add_programs([p], llm, tools)
    f1 = store.fingerprint()
    q, llm2, tools2 = _program("b")
    store.add_programs([q], llm2, tools2)
    assert store.fingerprint() != f1
    assert store.fingerprint().startswith("6:")


def test_a_store_locked_by_a_writer_is_read_from_a_snapshot(tmp_path):
    import subprocess
    import sys

    db = tmp_path / "busy.duckdb"
    with TraceStore(db) as store:
        prog, llm, tools = _program("p1")
        store.add_programs([prog], llm, tools)
    writer = subprocess.Popen(  # another process holds the store open for writing, as `ctk proxy` does
        [sys.executable, "-c", f"from ctk.store import TraceStore; s = TraceStore({str(db)!r}); "
         "print('open', flush=True); input()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert writer.stdout.readline().strip() == "open"
        with pytest.raises(StoreError, match=f"being written by another process \\(PID {writer.pid}"):
            TraceStore(db)
        with TraceStore(db, read_only=True) as store:
            assert store.snapshot is not None and store.counts()["tool_calls"] == 3
            snapshot = store.snapshot
        assert not snapshot.exists()  # the copy is removed on close
        res = subprocess.run(
            [sys.executable, "-m", "ctk.cli", "stats", "--db", str(db)], capture_output=True, text=True
        )
        assert res.returncode == 0 and "reading a copy taken now" in res.stderr and "ls" in res.stdout
    finally:
        writer.communicate("", timeout=30)
