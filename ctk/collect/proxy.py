"""``ctk proxy``: an OpenAI-compatible recording proxy for agents ctk does not drive.

Every ``/v1/chat/completions`` and ``/v1/completions`` request is forwarded to ``--url`` (streaming
responses are passed through chunk by chunk) and recorded as an LLM call: send, first token (streaming),
finish, token usage, finish reason. Other paths (``/v1/models``, ...) are forwarded unrecorded.

Program identity, in vLLM's order: body ``session_id``, ``X-Session-ID`` header, ``vllm_xargs.session_id``,
``vllm_xargs.program_id``; without any, the program is inferred from a hash of the conversation's first
system and user messages (turns of one agent run share them). The proxy forwards the identity to the
upstream as ``X-Session-ID``, so vLLM (and ``ctk serve``) see the same program.

Tool calls are inferred: the pause between a program's response end and its next request is recorded as a
tool call of the previous turn (``provenance = "proxy:response_end_to_next_request"``), named after the
previous response's tool call (or its fenced shell block). Overlapping requests of one program record no
pause. Programs are finished after ``--idle-finish`` seconds without requests and when the proxy stops.

API keys and other headers are forwarded, never logged or stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ctk.collect.recorder import ProgramRecorder, Stamp
from ctk.collect.writer import StoreWriter, open_store
from ctk.store import ProgramRecord, RunRecord
from ctk.wire import MAX_BODY_BYTES, SESSION_HEADER, SESSION_ID, program_identity

log = logging.getLogger(__name__)

RECORDED_PATHS = ("chat/completions", "completions")
_HOP_HEADERS = {
    "host",
    "content-length",
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-authorization",
    "proxy-connection",
    "accept-encoding",
}
_FENCE = re.compile(r"```(?:[a-zA-Z_]*bash[a-zA-Z_]*|sh|shell)?\s*\n(.*?)\n```", re.S)


@dataclass
class ProxyOptions:
    upstream: str
    db: Path
    source: str = "proxy"
    idle_finish_s: float = 600.0
    timeout_s: float = 600.0
    model: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES  # larger request bodies get HTTP 413 (untrusted clients)


def check_upstream(url: str) -> None:
    """Raise ValueError (one line) unless ``url`` is an http(s) URL with a host."""
    parsed = httpx.URL(url) if url.startswith(("http://", "https://")) else None
    if parsed is None or not parsed.host:
        raise ValueError(f"--url {url!r} is not an http(s) URL, e.g. http://127.0.0.1:8000/v1")


#: The error types of the proxy's own answers, vLLM's names (its 400 is ``BadRequestError``), so a client
#: sees one ``type`` per status whether the proxy or the engine behind it refused the request.
ERROR_TYPES = {400: "BadRequestError", 413: "BadRequestError", 502: "BadGatewayError"}


def error_response(status: int, message: str) -> JSONResponse:
    """An error the proxy answers itself, in vLLM's (OpenAI-compatible) shape: message, type, code."""
    return JSONResponse({"error": {"message": message, "type": ERROR_TYPES[status], "code": status}}, status)


def check_listen(host: str, port: int) -> None:
    """Raise ValueError (one line) unless ``host:port`` can be bound now, as uvicorn binds it
    (``SO_REUSEADDR``): checked before the proxy prints its banner or writes a byte to the store."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ValueError(f"--host {host!r}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            raise ValueError(
                f"cannot listen on {host}:{port}: {exc.strerror or exc} (is another process using it? "
                "choose another --port)"
            ) from None


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The request body, or None when it is larger than ``limit`` bytes (read no further than that)."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        return None
    buf = bytearray()
    async for chunk in request.stream():
        buf.extend(chunk)
        if len(buf) > limit:
            return None
    return bytes(buf)


def program_from_request(headers: dict[str, str], body: dict[str, Any]) -> tuple[str, bool]:
    """``(program id, given)``: the client's identity (:func:`ctk.wire.program_identity`), or one inferred
    from the first messages."""
    given = program_identity(headers, body)
    if given is not None:
        return given, True
    msgs = body.get("messages")
    if isinstance(msgs, list):
        head = [m for m in msgs if isinstance(m, dict) and m.get("role") in ("system", "developer")][:1]
        head += [m for m in msgs if isinstance(m, dict) and m.get("role") == "user"][:1]
        basis = json.dumps([[m.get("role"), m.get("content")] for m in head], sort_keys=True, default=str)
    else:
        basis = str(body.get("prompt"))[:4000]
    return "proxy-" + hashlib.sha1(basis.encode()).hexdigest()[:16], False


def tool_of_response(message: dict[str, Any]) -> tuple[str | None, str | None]:
    """``(tool_name, command)`` the agent will presumably run after this response."""
    calls = message.get("tool_calls") or []
    if calls:
        fn = (calls[0] or {}).get("function") or {}
        name, raw = fn.get("name"), fn.get("arguments") or ""
        try:
            args = json.loads(raw) if isinstance(raw, str) else raw
        except json.JSONDecodeError:
            args = None
        if isinstance(args, dict) and isinstance(args.get("command"), str):
            return None, args["command"]  # a shell tool: name it by its command
        return name, f"{name}({raw})" if name else raw
    text = message.get("content") or message.get("text") or ""
    m = _FENCE.search(text) if isinstance(text, str) else None
    return (None, m.group(1).strip()) if m else (None, None)


@dataclass
class _ProgramState:
    recorder: ProgramRecorder
    last_end: Stamp | None = None
    last_tool: tuple[str | None, str | None] = (None, None)
    in_flight: int = 0
    last_seen: float = field(default_factory=time.monotonic)


class ProxyRecorder:
    """Per-program turn counting and tool-pause inference; writes through a :class:`StoreWriter`."""

    def __init__(self, opts: ProxyOptions):
        self.opts = opts
        self.run = RunRecord(
            kind="proxy",
            source=opts.source,
            model=opts.model,
            config={"upstream": opts.upstream, "idle_finish_s": opts.idle_finish_s},
        )
        store = open_store(opts.db)
        try:
            store.add_run(self.run)
            self._known = store.program_ids()  # ids already stored: never reused
        finally:
            store.close()
        self.writer = StoreWriter(opts.db)
        self._programs: dict[str, _ProgramState] = {}
        self._lock = threading.Lock()

    def _state(self, program: str) -> _ProgramState:
        st = self._programs.get(program)
        if st is None:
            pid = program
            n = 1
            while pid in self._known:
                n += 1
                pid = f"{program}#{n}"
            self._known.add(pid)
            st = _ProgramState(
                ProgramRecorder(
                    self.writer,
                    ProgramRecord(
                        program_id=pid,
                        source=self.opts.source,
                        run_id=self.run.run_id,
                        agent="proxy",
                        model=self.opts.model,
                    ),
                    provenance="proxy",
                )
            )
            self._programs[program] = st
        return st

    def request_started(self, program: str, sent: Stamp) -> int:
        """A request arrives: record the tool pause before it; returns the turn index."""
        with self._lock:
            st = self._state(program)
            rec = st.recorder
            if st.last_end is not None and st.in_flight == 0 and sent.mono >= st.last_end.mono:
                name, command = st.last_tool
                rec.tool_call(
                    st.last_end,
                    sent,
                    command=command,
                    tool_name=name,
                    provenance="proxy:response_end_to_next_request",
                )
            st.in_flight += 1
            st.last_seen = time.monotonic()
            return rec.next_turn()

    def request_finished(
        self,
        program: str,
        turn: int,
        sent: Stamp,
        end: Stamp,
        *,
        first_token: Stamp | None,
        usage: dict[str, Any],
        finish_reason: str | None,
        message: dict[str, Any],
        ok: bool,
    ) -> None:
        with self._lock:
            st = self._state(program)
            text = message.get("content") or message.get("text") or ""
            chars = len(text) if isinstance(text, str) else 0
            chars += sum(
                len(((c or {}).get("function") or {}).get("arguments") or "")
                for c in message.get("tool_calls") or []
            )
            st.recorder.llm_call(
                sent,
                end,
                first_token=first_token,
                usage=usage,
                finish_reason=finish_reason if ok else "error",
                response_chars=chars,
                quality_flag="ok" if ok else "error",
                turn=turn,
            )
            st.in_flight = max(0, st.in_flight - 1)
            st.last_end = end
            st.last_tool = tool_of_response(message) if ok else (None, None)
            st.last_seen = time.monotonic()

    def finish_idle(self, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        with self._lock:
            idle = [
                p
                for p, st in self._programs.items()
                if st.in_flight == 0 and now - st.last_seen >= self.opts.idle_finish_s
            ]
            for p in idle:
                self._programs.pop(p).recorder.finish("idle")
        return len(idle)

    def close(self) -> None:
        with self._lock:
            for st in self._programs.values():
                st.recorder.finish("proxy_stopped")
            self._programs.clear()
        self.writer.close()


def _sse_events(buffer: bytearray) -> list[dict[str, Any]]:
    """Complete ``data:`` events parsed out of ``buffer`` (consumed in place)."""
    events = []
    while True:
        i = buffer.find(b"\n")
        if i < 0:
            return events
        line = bytes(buffer[:i]).strip()
        del buffer[: i + 1]
        if line.startswith(b"data:"):
            payload = line[5:].strip()
            if payload and payload != b"[DONE]":
                with contextlib.suppress(json.JSONDecodeError):
                    events.append(json.loads(payload))


class _StreamFacts:
    """What the proxy learns from a streamed response."""

    def __init__(self) -> None:
        self.first_token: Stamp | None = None
        self.usage: dict[str, Any] = {}
        self.finish: str | None = None
        self.content: list[str] = []
        self.calls: dict[int, dict[str, Any]] = {}

    def feed(self, event: dict[str, Any]) -> None:
        if event.get("usage"):
            self.usage = event["usage"]
        for choice in event.get("choices") or []:
            delta = choice.get("delta") or {}
            text = delta.get("content") or choice.get("text")
            if self.first_token is None and (text or delta.get("tool_calls")):
                self.first_token = Stamp.now()
            if text:
                self.content.append(text)
            for tc in delta.get("tool_calls") or []:
                slot = self.calls.setdefault(
                    int(tc.get("index", 0)), {"function": {"name": "", "arguments": ""}}
                )
                fn = tc.get("function") or {}
                slot["function"]["name"] += fn.get("name") or ""
                slot["function"]["arguments"] += fn.get("arguments") or ""
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]

    def message(self) -> dict[str, Any]:
        return {"content": "".join(self.content), "tool_calls": [self.calls[i] for i in sorted(self.calls)]}


def create_app(opts: ProxyOptions) -> FastAPI:
    """The proxy app; the trace store is opened at start-up and closed (programs finished) at shutdown."""
    upstream = opts.upstream.rstrip("/")
    if not upstream.endswith("/v1"):
        upstream += "/v1"

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.recorder = ProxyRecorder(opts)
        app.state.client = httpx.AsyncClient(timeout=httpx.Timeout(opts.timeout_s, connect=30.0))

        async def reaper() -> None:
            while True:
                await asyncio.sleep(min(5.0, max(opts.idle_finish_s / 4, 0.05)))
                app.state.recorder.finish_idle()

        task = asyncio.create_task(reaper())
        try:
            yield
        finally:
            task.cancel()
            await app.state.client.aclose()
            app.state.recorder.close()

    app = FastAPI(title="ctk recording proxy", lifespan=lifespan)

    @app.api_route("/v1/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    async def forward(path: str, request: Request):
        client: httpx.AsyncClient = app.state.client
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        raw = await _read_body(request, opts.max_body_bytes)
        if raw is None:
            return error_response(413, f"request body larger than {opts.max_body_bytes} bytes")
        url = f"{upstream}/{path}"
        if request.method != "POST" or path not in RECORDED_PATHS:
            try:
                r = await client.request(
                    request.method, url, params=request.query_params, headers=headers, content=raw
                )
            except httpx.HTTPError as exc:
                return error_response(502, f"upstream unreachable: {type(exc).__name__}")
            return Response(r.content, r.status_code, media_type=r.headers.get("content-type"))
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError
        except ValueError:
            return error_response(400, "request body is not a JSON object")
        lower = {k.lower(): v for k, v in headers.items()}
        program, _given = program_from_request(lower, body)
        if not body.get(SESSION_ID):
            headers = {k: v for k, v in headers.items() if k.lower() != SESSION_HEADER}
            headers["X-Session-ID"] = program
        recorder: ProxyRecorder = app.state.recorder
        sent = Stamp.now()
        turn = recorder.request_started(program, sent)
        req = client.build_request("POST", url, params=request.query_params, headers=headers, content=raw)
        try:
            resp = await client.send(req, stream=True)
        except httpx.HTTPError as exc:
            recorder.request_finished(
                program,
                turn,
                sent,
                Stamp.now(),
                first_token=None,
                usage={},
                finish_reason=None,
                message={},
                ok=False,
            )
            return error_response(502, f"upstream unreachable: {type(exc).__name__}")
        is_sse = "text/event-stream" in resp.headers.get("content-type", "")
        if not is_sse:
            try:
                content = await resp.aread()
            finally:
                await resp.aclose()
            end = Stamp.now()
            message, usage, finish = {}, {}, None
            with contextlib.suppress(ValueError, AttributeError, IndexError, TypeError):
                data = json.loads(content)
                usage = data.get("usage") or {}
                choice = (data.get("choices") or [{}])[0]
                message = choice.get("message") or {"text": choice.get("text", "")}
                finish = choice.get("finish_reason")
            recorder.request_finished(
                program,
                turn,
                sent,
                end,
                first_token=None,
                usage=usage,
                finish_reason=finish,
                message=message,
                ok=resp.status_code < 400,
            )
            return Response(content, resp.status_code, media_type=resp.headers.get("content-type"))

        facts, buffer = _StreamFacts(), bytearray()

        async def relay():
            ok = True
            try:
                async for chunk in resp.aiter_raw():
                    buffer.extend(chunk)
                    for event in _sse_events(buffer):
                        facts.feed(event)
                    yield chunk
            except (httpx.HTTPError, asyncio.CancelledError):
                ok = False
                raise
            finally:
                await resp.aclose()
                recorder.request_finished(
                    program,
                    turn,
                    sent,
                    Stamp.now(),
                    first_token=facts.first_token,
                    usage=facts.usage,
                    finish_reason=facts.finish,
                    message=facts.message(),
                    ok=ok and resp.status_code < 400,
                )

        return StreamingResponse(relay(), status_code=resp.status_code, media_type="text/event-stream")

    return app


def serve_proxy(opts: ProxyOptions, host: str = "127.0.0.1", port: int = 8080) -> None:
    import signal
    import sys

    import uvicorn

    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again with the handler it found: with
    # the default one the process dies at once and the writer's queues leak their semaphores (a warning at
    # exit). With this one it exits normally (code 143) and everything is cleaned up.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    uvicorn.run(create_app(opts), host=host, port=port, log_level="warning", access_log=False)
