"""The ``ttl`` model a simulation trains for itself (``ctk.simulate.ttl``)."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

from tests.predict_fixtures import store_from_rows, synthetic_rows


def _train(db: str, work: str) -> int:
    from ctk.simulate.profiles import load_profile
    from ctk.simulate.ttl import ttl_tables

    _, tables = ttl_tables(Path(db), [], load_profile("h100", "llama-3.1-8b"), Path(work))
    return len(tables.quantiles_s)


def test_simulations_sharing_a_work_dir_train_their_models_without_colliding(tmp_path):
    """Two ``ctk simulate`` runs started together in one directory (each trains its ttl model on a copy of
    the store): each copy is the run's own, so both train (one failed on the other's half-written copy:
    "empty file, not a ctk trace store"), and no copy is left behind."""
    db = store_from_rows(tmp_path / "traces.duckdb", synthetic_rows(80, 8, seed=2))
    work = tmp_path / "work"
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(3) as pool:
        keys = pool.starmap(_train, [(str(db), str(work))] * 3)
    assert all(k > 0 for k in keys) and len(set(keys)) == 1
    left = sorted(p.name for p in work.iterdir())
    assert left == ["model-h100--llama-3.1-8b.pkl", "prefill-h100--llama-3.1-8b.json"], left
