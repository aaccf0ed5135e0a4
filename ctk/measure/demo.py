"""``ctk demo`` / ``make demo``: the whole loop on embedded defaults, in one folder, under 10 minutes.

bundled sample traces -> ``ctk import`` (a trace store) -> tiny model -> ``ctk train`` (on the programs that
are not replayed) -> ``ctk serve`` the tiny model once per policy -> ``ctk replay`` a few programs ->
``ctk report``. Prints the comparison table and the report's path.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from ctk.measure.compare import Comparison, run_comparison
from ctk.measure.presets import demo_config
from ctk.measure.table import format_table


def import_sample(out_dir: Path) -> Path:
    """The bundled sample of real traces as a trace store (made once; reused on the next run)."""
    from ctk.datasets.importer import import_paths
    from ctk.datasets.samples import sample_traces_dir
    from ctk.store import TraceStore

    db = out_dir / "traces.duckdb"
    if db.exists():
        return db
    tmp = out_dir / "traces.tmp.duckdb"
    tmp.unlink(missing_ok=True)
    with TraceStore(tmp) as store:
        import_paths(store, [sample_traces_dir() / "tool_calls.csv.gz"])
    tmp.rename(db)
    return db


def tiny_model(out_dir: Path) -> Path:
    from ctk.engine_patch.serve.tiny_model import build_tiny_model

    path = out_dir / "tiny-model"
    if not (path / "config.json").exists():
        build_tiny_model(path)
    return path


def run_demo(
    out_dir: Path,
    policies: list[str] | None = None,
    programs: int | None = None,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> tuple[Comparison, Path]:
    """Run the loop; returns the comparison and the report's HTML path."""
    from ctk.measure.report import build_report, load_inputs

    t0 = time.monotonic()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    db = import_sample(out_dir)
    log(f"[demo] trace store {db}")
    model_dir = tiny_model(out_dir)
    log(f"[demo] tiny model {model_dir}")
    cfg = demo_config(seed=seed)
    if policies:
        cfg.policies = policies
    if programs:
        cfg.workload.n_programs = programs
    comp = run_comparison(db, model_dir, out_dir, cfg, log=log)
    model = out_dir / "model.pkl"
    inputs = load_inputs(
        db, [out_dir / "compare-results.json"], model if model.exists() else None, cfg.replay.time_scale
    )
    page = build_report(inputs, out_dir / "report")
    log(f"[demo] done in {time.monotonic() - t0:.0f} s")
    return comp, page


def main(out_dir: Path, policies: list[str] | None = None, programs: int | None = None) -> int:
    from ctk.measure.compare import CompareError
    from ctk.measure.workload import WorkloadError
    from ctk.store import StoreError

    try:
        comp, page = run_demo(out_dir, policies, programs, log=lambda m: print(m, flush=True))
    except (CompareError, WorkloadError, StoreError) as exc:
        print(f"error: {exc}")
        return 2
    except KeyboardInterrupt:
        print(f"interrupted; what finished is in {out_dir}")
        return 130
    print()
    print(format_table(comp))
    print(f"\nreport: {page}")
    return 0
