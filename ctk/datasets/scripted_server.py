"""A scripted OpenAI-compatible model server for tests and demos.

It answers ``/v1/chat/completions`` (streaming too) from a script, so a real agent runs real commands
without a real LLM. The server is stateless: the reply to a request is turn ``k`` of the program's
script, ``k`` = the number of assistant messages already in the request. The program is taken from the
``session_id`` body field, the ``X-Session-ID`` header or ``vllm_xargs`` (``session_id`` /
``program_id``), and matched against the script's program keys (exact id, the id's last ``/`` part, or
an ``fnmatch`` pattern), falling back to ``default``.

Script file (JSON)::

    {"default": [turn, ...], "programs": {"<program id | task id | pattern>": [turn, ...]}}

A turn is ``{"content": "...", "commands": ["ls", ...], "tool_calls": [{"name": f, "arguments": {...}}],
"delay_s": 0.0}``. Commands become native ``bash`` tool calls when the request offers tools, else a
fenced block (```` ```mswea_bash_command ````) in the text. A recorded mini-swe-agent trajectory
(``*.traj.json``) can serve as a script too: its assistant messages become the turns.

Run: ``python -m ctk.datasets.scripted_server --script FILE --port 8001``; in-process:
``with BackgroundServer(create_app(script)) as url: ...``.
"""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ctk.errors import CtkError
from ctk.wire import SESSION_HEADER, SESSION_ID, XARGS, program_identity


class ScriptError(CtkError, ValueError):
    """A script file cannot be read; the message says why."""


@dataclass
class ScriptedTurn:
    content: str = ""
    commands: list[str] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # {"name": str, "arguments": dict|str}
    delay_s: float = 0.0

    @classmethod
    def from_dict(cls, d: dict[str, Any] | str) -> ScriptedTurn:
        if isinstance(d, str):
            return cls(commands=[d])
        if not isinstance(d, dict):
            raise ScriptError(f"a turn must be an object or a command string, got {type(d).__name__}")
        unknown = set(d) - {"content", "commands", "command", "tool_calls", "delay_s"}
        if unknown:
            raise ScriptError(f"unknown turn keys {sorted(unknown)}")
        commands = list(d.get("commands") or [])
        if d.get("command"):
            commands.append(d["command"])
        return cls(
            content=str(d.get("content") or ""),
            commands=[str(c) for c in commands],
            tool_calls=list(d.get("tool_calls") or []),
            delay_s=float(d.get("delay_s") or 0.0),
        )


@dataclass
class Script:
    programs: dict[str, list[ScriptedTurn]] = field(default_factory=dict)
    default: list[ScriptedTurn] | None = None
    text_fence: str = "mswea_bash_command"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Script:
        if not isinstance(d, dict) or not ({"programs", "default"} & set(d)):
            raise ScriptError("a script needs a 'programs' object and/or a 'default' list of turns")
        programs = {
            str(k): [ScriptedTurn.from_dict(t) for t in v] for k, v in (d.get("programs") or {}).items()
        }
        default = [ScriptedTurn.from_dict(t) for t in d["default"]] if d.get("default") is not None else None
        return cls(programs=programs, default=default, text_fence=d.get("text_fence", "mswea_bash_command"))

    @classmethod
    def from_file(cls, path: str | Path) -> Script:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ScriptError(f"{path}: no such script file") from None
        except json.JSONDecodeError as exc:
            raise ScriptError(f"{path}: not JSON ({exc})") from None
        if isinstance(data, dict) and "messages" in data and "programs" not in data:
            return cls.from_trajectory(data, key=data.get("instance_id") or path.name.split(".")[0])
        return cls.from_dict(data)

    @classmethod
    def from_trajectory(cls, traj: dict[str, Any], key: str | None = None) -> Script:
        """Turns from the assistant messages of a mini-swe-agent trajectory (``*.traj.json``)."""
        turns: list[ScriptedTurn] = []
        for msg in traj.get("messages", []):
            if msg.get("role") != "assistant":
                continue
            actions = (msg.get("extra") or {}).get("actions") or []
            commands = [a["command"] for a in actions if isinstance(a, dict) and "command" in a]
            turns.append(ScriptedTurn(content=msg.get("content") or "", commands=commands))
        if not turns:
            raise ScriptError("the trajectory has no assistant messages")
        return cls(programs={key: turns} if key else {}, default=turns)

    def turns_for(self, program: str | None) -> list[ScriptedTurn] | None:
        if program:
            if program in self.programs:
                return self.programs[program]
            tail = program.rsplit("/", 1)[-1].split("#", 1)[0]
            if tail in self.programs:
                return self.programs[tail]
            for pattern, turns in self.programs.items():
                if fnmatch.fnmatchcase(program, pattern):
                    return turns
        return self.default


def _approx_tokens(text: str) -> int:
    return max(1, len(text) // 4) if text else 0


def _message_text(messages: list[dict[str, Any]]) -> str:
    parts = []
    for m in messages:
        c = m.get("content")
        if isinstance(c, list):
            c = " ".join(str(p.get("text", "")) for p in c if isinstance(p, dict))
        parts.append(str(c or ""))
        for tc in m.get("tool_calls") or []:
            parts.append(str((tc.get("function") or {}).get("arguments", "")))
    return "\n".join(parts)


def build_reply(script: Script, program: str | None, body: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """The assistant message for this request and the delay to apply before answering."""
    messages = body.get("messages") or []
    k = sum(1 for m in messages if m.get("role") == "assistant")
    turns = script.turns_for(program)
    if turns is None:
        return {"role": "assistant", "content": f"(no script for program {program!r})"}, 0.0
    if k >= len(turns):
        return {"role": "assistant", "content": "(script exhausted)"}, 0.0
    turn = turns[k]
    tools = body.get("tools") or []
    content = turn.content
    tool_calls = []
    if turn.commands:
        if tools:
            bash_name = ((tools[0] or {}).get("function") or {}).get("name", "bash")
            tool_calls += [{"name": bash_name, "arguments": {"command": c}} for c in turn.commands]
        else:
            blocks = "\n\n".join(f"```{script.text_fence}\n{c}\n```" for c in turn.commands)
            content = f"{content}\n\n{blocks}".strip()
    tool_calls += turn.tool_calls
    message: dict[str, Any] = {"role": "assistant", "content": content or None}
    if tool_calls:
        message["tool_calls"] = [
            {
                "id": f"call_{uuid.uuid4().hex[:12]}",
                "type": "function",
                "function": {
                    "name": tc["name"],
                    "arguments": tc["arguments"]
                    if isinstance(tc["arguments"], str)
                    else json.dumps(tc["arguments"]),
                },
            }
            for tc in tool_calls
        ]
    return message, turn.delay_s


@dataclass
class RequestLog:
    """What the server saw, for tests: program, headers of interest, ``vllm_xargs``."""

    entries: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, entry: dict[str, Any]) -> None:
        with self.lock:
            self.entries.append(entry)

    def snapshot(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.entries)


def create_app(script: Script, *, latency_s: float = 0.0, model_name: str = "scripted"):
    """The FastAPI app answering from ``script``; ``latency_s`` is added to every reply."""

    app = FastAPI(title="ctk scripted model")
    app.state.log = RequestLog()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "ctk"}]}

    @app.get("/ctk/requests")
    async def requests_seen() -> list[dict[str, Any]]:
        return app.state.log.snapshot()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await _json_object(request)
        if body is None or not isinstance(body.get("messages"), list):
            return _invalid("'messages' must be a list")
        program = _log_request(app.state.log, request, body)
        message, delay = build_reply(script, program, body)
        if delay + latency_s > 0:
            await asyncio.sleep(delay + latency_s)
        prompt_tokens = _approx_tokens(_message_text(body["messages"]))
        completion_tokens = _approx_tokens(_message_text([message]))
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        finish = "tool_calls" if message.get("tool_calls") else "stop"
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:16]}", int(time.time())
        model = body.get("model") or model_name
        if not body.get("stream"):
            return {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                "usage": usage,
            }
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        chunks = _stream_chunks(rid, created, model, message, finish, usage if include_usage else None)
        return StreamingResponse(chunks, media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        """Plain completions (what ``ctk replay`` sends): ``max_tokens`` filler tokens, no script."""
        body = await _json_object(request)
        prompt = body.get("prompt") if body is not None else None
        if not isinstance(prompt, str | list):
            return _invalid("'prompt' must be a string or token ids")
        _log_request(app.state.log, request, body)
        if latency_s > 0:
            await asyncio.sleep(latency_s)
        n_out = max(0, min(int(body.get("max_tokens") or 16), 4096))
        n_in = len(prompt) if isinstance(prompt, list) else _approx_tokens(prompt)
        usage = {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}
        rid, created = f"cmpl-{uuid.uuid4().hex[:16]}", int(time.time())
        model = body.get("model") or model_name
        ids = body.get("return_token_ids") is True
        if not body.get("stream"):
            choice = {"index": 0, "text": " x" * n_out, "finish_reason": "length"}
            if ids:
                choice["token_ids"] = [FILLER_TOKEN_ID] * n_out
            return {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [choice],
                "usage": usage,
            }
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        chunks = _completion_chunks(rid, created, model, n_out, ids, usage if include_usage else None)
        return StreamingResponse(chunks, media_type="text/event-stream")

    return app


async def _json_object(request: Request) -> dict[str, Any] | None:
    """The request body if it is a JSON object, else None."""
    try:
        body = await request.json()
    except json.JSONDecodeError:
        return None
    return body if isinstance(body, dict) else None


def _invalid(message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request"}}, 400)


def _log_request(log: RequestLog, request: Request, body: dict[str, Any]) -> str | None:
    """Note what the request carried (for tests); returns its program identity."""
    headers = {k.lower(): v for k, v in request.headers.items()}
    program = program_identity(headers, body)
    log.add(
        {
            "time_unix_s": time.time(),
            "program": program,
            "header_session_id": headers.get(SESSION_HEADER),
            "body_session_id": body.get(SESSION_ID),
            "vllm_xargs": body.get(XARGS),
            "n_messages": len(body.get("messages") or []),
            "stream": bool(body.get("stream")),
        }
    )
    return program


#: The token id the scripted server's plain completions are made of.
FILLER_TOKEN_ID = 1


def _completion_chunks(
    rid: str, created: int, model: str, n_out: int, ids: bool, usage: dict[str, Any] | None
) -> Iterator[str]:
    for i in range(n_out):
        choice: dict[str, Any] = {
            "index": 0,
            "text": " x",
            "finish_reason": "length" if i == n_out - 1 else None,
        }
        if ids:
            choice["token_ids"] = [FILLER_TOKEN_ID]
        event = {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [choice],
        }
        yield "data: " + json.dumps(event) + "\n\n"
    if usage is not None:
        event = {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [],
            "usage": usage,
        }
        yield "data: " + json.dumps(event) + "\n\n"
    yield "data: [DONE]\n\n"


def _stream_chunks(
    rid: str, created: int, model: str, message: dict[str, Any], finish: str, usage: dict[str, Any] | None
) -> Iterator[str]:
    def event(**fields: Any) -> str:
        body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, **fields}
        return "data: " + json.dumps(body) + "\n\n"

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> str:
        return event(choices=[{"index": 0, "delta": delta, "finish_reason": finish_reason}])

    yield chunk({"role": "assistant", "content": ""})
    content = message.get("content") or ""
    for i in range(0, len(content), 16):
        yield chunk({"content": content[i : i + 16]})
    for i, tc in enumerate(message.get("tool_calls") or []):
        yield chunk(
            {
                "tool_calls": [
                    {
                        "index": i,
                        "id": tc["id"],
                        "type": "function",
                        "function": {
                            "name": tc["function"]["name"],
                            "arguments": tc["function"]["arguments"],
                        },
                    }
                ]
            }
        )
    yield chunk({}, finish)
    if usage is not None:
        yield event(choices=[], usage=usage)
    yield "data: [DONE]\n\n"


class BackgroundServer:
    """Runs an ASGI app with uvicorn in a daemon thread; the context value is the base URL (``.../v1``)."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.app = app
        self._server = uvicorn.Server(
            uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="on")
        )
        self._server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self._thread = threading.Thread(target=self._server.run, name="ctk-http-server", daemon=True)
        self.host = host
        self.port = port

    def start(self, timeout: float = 20.0) -> str:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server on {self.host}:{self.port} did not start")
            time.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self.base_url

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    p = argparse.ArgumentParser(description="Serve a scripted OpenAI-compatible model.")
    p.add_argument("--script", required=True, help="script JSON, a mini-swe-agent *.traj.json, or 'bundled'")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--latency", type=float, default=0.0, help="seconds added to every reply")
    args = p.parse_args(argv)
    if args.script == "bundled":  # the solutions of the bundled sample tasks
        from ctk.datasets.instances import bundled_script_path

        args.script = str(bundled_script_path())
    try:
        script = Script.from_file(args.script)
    except ScriptError as exc:
        raise SystemExit(f"error: {exc}") from None
    uvicorn.run(
        create_app(script, latency_s=args.latency), host=args.host, port=args.port, log_level="warning"
    )


if __name__ == "__main__":
    main()
