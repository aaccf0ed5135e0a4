"""The one progress bar: its columns, its quiet mode when piped, and that importing it does not load rich."""

from __future__ import annotations

import io
import subprocess
import sys

from rich.console import Console

from ctk.progress import progress_bar


def _console(terminal: bool) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=terminal, width=120, color_system=None), out


def test_bar_shows_count_unit_and_status():
    console, out = _console(terminal=True)
    with progress_bar(unit="programs", status=True, console=console, transient=False) as bar:
        task = bar.add_task("swebench", total=5, status="")
        bar.advance(task, 3)
        bar.update(task, status="ok 3, failed 0")
    text = out.getvalue()
    assert "swebench" in text and "3/5 programs" in text and "ok 3, failed 0" in text


def test_only_on_terminal_draws_nothing_when_piped():
    console, out = _console(terminal=False)
    with progress_bar(console=console, only_on_terminal=True) as bar:
        assert bar.disable
        bar.advance(bar.add_task("importing", total=2), 2)
    assert out.getvalue() == ""
    console, _ = _console(terminal=True)
    assert not progress_bar(console=console, only_on_terminal=True).disable


def test_import_does_not_load_rich():
    code = "import sys, ctk.progress; print('rich' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
