"""Value types shared by the command-line options: numbers checked against their documented range.

click's ``FloatRange`` lets ``nan`` through (every comparison with nan is false) and ``inf`` too; a
:class:`Number` refuses both unless asked, so ``--pressure nan`` is an error, not a TTL of 0.
"""

from __future__ import annotations

import math

import click


class Number(click.ParamType):
    """A finite float in ``[lo, hi]`` (``lo_open``/``hi_open`` exclude the end), or an int if ``integer``."""

    name = "number"

    def __init__(
        self,
        lo: float | None = None,
        hi: float | None = None,
        *,
        lo_open: bool = False,
        hi_open: bool = False,
        integer: bool = False,
    ):
        self.lo, self.hi, self.lo_open, self.hi_open, self.integer = lo, hi, lo_open, hi_open, integer

    def describe(self) -> str:
        left = "" if self.lo is None else f"{self.lo:g} {'<' if self.lo_open else '<='} "
        right = "" if self.hi is None else f" {'<' if self.hi_open else '<='} {self.hi:g}"
        return f"{left}x{right}"

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return f"[{self.describe()}]"

    def convert(self, value, param, ctx):  # type: ignore[no-untyped-def]
        if value is None:
            return value
        try:
            x = int(value) if self.integer else float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not {'an integer' if self.integer else 'a number'}", param, ctx)
        if not self._ok(x):
            self.fail(f"{value!r} is outside {self.describe()}", param, ctx)
        return x

    def __call__(self, value):  # type: ignore[no-untyped-def]
        """As typer's ``parser=``: ``typer.Option(parser=FRACTION)`` (click reports the ValueError)."""
        try:
            return self.convert(value, None, None)
        except click.BadParameter as exc:
            raise ValueError(exc.message) from None

    def _ok(self, x: float) -> bool:
        if not math.isfinite(x):
            return False
        if self.lo is not None and (x < self.lo or (self.lo_open and x == self.lo)):
            return False
        return not (self.hi is not None and (x > self.hi or (self.hi_open and x == self.hi)))


#: Common ranges.
FRACTION = Number(0.0, 1.0)
POSITIVE = Number(0.0, lo_open=True)
NON_NEGATIVE = Number(0.0)
PORT = Number(1, 65535, integer=True)


def at_least(lo: int) -> Number:
    return Number(lo, integer=True)
