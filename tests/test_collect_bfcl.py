"""`ctk collect bfcl`: shipped multi-turn tasks, scripted model over real HTTP, bfcl-eval's simulated APIs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from collect_fixtures import COLLECT_ENV, CTK, read_table, scripted_server

from ctk.collect.bfcl import (
    BfclCollector,
    BfclOptions,
    LatencySampler,
    call_string,
    ground_truth_script,
    load_entries,
    parse_call_string,
    to_openai_tools,
)
from ctk.collect.runner import CollectError, collect

IDS = r"^multi_turn_(base_(0|1)|miss_func_0)$"


@pytest.fixture(scope="module")
def entries() -> list[dict]:
    return load_entries(["base", "miss_func"], filter_spec=IDS)


def test_entries_tools_and_call_strings(entries: list[dict]) -> None:
    assert [e["id"] for e in entries] == ["multi_turn_base_0", "multi_turn_base_1", "multi_turn_miss_func_0"]
    miss = entries[2]
    held = [f["name"] for docs in miss["missed_docs"].values() for f in docs]
    assert held and not set(held) & {f["name"] for f in miss["function"]}
    tools = to_openai_tools(entries[0]["function"])
    blob = json.dumps(tools)
    assert '"dict"' not in blob and '"float"' not in blob
    assert tools[0]["function"]["parameters"]["type"] == "object"
    assert parse_call_string("sort('a.pdf')", entries[0]["function"]) == ("sort", {"file_name": "a.pdf"})
    assert call_string("mv", {"source": "a'b", "destination": "t"}) == "mv(source=\"a'b\", destination='t')"
    with pytest.raises(ValueError):
        call_string("os.system", {})


def test_collect_bfcl_records_turns_and_honours_injected_latency(tmp_path: Path, entries: list[dict]) -> None:
    script = ground_truth_script(entries)
    db = tmp_path / "b.duckdb"
    with scripted_server(script) as srv:
        proc = subprocess.run(
            [
                *CTK,
                "collect",
                "bfcl",
                "--db",
                str(db),
                "--base-url",
                srv.base_url,
                "--model",
                "scripted",
                "--category",
                "base",
                "--category",
                "miss_func",
                "--filter",
                IDS,
                "--tool-latency",
                "const:0.15",
                "--workers",
                "2",
            ],
            env=COLLECT_ENV,
            capture_output=True,
            text=True,
            timeout=300,
        )
        seen = srv.requests()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    programs, llm, tools = (read_table(db, t) for t in ("programs", "llm_calls", "tool_calls"))
    assert len(programs) == 3 and programs["complete"].all() and (programs["outcome"] == "completed").all()
    for e in entries:
        pid = f"collect-bfcl/{e['id']}"
        turns = script["programs"][e["id"]]
        p_tools = tools[tools.program_id == pid].sort_values(["turn_index", "call_index"])
        assert (llm.program_id == pid).sum() == len(turns) == len([r for r in seen if r["program"] == pid])
        expected = [call_string(tc["name"], tc["arguments"]) for t in turns for tc in t.get("tool_calls", [])]
        assert list(p_tools["command_or_args"]) == expected
        assert list(p_tools["tool_name"]) == [c.split("(")[0] for c in expected]
    # the simulated APIs really ran: a cd into a missing folder fails, mkdir works
    assert (tools["exit_status"] == "0").mean() > 0.5
    # injected latency is honoured and marked
    assert tools["injected"].all() and (tools["provenance"] == "injected:const:0.15").all()
    durations = tools["duration_s"]
    assert (durations >= 0.15).all() and durations.median() == pytest.approx(0.15, abs=0.03)
    # streamed: time to first token recorded; usage from the final chunk
    assert llm["ttft_s"].notna().all() and (llm["ttft_s"] <= llm["latency_s"]).all()
    assert (llm["prompt_tokens"] > 0).all()
    assert all(r["header_session_id"] == r["body_session_id"] == r["program"] for r in seen)


def test_latency_sampler_specs_and_trace_store(tmp_path: Path, entries: list[dict]) -> None:
    assert LatencySampler("0.5").sample() == 0.5
    s = LatencySampler("lognormal:0.5,1.0", seed=1)
    draws = np.array([s.sample() for _ in range(4000)])
    assert np.median(draws) == pytest.approx(0.5, rel=0.1)
    assert LatencySampler("exp:100", max_s=2.0).sample() <= 2.0
    for bad in ("lognormal:0.5", "weird:1", str(tmp_path / "missing.csv")):
        with pytest.raises(CollectError):
            LatencySampler(bad)
    # sample from a trace store holding measured durations (injected ones are ignored)
    script = ground_truth_script(entries[:1])
    db = tmp_path / "src.duckdb"
    with scripted_server(script) as srv:
        injected = BfclOptions(db=db, base_url=srv.base_url, tool_latency="uniform:0.05,0.06")
        collect(BfclCollector(injected), entries[:1])
        no_latency = BfclOptions(db=db, base_url=srv.base_url, source="measured", stream=False)
        collect(BfclCollector(no_latency), entries[:1])
    sampled = LatencySampler(str(db), seed=0)
    measured = read_table(db, "tool_calls").query("source == 'measured'")["duration_s"].to_numpy()
    assert all(min(abs(measured - sampled.sample())) < 1e-12 for _ in range(20))
    assert measured.max() < 0.04  # simulated APIs take microseconds; the 0.05 s injected ones were skipped
