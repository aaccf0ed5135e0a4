"""The ``ctk`` command line. Each part registers its own commands from ``<part>/commands.py``."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from ctk.errors import quiet_ctrl_c_while_loading, run_cli

if __name__ == "__main__" or Path(sys.argv[0]).name == "ctk":  # run as a program, not imported by tests
    quiet_ctrl_c_while_loading()

import typer  # noqa: E402


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"ctk {version('ctk')}")
        except PackageNotFoundError:
            typer.echo("ctk (not installed)")
        raise typer.Exit()


def _consistent_help() -> None:
    """One help convention for every command: flags show no value type (they take none), and arguments
    are named in capitals in usage lines (``PATHS...``, ``INPUT``) like options' values."""
    from typer.core import TyperArgument, TyperOption

    shown_type = TyperOption.display_type_rich
    TyperOption.display_type_rich = lambda self, ctx: None if self.is_flag else shown_type(self, ctx)
    TyperArgument.display_name_raw = property(lambda self: self.metavar or (self.name or "").upper())


_consistent_help()

app = typer.Typer(
    name="ctk",
    help="ctk: collect agent traces, predict tool durations, serve vLLM with TTL pins, measure.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Registration order is the order of the loop: collect -> predict -> serve -> measure.
COMMAND_MODULES = (
    "ctk.datasets.commands",
    "ctk.collect.commands",
    "ctk.predict.commands",
    "ctk.engine_patch.commands",
    "ctk.measure.commands",
    "ctk.simulate.commands",
)

for _name in COMMAND_MODULES:
    if importlib.util.find_spec(_name) is not None:  # TODO(lead): drop once every part has landed
        importlib.import_module(_name).register(app)


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print ctk's version and exit."
    ),
) -> None:
    """ctk: collect agent traces, predict tool durations, serve vLLM with TTL pins, measure."""


def main() -> None:
    """The ``ctk`` entry point: a ctk error, a bad path or Ctrl-C ends in one line and a non-zero exit."""
    run_cli(app)


if __name__ == "__main__":
    main()
