"""The wire contract (ctk/wire.py): every reader of a request names the same program; timeouts and the
command cap are one rule for the recorder and the trajectory importer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from ctk.collect.proxy import program_from_request
from ctk.datasets.scripted_server import Script, create_app
from ctk.datasets.traj_json import read_trajectory
from ctk.policy.hints import parse_hints
from ctk.wire import (
    MAX_COMMAND_CHARS,
    MAX_ID_CHARS,
    SESSION_HEADER,
    clip_command,
    is_timeout,
    program_identity,
)

# (headers, body, the program) in vLLM's order: body session_id, header, xargs.session_id, xargs.program_id
REQUESTS = [
    ({SESSION_HEADER: "h"}, {"session_id": "b", "vllm_xargs": {"program_id": "p"}}, "b"),
    ({SESSION_HEADER: "h"}, {"vllm_xargs": {"session_id": "x", "program_id": "p"}}, "h"),
    ({}, {"session_id": "", "vllm_xargs": {"session_id": "x", "program_id": "p"}}, "x"),
    ({}, {"vllm_xargs": {"program_id": "p"}}, "p"),
    ({}, {"vllm_xargs": {"session_id": 7, "program_id": "p"}}, "7"),  # an integer id is its text
    ({}, {"vllm_xargs": {"session_id": 7.5, "program_id": "p"}}, "p"),  # neither string nor integer
    ({}, {"session_id": " ", "vllm_xargs": {"session_id": " a ", "program_id": "p"}}, "a"),  # stripped
    ({}, {"vllm_xargs": {"session_id": "x" * (MAX_ID_CHARS + 1), "program_id": "p"}}, "p"),  # too long
    ({}, {"vllm_xargs": ["p"]}, None),  # vllm_xargs not an object
    ({}, {}, None),
]


def _vllm_session_id(headers: dict, body: dict) -> str | None:
    """What vLLM 0.32 passes to the engine as ``request.session_id`` (``_get_session_id``)."""
    xargs = body.get("vllm_xargs") if isinstance(body.get("vllm_xargs"), dict) else {}
    sid = xargs.get("session_id")
    return body.get("session_id") or headers.get(SESSION_HEADER) or (sid if isinstance(sid, str) else None)


@pytest.mark.parametrize(("headers", "body", "program"), REQUESTS)
def test_every_reader_names_the_same_program(headers: dict, body: dict, program: str | None) -> None:
    assert program_identity(headers, body) == program
    assert program_from_request(headers, body)[0 if program else 1] == (program or False)
    xargs = body.get("vllm_xargs") if isinstance(body.get("vllm_xargs"), dict) else None
    assert parse_hints(_vllm_session_id(headers, body), xargs).program_id == program  # the engine

    client = TestClient(create_app(Script(default=[])))  # the scripted server, over HTTP
    headers = {"X-Session-ID" if k == SESSION_HEADER else k: v for k, v in headers.items()}
    client.post(
        "/v1/chat/completions",
        json={**body, "messages": [{"role": "user", "content": "hi"}]},
        headers=headers,
    )
    assert client.app.state.log.snapshot()[-1]["program"] == program


def test_timeout_rule() -> None:
    for name in ("TimeoutExpired", "TimeoutError", "CommandTimeoutError", "ReadTimeout"):
        assert is_timeout(name)
    for name in (None, "", "CalledProcessError", "Submitted", 3):
        assert not is_timeout(name)


def test_command_cap() -> None:
    assert clip_command(None) is None and clip_command("") == ""
    assert clip_command("x" * (MAX_COMMAND_CHARS + 5)) == "x" * MAX_COMMAND_CHARS


def test_trajectory_import_uses_the_same_rules(tmp_path: Path) -> None:
    """A swe-rex ``CommandTimeoutError`` is censored on import as in the recorder; commands are capped."""
    long = "echo " + "y" * 3000
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "task"},
        {
            "role": "assistant",
            "content": "a",
            "extra": {"timestamp": 10.0, "actions": [{"command": "sleep 9"}]},
        },
        {
            "role": "tool",
            "content": "o",
            "extra": {"timestamp": 13.0, "returncode": -1, "exception_type": "CommandTimeoutError"},
        },
        {"role": "assistant", "content": "b", "extra": {"timestamp": 14.0, "actions": [{"command": long}]}},
        {"role": "tool", "content": "o", "extra": {"timestamp": 14.5, "returncode": 0}},
    ]
    path = tmp_path / "t1.traj.json"
    path.write_text(json.dumps({"messages": messages}))
    _, _, tools = read_trajectory(path)
    assert [t.censored for t in tools] == [True, False]
    assert tools[0].quality_flag == "timeout_censored" and tools[0].exit_status == "timeout"
    assert tools[1].command_or_args == long[:MAX_COMMAND_CHARS]


def test_the_engine_recorder_keeps_as_much_of_a_command_as_the_collectors(tmp_path: Path) -> None:
    from ctk.engine_patch.recorder import TraceRecorder
    from ctk.policy.detect import ToolCall
    from ctk.policy.events import ToolObservation
    from ctk.store import TraceStore

    long = "python -c " + "x" * 3000
    recorder = TraceRecorder(tmp_path / "s.duckdb")
    obs = ToolObservation("p", 1, ToolCall("hint", None, long), ["python", "*"], 1.5, 1e9, 100, 10)
    recorder.tool_observed(obs)
    recorder.close()
    with TraceStore(tmp_path / "s.duckdb", read_only=True) as store:
        [command] = store.table("tool_calls")["command_or_args"].tolist()
    assert command == clip_command(long) == long[:MAX_COMMAND_CHARS]


def test_turn_metadata_round_trips_through_the_engine_parser():
    """What clients send (collectors, replay, the simulator's programs) is what the engine reads back."""
    from ctk.policy.hints import parse_hints
    from ctk.wire import program_identity, session_body, session_headers, turn_xargs

    xargs = turn_xargs("prog/1", 3, True, "pytest -q", 1.5)
    body = session_body("prog/1", xargs)
    lower = {k.lower(): v for k, v in session_headers("prog/1").items()}  # as an HTTP server hands them over
    assert program_identity(lower, {}) == "prog/1"
    assert program_identity({}, body) == "prog/1"
    hints = parse_hints("prog/1", body["vllm_xargs"])
    got = (hints.turn_index, hints.last_turn, hints.tool, hints.tool_duration_s)
    assert got == (3, True, "pytest -q", 1.5)
    unknown = turn_xargs("p", 0, None)
    assert "last_turn" not in unknown and not parse_hints("p", unknown).last_turn
