"""Admission gates (ctk.policy.pause, ctk.policy.admit) on a 16,000-token cache: ticked by hand."""

from __future__ import annotations

from typing import TypeVar

from ctk.policy.events import EngineState

CAP_BLOCKS, BS = 1000, 16  # 16,000 tokens
CAP = CAP_BLOCKS * BS

G = TypeVar("G")


def tick(g, now: float) -> None:
    """The driver's tick at ``now`` (the gate learns the cache's size from it)."""
    g.tick(EngineState(now, free_blocks=0, total_blocks=CAP_BLOCKS, block_size=BS))


def started(g: G) -> G:
    """``g`` after its first tick at 0."""
    tick(g, 0.0)
    return g
