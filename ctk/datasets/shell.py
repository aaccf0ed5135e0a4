"""Name the tool of a shell command the way the agent-traces data does.

``tool_name`` is the first word of the command; ``main_program`` is the first program that does the work,
after leading ``cd`` / ``export`` / ``source`` segments, ``VAR=value`` assignments and wrappers such as
``timeout 30`` or ``sudo``. ``cd /app && timeout 10 python3 x.py`` -> ``("cd", "python3")``.
"""

from __future__ import annotations

import re
import shlex

_SEGMENT_SPLIT = re.compile(r"&&|\|\||;|\||\n")
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_SETUP = {"cd", "pushd", "popd", "export", "source", ".", "set", "unset", "alias", "ulimit", "umask"}
_WRAPPERS = {"sudo", "env", "nohup", "time", "nice", "command", "exec", "stdbuf", "xargs"}


def _tokens(segment: str) -> list[str]:
    try:
        return shlex.split(segment, posix=True)
    except ValueError:  # unbalanced quotes in a heredoc or a truncated command
        return segment.split()


def _program_of(tokens: list[str]) -> str | None:
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if _ASSIGNMENT.match(tok) or tok.startswith("-"):
            i += 1
        elif tok == "timeout":
            i += 1
            while i < len(tokens) and (
                tokens[i].startswith("-") or re.fullmatch(r"[\d.]+[smhd]?", tokens[i])
            ):
                i += 1
        elif tok in _WRAPPERS:
            i += 1
        else:
            return tok
    return None


def split_command(command: str | None) -> tuple[str | None, str | None]:
    """``(tool_name, main_program)`` of a shell command; ``(None, None)`` for an empty one."""
    if not command or not command.strip():
        return None, None
    first = command.strip().split(None, 1)[0]
    main = None
    for segment in _SEGMENT_SPLIT.split(command):
        tokens = _tokens(segment.strip())
        if not tokens:
            continue
        program = _program_of(tokens)
        if program is None or program in _SETUP:
            continue
        main = program
        break
    return first, main or first
