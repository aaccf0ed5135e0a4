"""Fast tests of the collect building blocks: command names, instances, arrivals, writer, scripted server."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from collect_fixtures import read_table, scripted_server

from ctk.collect.arrival import ArrivalError, arrival_offsets, run_jobs
from ctk.collect.recorder import ProgramRecorder, Stamp
from ctk.collect.runner import CollectError
from ctk.collect.swebench import prepare_working_copy
from ctk.collect.writer import StoreWriter
from ctk.datasets.instances import InstanceError, find_repo_source, load_instances, load_local, select
from ctk.datasets.scripted_server import Script, ScriptError
from ctk.datasets.shell import split_command
from ctk.store import ProgramRecord, StoreError, TraceStore


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("cd /testbed && python -m pytest -q", ("cd", "python")),
        ("FOO=1 BAR=2 pytest tests/", ("FOO=1", "pytest")),
        ("timeout 30 python train.py", ("timeout", "python")),
        ("/usr/bin/git diff > patch.txt", ("/usr/bin/git", "git")),  # the program, as table keys name it
        ("./run.sh 1", ("./run.sh", "run.sh")),
        ("cd /app && . venv/bin/activate && pip install x", ("cd", "pip")),
        ("export X=1; cd a; ls -la | head", ("export", "ls")),
        ("echo 'unbalanced", ("echo", "echo")),
        ("", (None, None)),
    ],
)
def test_split_command(command: str, expected: tuple) -> None:
    assert split_command(command) == expected


def test_instances_local_bundled_and_errors(tmp_path: Path) -> None:
    rows = load_instances("bundled")
    assert len(rows) == 3 and all(Path(r["ctk_repo_path"]).is_dir() for r in rows)
    assert [r["instance_id"] for r in select(rows, "calc|interval", "0:1")] == ["ctk-samples__calc-1"]
    (tmp_path / "a.jsonl").write_text(
        '{"instance_id": "x", "problem_statement": "p", "ctk_repo_path": "r"}\n'
    )
    assert load_local(tmp_path)[0]["ctk_repo_path"] == str(tmp_path / "r")  # relative to the file
    (tmp_path / "b.json").write_text('[{"instance_id": "x", "problem_statement": "again"}]')
    with pytest.raises(InstanceError, match="appears twice"):
        load_local(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instance_id": "y", "problem_statement": "p"}\n{not json\n')
    with pytest.raises(InstanceError, match=r"bad.jsonl:2"):
        load_local(bad)
    (tmp_path / "c.json").write_text('[{"instance_id": "z"}]')
    with pytest.raises(InstanceError, match="lacks problem_statement"):
        load_local(tmp_path / "c.json")
    for spec in ("a:b", "1:2:3:4"):
        with pytest.raises(InstanceError, match="--slice"):
            select(rows, slice_spec=spec)
    with pytest.raises(InstanceError, match="--filter"):
        select(rows, filter_spec="(")
    with pytest.raises(InstanceError, match="no repository"):
        find_repo_source({"instance_id": "q", "repo": "o/n"})


def test_working_copy_from_folder_archive_and_git(tmp_path: Path) -> None:
    import shutil

    src = Path(load_instances("bundled", filter_spec="calc")[0]["ctk_repo_path"])
    wc = prepare_working_copy(src, tmp_path / "wc1")
    assert (wc / "calc" / "ops.py").exists()
    assert (
        subprocess.run(["git", "status", "--porcelain"], cwd=wc, capture_output=True, text=True).stdout == ""
    )
    archive = shutil.make_archive(str(tmp_path / "calc"), "gztar", root_dir=src.parent, base_dir=src.name)
    wc2 = prepare_working_copy(Path(archive), tmp_path / "wc2")
    assert (wc2 / "calc" / "ops.py").read_text() == (src / "calc" / "ops.py").read_text()
    # a git repository is cloned and checked out at base_commit
    (wc / "calc" / "ops.py").write_text("changed\n")
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "x"], cwd=wc, check=True
    )
    base = subprocess.run(
        ["git", "rev-parse", "HEAD~1"], cwd=wc, capture_output=True, text=True
    ).stdout.strip()
    wc3 = prepare_working_copy(wc, tmp_path / "wc3", base_commit=base)
    assert (wc3 / "calc" / "ops.py").read_text() == (src / "calc" / "ops.py").read_text()
    with pytest.raises(CollectError, match="archive"):
        (tmp_path / "x.txt").write_text("x")
        prepare_working_copy(tmp_path / "x.txt", tmp_path / "wc4")


def test_arrivals_and_job_driver() -> None:
    assert arrival_offsets(3) == [0.0, 0.0, 0.0]
    offs = arrival_offsets(4000, "poisson", rate=5.0, seed=1)
    gaps = np.diff(offs)
    assert offs[0] == 0 and gaps.mean() == pytest.approx(0.2, rel=0.05) and (gaps >= 0).all()
    with pytest.raises(ArrivalError):
        arrival_offsets(3, "poisson")
    with pytest.raises(ArrivalError):
        arrival_offsets(3, "burst")
    active, peak, lock = [0], [0], threading.Lock()

    def job(i: int):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        with lock:
            active[0] -= 1
        if i == 2:
            raise ValueError("boom")
        return i

    results, interrupted = run_jobs([(str(i), lambda i=i: job(i)) for i in range(6)], workers=2)
    assert not interrupted and peak[0] == 2
    assert sorted(r.key for r in results) == [str(i) for i in range(6)]
    assert [r.error for r in results if not r.ok] == ["ValueError: boom"]
    # jobs start at their arrival offsets
    starts: dict[str, float] = {}
    t0 = time.monotonic()
    run_jobs(
        [(k, lambda: None) for k in "abc"],
        workers=3,
        offsets=[0.0, 0.15, 0.4],
        on_start=lambda k: starts.setdefault(k, time.monotonic() - t0),
    )
    for k, offset in zip("abc", [0.0, 0.15, 0.4], strict=True):  # never early; late only by scheduling
        assert offset - 0.005 <= starts[k] <= offset + 1.0
    assert starts["a"] < starts["b"] < starts["c"]
    stop = threading.Event()
    t0 = time.monotonic()
    threading.Timer(0.2, stop.set).start()
    results, interrupted = run_jobs(
        [("a", lambda: 1), ("b", lambda: 2)], workers=1, offsets=[0, 30], stop=stop
    )
    assert interrupted and [r.key for r in results] == ["a"] and time.monotonic() - t0 < 5


def test_store_writer_keeps_order_and_reports_errors(tmp_path: Path) -> None:
    db = tmp_path / "w.duckdb"
    with StoreWriter(db) as writer:
        rec = ProgramRecorder(writer, ProgramRecord(program_id="p", source="s"))
        for _ in range(5):
            rec.next_turn()
            a = Stamp.now()
            rec.llm_call(
                a, Stamp.now(), usage={"prompt_tokens": 7, "prompt_tokens_details": {"cached_tokens": 3}}
            )
            for _ in range(3):
                rec.tool_call(Stamp.now(), Stamp.now(), command="ls", exit_status="0")
        rec.finish("done")
        ProgramRecorder(writer, ProgramRecord(program_id="p", source="s"))  # duplicate: an error, not a crash
        assert writer.flush(timeout=30)
        with pytest.raises(StoreError, match="being written by another process"):  # the writer owns it
            TraceStore(db)
    assert len(writer.errors) == 1 and "already" in writer.errors[0]
    tools, llm = read_table(db, "tool_calls"), read_table(db, "llm_calls")
    assert len(tools) == 15 and sorted(tools["call_index"].unique()) == [0, 1, 2]
    assert (tools["context_tokens"] == 7).all() and (llm["cached_tokens"] == 3).all()
    prog = read_table(db, "programs").iloc[0]
    assert prog["complete"] and prog["n_turns"] == 5 and prog["outcome"] == "done"


def test_scripted_server_turns_formats_and_errors(tmp_path: Path) -> None:
    script = {
        "programs": {"task-*": [{"commands": ["ls"]}], "t1": [{"content": "hi", "delay_s": 0.2}]},
        "default": ["pwd"],
    }
    with scripted_server(script) as srv:
        chat = srv.base_url + "/chat/completions"
        user = [{"role": "user", "content": "x"}]
        r = httpx.post(
            chat,
            json={"messages": user, "tools": [{"type": "function", "function": {"name": "bash"}}]},
            headers={"X-Session-ID": "task-7"},
        ).json()
        assert json.loads(r["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]) == {
            "command": "ls"
        }
        t0 = time.monotonic()
        r = httpx.post(chat, json={"messages": user, "session_id": "src/t1#2"})
        assert r.json()["choices"][0]["message"]["content"] == "hi" and time.monotonic() - t0 >= 0.2
        r = httpx.post(chat, json={"messages": user}).json()  # no tools offered: a fenced block
        assert "```mswea_bash_command\npwd\n```" in r["choices"][0]["message"]["content"]
        done = user + [{"role": "assistant", "content": "x"}]
        r = httpx.post(chat, json={"messages": done}).json()
        assert r["choices"][0]["message"]["content"] == "(script exhausted)"
        assert httpx.post(chat, content=b"{").status_code == 400
        assert httpx.post(chat, json={"messages": "no"}).status_code == 400
    traj = {"messages": [{"role": "assistant", "content": "a", "extra": {"actions": [{"command": "ls"}]}}]}
    (tmp_path / "x.traj.json").write_text(json.dumps(traj))
    assert Script.from_file(tmp_path / "x.traj.json").default[0].commands == ["ls"]
    for bad in ('{"programs": {"a": [{"bogus": 1}]}}', "[1]", "{"):
        (tmp_path / "bad.json").write_text(bad)
        with pytest.raises(ScriptError):
            Script.from_file(tmp_path / "bad.json")


def test_proxy_recorder_idle_finish_and_unique_ids(tmp_path: Path) -> None:
    from ctk.collect.proxy import ProxyOptions, ProxyRecorder

    db = tmp_path / "p.duckdb"
    rec = ProxyRecorder(ProxyOptions(upstream="http://x/v1", db=db, idle_finish_s=10))
    msg = {"tool_calls": [{"function": {"name": "bash", "arguments": '{"command": "make test"}'}}]}
    for _ in range(2):
        sent = Stamp.now()
        turn = rec.request_started("prog", sent)
        rec.request_finished(
            "prog",
            turn,
            sent,
            Stamp.now(),
            first_token=None,
            usage={},
            finish_reason="tool_calls",
            message=msg,
            ok=True,
        )
    assert rec.finish_idle(now=time.monotonic() + 5) == 0
    assert rec.finish_idle(now=time.monotonic() + 11) == 1
    sent = Stamp.now()  # the same client id after its program was finished: a new, unique program
    turn = rec.request_started("prog", sent)
    rec.request_finished(
        "prog",
        turn,
        sent,
        Stamp.now(),
        first_token=None,
        usage={},
        finish_reason="stop",
        message={"content": "bye"},
        ok=True,
    )
    rec.close()
    programs = read_table(db, "programs").set_index("program_id")
    assert programs.loc["prog", "outcome"] == "idle" and programs.loc["prog#2", "outcome"] == "proxy_stopped"
    tools = read_table(db, "tool_calls")
    assert list(tools["command_or_args"]) == ["make test"] and list(tools["main_program"]) == ["make"]


def test_a_killed_collections_work_folder_is_cleaned_by_the_next(tmp_path) -> None:
    import os
    import sys

    from ctk.collect.swebench import OWNER_FILE, clean_stale_workroots

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    stale = tmp_path / "ctk-collect-stale"  # its owner exited without cleaning up (SIGKILL)
    (stale / "p" / "repo").mkdir(parents=True)
    (stale / OWNER_FILE).write_text(dead.stdout.strip())
    live = tmp_path / "ctk-collect-live"  # a collection running now
    live.mkdir()
    (live / OWNER_FILE).write_text(str(os.getppid()))
    unknown = tmp_path / "ctk-collect-unknown"  # not ours to judge: no owner file
    unknown.mkdir()
    assert clean_stale_workroots(tmp_path) == 1
    assert not stale.exists() and live.exists() and unknown.exists()
