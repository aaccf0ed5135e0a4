"""A tiny calculator package (a sample task for ctk)."""

from calc.ops import add, mean, sub

__all__ = ["add", "mean", "sub"]
