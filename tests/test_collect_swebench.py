"""`ctk collect swebench --env local`: mini-swe-agent driven by the scripted model over real HTTP."""

from __future__ import annotations

import copy
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from collect_fixtures import COLLECT_ENV, CTK, bundled_script_dict, read_table, scripted_server

from ctk.collect.arrival import arrival_offsets
from ctk.collect.runner import collect
from ctk.collect.swebench import SwebenchCollector, SwebenchOptions
from ctk.datasets.instances import load_instances

CALC = "ctk-samples__calc-1"
#: A 0.3 s command that prints its own start and end (wall clock) from inside the shell.
SLEEP = "date +%s.%N && sleep 0.3 && date +%s.%N"


def _timing_script() -> dict:
    """The bundled solutions, with a `sleep 0.3` step and a two-command turn added to calc."""
    script = bundled_script_dict()
    turns = script["programs"][CALC]
    turns.insert(1, {"content": "THOUGHT: wait for the build.", "commands": [SLEEP]})
    turns.insert(2, {"content": "THOUGHT: two at once.", "commands": ["sleep 0.1; exit 3", "echo hi"]})
    turns.insert(3, {"content": "THOUGHT: this one hangs.", "commands": ["sleep 5"]})
    return script


def test_collect_bundled_local_records_every_call_with_true_durations(tmp_path: Path) -> None:
    script = _timing_script()
    db, traj = tmp_path / "t.duckdb", tmp_path / "traj"
    with scripted_server(script) as srv:
        proc = subprocess.run(
            [
                *CTK,
                "collect",
                "swebench",
                "--db",
                str(db),
                "--base-url",
                srv.base_url,
                "--model",
                "scripted",
                "--instances",
                "bundled",
                "--env",
                "local",
                "--workers",
                "1",
                "--timeout",
                "1",
                "--traj-dir",
                str(traj),
            ],
            env=COLLECT_ENV,
            capture_output=True,
            text=True,
            timeout=300,
        )
        seen = srv.requests()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Provider List" not in proc.stdout + proc.stderr  # no litellm banner per call
    programs = read_table(db, "programs").set_index("task_id")
    llm = read_table(db, "llm_calls")
    tools = read_table(db, "tool_calls")

    assert set(programs.index) == {CALC, "ctk-samples__wordcount-1", "ctk-samples__intervals-1"}
    assert programs["complete"].all() and (programs["outcome"] == "Submitted").all()
    for task, row in programs.iterrows():
        turns = script["programs"][task]
        pid = row["program_id"]
        p_llm = llm[llm.program_id == pid].sort_values("turn_index")
        p_tools = tools[tools.program_id == pid].sort_values(["turn_index", "call_index"])
        # every request the server answered is one recorded LLM call, every scripted command one tool call
        assert len(p_llm) == len([r for r in seen if r["program"] == pid]) == len(turns) == row["n_turns"]
        assert list(p_tools["command_or_args"]) == [c for t in turns for c in t["commands"]]
        assert list(p_llm["finish_reason"]) == ["tool_calls"] * len(turns)
        assert (p_llm["prompt_tokens"] > 0).all() and (p_llm["latency_s"] > 0).all()
        # prompts grow turn by turn (the observation is appended)
        assert p_llm["prompt_tokens"].is_monotonic_increasing
        # a tool call starts after its LLM call finished
        merged = p_tools.merge(p_llm, on="turn_index")
        assert (merged["start_unix_s"] >= merged["finished_unix_s"] - 1e-3).all()
        assert (merged["context_tokens"] == merged["prompt_tokens"]).all()
        final = p_tools[p_tools.is_final]
        assert len(final) == 1 and final.iloc[0]["command_or_args"].startswith("echo COMPLETE_TASK")
        assert final.iloc[0]["turn_index"] == len(turns) - 1

    calc = tools[tools.program_id == programs.loc[CALC, "program_id"]].set_index("command_or_args")
    # the recorded interval brackets the command's own [start, end] stamps (the command ran 0.3 s) and
    # exceeds it only by shell start-up + recording: ~10 ms on an idle machine (bench/collect_overhead.py
    # reports the precision); the bound here tolerates a loaded CI machine
    traj_msgs = json.loads((traj / f"collect-swebench__{CALC}.traj.json").read_text())["messages"]
    out = next(
        m["extra"]["raw_output"]
        for m in traj_msgs
        if m["role"] == "tool"
        and "." in m["extra"]["raw_output"]
        and len(m["extra"]["raw_output"].split()) == 2
    )
    inner_start, inner_end = (float(x) for x in out.split())
    rec = calc.loc[SLEEP]
    assert rec["start_unix_s"] - 1e-3 <= inner_start < inner_end <= rec["end_unix_s"] + 1e-3
    assert inner_end - inner_start >= 0.3
    assert rec["duration_s"] - (inner_end - inner_start) <= 0.1
    assert rec["duration_s"] == pytest.approx(rec["end_unix_s"] - rec["start_unix_s"], abs=2e-3)
    # the two commands of one turn are timed one by one (bounds loose enough for a loaded 2-core machine)
    two = calc.loc[["sleep 0.1; exit 3", "echo hi"]]
    assert 0.1 <= two.iloc[0]["duration_s"] < 1.0
    assert two.iloc[0]["end_unix_s"] <= two.iloc[1]["start_unix_s"] + 1e-3
    assert calc.loc["sleep 0.1; exit 3", "exit_status"] == "3"
    assert calc.loc["echo hi", "call_index"] == 1 and calc.loc["echo hi", "output_chars"] == 3
    assert calc.loc[SLEEP, "main_program"] == "date"
    # the harness killed the hanging command after --timeout 1: a censored duration
    assert calc.loc["sleep 5", "exit_status"] == "timeout" and calc.loc["sleep 5", "censored"]
    assert 1.0 <= calc.loc["sleep 5", "duration_s"] <= 3.0  # killed at 1 s, far short of its 5 s
    assert not tools[tools.command_or_args != "sleep 5"]["censored"].any()

    # the program identity reached the endpoint on every request, with the turn index
    for r in seen:
        assert r["header_session_id"] == r["body_session_id"] == r["vllm_xargs"]["program_id"] == r["program"]
    calc_turns = [r["vllm_xargs"]["turn_index"] for r in seen if r["program"].endswith(CALC)]
    assert calc_turns == list(range(len(script["programs"][CALC])))

    # the agent really fixed the bug in its working copy: the submitted patch is the fix
    sub = json.loads((traj / f"collect-swebench__{CALC}.traj.json").read_text())["info"]["submission"]
    assert "+    return sum(values) / len(values)" in sub


def test_kill_mid_run_then_resume_completes_without_duplicates(tmp_path: Path) -> None:
    script = bundled_script_dict()
    for turns in script["programs"].values():
        turns.insert(1, {"content": "slow step", "commands": ["sleep 0.4"]})
    db = tmp_path / "t.duckdb"
    args = [*CTK, "collect", "swebench", "--db", str(db), "--model", "scripted", "--instances", "bundled"]
    with scripted_server(script) as srv:
        proc = subprocess.Popen(
            [*args, "--base-url", srv.base_url],
            env=COLLECT_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # kill inside the second program, a few steps in
            second = [r for r in srv.requests() if r["program"].endswith("wordcount-1")]
            if len(second) >= 3:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        n_before = len(srv.requests())
        assert n_before >= 3 + len(script["programs"][CALC])

        again = subprocess.run(
            [*args, "--base-url", srv.base_url], env=COLLECT_ENV, capture_output=True, text=True, timeout=120
        )
        assert again.returncode == 2 and "--resume" in again.stderr  # never silently duplicates

        resumed = subprocess.run(
            [*args, "--base-url", srv.base_url, "--resume"],
            env=COLLECT_ENV,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        second_run = srv.requests()[n_before:]
    assert "1 already complete" in resumed.stdout and "1 unfinished redone" in resumed.stdout
    # the program finished before the kill was not run again
    assert not [r for r in second_run if r["program"].endswith(CALC)]
    programs = read_table(db, "programs")
    llm, tools = read_table(db, "llm_calls"), read_table(db, "tool_calls")
    assert len(programs) == 3 and programs["complete"].all()
    for _, row in programs.iterrows():
        turns = script["programs"][row["task_id"]]
        assert (llm.program_id == row["program_id"]).sum() == len(turns)
        assert (tools.program_id == row["program_id"]).sum() == sum(len(t["commands"]) for t in turns)
    assert not llm.duplicated(["program_id", "turn_index"]).any()


def test_poisson_arrivals_and_step_limit_hint(tmp_path: Path) -> None:
    script = copy.deepcopy(bundled_script_dict())
    rows = load_instances("bundled")
    with scripted_server(script) as srv:
        opts = SwebenchOptions(
            db=tmp_path / "p.duckdb",
            base_url=srv.base_url,
            model="scripted",
            workers=3,
            arrival="poisson",
            rate=1.0,
            seed=3,
            step_limit=3,
        )
        started: list[float] = []
        on_start = lambda key: started.append(time.monotonic())  # noqa: E731
        summary = collect(SwebenchCollector(opts), rows, on_start=on_start)
        seen = srv.requests()
    assert summary.completed == 3 and summary.outcomes == {"LimitsExceeded": 3}
    # the step limit makes the third call the known last turn
    assert [r["vllm_xargs"].get("last_turn") for r in seen if r["program"].endswith(CALC)] == [None, None, 1]
    # programs start at the Poisson arrival times (not all at once, although 3 workers are free)
    offsets = arrival_offsets(3, "poisson", 1.0, seed=3)
    assert offsets[2] > 0.4
    assert started[-1] - started[0] >= offsets[-1] - 0.2  # (exact timing: test_collect_units)
    progs = read_table(tmp_path / "p.duckdb", "programs")
    assert (progs["n_turns"] == 3).all() and (progs["outcome"] == "LimitsExceeded").all()


def test_ctrl_c_keeps_every_finished_step(tmp_path: Path) -> None:
    script = bundled_script_dict()
    for turns in script["programs"].values():
        turns.insert(1, {"content": "slow step", "commands": ["sleep 0.4"]})
    db = tmp_path / "i.duckdb"
    with scripted_server(script) as srv:
        proc = subprocess.Popen(
            [
                *CTK,
                "collect",
                "swebench",
                "--db",
                str(db),
                "--base-url",
                srv.base_url,
                "--instances",
                "bundled",
            ],
            env=COLLECT_ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 120
        while len(srv.requests()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        n_requests = len(srv.requests())
    assert proc.returncode == 130, out + err
    assert "1 unfinished program(s) stay marked incomplete" in err
    programs, llm = read_table(db, "programs"), read_table(db, "llm_calls")
    assert len(programs) == 1 and not programs.iloc[0]["complete"]
    # the step in flight was finished and recorded; nothing answered by the model was lost
    assert len(llm) == n_requests
    tools = read_table(db, "tool_calls")
    assert set(tools["turn_index"]) == set(range(n_requests))
    # the progress bar and the summary agree: the stopped program is not "failed", its calls are counted
    assert "failed 1" not in out + err and "0 failed" in out
    assert f"{len(llm)} LLM calls, {len(tools)} tool calls" in out


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        (["--url", "http://127.0.0.1:1/v1"], "no server answers"),
        (["--model", "my-model"], "names no provider"),  # no --url: litellm cannot place it
    ],
)
def test_bad_endpoint_fails_at_once_in_one_line(tmp_path: Path, endpoint, expected) -> None:
    env = {k: v for k, v in COLLECT_ENV.items() if k != "MSWEA_MODEL_RETRY_STOP_AFTER_ATTEMPT"}
    db = tmp_path / "e.duckdb"
    t0 = time.monotonic()
    proc = subprocess.run(
        [*CTK, "collect", "swebench", "--db", str(db), "--instances", "bundled", *endpoint],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert time.monotonic() - t0 < 30  # was: 282 s of retries per program
    assert proc.returncode == 2 and expected in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not db.exists()
