"""The ``ctk`` command line. Each part registers its own commands from ``<part>/commands.py``."""

from __future__ import annotations

import importlib
import importlib.util

import typer

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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
