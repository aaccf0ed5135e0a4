"""Program identity and per-request hints from request metadata, read leniently on the engine's hot path.

The key names, their order and bounds are the wire contract in :mod:`ctk.wire`. Program = vLLM's
``session_id`` (body field, ``X-Session-ID`` header, or ``vllm_xargs.session_id``), else
``vllm_xargs.program_id``. Other ``vllm_xargs`` keys: ``turn_index`` (int), ``last_turn`` (bool/int),
``tool`` (str), ``tool_duration_s`` (float, oracle only), ``program_size`` (float, the size-order
admission probe only), ``agent`` (str: the agent running the program, the admission size predictor's class;
a name starting with ``prefix:`` is ignored: that namespace is the classes the engine adapter derives from a
prompt's prefix when no agent is named, :func:`prefix_agent`),
``kv_retention_ttl_seconds`` (float: a client's TTL
hint, vllm-router's name for it; read by the pin rules as ``ttl_hint_s``). Garbage values are ignored with a
warning (logged at most once per key and kind), never raised: bad metadata must not crash the engine.

vllm-router's Program Scheduling contract, ``vllm_xargs.agentic_context`` (an object, or that object as a JSON
string), is read too: its program (``program_id``, else ``task_id``/``session_id`` + ``agent_id``) names
the program, ``step_id`` is the turn, ``expected_resume: false`` marks the last turn and its
``kv_retention_ttl_seconds`` is the TTL hint; a flat ``vllm_xargs`` key wins over the same fact in the
context.

vLLM 0.32 itself validates ``vllm_xargs`` as ``dict[str, str | int | float | list[str | int | float]]`` and
answers HTTP 400 to anything else (``null``, nested objects such as the router's ``agentic_context``, nested
lists).
:func:`sanitize_xargs` turns such values into ones vLLM accepts, without losing what ctk reads; ``ctk serve``
applies it to every request before vLLM sees it (:mod:`ctk.engine_patch.request_filter`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ctk.wire import (
    AGENT,
    AGENTIC_CONTEXT,
    DERIVED_AGENT,
    LAST_TURN,
    MAX_CONTEXT_CHARS,
    MAX_ID_CHARS,
    MAX_TOOL_CHARS,
    MAX_TURN_INDEX,
    PROGRAM_SIZE,
    SESSION_ID,
    TOOL,
    TOOL_DURATION_S,
    TTL_HINT_S,
    TURN_INDEX,
    XARGS_IDENTITY_KEYS,
    as_program_id,
)

logger = logging.getLogger("ctk.engine_patch")

_warned: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class RequestHints:
    program_id: str | None = None
    turn_index: int | None = None
    last_turn: bool = False
    tool: str | None = None
    tool_duration_s: float | None = None
    ttl_hint_s: float | None = None  # the client's own TTL for this turn's pin (``kv_retention_ttl_seconds``)
    program_size: float | None = None  # the program's true total work (admission probe only)
    agent: str | None = None  # the agent running the program (``agent``: the size predictor's class)
    warnings: tuple[str, ...] = field(default=(), compare=False)


def _warn(key: str, msg: str, warnings: list[str]) -> None:
    warnings.append(msg)
    if (key, msg.split(":")[0]) not in _warned and len(_warned) < 1000:
        _warned.add((key, msg.split(":")[0]))
        logger.warning("ctk: ignoring request metadata %s", msg)


def _as_id(value: Any, key: str, warnings: list[str]) -> str | None:
    if value is None:
        return None
    program, problem = as_program_id(value)
    if problem is not None:
        _warn(key, f"{key}: {problem}", warnings)
    return program


def parse_hints(session_id: Any, extra_args: Mapping[str, Any] | None) -> RequestHints:
    """Hints of one request; never raises. (On the engine's hot path, with cold caches: a helper is called
    only for a key that is present.)"""
    warnings: list[str] = []
    is_mapping = type(extra_args) is dict or isinstance(extra_args, Mapping)
    xargs: Mapping[str, Any] = extra_args if is_mapping else {}
    if extra_args is not None and not is_mapping:
        _warn("vllm_xargs", f"vllm_xargs: expected an object, got {type(extra_args).__name__}", warnings)
    # the router's context, when given (every read of an empty context finds nothing and warns nothing)
    ctx = _agentic_context(xargs[AGENTIC_CONTEXT], warnings) if AGENTIC_CONTEXT in xargs else {}

    program = _context_program(ctx, session_id, warnings) if ctx else None
    if program is None and session_id is not None:
        program = _as_id(session_id, SESSION_ID, warnings)
    for key in XARGS_IDENTITY_KEYS:
        if program is not None:
            break
        if key in xargs:
            value = xargs[key]
            if type(value) is str and len(text := value.strip()) <= MAX_ID_CHARS:  # as_program_id, inline
                program = text or None
            else:
                program = _as_id(value, key, warnings)

    turn = xargs.get(TURN_INDEX)
    if turn is not None and not (type(turn) is int and 0 <= turn <= MAX_TURN_INDEX):  # (_turn's usual case)
        turn = _turn(xargs, TURN_INDEX, warnings)
    if turn is None and ctx:
        turn = _turn(ctx, "step_id", warnings)

    last = False
    raw = xargs.get(LAST_TURN)
    if raw is not None:
        if isinstance(raw, bool):
            last = raw
        elif isinstance(raw, int | float) and raw in (0, 1):
            last = bool(raw)
        elif isinstance(raw, str) and raw.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
            last = raw.strip().lower() in ("true", "1", "yes")
        else:
            _warn(LAST_TURN, f"{LAST_TURN}: expected a boolean: {str(raw)[:40]!r}", warnings)
    elif ctx and ctx.get("expected_resume") is False:  # the router's way to say "no next turn"
        last = True

    tool = _label(xargs, TOOL, MAX_TOOL_CHARS, warnings) if TOOL in xargs else None
    duration = _non_negative(xargs, TOOL_DURATION_S, warnings) if TOOL_DURATION_S in xargs else None
    size = _non_negative(xargs, PROGRAM_SIZE, warnings) if PROGRAM_SIZE in xargs else None
    agent = _label(xargs, AGENT, MAX_ID_CHARS, warnings) if AGENT in xargs else None
    if agent is None and ctx:  # the router's agent (already checked as part of the program's identity)
        raw = ctx.get("agent_id")
        agent = raw.strip()[:MAX_ID_CHARS] or None if isinstance(raw, str) else None
    if agent is not None and agent.startswith(DERIVED_AGENT):  # ctk's own namespace: never a named agent
        _warn(AGENT, f"{AGENT}: names starting with {DERIVED_AGENT!r} are reserved: {agent[:40]!r}", warnings)
        agent = None
    ttl_hint = _non_negative(xargs, TTL_HINT_S, warnings) if TTL_HINT_S in xargs else None
    if ttl_hint is None and ctx:
        ttl_hint = _non_negative(ctx, TTL_HINT_S, warnings)

    # RequestHints(...) without its __init__ (a frame and an object.__setattr__ per field of the frozen class)
    hints = _new(RequestHints)
    hints.__dict__.update(
        program_id=program,
        turn_index=turn,
        last_turn=last,
        tool=tool,
        tool_duration_s=duration,
        ttl_hint_s=ttl_hint,
        program_size=size,
        agent=agent,
        warnings=tuple(warnings) if warnings else (),
    )
    return hints


_new = object.__new__


def prefix_agent(block_hash: bytes) -> str:
    """The agent class of a prompt whose prefix has this block hash (the engine's chained prefix-cache hash of
    the prefix's last block, which stands for the whole prefix): ``prefix:`` and 16 hex digits (its first 8
    bytes), within :data:`~ctk.wire.MAX_ID_CHARS`. No named agent can be one (:func:`parse_hints`)."""
    return (DERIVED_AGENT + block_hash[:8].hex())[:MAX_ID_CHARS]


def _label(xargs: Mapping[str, Any], key: str, max_chars: int, warnings: list[str]) -> str | None:
    """A free-text label (``tool``, ``agent``): the stripped text cut to ``max_chars``; None when blank or
    null; a value that is not a string warns."""
    raw = xargs[key]
    if isinstance(raw, str):
        return raw.strip()[:max_chars] or None
    if raw is not None:
        _warn(key, f"{key}: expected a string, got {type(raw).__name__}", warnings)
    return None


def _agentic_context(raw: Any, warnings: list[str]) -> Mapping[str, Any]:
    """vllm-router's ``agentic_context``: an object or its JSON text; ``{}`` when absent or bad."""
    if raw is None:
        return {}
    if isinstance(raw, str):
        if len(raw) > MAX_CONTEXT_CHARS:
            _warn("agentic_context", f"agentic_context: longer than {MAX_CONTEXT_CHARS} characters", warnings)
            return {}
        try:
            raw = json.loads(raw)
        except ValueError:
            _warn("agentic_context", "agentic_context: not a JSON object", warnings)
            return {}
    if not isinstance(raw, Mapping):
        _warn("agentic_context", f"agentic_context: expected an object, got {type(raw).__name__}", warnings)
        return {}
    return raw


def _context_program(ctx: Mapping[str, Any], session_id: Any, warnings: list[str]) -> str | None:
    """The router's program: ``program_id``, else ``task_id`` (or session) + ``:`` + ``agent_id``."""
    program = _as_id(ctx.get("program_id"), "agentic_context.program_id", warnings)
    if program is not None:
        return program
    agent = _as_id(ctx.get("agent_id"), "agentic_context.agent_id", warnings)
    if agent is None:
        return None
    base = _as_id(ctx.get("task_id"), "agentic_context.task_id", warnings)
    base = base or _as_id(ctx.get("session_id"), "agentic_context.session_id", warnings)
    base = base or _as_id(session_id, "session_id", [])
    return f"{base}:{agent}" if base else None


def _turn(xargs: Mapping[str, Any], key: str, warnings: list[str]) -> int | None:
    raw = xargs.get(key)
    if raw is None:
        return None
    if type(raw) is int and 0 <= raw <= MAX_TURN_INDEX:  # the usual case, as the general rule below reads it
        return raw
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        _warn(key, f"{key}: expected an integer, got {type(raw).__name__}", warnings)
        return None
    try:
        f = float(raw)
        if not math.isfinite(f) or f < 0 or f != int(f) or f > MAX_TURN_INDEX:
            raise ValueError
        return int(f)
    except ValueError:
        _warn(key, f"{key}: not a non-negative integer: {str(raw)[:40]!r}", warnings)
        return None


def _non_negative(xargs: Mapping[str, Any], key: str, warnings: list[str]) -> float | None:
    """A finite number >= 0 under ``key``, else None (with a warning when present but bad)."""
    raw = xargs.get(key)
    if raw is None:
        return None
    try:
        if isinstance(raw, bool):
            raise ValueError
        d = float(raw)
        if not math.isfinite(d) or d < 0:
            raise ValueError
        return d
    except (TypeError, ValueError):
        _warn(key, f"{key}: not a non-negative number: {str(raw)[:40]!r}", warnings)
        return None


# -- what vLLM's own request validation accepts ---------------------------------------------------------

_SCALAR = (str, int, float)  # bool is an int: vLLM turns it into 0/1
#: vLLM hands ``vllm_xargs`` to the engine core through msgpack, whose integers are 64-bit.
_INT_RANGE = (-(2**63), 2**64 - 1)


def _accepted_scalar(value: Any) -> bool:
    if isinstance(value, int):
        return _INT_RANGE[0] <= value <= _INT_RANGE[1]
    return isinstance(value, _SCALAR)


def sanitize_xargs(xargs: Any) -> tuple[dict[str, Any] | None, list[str]]:
    """``vllm_xargs`` rewritten so that vLLM 0.32's validation accepts it; (value, what was changed).

    vLLM answers HTTP 400 to a ``null`` value, an object value (vllm-router's ``agentic_context``), a list
    holding anything but strings and numbers, and a ``vllm_xargs`` that is not an object; an integer outside
    64 bits passes its validation but cannot reach the engine core. Here ``null`` values are dropped, objects,
    odd lists and huge integers become their JSON text (``parse_hints`` reads ``agentic_context`` from
    it), and a ``vllm_xargs`` that is not an object is dropped (None). Returns the input itself when nothing
    needs changing.
    """
    if xargs is None:
        return None, []
    if not isinstance(xargs, dict):
        return None, [f"vllm_xargs: expected an object, got {type(xargs).__name__}: dropped"]
    out: dict[str, Any] = {}
    changes: list[str] = []
    for key, value in xargs.items():
        if value is None:
            changes.append(f"{key}: null dropped")
            continue
        if _accepted_scalar(value) or (isinstance(value, list) and all(map(_accepted_scalar, value))):
            out[key] = value
            continue
        out[key] = json.dumps(value, separators=(",", ":"), default=str)[:MAX_CONTEXT_CHARS]
        changes.append(f"{key}: {type(value).__name__} passed as JSON text")
    return (out if changes else xargs), changes
