"""Program identity and per-request hints from request metadata (docs/CONTRACTS.md, client -> serve).

Program = vLLM's ``session_id`` (body field, ``X-Session-ID`` header, or ``vllm_xargs.session_id``), else
``vllm_xargs.program_id``. Other ``vllm_xargs`` keys: ``turn_index`` (int), ``last_turn`` (bool/int),
``tool`` (str), ``tool_duration_s`` (float, oracle only), ``kv_retention_ttl_seconds`` (float: a client's TTL
hint, vllm-router's name for it; read by the pin rules as ``ttl_hint_s``). Garbage values are ignored with a
warning (logged at most once per key and kind), never raised: bad metadata must not crash the engine.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("ctk.engine_patch")

MAX_ID_CHARS = 256
MAX_TOOL_CHARS = 4000
_warned: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class RequestHints:
    program_id: str | None = None
    turn_index: int | None = None
    last_turn: bool = False
    tool: str | None = None
    tool_duration_s: float | None = None
    ttl_hint_s: float | None = None  # the client's own TTL for this turn's pin (``kv_retention_ttl_seconds``)
    warnings: tuple[str, ...] = field(default=(), compare=False)


def _warn(key: str, msg: str, warnings: list[str]) -> None:
    warnings.append(msg)
    if (key, msg.split(":")[0]) not in _warned and len(_warned) < 1000:
        _warned.add((key, msg.split(":")[0]))
        logger.warning("ctk: ignoring request metadata %s", msg)


def _as_id(value: Any, key: str, warnings: list[str]) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        _warn(key, f"{key}: expected a string, got {type(value).__name__}", warnings)
        return None
    s = str(value).strip()
    if not s:
        return None
    if len(s) > MAX_ID_CHARS:
        _warn(key, f"{key}: longer than {MAX_ID_CHARS} characters", warnings)
        return None
    return s


def parse_hints(session_id: Any, extra_args: Mapping[str, Any] | None) -> RequestHints:
    """Hints of one request; never raises."""
    warnings: list[str] = []
    xargs: Mapping[str, Any] = extra_args if isinstance(extra_args, Mapping) else {}
    if extra_args is not None and not isinstance(extra_args, Mapping):
        _warn("vllm_xargs", f"vllm_xargs: expected an object, got {type(extra_args).__name__}", warnings)

    program = _as_id(session_id, "session_id", warnings)
    if program is None:
        program = _as_id(xargs.get("session_id"), "session_id", warnings)
    if program is None:
        program = _as_id(xargs.get("program_id"), "program_id", warnings)

    turn = None
    raw = xargs.get("turn_index")
    if raw is not None:
        if isinstance(raw, bool) or not isinstance(raw, int | float | str):
            _warn("turn_index", f"turn_index: expected an integer, got {type(raw).__name__}", warnings)
        else:
            try:
                f = float(raw)
                if not math.isfinite(f) or f < 0 or f != int(f):
                    raise ValueError
                turn = int(f)
            except ValueError:
                _warn("turn_index", f"turn_index: not a non-negative integer: {str(raw)[:40]!r}", warnings)

    last = False
    raw = xargs.get("last_turn")
    if raw is not None:
        if isinstance(raw, bool):
            last = raw
        elif isinstance(raw, int | float) and raw in (0, 1):
            last = bool(raw)
        elif isinstance(raw, str) and raw.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
            last = raw.strip().lower() in ("true", "1", "yes")
        else:
            _warn("last_turn", f"last_turn: expected a boolean: {str(raw)[:40]!r}", warnings)

    tool = None
    raw = xargs.get("tool")
    if raw is not None:
        if isinstance(raw, str) and raw.strip():
            tool = raw.strip()[:MAX_TOOL_CHARS]
        elif not (isinstance(raw, str)):
            _warn("tool", f"tool: expected a string, got {type(raw).__name__}", warnings)

    duration = _non_negative(xargs, "tool_duration_s", warnings)
    ttl_hint = _non_negative(xargs, "kv_retention_ttl_seconds", warnings)

    return RequestHints(program, turn, last, tool, duration, ttl_hint, tuple(warnings))


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
