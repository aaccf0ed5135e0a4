"""Tool calls imported per second into the DuckDB trace store (target: >= 100,000/s on 2 cores).

Measures, in one run, on synthetic programs shaped like the agent traces (10-40 calls a program):

- ``batch``: ctk's path, ``TraceStore.add_programs`` with whole frames per transaction;
- ``csv``: the full ``ctk import`` path of an agent-traces CSV (parse + batch insert);
- ``row-by-row``: the baseline, one INSERT per tool call (a transaction per program), on a subset;
- ``ctk import`` as a command (a new process: Python start-up, imports, the import, the summary) on the same
  CSV and on a 3,530-call CSV, the size of the shared agent traces, where start-up dominates.

Usage: ``python bench/ingest.py [--calls 500000]``
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ctk.datasets.importer import import_paths
from ctk.store import ToolCallRecord, TraceStore, records_frame

TARGET_PER_S = 100_000


def synthetic_frames(n_calls: int, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(10, 41, size=n_calls // 10)
    sizes = sizes[np.cumsum(sizes) <= n_calls]
    n = int(sizes.sum())
    pids = np.repeat([f"bench-{i:07d}" for i in range(len(sizes))], sizes)
    turns = np.concatenate([np.arange(s) for s in sizes])
    tools = np.array(["cat", "ls", "python3", "pip", "git", "pytest", "sed", "grep"])[rng.integers(0, 8, n)]
    duration = rng.lognormal(-2.0, 2.0, n)
    calls = pd.DataFrame(
        {
            "program_id": pids,
            "turn_index": turns,
            "source": "bench",
            "tool_name": tools,
            "main_program": tools,
            "command_or_args": np.char.add(tools, " -x file.py"),
            "duration_s": duration,
            "call_index": 0,
            "start_unix_s": 1.7e9 + np.arange(n, dtype=float),
            "end_unix_s": 1.7e9 + np.arange(n) + duration,
            "exit_status": "0",
            "output_chars": 100,
            "censored": duration > 30,
            "quality_flag": "ok",
            "provenance": "bench",
            "injected": False,
            "is_final": False,
            "context_tokens": 2000,
            "llm_output_tokens": 100,
            "llm_output_chars": 400,
        }
    )
    programs = pd.DataFrame(
        {
            "program_id": [f"bench-{i:07d}" for i in range(len(sizes))],
            "source": "bench",
            "n_turns": sizes,
            "complete": True,
        }
    )
    return programs, calls


def bench_batch(tmp: Path, programs: pd.DataFrame, calls: pd.DataFrame, per_tx: int = 2000) -> float:
    store = TraceStore(tmp / "batch.duckdb")
    start = time.perf_counter()
    ids = programs["program_id"].to_numpy()
    for i in range(0, len(ids), per_tx):
        chunk = set(ids[i : i + per_tx])
        store.add_programs(
            programs[programs["program_id"].isin(chunk)], (), calls[calls["program_id"].isin(chunk)]
        )
    elapsed = time.perf_counter() - start
    assert store.counts()["tool_calls"] == len(calls)
    store.close()
    return len(calls) / elapsed


def bench_csv(tmp: Path, calls: pd.DataFrame) -> float:
    folder = tmp / "csv"
    folder.mkdir()
    calls.assign(quality_flag="ok").to_csv(folder / "tool_calls.csv", index=False)
    store = TraceStore(tmp / "csv.duckdb")
    start = time.perf_counter()
    summary = import_paths(store, [folder], batch_programs=2000)
    elapsed = time.perf_counter() - start
    assert summary.tool_calls_added == len(calls), summary
    store.close()
    return len(calls) / elapsed


def bench_command(tmp: Path, calls: pd.DataFrame, name: str) -> float:
    """``ctk import FILE --db NEW`` in a new process, wall clock from start to exit."""
    import subprocess
    import sys

    csv = tmp / f"{name}.csv"
    calls.assign(quality_flag="ok").to_csv(csv, index=False)
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "ctk.cli", "import", str(csv), "--db", str(tmp / f"{name}.duckdb"),
         "--batch-programs", "2000"],
        check=True, capture_output=True,
    )
    return len(calls) / (time.perf_counter() - start)


def bench_row_by_row(tmp: Path, programs: pd.DataFrame, calls: pd.DataFrame, n_programs: int = 40) -> float:
    store = TraceStore(tmp / "rows.duckdb")
    subset = calls[calls["program_id"].isin(set(programs["program_id"].iloc[:n_programs]))]
    records = [ToolCallRecord(**row) for row in subset.to_dict("records")]
    start = time.perf_counter()
    for _pid, group in pd.Series(records).groupby(subset["program_id"].to_numpy()):
        for rec in group:
            store.add_tool_call(rec)
    elapsed = time.perf_counter() - start
    assert len(records_frame(records, "tool_calls")) == store.counts()["tool_calls"]
    store.close()
    return len(records) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=500_000, help="synthetic tool calls to import")
    args = parser.parse_args()
    programs, calls = synthetic_frames(args.calls)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        batch = bench_batch(tmp, programs, calls)
        csv = bench_csv(tmp, calls)
        rows = bench_row_by_row(tmp, programs, calls)
        command = bench_command(tmp, calls, "command")
        small = calls[calls["program_id"].isin(set(programs["program_id"].iloc[:140]))].head(3530)
        command_small = bench_command(tmp, small, "command-small")
    print(f"tool calls: {len(calls):,} in {len(programs):,} programs")
    print(f"{'path':<28}{'calls/s':>12}{'vs row-by-row':>16}{'vs target':>12}")
    for name, rate in [
        ("batch (add_programs)", batch),
        ("ctk import of a CSV", csv),
        ("row-by-row baseline", rows),
        ("`ctk import` command", command),
        (f"`ctk import`, {len(small):,} calls", command_small),
    ]:
        print(f"{name:<28}{rate:>12,.0f}{rate / rows:>15.1f}x{rate / TARGET_PER_S:>11.2f}x")
    verdict = "meets" if batch >= TARGET_PER_S else "MISSES"
    print(f"target >= {TARGET_PER_S:,} tool calls/s: batch path {verdict} it ({batch:,.0f}/s)")


if __name__ == "__main__":
    main()
