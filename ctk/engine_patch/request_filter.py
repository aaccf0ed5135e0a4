"""ASGI middleware of ``ctk serve``: request metadata vLLM would refuse is made acceptable first.

vLLM 0.32 answers HTTP 400 to a ``vllm_xargs`` value that is ``null``, an object (vllm-router forwards its
``agentic_context`` object unchanged) or a nested list, and to a body ``session_id`` that is not a string.
:class:`MetadataFilter` rewrites exactly those fields of a JSON request body (``hints.sanitize_xargs``) and
passes every other byte through; a body without them is not even parsed. ``ctk serve`` adds it with vLLM's own
``--middleware`` option.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from ctk.policy.hints import sanitize_xargs
from ctk.wire import MAX_ID_CHARS

logger = logging.getLogger("ctk.engine_patch")

MIDDLEWARE = "ctk.engine_patch.request_filter.MetadataFilter"
_MARKERS = (b'"vllm_xargs"', b'"session_id"')
_warned: set[str] = set()


def sanitize_body(body: bytes) -> tuple[bytes, list[str]]:
    """The request body with its metadata made acceptable to vLLM; (body, changes). Never raises."""
    if not any(m in body for m in _MARKERS):
        return body, []
    try:
        data = json.loads(body)
    except ValueError:
        return body, []  # vLLM reports the bad JSON itself
    if not isinstance(data, dict):
        return body, []
    changes = []
    if "vllm_xargs" in data:
        xargs, changes = sanitize_xargs(data["vllm_xargs"])
        if xargs is None:
            data.pop("vllm_xargs")
        else:
            data["vllm_xargs"] = xargs
    sid = data.get("session_id")
    if sid is not None and not isinstance(sid, str):
        if isinstance(sid, int) and not isinstance(sid, bool) and len(str(sid)) <= MAX_ID_CHARS:
            data["session_id"] = str(sid)
            changes.append("session_id: number passed as text")
        else:
            data.pop("session_id")
            changes.append(f"session_id: {type(sid).__name__} dropped")
    if not changes:
        return body, []
    return json.dumps(data, separators=(",", ":")).encode(), changes


class MetadataFilter:
    """Pure ASGI middleware: buffers POST JSON bodies that carry metadata and sanitizes them."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                await self.app(scope, _replay([message]), send)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body, changes = sanitize_body(b"".join(chunks))
        if changes:
            _log(changes)
            headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
            scope = {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
        first = {"type": "http.request", "body": body, "more_body": False}
        await self.app(scope, _replay([first], receive), send)


def _replay(messages: list[dict], then: Any = None):
    """A ``receive`` that returns ``messages`` first, then defers to ``then`` (disconnects)."""

    async def receive() -> dict:
        if messages:
            return messages.pop(0)
        if then is None:
            return {"type": "http.disconnect"}
        return await then()

    return receive


def _log(changes: list[str]) -> None:
    for c in changes:
        kind = c.split(":")[0]
        if kind not in _warned and len(_warned) < 1000:
            _warned.add(kind)
            logger.warning("ctk: request metadata made acceptable to vLLM: %s", c)
