"""Paths of the data bundled with ctk (so the demo and tests run without ``shared/``)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def sample_traces_dir() -> Path:
    """Folder with ``tool_calls.csv.gz`` and ``llm_calls.csv.gz``: a sample of real agent timings."""
    return Path(str(files("ctk.datasets") / "data" / "agent_traces_sample"))
