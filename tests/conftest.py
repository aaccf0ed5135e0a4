"""Shared pytest set-up: paths of the shared traces and the bundled sample, and every fixture module.

The fixtures of each part (a tiny model and engine, sample stores, trained models) live in
``tests/<part>_fixtures.py`` and are registered here once, so a test names a fixture as an argument and
imports nothing for it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_TRACES = REPO.parent / "shared" / "data" / "agent-traces"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

pytest_plugins = ("engine_fixtures", "measure_fixtures", "predict_fixtures")


@pytest.fixture(scope="session")
def shared_traces() -> Path:
    """The real agent traces beside the checkout (skips where a clone has no shared/ folder)."""
    if not (SHARED_TRACES / "tool_calls.csv").exists():
        pytest.skip("shared/data/agent-traces is not beside this checkout")
    return SHARED_TRACES


@pytest.fixture(scope="session")
def ctk_bin() -> list[str]:
    """How to run the ctk CLI of this checkout in a subprocess."""
    import sys

    return [sys.executable, "-m", "ctk.cli"]
