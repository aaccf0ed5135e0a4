"""The ``ctk`` command line. Each part registers its own commands from ``<part>/commands.py``."""

from __future__ import annotations

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

# Registration order is the order of the loop: collect -> predict -> serve -> measure. Each ``register`` only
# declares commands; heavy libraries are imported inside the commands, so ``ctk --help`` stays fast.
from ctk.collect import commands as _collect  # noqa: E402
from ctk.datasets import commands as _datasets  # noqa: E402
from ctk.engine_patch.serve import commands as _serve  # noqa: E402
from ctk.measure import commands as _measure  # noqa: E402
from ctk.predict import commands as _predict  # noqa: E402
from ctk.simulate import commands as _simulate  # noqa: E402

for _part in (_datasets, _collect, _predict, _serve, _measure, _simulate):
    _part.register(app)


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
