"""Tool-call detection from a finished request's output text (used when the client gives no ``tool`` hint).

Three detectors, applied in the configured order; the first that matches wins:

- ``bash``: mini-swe-agent's fenced block (```` ```bash ... ``` ```` or ```` ```mswea_bash_command ````);
  the command is the block's body (the last block when there are several, as the agent runs one).
- ``tool_call``: Hermes/Qwen-style ``<tool_call>{"name": ..., "arguments": ...}</tool_call>``.
- ``openai``: OpenAI-style function-call JSON (``{"tool_calls": [{"function": {"name", "arguments"}}]}``,
  ``{"function_call": {...}}`` or a bare ``{"name": ..., "arguments": ...}``).

Pure Python, no vLLM import. Output text is truncated to its tail before parsing so a runaway output
costs bounded time.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import NamedTuple

#: The detectors, in their default order (``ServeConfig.detectors``).
DETECTORS = ("bash", "tool_call", "openai")
#: Only the last characters of an output are parsed (a tool call ends the turn).
MAX_PARSE_CHARS = 20_000
#: Characters every detector needs in a text before it can find a call (``bash`` a fence, ``tool_call`` its
#: tag, ``openai`` a quoted ``"name"``): a text holding none of them is no tool call. The vLLM door skips the
#: decode of an output tail whose tokens hold none of them.
CALL_CHARS = '`<"'

_FENCE_RE = re.compile(r"```(?:bash|sh|shell|mswea_bash_command)[ \t]*\n(.*?)(?:```|\Z)", re.S)
_TOOL_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|\Z)", re.S)


class ToolCall(NamedTuple):
    """A detected (or hinted) tool call: ``command`` is shell text or the JSON arguments. Immutable; a tuple
    so that building and hashing it (the table-key cache is keyed by it) cost no Python call."""

    kind: str  # bash | tool_call | openai | hint
    name: str | None
    command: str | None


def detect_tool_call(text: str | None, detectors: Sequence[str] = DETECTORS) -> ToolCall | None:
    """The tool call the output ends with, or None (a final answer, or nothing recognisable)."""
    if not text:
        return None
    tail = text[-MAX_PARSE_CHARS:]
    for name in detectors:
        fn = _DETECTORS.get(name)
        if fn is None:
            continue
        need = _NEEDS.get(name)
        if need is not None and need not in tail:  # (a substring test instead of the detector's scan)
            continue
        found = fn(tail)
        if found is not None:
            return found
    return None


def _bash(text: str) -> ToolCall | None:
    blocks = _FENCE_RE.findall(text)
    if not blocks:
        return None
    cmd = blocks[-1].strip()
    if not cmd:
        return None
    return ToolCall("bash", "bash", cmd)


def _from_call_obj(obj: object, kind: str) -> ToolCall | None:
    if not isinstance(obj, dict):
        return None
    fn = obj.get("function") if isinstance(obj.get("function"), dict) else obj
    name = fn.get("name")
    if not isinstance(name, str) or not name.strip():
        return None
    args = fn.get("arguments", fn.get("parameters"))
    if args is not None and not isinstance(args, str):
        try:
            args = json.dumps(args, sort_keys=True)
        except (TypeError, ValueError):
            args = str(args)
    return ToolCall(kind, name.strip(), args)


def _tool_call(text: str) -> ToolCall | None:
    for body in reversed(_TOOL_CALL_RE.findall(text)):
        try:
            obj = json.loads(body)
        except ValueError:
            m = re.search(r'"name"\s*:\s*"([^"]+)"', body)  # truncated JSON: the name is enough
            if m:
                return ToolCall("tool_call", m.group(1), None)
            continue
        found = _from_call_obj(obj, "tool_call")
        if found is not None:
            return found
    return None


def _json_objects(text: str) -> list[object]:
    """Top-level JSON values found in ``text`` (objects and arrays), last one last."""
    dec = json.JSONDecoder()
    out = []
    i = 0
    n = len(text)
    while i < n:
        j = min((k for k in (text.find("{", i), text.find("[", i)) if k >= 0), default=-1)
        if j < 0:
            break
        try:
            obj, end = dec.raw_decode(text, j)
        except ValueError:
            i = j + 1
            continue
        out.append(obj)
        i = end
    return out


def _openai(text: str) -> ToolCall | None:
    for obj in reversed(_json_objects(text)):
        calls: list[object] = []
        if isinstance(obj, dict):
            if isinstance(obj.get("tool_calls"), list):
                calls = obj["tool_calls"]
            elif isinstance(obj.get("function_call"), dict):
                calls = [obj["function_call"]]
            else:
                calls = [obj]
        elif isinstance(obj, list):
            calls = obj
        for call in reversed(calls):
            found = _from_call_obj(call, "openai")
            if found is not None:
                return found
    return None


_DETECTORS = {"bash": _bash, "tool_call": _tool_call, "openai": _openai}
#: What each detector needs in a text (:func:`detect_tool_call` tests it first): without it, no call.
_NEEDS = {"bash": "```", "tool_call": "<tool_call>", "openai": '"name"'}
