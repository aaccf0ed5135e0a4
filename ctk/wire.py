"""The wire contract: what ctk reads from a request, and the size limits of what it records.

One home for the rules every part must agree on (docs/CONTRACTS.md, client -> serve):

- **program identity**, in vLLM's order (``GenerateBaseServing._get_session_id``): the body's ``session_id``,
  the ``X-Session-ID`` header, ``vllm_xargs.session_id``; then ctk's own ``vllm_xargs.program_id``
  (:func:`program_identity`, :data:`XARGS_IDENTITY_KEYS`);
- the names of the other ``vllm_xargs`` keys ctk reads (the per-request hints, parsed leniently on the
  engine's hot path by :func:`ctk.policy.hints.parse_hints`) and their bounds;
- which tool exceptions are timeouts (:func:`is_timeout`: the call was killed, its duration is censored);
- how much of a command a trace record keeps (:data:`MAX_COMMAND_CHARS`), and the largest request body the
  recording proxy reads (:data:`MAX_BODY_BYTES`).

Pure Python, no ctk import: every part may import it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# -- request metadata ------------------------------------------------------------------------------------

SESSION_HEADER = "x-session-id"  # lower case: look it up in lower-cased headers
SESSION_ID = "session_id"  # body field, and a vllm_xargs key
XARGS = "vllm_xargs"  # the body field carrying vLLM's extra args
PROGRAM_ID = "program_id"  # ctk: program identity when no session id is given
#: ``vllm_xargs`` keys naming the program, in the order they are tried (after the body field and header).
XARGS_IDENTITY_KEYS = (SESSION_ID, PROGRAM_ID)

TURN_INDEX = "turn_index"  # int: the turn number within the program
LAST_TURN = "last_turn"  # bool / 0 / 1: the program's last turn (never pin after it)
TOOL = "tool"  # str: the command / tool the client runs after this turn
TOOL_DURATION_S = "tool_duration_s"  # float: that call's true duration (policy oracle; benchmarks only)
PROGRAM_SIZE = "program_size"  # float: the program's true engine work, s (admission probe; benchmarks)
AGENT = "agent"  # str: the agent (software / kind) running the program: the size predictor's class
#: The agent classes ctk derives from a prompt's prefix when the request names no agent are this followed by
#: hex digits of the prefix's block hash; a named agent may not start with it (ignored with a warning).
DERIVED_AGENT = "prefix:"
TTL_HINT_S = "kv_retention_ttl_seconds"  # float: the client's TTL for this turn's pin (vllm-router's name)
AGENTIC_CONTEXT = "agentic_context"  # vllm-router's Program Scheduling object (or its JSON text)
#: Every ``vllm_xargs`` key ctk reads.
HINT_KEYS = (
    *XARGS_IDENTITY_KEYS,
    TURN_INDEX,
    LAST_TURN,
    TOOL,
    TOOL_DURATION_S,
    PROGRAM_SIZE,
    AGENT,
    TTL_HINT_S,
    AGENTIC_CONTEXT,
)

MAX_ID_CHARS = 256  # a longer program id is ignored
MAX_TOOL_CHARS = 4000  # a ``tool`` hint is cut to this
MAX_TURN_INDEX = 2**31 - 1
MAX_CONTEXT_CHARS = 16 * 1024  # vllm-router's bound on an agentic_context


def xargs_of(body: Mapping[str, Any]) -> Mapping[str, Any]:
    """The body's ``vllm_xargs`` when it is an object, else ``{}``."""
    xargs = body.get(XARGS)
    return xargs if isinstance(xargs, Mapping) else {}


def as_program_id(value: Any) -> tuple[str | None, str | None]:
    """``(program id, problem)`` of one identity value: a string or an integer, stripped, non-empty, at most
    :data:`MAX_ID_CHARS` long. Absent or blank gives ``(None, None)``; anything else ``(None, why not)``."""
    if value is None:
        return None, None
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None, f"expected a string, got {type(value).__name__}"
    text = str(value).strip()
    if len(text) > MAX_ID_CHARS:
        return None, f"longer than {MAX_ID_CHARS} characters"
    return (text or None), None


SESSION_HEADER_NAME = "X-Session-ID"  # the header as clients send it (vllm-router routes on it)


def turn_xargs(
    program_id: str,
    turn_index: int,
    last_turn: bool | None,
    tool: str | None = None,
    tool_duration_s: float | None = None,
    program_size: float | None = None,
    agent: str | None = None,
) -> dict[str, Any]:
    """The ``vllm_xargs`` a client sends to name a program's turn (``last_turn`` None: unknown, not sent)."""
    xargs: dict[str, Any] = {PROGRAM_ID: program_id, TURN_INDEX: turn_index}
    if last_turn is not None:
        xargs[LAST_TURN] = int(last_turn)
    if tool:
        xargs[TOOL] = tool
    if tool_duration_s is not None:
        xargs[TOOL_DURATION_S] = tool_duration_s
    if program_size is not None:
        xargs[PROGRAM_SIZE] = program_size
    if agent:
        xargs[AGENT] = agent
    return xargs


def session_body(program_id: str, xargs: Mapping[str, Any]) -> dict[str, Any]:
    """The body fields naming the program: vLLM's ``session_id`` and ctk's ``vllm_xargs``."""
    return {SESSION_ID: program_id, XARGS: dict(xargs)}


def session_headers(program_id: str) -> dict[str, str]:
    """The header naming the program (what vllm-router's consistent hashing and program binding read)."""
    return {SESSION_HEADER_NAME: program_id}


def program_identity(headers: Mapping[str, str], body: Mapping[str, Any]) -> str | None:
    """The program a request belongs to, as the client named it (None: unnamed).

    ``headers`` must have lower-case names. The first valid id (:func:`as_program_id`) in vLLM's order wins:
    body ``session_id``, ``X-Session-ID`` header, ``vllm_xargs.session_id``, ``vllm_xargs.program_id``.
    """
    xargs = xargs_of(body)
    for value in (body.get(SESSION_ID), headers.get(SESSION_HEADER), *map(xargs.get, XARGS_IDENTITY_KEYS)):
        program = as_program_id(value)[0]
        if program is not None:
            return program
    return None


# -- what a trace record keeps ---------------------------------------------------------------------------

MAX_COMMAND_CHARS = 2000  # a tool call's command / arguments are stored cut to this many characters
MAX_BODY_BYTES = 32_000_000  # the recording proxy answers HTTP 413 to larger request bodies


def clip_command(command: str | None) -> str | None:
    """``command`` as a trace record stores it: at most :data:`MAX_COMMAND_CHARS` characters."""
    return command[:MAX_COMMAND_CHARS] if command else command


def is_timeout(exception_type: object) -> bool:
    """True when a tool call's exception (its class name, e.g. mini-swe-agent's ``extra.exception_type``)
    is a timeout: ``TimeoutExpired``, ``TimeoutError``, ``CommandTimeoutError``, any ``*Timeout*``. The call
    was killed, so its true duration is at least the recorded one (censored)."""
    return isinstance(exception_type, str) and "timeout" in exception_type.lower()
