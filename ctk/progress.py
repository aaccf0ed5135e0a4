"""The one progress bar every long-running command draws (collect, import, train, replay, simulate).

rich is imported inside :func:`progress_bar`, so importing this module (and ``ctk --help``) stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress


def progress_bar(
    *,
    unit: str = "",
    status: bool = False,
    console: Console | None = None,
    transient: bool = True,
    only_on_terminal: bool = False,
) -> Progress:
    """A rich ``Progress`` with the house columns: description, bar, done/total [unit], elapsed[, status].

    Args:
        unit: word printed after the count ("programs", "turns"); none when empty.
        status: add a last column showing each task's ``status`` field, so every task must be added
            with one: ``add_task(label, total=n, status="")`` and changed with ``update(task, status=...)``.
        console: where to draw (rich's default console, stdout, when None).
        transient: erase the bar when it stops (False leaves the last state on screen).
        only_on_terminal: draw nothing when ``console`` is not a terminal, so piped output stays clean.

    Use it as a context manager (``with progress_bar() as bar:``) or call ``start()``/``stop()``.
    """
    from rich import get_console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()]
    if unit:
        columns.append(TextColumn(unit))
    columns.append(TimeElapsedColumn())
    if status:
        columns.append(TextColumn("{task.fields[status]}"))
    disable = only_on_terminal and not (console or get_console()).is_terminal
    return Progress(*columns, console=console, transient=transient, disable=disable)
