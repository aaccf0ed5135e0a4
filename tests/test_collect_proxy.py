"""`ctk proxy`: an agent loop pointed at the recording proxy, in front of the scripted model and of vLLM."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from collect_fixtures import read_table, scripted_server
from engine_fixtures import block_size_args

from ctk.collect.proxy import ProxyOptions, create_app, program_from_request, tool_of_response
from ctk.datasets.scripted_server import BackgroundServer

SECRET = "sk-ctk-test-secret-123"
BASH_TOOL = {
    "type": "function",
    "function": {
        "name": "bash",
        "parameters": {
            "type": "object",
            "properties": {"command": {"type": "string"}},
            "required": ["command"],
        },
    },
}


def _agent_loop(
    base_url: str,
    *,
    turns: int,
    session: str | None,
    stream: bool,
    model: str = "scripted",
    max_tokens: int | None = None,
) -> list[str]:
    """A tiny agent: ask, run the command the model returns (really), append the output, ask again."""
    headers = {"Authorization": f"Bearer {SECRET}"}
    if session:
        headers["X-Session-ID"] = session
    messages = [
        {"role": "system", "content": "You run shell commands."},
        {"role": "user", "content": f"task for {session or 'anonymous'}"},
    ]
    ran = []
    with httpx.Client(base_url=base_url, headers=headers, timeout=120) as client:
        for _ in range(turns):
            body = {"model": model, "messages": messages, "stream": stream}
            if model == "scripted":
                body["tools"] = [BASH_TOOL]
            if max_tokens:  # the tiny vLLM model: tell ctk serve which tool runs next (contract key `tool`)
                body |= {"max_tokens": max_tokens, "temperature": 0, "vllm_xargs": {"tool": "sleep 0.2"}}
            if stream:
                body["stream_options"] = {"include_usage": True}
                text, calls = "", []
                with client.stream("POST", "/chat/completions", json=body) as r:
                    assert r.status_code == 200, r.read()
                    for line in r.iter_lines():
                        if line.startswith("data:") and "[DONE]" not in line:
                            for ch in json.loads(line[5:])["choices"]:
                                text += ch["delta"].get("content") or ""
                                calls += ch["delta"].get("tool_calls") or []
            else:
                r = client.post("/chat/completions", json=body)
                assert r.status_code == 200, r.text
                msg = r.json()["choices"][0]["message"]
                text, calls = msg.get("content") or "", msg.get("tool_calls") or []
            command = json.loads(calls[0]["function"]["arguments"])["command"] if calls else "sleep 0.2"
            subprocess.run(command, shell=True, check=True)
            ran.append(command)
            messages += [
                {"role": "assistant", "content": text or command},
                {"role": "user", "content": f"ran {command}"},
            ]
    return ran


def test_identity_and_tool_inference_helpers() -> None:
    assert program_from_request({"x-session-id": "h"}, {"session_id": "b"}) == ("b", True)
    assert program_from_request({"x-session-id": "h"}, {"vllm_xargs": {"session_id": "x"}}) == ("h", True)
    assert program_from_request({}, {"vllm_xargs": {"program_id": "p"}}) == ("p", True)
    a = [{"role": "system", "content": "s"}, {"role": "user", "content": "task"}]
    later = a + [{"role": "assistant", "content": "x"}, {"role": "user", "content": "obs"}]
    pid, given = program_from_request({}, {"messages": a})
    assert not given and pid == program_from_request({}, {"messages": later})[0]
    assert pid != program_from_request({}, {"messages": [a[0], {"role": "user", "content": "other"}]})[0]
    bash = {"tool_calls": [{"function": {"name": "bash", "arguments": '{"command": "ls -la"}'}}]}
    assert tool_of_response(bash) == (None, "ls -la")
    fn = {"tool_calls": [{"function": {"name": "cd", "arguments": '{"folder": "x"}'}}]}
    assert tool_of_response(fn) == ("cd", 'cd({"folder": "x"})')
    assert tool_of_response({"content": "run\n```bash\npytest -q\n```"}) == (None, "pytest -q")


def test_proxy_records_programs_and_tool_pauses(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    script = {
        "programs": {"agent-A": [{"commands": ["sleep 0.3"]}, {"commands": ["true"]}, {"content": "done"}]},
        "default": [{"commands": ["sleep 0.2"]}, {"content": "done"}],
    }
    db = tmp_path / "proxy.duckdb"
    with scripted_server(script) as upstream:
        proxy = BackgroundServer(create_app(ProxyOptions(upstream=upstream.base_url, db=db)))
        with proxy as url:
            assert httpx.get(url + "/models").json()["data"][0]["id"] == "scripted"  # forwarded, unrecorded
            _agent_loop(url, turns=3, session="agent-A", stream=False)
            _agent_loop(url, turns=2, session=None, stream=True)
            bad = httpx.post(url + "/chat/completions", content=b"not json")
            assert bad.status_code == 400
        seen = upstream.requests()
    programs = read_table(db, "programs").set_index("program_id")
    llm, tools = read_table(db, "llm_calls"), read_table(db, "tool_calls")
    anon = [p for p in programs.index if p != "agent-A"]
    assert len(anon) == 1 and anon[0].startswith("proxy-")
    assert programs["complete"].all() and (programs["outcome"] == "proxy_stopped").all()
    # the program id reached the upstream on every request (inferred ones injected as X-Session-ID)
    assert [r["header_session_id"] for r in seen] == ["agent-A"] * 3 + [anon[0]] * 2
    a_llm = llm[llm.program_id == "agent-A"].sort_values("turn_index")
    assert list(a_llm["turn_index"]) == [0, 1, 2] and list(a_llm["finish_reason"]) == ["tool_calls"] * 2 + [
        "stop"
    ]
    assert a_llm["prompt_tokens"].is_monotonic_increasing and a_llm["ttft_s"].isna().all()
    b_llm = llm[llm.program_id == anon[0]]
    assert b_llm["ttft_s"].notna().all() and (b_llm["prompt_tokens"] > 0).all()  # streamed, usage chunk
    # pauses between a response and the next request = the commands the agent really ran
    a_tools = tools[tools.program_id == "agent-A"].sort_values("turn_index").set_index("command_or_args")
    assert list(a_tools.index) == ["sleep 0.3", "true"]
    # (lower bounds are exact; upper bounds leave room for the agent's own overhead on a loaded machine)
    assert 0.3 <= a_tools.loc["sleep 0.3", "duration_s"] <= 0.5
    assert a_tools.loc["true", "duration_s"] < 0.25
    b_tools = tools[tools.program_id == anon[0]]
    assert list(b_tools["command_or_args"]) == ["sleep 0.2"]
    assert 0.2 <= b_tools.iloc[0]["duration_s"] <= 0.4
    assert (tools["provenance"] == "proxy:response_end_to_next_request").all()
    # never logs or stores API keys
    assert SECRET not in caplog.text
    assert SECRET.encode() not in db.read_bytes()


def _observed(port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    counts = re.findall(r"^ctk:tool_duration_seconds_count\{[^}]*\} ([0-9.e+]+)$", text, re.M)
    return sum(float(c) for c in counts)


@pytest.mark.engine
def test_proxy_in_front_of_vllm_passes_the_session_id(tmp_path: Path, tiny_model_dir: Path) -> None:
    from ctk.engine_patch.serve.server import free_port, launch_server, stop_server, wait_ready

    port = free_port()
    serve_db, proxy_db = tmp_path / "serve.duckdb", tmp_path / "proxy.duckdb"
    args = ["--kv-cache-memory-bytes", str(16 << 20), "--max-model-len", "2048", "--max-num-seqs", "4"]
    args += block_size_args()
    proc = launch_server(
        tiny_model_dir, port, "continuum", extra_args=args, record=serve_db, log_path=tmp_path / "serve.log"
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}", 300, proc)
        proxy = BackgroundServer(
            create_app(ProxyOptions(upstream=f"http://127.0.0.1:{port}/v1", db=proxy_db))
        )
        with proxy as url:
            model = httpx.get(url + "/models").json()["data"][0]["id"]
            _agent_loop(url, turns=3, session="agent-V", stream=False, model=model, max_tokens=8)
            _agent_loop(url, turns=2, session=None, stream=True, model=model, max_tokens=8)
        # the engine observed three tool pauses, hence saw a program identity on the requests
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _observed(port) < 3:
            time.sleep(0.2)
        assert _observed(port) == 3
        time.sleep(2.0)  # let ctk serve's recorder thread commit its rows
    finally:
        stop_server(proc)
    proxy_programs = set(read_table(proxy_db, "programs")["program_id"])
    anon = (proxy_programs - {"agent-V"}).pop()
    # vLLM's scheduler (ctk serve --record) saw the same programs: the session id reached the engine,
    # for the client-given one and for the one the proxy inferred and injected
    serve_tools = read_table(serve_db, "tool_calls")
    assert set(serve_tools["program_id"]) == {"agent-V", anon}
    assert (serve_tools.program_id == "agent-V").sum() == 2 and (serve_tools.program_id == anon).sum() == 1
    proxy_tools = read_table(proxy_db, "tool_calls").sort_values(["program_id", "turn_index"])
    merged = proxy_tools.merge(serve_tools, on=["program_id", "turn_index"], suffixes=("", "_serve"))
    assert len(merged) == 3
    # both see the same pause; the engine's (its finish -> next arrival) encloses the proxy's (response
    # end -> next request), as the response leaves the engine before it reaches the proxy
    diff = merged["duration_s_serve"] - merged["duration_s"]
    assert (diff > -0.005).all() and (diff < 0.5).all()
    llm = read_table(proxy_db, "llm_calls")
    assert len(llm) == 5 and (llm["completion_tokens"] == 8).all() and llm["ttft_s"].notna().sum() == 2


def test_proxy_refuses_bad_input_and_stops_cleanly(tmp_path: Path) -> None:
    import signal
    import socket

    from collect_fixtures import CTK

    bad = subprocess.run([*CTK, "proxy", "--url", "notaurl", "--db", str(tmp_path / "x.duckdb")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "not an http(s) URL" in bad.stderr and "Traceback" not in bad.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with scripted_server({"default": [{"content": "done"}]}) as upstream:
        args = ["proxy", "--url", upstream.base_url, "--db", tmp_path / "p.duckdb", "--port", port]
        proc = subprocess.Popen(
            [*CTK, *map(str, args)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        url = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                httpx.get(url + "/models", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        body = b'{"messages": [{"role": "user", "content": "' + b"a" * 50_000_000 + b'"}]}'
        try:
            status = httpx.post(url + "/chat/completions", content=body, timeout=60).status_code
        except httpx.HTTPError:  # the proxy may close the connection before the client has sent it all
            status = 413
        assert status == 413
        assert httpx.post(url + "/chat/completions", json={"messages": []}, timeout=30).status_code == 200
        refused = httpx.post(url + "/chat/completions", content=b"[1]", timeout=30)  # vLLM's 400 type
        assert refused.status_code == 400 and refused.json()["error"]["type"] == "BadRequestError"
        # a second proxy on the same port: one line before any banner, no store written
        second = subprocess.run([*CTK, *map(str, [*args[:4], tmp_path / "q.duckdb", *args[5:]])],
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 2 and second.stdout == "", second.stdout
        assert second.stderr.startswith("error: cannot listen on") and second.stderr.count("\n") == 1
        assert not (tmp_path / "q.duckdb").exists()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "leaked semaphore" not in err and "Traceback" not in err, err
    assert len(read_table(tmp_path / "p.duckdb", "llm_calls")) == 1  # the one good request was recorded
