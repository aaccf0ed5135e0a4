"""Fixtures of the predict tests: a store of the bundled real traces, synthetic traces, a trained model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

#: Synthetic tools: (command template, median seconds, log-sd). Durations also scale with a per-program speed
#: factor (some machines are slow), which only the program-history features can pick up.
SYNTH_TOOLS = (
    ("ls -la {d}", 0.02, 0.3),
    ("cat {d}/notes.txt", 0.03, 0.3),
    ("python -c 'print({i})'", 0.3, 0.4),
    ("python train.py --epochs {i}", 12.0, 0.6),
    ("cd /repo && python -m pytest -k case{i}", 4.0, 0.5),
    ("pip install pkg{i}", 15.0, 0.5),
    ("git status", 0.05, 0.3),
    ("git clone https://example.org/r{i}", 3.0, 0.5),
)
TIMEOUT_S = 30.0


def synthetic_rows(
    n_programs: int = 300,
    turns: int = 12,
    seed: int = 0,
    source: str = "synthetic",
    speed_sd: float = 0.8,
    timeout_s: float = TIMEOUT_S,
) -> pd.DataFrame:
    """Tool-call rows in the store's column names; calls past ``timeout_s`` are censored at it."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_programs):
        speed = float(np.exp(rng.normal(0.0, speed_sd)))
        for t in range(turns):
            tmpl, med, sd = SYNTH_TOOLS[int(rng.integers(len(SYNTH_TOOLS)))]
            d = med * speed * float(np.exp(rng.normal(0.0, sd)))
            cens = d > timeout_s
            cmd = tmpl.format(d=f"/w{p}", i=int(rng.integers(100)))
            rows.append(
                {
                    "program_id": f"{source}-p{p:05d}",
                    "turn_index": t + 1,
                    "source": source,
                    "tool_name": cmd.split()[0],
                    "main_program": None,
                    "command_or_args": cmd,
                    "duration_s": min(d, timeout_s),
                    "call_index": 0,
                    "censored": cens,
                    "quality_flag": "timeout_censored" if cens else "ok",
                    "output_chars": int(rng.integers(10, 4000)),
                    "llm_output_chars": int(rng.integers(50, 800)),
                    "true_duration_s": d,
                }
            )
    return pd.DataFrame(rows)


def store_from_rows(path: Path, rows: pd.DataFrame) -> Path:
    """A real DuckDB trace store holding ``rows`` (programs derived from them)."""
    from ctk.store import TraceStore

    progs = rows.groupby("program_id", as_index=False).agg(
        source=("source", "first"), n_turns=("turn_index", "max")
    )
    progs["complete"] = True
    with TraceStore(path) as store:
        store.add_programs(progs, tool_calls=rows.drop(columns=["true_duration_s"], errors="ignore"))
    return path


@pytest.fixture(scope="session")
def predict_sample_store(tmp_path_factory) -> Path:
    """A trace store of the bundled sample of real agent traces (imported as ``ctk import`` does)."""
    from ctk.datasets.importer import import_paths
    from ctk.datasets.samples import sample_traces_dir
    from ctk.store import TraceStore

    path = tmp_path_factory.mktemp("predict-store") / "traces.duckdb"
    with TraceStore(path) as store:
        import_paths(store, [sample_traces_dir() / "tool_calls.csv.gz"])
    return path


@pytest.fixture(scope="session")
def synthetic_store(tmp_path_factory) -> Path:
    """Another deployment: synthetic traces in their own store."""
    return store_from_rows(
        tmp_path_factory.mktemp("predict-synth") / "other.duckdb",
        synthetic_rows(60, 10, seed=7, source="other-deployment"),
    )


@pytest.fixture(scope="session")
def trained_model(predict_sample_store, tmp_path_factory) -> Path:
    """``ctk train`` (lightgbm) on the bundled sample: the model file path."""
    from typer.testing import CliRunner

    from ctk.cli import app

    out = tmp_path_factory.mktemp("predict-model") / "model.pkl"
    r = CliRunner().invoke(app, ["train", "--db", str(predict_sample_store), "-o", str(out)])
    assert r.exit_code == 0, r.output
    return out
