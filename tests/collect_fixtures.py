"""Helpers for the collect tests: a scripted model server over real HTTP, scripts, store reads."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from ctk.datasets.instances import bundled_script_path
from ctk.datasets.scripted_server import BackgroundServer, Script, create_app

CTK = [sys.executable, "-m", "ctk.cli"]
#: Subprocess environment: fail fast instead of mini-swe-agent's 10 retries with exponential back-off.
COLLECT_ENV = {
    **os.environ,
    "MSWEA_MODEL_RETRY_STOP_AFTER_ATTEMPT": "1",
    "MSWEA_SILENT_STARTUP": "1",
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "HF_HUB_OFFLINE": "1",
}
os.environ.update(
    {
        k: COLLECT_ENV[k]
        for k in (
            "MSWEA_MODEL_RETRY_STOP_AFTER_ATTEMPT",
            "MSWEA_SILENT_STARTUP",
            "LITELLM_LOCAL_MODEL_COST_MAP",
        )
    }
)


@dataclass
class Served:
    base_url: str
    app: Any

    def requests(self) -> list[dict[str, Any]]:
        return self.app.state.log.snapshot()


@contextmanager
def scripted_server(script: Script | dict, latency_s: float = 0.0) -> Iterator[Served]:
    if isinstance(script, dict):
        script = Script.from_dict(script)
    app = create_app(script, latency_s=latency_s)
    with BackgroundServer(app) as url:
        yield Served(url, app)


def bundled_script_dict() -> dict[str, Any]:
    return json.loads(bundled_script_path().read_text())


def read_table(db: Path, table: str) -> pd.DataFrame:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(f"SELECT * FROM {table}").df()
    finally:
        con.close()
