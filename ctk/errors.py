"""One base class for every ctk error, and the rule that turns errors into one line at the command line.

Every exception class ctk raises on purpose derives from :class:`CtkError`; its message is one line that
says what is wrong (and usually what to do). The CLI entry (:func:`run_cli`) prints that line and exits
non-zero instead of showing a traceback; Ctrl-C exits 130 quietly, and a file-system error on a path the
user gave (missing, unwritable, a folder) is one line too. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

#: Exit codes: 2 = bad input or a failed operation, 130 = interrupted (as a shell reports SIGINT).
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


class CtkError(Exception):
    """Base of every ctk error; ``str(exc)`` is the one line the user sees."""


def _is_interrupt(exc: BaseException) -> bool:
    """DuckDB turns a Ctrl-C during a query into its own exception or ``RuntimeError: Query interrupted``."""
    if "Interrupt" in type(exc).__name__:
        return True
    from_duckdb = "duckdb" in type(exc).__module__ or type(exc) is RuntimeError
    return from_duckdb and "interrupted" in str(exc).lower()


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (an OSError names its path and reason, as ``ls`` would)."""
    if isinstance(exc, OSError) and exc.filename is not None:
        text = f"{exc.filename}: {exc.strerror or exc}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def quiet_ctrl_c_while_loading() -> None:
    """Ctrl-C while the command modules load (pandas, duckdb: a second or two) exits 130 at once instead of
    printing an import traceback; :func:`run_cli` restores Python's handler before the command runs."""
    import os
    import signal

    signal.signal(signal.SIGINT, lambda *_: os._exit(EXIT_INTERRUPTED))


def run_cli(main: Callable[[], Any]) -> None:
    """Run ``main`` (the typer app); CtkError, OSError and interrupts end in one line and an exit code."""
    import signal

    if signal.getsignal(signal.SIGINT) not in (signal.SIG_IGN, None):
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)
    except CtkError as exc:
        _fail(one_line(exc))
    except OSError as exc:
        if exc.filename is None:
            raise
        _fail(one_line(exc))
    except Exception as exc:
        if _is_interrupt(exc):
            sys.exit(EXIT_INTERRUPTED)
        raise


def print_error(console: Any, message: str) -> None:
    """Print ``error: message`` on a rich console as one line: never wrapped at the console's width, and
    brackets in a path are text, not markup."""
    from rich.markup import escape

    console.print(f"[red]error:[/red] {escape(' '.join(message.split()))}", soft_wrap=True, highlight=False)


def _fail(message: str) -> None:
    sys.stderr.write(f"error: {message}\n")
    sys.exit(EXIT_ERROR)
