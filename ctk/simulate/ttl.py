"""The ``ttl`` policy's model for a simulation: given, or trained as the benchmark trains it.

As in :func:`ctk.measure.compare.run_comparison`: ``ctk train`` on the store minus the simulated programs,
tool durations on the simulation's clock (× ``time_scale``), with the SIMULATED hardware's prefill profile
(:meth:`HardwareProfile.prefill_profile`) and block size, so the cost model the policy decides with is the
one the simulated engine pays.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

from ctk.files import write_atomically
from ctk.measure.workload import ProgramSpec
from ctk.predict.train import train_ttl_model, training_store
from ctk.simulate.profiles import HardwareProfile


def ttl_tables(
    db: Path,
    programs: list[ProgramSpec],
    profile: HardwareProfile,
    work_dir: Path,
    time_scale: float = 1.0,
    ttl_model: Path | None = None,
    log: Callable[[str], None] | None = None,
):
    """(model path, TTL tables): ``ttl_model`` loaded, else a model trained on the other programs."""
    from ctk.predict.modelfile import load_ttl_tables

    if ttl_model is None:
        work_dir = Path(work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
        prof_path = work_dir / f"prefill-{profile.name}.json"
        text = json.dumps(profile.prefill_profile(), indent=1)
        write_atomically(prof_path, lambda tmp: tmp.write_text(text))
        exclude = {p.program_id for p in programs}
        model_path = work_dir / f"model-{profile.name}.pkl"
        # the training copy in a directory of this run's own: runs sharing a work dir do not collide
        with tempfile.TemporaryDirectory(prefix=".train-", dir=work_dir) as tmp:
            train_db = training_store(db, exclude, time_scale, Path(tmp) / "train.duckdb")
            ttl_model = train_ttl_model(train_db, model_path, prof_path, profile.block_size)
        if log is not None:
            n = len(exclude)
            log(f"trained {ttl_model} on {db} minus the {n} simulated programs ({profile.name} costs)")
    return Path(ttl_model), load_ttl_tables(str(ttl_model))
