"""`ctk import`, `ctk stats`, `ctk export` on real data: the shared CSV and real mini-swe-agent runs."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from ctk.datasets.importer import import_paths
from ctk.datasets.samples import sample_traces_dir
from ctk.store import TraceStore
from tests.mswea_runs import SUBMIT, run_agent


def _ctk(*args, check=True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ctk.cli", *map(str, args)], capture_output=True, text=True, check=check, **kw
    )


def test_stats_match_pandas_on_shared_csv(tmp_path, shared_traces):
    db = tmp_path / "t.duckdb"
    _ctk("import", shared_traces, "--db", db)
    got = pd.DataFrame(json.loads(_ctk("stats", "--db", db, "--json").stdout))

    csv = pd.read_csv(shared_traces / "tool_calls.csv")
    csv = csv[csv["quality_flag"] != "implausible_lt_2ms"]
    g = csv.groupby(["source", "main_program"], dropna=False)["duration_s"]
    want = pd.DataFrame(
        {"n": g.size(), "p50_s": g.quantile(0.5), "p90_s": g.quantile(0.9), "p99_s": g.quantile(0.99)}
    ).reset_index()
    merged = want.merge(
        got, on=["source", "main_program"], suffixes=("_pd", "_ctk"), how="outer", indicator=True
    )
    assert (merged["_merge"] == "both").all(), merged[merged["_merge"] != "both"]
    assert (merged["n_pd"] == merged["n_ctk"]).all()
    for q in ("p50_s", "p90_s", "p99_s"):
        np.testing.assert_allclose(merged[f"{q}_ctk"], merged[f"{q}_pd"], rtol=1e-9, atol=1e-12)
    # censored rows stay censored
    store = TraceStore(db, read_only=True)
    tools = store.table("tool_calls")
    assert int(tools["censored"].sum()) == int(
        (pd.read_csv(shared_traces / "tool_calls.csv")["quality_flag"] == "timeout_censored").sum()
    )
    assert store.counts()["llm_calls"] == len(pd.read_csv(shared_traces / "llm_calls.csv"))


def test_bundled_sample_imports_idempotently(tmp_path):
    store = TraceStore(tmp_path / "t.duckdb")
    first = import_paths(store, [sample_traces_dir()])
    assert first.programs_added > 100 and first.tool_calls_added > 1000 and not first.skipped_files
    again = import_paths(store, [sample_traces_dir()])
    assert again.programs_added == 0 and again.programs_already_present == first.programs_added
    assert store.counts()["tool_calls"] == first.tool_calls_added


def test_mini_swe_agent_run_imports_with_exact_durations(tmp_path):
    work = tmp_path / "repo"
    work.mkdir()
    (work / "calc.py").write_text("def add(a, b):\n    return a - b\n")
    trajs = tmp_path / "trajs"
    commands = [
        "ls",
        "sleep 0.3",
        "sed -i 's/a - b/a + b/' calc.py && python3 -c 'import calc; print(calc.add(2, 3))'",
        "exit 3",
        "sleep 5",
        SUBMIT,
    ]
    data = run_agent(work, commands, trajs / "task1" / "task1.traj.json", timeout_s=1)
    assert (work / "calc.py").read_text().count("a + b") == 1  # the commands really ran

    # a truncated copy and a garbage file beside the good one: reported and skipped, the good one lands
    raw = (trajs / "task1" / "task1.traj.json").read_text()
    (trajs / "broken.traj.json").write_text(raw[: len(raw) // 2])
    (trajs / "empty.traj.json").write_text(json.dumps({"messages": "nope"}))
    db = tmp_path / "t.duckdb"
    out = _ctk("import", trajs, "--db", db)
    assert "broken.traj.json" in out.stderr and "not valid JSON" in out.stderr
    assert "empty.traj.json" in out.stderr

    store = TraceStore(db, read_only=True)
    assert store.counts()["programs"] == 1
    tools = store.table("tool_calls").sort_values("turn_index").reset_index(drop=True)
    msgs = data["messages"]
    assistants = [m for m in msgs if m["role"] == "assistant"]
    observations = [m for m in msgs if m["role"] == "tool"]
    assert len(tools) == len(commands)
    for i in range(len(commands) - 1):  # exact: observation stamp minus assistant stamp
        want = observations[i]["extra"]["timestamp"] - assistants[i]["extra"]["timestamp"]
        assert tools.loc[i, "duration_s"] == pytest.approx(want, abs=1e-6)
    assert tools.loc[1, "duration_s"] == pytest.approx(0.3, abs=0.05)
    assert tools.loc[1, "main_program"] == "sleep"
    assert tools.loc[3, "exit_status"] == "3"
    assert bool(tools.loc[4, "censored"]) and tools.loc[4, "quality_flag"] == "timeout_censored"
    assert tools.loc[4, "duration_s"] == pytest.approx(1.0, abs=0.3)
    final = tools.loc[len(commands) - 1]
    assert bool(final["is_final"]) and pd.isna(final["duration_s"])
    prog = store.table("programs").iloc[0]
    assert prog["outcome"] == "Submitted" and prog["n_turns"] == len(commands)
    llm = store.table("llm_calls")
    assert llm["latency_s"].iloc[1:].notna().all()

    store.close()  # DuckDB: one process may write, and only while no other has the file open

    # re-import adds nothing
    _ctk("import", trajs, "--db", db)
    assert TraceStore(db, read_only=True).counts()["tool_calls"] == len(commands)


def _synthetic_csv(path, n_programs: int, calls: int) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    n = n_programs * calls
    df = pd.DataFrame(
        {
            "source": "synthetic",
            "program_id": np.repeat([f"p{i:06d}" for i in range(n_programs)], calls),
            "turn_index": np.tile(np.arange(calls), n_programs),
            "tool_name": "python3",
            "main_program": "python3",
            "command_or_args": "python3 x.py",
            "duration_s": rng.lognormal(-1, 2, n),
            "quality_flag": "ok",
            "exit_status": "0",
        }
    )
    df.to_csv(path, index=False)
    return df


def _signal_after_commits(proc: subprocess.Popen, sig: int, n: int) -> None:
    """Send ``sig`` to a ``ctk import -v`` once it has reported ``n`` committed batches."""
    commits = 0
    for line in proc.stderr:
        commits += line.startswith("committed")
        if commits >= n:
            proc.send_signal(sig)
            return


def test_killed_import_keeps_every_committed_program(tmp_path):
    src = tmp_path / "csv"
    src.mkdir()
    df = _synthetic_csv(src / "tool_calls.csv", n_programs=6000, calls=10)
    db = tmp_path / "t.duckdb"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ctk.cli",
            "import",
            str(src),
            "--db",
            str(db),
            "--batch-programs",
            "20",
            "-v",
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    _signal_after_commits(proc, signal.SIGKILL, 3)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the import finished before it could be killed"

    store = TraceStore(db)
    per_program = store.query("SELECT program_id, count(*) AS n FROM tool_calls GROUP BY program_id")
    assert len(per_program) >= 60 and len(per_program) < 6000
    assert (per_program["n"] == 10).all()  # every committed program is whole
    assert store.counts()["programs"] == len(per_program)
    store.close()
    _ctk("import", src, "--db", db, "--batch-programs", "2000")  # the rerun completes the rest
    store = TraceStore(db, read_only=True)
    assert store.counts()["tool_calls"] == len(df)


def test_export_roundtrip_csv_and_parquet(tmp_path):
    db = tmp_path / "t.duckdb"
    _ctk("import", sample_traces_dir(), "--db", db)
    out_csv = tmp_path / "exp" / "tool_calls.csv"
    _ctk("export", "--db", db, "--table", "tool_calls", "-o", out_csv)
    exported = pd.read_csv(out_csv)
    for col in [
        "source",
        "program_id",
        "turn_index",
        "tool_name",
        "main_program",
        "command_or_args",
        "duration_s",
        "quality_flag",
        "exit_status",
    ]:
        assert col in exported.columns
    original = pd.read_csv(sample_traces_dir() / "tool_calls.csv.gz")
    assert len(exported) == len(original)
    np.testing.assert_allclose(np.sort(exported["duration_s"]), np.sort(original["duration_s"]))
    # what ctk exports, ctk imports again with the same statistics
    db2 = tmp_path / "t2.duckdb"
    _ctk("import", out_csv, "--db", db2)
    s1 = TraceStore(db, read_only=True).stats()
    s2 = TraceStore(db2, read_only=True).stats()
    pd.testing.assert_frame_equal(s1.reset_index(drop=True), s2.reset_index(drop=True))
    pq = tmp_path / "programs.parquet"
    _ctk("export", "--db", db, "--table", "programs", "-o", pq)
    assert len(pd.read_parquet(pq)) == TraceStore(db, read_only=True).counts()["programs"]


def test_cli_errors_are_clear(tmp_path):
    missing = _ctk("stats", "--db", tmp_path / "none.duckdb", check=False)
    assert (
        missing.returncode == 2
        and "no such trace store" in missing.stderr
        and "Traceback" not in missing.stderr
    )
    bad = tmp_path / "bad.duckdb"
    bad.write_bytes(b"\x00garbage" * 500)
    res = _ctk("stats", "--db", bad, check=False)
    assert res.returncode == 2 and "cannot open" in res.stderr and "Traceback" not in res.stderr
    res = _ctk("export", "--db", bad, "-o", tmp_path / "x.txt", check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    res = _ctk("import", tmp_path / "nothing-here", "--db", tmp_path / "n.duckdb", check=False)
    assert res.returncode == 2 and "no such file" in res.stderr
    assert not (tmp_path / "n.duckdb").exists()
    shutil.rmtree(tmp_path / "n.duckdb", ignore_errors=True)


def test_import_of_nothing_fails_and_creates_no_store(tmp_path):
    good = tmp_path / "tool_calls.csv"
    _synthetic_csv(good, n_programs=3, calls=2)
    empty = tmp_path / "tool_calls_empty.csv"
    empty.write_text("")
    wrong = tmp_path / "tool_calls_wrong.csv"
    wrong.write_text("a,b\n1,2\n")
    truncated = tmp_path / "tool_calls_truncated.csv"
    truncated.write_bytes(good.read_bytes()[:25])
    db = tmp_path / "new.duckdb"
    for paths in ([tmp_path / "typo.csv"], [good, tmp_path / "typo.csv"], [empty], [wrong], [truncated]):
        res = _ctk("import", *paths, "--db", db, "--format", "agent-traces-csv", check=False)
        assert res.returncode != 0, (paths, res.stderr)
        assert "error:" in res.stderr and "Traceback" not in res.stderr, res.stderr
        assert not db.exists(), paths
    # a store that already exists is left as it was
    _ctk("import", good, "--db", db)
    before = TraceStore(db, read_only=True).counts()
    res = _ctk("import", wrong, "--db", db, "--format", "agent-traces-csv", check=False)
    assert res.returncode == 1 and "unchanged" in res.stderr
    assert TraceStore(db, read_only=True).counts() == before


def test_impossible_durations_are_flagged_and_never_used(tmp_path):
    csv = tmp_path / "tool_calls.csv"
    bad = ["-5", "-0.0001", "inf", "-inf", "1e300"]
    good = [0.5, 1.0, 2.0, 4.0]
    rows = ["source,program_id,turn_index,tool_name,main_program,command_or_args,duration_s"]
    rows += [f"s,p{i % 2},{i},bash,cat,cat f{i},{d}" for i, d in enumerate([*bad, *map(str, good)])]
    csv.write_text("\n".join(rows) + "\n")
    db = tmp_path / "t.duckdb"
    res = _ctk("import", csv, "--db", db)
    assert "impossible durations (flagged, not used)" in res.stdout
    assert res.stdout.split("impossible durations (flagged, not used)")[1].split()[1] == str(len(bad))
    with TraceStore(db, read_only=True) as store:
        assert store.counts()["tool_calls"] == len(bad) + len(good)  # stored, flagged: nothing is lost
        usable = store.tool_calls()  # what every predictor reads
        assert sorted(usable["duration_s"]) == good
        stats = store.stats()
    assert stats["n"].tolist() == [len(good)] and np.isclose(stats["p99_s"].iloc[0], np.quantile(good, 0.99))
    js = json.loads(_ctk("stats", "--db", db, "--json").stdout)
    assert js[0]["p99_s"] < 5


def test_stats_shows_a_missing_main_program_as_a_dash(tmp_path):
    csv = tmp_path / "tool_calls.csv"
    csv.write_text("source,program_id,turn_index,tool_name,main_program,command_or_args,duration_s\n"
                   "s,p0,0,bash,,,1.0\ns,p0,1,bash,ls,ls,2.0\n")
    db = tmp_path / "t.duckdb"
    _ctk("import", csv, "--db", db)
    out = _ctk("stats", "--db", db).stdout
    assert "nan" not in out and "None" not in out
    assert any(line.split("│")[2].strip() == "-" for line in out.splitlines() if line.count("│") > 3)


def test_export_to_an_unwritable_path_is_one_line(tmp_path):
    db = tmp_path / "t.duckdb"
    _ctk("import", sample_traces_dir(), "--db", db)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    res = _ctk("export", "--db", db, "-o", blocker / "sub" / "x.csv", check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().startswith("error: cannot write") and len(res.stderr.strip().splitlines()) == 1


def test_ctrl_c_during_import_exits_130_and_keeps_committed_programs(tmp_path):
    src = tmp_path / "csv"
    src.mkdir()
    df = _synthetic_csv(src / "tool_calls.csv", n_programs=3000, calls=10)
    db = tmp_path / "t.duckdb"
    args = [sys.executable, "-m", "ctk.cli", "import", src, "--db", db, "--batch-programs", "20", "-v"]
    proc = subprocess.Popen([*map(str, args)], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    _signal_after_commits(proc, signal.SIGINT, 3)
    rest = proc.stderr.read()
    proc.wait(timeout=60)
    assert proc.returncode == 130, rest
    assert "Traceback" not in rest and "interrupted" in rest, rest
    with TraceStore(db, read_only=True) as store:
        per_program = store.query("SELECT program_id, count(*) AS n FROM tool_calls GROUP BY program_id")
    assert 60 <= len(per_program) < 3000 and (per_program["n"] == 10).all()
    _ctk("import", src, "--db", db, "--batch-programs", "3000")  # the rerun adds the rest
    with TraceStore(db, read_only=True) as store:
        assert store.counts()["tool_calls"] == len(df)
