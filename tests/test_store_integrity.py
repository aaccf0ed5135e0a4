"""Nothing invented gets into the trace store (issue 25): a file's kind comes from its columns, impossible
timings are flagged (tool durations and LLM latencies by one rule), every exported table imports back
identically, and a damaged store is one error line that leaves the file as it was."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from ctk.datasets.importer import import_paths
from ctk.datasets.samples import sample_traces_dir
from ctk.store import (
    IMPOSSIBLE_DURATION_FLAG,
    TABLES,
    LLMCallRecord,
    ProgramRecord,
    ToolCallRecord,
    TraceStore,
)

SAMPLE = sample_traces_dir()


def _ctk(*args, check=True) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ctk.cli", *map(str, args)], capture_output=True, text=True, check=check
    )


def _counts(db: Path) -> dict[str, int]:
    with TraceStore(db, read_only=True) as store:
        return store.counts()


def _trajectory(path: Path, steps: list[tuple[float, str | None, float | None]]) -> Path:
    """A mini-swe-agent trajectory: per step (assistant timestamp, command, observation timestamp)."""
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "task"}]
    for ts, command, obs_ts in steps:
        actions = [{"command": command}] if command is not None else []
        messages.append({"role": "assistant", "content": "x", "extra": {"timestamp": ts, "actions": actions}})
        if obs_ts is not None:
            extra = {"timestamp": obs_ts, "returncode": 0}
            messages.append({"role": "tool", "content": "out", "extra": extra})
    messages.append({"role": "exit", "content": "", "extra": {"exit_status": "Submitted"}})
    path.write_text(json.dumps({"instance_id": path.name.split(".")[0], "messages": messages}))
    return path


# -- 1. a file's kind comes from its columns ------------------------------------------------------------


def test_file_kind_comes_from_columns_not_names(tmp_path):
    tools = pd.read_csv(SAMPLE / "tool_calls.csv.gz")
    llm = pd.read_csv(SAMPLE / "llm_calls.csv.gz")
    mine = tmp_path / "mytraces.csv.gz"  # a tool-calls table not named tool_calls*: not read twice
    shutil.copy(SAMPLE / "tool_calls.csv.gz", mine)
    with TraceStore(tmp_path / "a.duckdb") as store:
        got = import_paths(store, [mine])
        assert (got.tool_calls_added, got.llm_calls_added) == (len(tools), 0)
        assert store.counts()["llm_calls"] == 0
    copy = tmp_path / "llmcopy.csv.gz"  # LLM calls, even with --format agent-traces-csv: never tool calls
    shutil.copy(SAMPLE / "llm_calls.csv.gz", copy)
    with TraceStore(tmp_path / "b.duckdb") as store:
        got = import_paths(store, [copy], fmt="agent-traces-csv")
        assert (got.tool_calls_added, got.llm_calls_added) == (0, len(llm))
    with TraceStore(tmp_path / "c.duckdb") as store:  # named otherwise, passed together: joined by program
        got = import_paths(store, [mine, copy])
        assert (got.tool_calls_added, got.llm_calls_added) == (len(tools), len(llm))
        assert got.programs_added == len(set(tools["program_id"]) | set(llm["program_id"]))


# -- 2, 3. impossible timings: trajectories, LLM latencies, step-wise writes -------------------------------


def test_a_trajectory_keeps_a_negative_duration_flagged_impossible(tmp_path):
    traj = _trajectory(
        tmp_path / "t1.traj.json",
        [(100.0, "ls", 95.0), (-1e300, "cat f", 101.0), (102.0, "echo done", None)],
    )
    db = tmp_path / "t.duckdb"
    out = _ctk("import", traj, "--db", db).stdout
    assert out.split("impossible tool durations (flagged, not used)")[1].split()[1] == "2"  # turns 1, 2
    assert out.split("impossible LLM latencies (flagged, not used)")[1].split()[1] == "1"
    with TraceStore(db, read_only=True) as store:
        tools = store.table("tool_calls").set_index("turn_index")
        llm = store.table("llm_calls").set_index("turn_index")
        usable = store.tool_calls()
    assert tools.loc[1, "duration_s"] == -5.0  # as measured, not invented as 0.0
    assert tools.loc[1, "quality_flag"] == IMPOSSIBLE_DURATION_FLAG
    assert llm.loc[2, "latency_s"] < -1e299 and llm.loc[2, "quality_flag"] == IMPOSSIBLE_DURATION_FLAG
    assert tools.loc[2, "quality_flag"] == IMPOSSIBLE_DURATION_FLAG  # 101 - (-1e300)
    assert set(usable["turn_index"]) == set()  # turn 3 is the submit step: no duration


def test_llm_latencies_are_checked_like_tool_durations(tmp_path):
    rows = ["source,program_id,turn_index,tool_name,main_program,command_or_args,duration_s"]
    rows += [f"s,p0,{i},bash,ls,ls,1.0" for i in range(6)]
    (tmp_path / "tool_calls.csv").write_text("\n".join(rows) + "\n")
    latencies = ["-5", "inf", "1e300", "-0.001", "2.5", ""]
    llm = ["source,program_id,turn_index,duration_s,prompt_tokens"]
    llm += [f"s,p0,{i},{x},100" for i, x in enumerate(latencies)]
    (tmp_path / "llm_calls.csv").write_text("\n".join(llm) + "\n")
    db = tmp_path / "t.duckdb"
    out = _ctk("import", tmp_path / "tool_calls.csv", "--db", db).stdout
    assert out.split("impossible LLM latencies (flagged, not used)")[1].split()[1] == "4"
    with TraceStore(db, read_only=True) as store:
        flags = store.table("llm_calls").set_index("turn_index")["quality_flag"]
    assert (flags.loc[[0, 1, 2, 3]] == IMPOSSIBLE_DURATION_FLAG).all()
    assert (flags.loc[[4, 5]] == "ok").all()  # a missing latency is "not measured", not impossible


def test_step_wise_writes_flag_impossible_timings(tmp_path):
    with TraceStore(tmp_path / "t.duckdb") as store:
        store.begin_program(ProgramRecord(program_id="p", source="s"))
        store.add_llm_call(LLMCallRecord(program_id="p", turn_index=0, source="s", latency_s=-1.0))
        store.add_llm_call(LLMCallRecord(program_id="p", turn_index=1, source="s", latency_s=1.0, ttft_s=-2))
        store.add_llm_call(LLMCallRecord(program_id="p", turn_index=2, source="s", latency_s=1.0, ttft_s=0.1))
        store.add_tool_call(ToolCallRecord("p", 0, "s", "bash", "ls", "ls", duration_s=float("inf")))
        store.add_tool_call(ToolCallRecord("p", 1, "s", "bash", "ls", "ls", duration_s=0.5))
        llm = store.table("llm_calls")["quality_flag"].tolist()
        tools = store.table("tool_calls")["quality_flag"].tolist()
    assert llm == [IMPOSSIBLE_DURATION_FLAG, IMPOSSIBLE_DURATION_FLAG, "ok"]
    assert tools == [IMPOSSIBLE_DURATION_FLAG, "ok"]


# -- 4. every table ctk export writes imports back identically -----------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_every_exported_table_imports_back_identically(tmp_path, suffix):
    db = tmp_path / "a.duckdb"
    trajs = tmp_path / "trajs"
    trajs.mkdir()
    _trajectory(trajs / "x.traj.json", [(10.0, "ls", 10.5), (12.0, "NA", 11.0), (13.0, "echo", None)])
    _ctk("import", SAMPLE, trajs, "--db", db)
    out = tmp_path / "export"
    for table in TABLES:
        _ctk("export", "--db", db, "--table", table, "-o", out / f"{table}{suffix}")
    db2 = tmp_path / "b.duckdb"
    _ctk("import", out, "--db", db2)
    with TraceStore(db, read_only=True) as a, TraceStore(db2, read_only=True) as b:
        for table in ("programs", "llm_calls", "tool_calls"):
            pd.testing.assert_frame_equal(a.table(table), b.table(table), obj=table)
        runs_a, runs_b = a.table("runs"), b.table("runs")
        assert a.table("llm_calls")["latency_s"].notna().sum() > 1000  # the timings the old import lost
    merged = runs_b.merge(runs_a, how="inner")  # every original run is back, beside the import's own
    assert len(merged) == len(runs_a) and len(runs_b) == len(runs_a) + 1


# -- 5. a damaged store: one error line, non-zero exit, the file as it was ------------------------------


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def damaged_stores(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("damaged")
    good = tmp / "good.duckdb"
    _ctk("import", SAMPLE, "--db", good)
    truncated = tmp / "truncated.duckdb"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size * 2 // 5])
    dropped = tmp / "dropped.duckdb"
    shutil.copy(good, dropped)
    con = duckdb.connect(str(dropped))
    con.execute("DROP TABLE llm_calls")
    con.close()
    return {"truncated": truncated, "dropped": dropped, "csv": SAMPLE / "tool_calls.csv.gz"}


COMMANDS = {
    "stats": ["stats", "--db", "{db}"],
    "import": ["import", "{csv}", "--db", "{db}"],
    "train": ["train", "--db", "{db}", "-o", "{tmp}/m.pkl", "--predictor", "histogram"],
    "export": ["export", "--db", "{db}", "--table", "tool_calls", "-o", "{tmp}/x.csv"],
    # the truncated store's llm_calls rows lie before the cut and export whole; the dropped table cannot
    "export-llm": ["export", "--db", "{db}", "--table", "llm_calls", "-o", "{tmp}/x.csv"],
}
CASES = [(d, c) for d in ("truncated", "dropped") for c in COMMANDS if (d, c) != ("truncated", "export-llm")]


@pytest.mark.parametrize(("damage", "command"), CASES, ids=[f"{d}-{c}" for d, c in CASES])
def test_a_damaged_store_is_one_line_and_left_as_it_was(damaged_stores, tmp_path, damage, command):
    db = tmp_path / f"{damage}.duckdb"
    shutil.copy(damaged_stores[damage], db)
    before = _md5(db)
    args = [a.format(db=db, csv=damaged_stores["csv"], tmp=tmp_path) for a in COMMANDS[command]]
    res = _ctk(*args, check=False)
    lines = res.stderr.strip().splitlines()
    assert res.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert str(db) in lines[0] and "damaged" in lines[0], lines[0]
    assert _md5(db) == before
    assert not (tmp_path / "m.pkl").exists() and not (tmp_path / "x.csv").exists()


def test_a_sound_store_passes_verify(tmp_path):
    with TraceStore(tmp_path / "t.duckdb") as store:
        import_paths(store, [SAMPLE])
        store.verify()
        assert np.all(np.array(list(store.counts().values())) > 0)


# -- 10. messages that say what is wrong, in one line ----------------------------------------------------


def test_a_bad_import_is_one_line_naming_the_missing_columns(tmp_path):
    wrong = tmp_path / "tool_calls.csv"
    wrong.write_text("source,program_id,turn_index,tool_name\ns,p,1,ls\n")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    db = tmp_path / "t.duckdb"
    for path, says in [(wrong, "not a tool-calls table: missing column(s) duration_s"), (empty, "empty")]:
        res = _ctk("import", path, "--db", db, check=False)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 1 and len(lines) == 1, lines
        assert lines[0].startswith("error: nothing imported"), lines
        assert str(path) in lines[0] and says in lines[0], lines
        assert not db.exists()
