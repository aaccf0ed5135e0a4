"""``ctk train``: fit a predictor, evaluate it on held-out programs, build the TTL tables: a ModelFile."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

import ctk
from ctk.errors import CtkError
from ctk.predict.caps import caps_to_dict, learn_caps
from ctk.predict.cost import CostModel
from ctk.predict.dataset import DataError, prepare_frame, rows_fingerprint
from ctk.predict.evaluate import Progress, evaluate_frame
from ctk.predict.features import FeatureSpec
from ctk.predict.modelfile import ModelFile
from ctk.predict.predictors import (
    DEFAULT_LEVELS,
    PREDICTOR_NAMES,
    Predictor,
    RunningMeanPredictor,
    build_tables,
    make_predictor,
)
from ctk.store import TraceStore

#: Below this many calls ``ctk train`` evaluates with 5-fold by program (every call predicted once);
#: above, one program hold-out (``evaluate.HELD_OUT_GROUP_SHARE``) keeps training time bounded.
AUTO_FOLDS_ROWS = 100_000


class TrainError(CtkError, RuntimeError):
    """Training a TTL model in process failed; the message has the whole reason."""


@dataclass
class TrainConfig:
    predictor: str = "lightgbm"
    levels: tuple[float, ...] = DEFAULT_LEVELS
    #: 0: auto (5 below AUTO_FOLDS_ROWS calls, else 1); 1: one hold-out (evaluate.HELD_OUT_GROUP_SHARE);
    #: k: k-fold
    eval_folds: int = 0
    loso: bool = False  # also leave-one-source-out
    seed: int = 0
    baselines: tuple[str, ...] = ("running-mean", "histogram")
    params: dict[str, dict] = field(default_factory=dict)
    #: predict pauses for a deployment whose harness kills calls at this cap (None: each source's own cap)
    serve_cap_s: float | None = None

    def validate(self) -> None:
        if self.predictor not in PREDICTOR_NAMES:
            raise ValueError(
                f"unknown predictor {self.predictor!r}; choose one of {', '.join(PREDICTOR_NAMES)}"
            )
        lv = list(self.levels)
        if not lv or lv != sorted(set(lv)) or lv[0] <= 0 or lv[-1] >= 1:
            raise ValueError("quantile levels must be ascending, distinct and inside (0, 1)")
        if 0.5 not in lv or 0.9 not in lv:
            raise ValueError("quantile levels must include 0.5 and 0.9")


def load_rows(db: str | Path, sources: Sequence[str] | None = None) -> tuple[pd.DataFrame, str]:
    """Usable tool-call rows of a trace store (with their program's ``task_id``, the evaluation's hold-out
    group) and the store's fingerprint."""
    from ctk.store import TraceStore

    with TraceStore(db, read_only=True) as store:
        if sources:
            known = sorted(store.query("SELECT DISTINCT source FROM tool_calls")["source"].dropna())
            unknown = [s for s in sources if s not in known]
            if unknown:
                shown = ", ".join(known[:8]) + (f" ... ({len(known)} in all)" if len(known) > 8 else "")
                raise DataError(
                    f"--source {', '.join(unknown)}: no tool calls of that source in {db}; "
                    f"its sources: {shown or 'none'}"
                )
        rows = store.tool_calls(sources=list(sources) if sources else None)
        programs = store.table("programs")[["program_id", "task_id", "run_id"]]
        caps = store.table("runs")[["run_id", "config"]]
        fp = store.fingerprint()
    caps = caps.assign(harness_cap_s=caps["config"].map(config_cap_s))[["run_id", "harness_cap_s"]]
    programs = programs.merge(caps, on="run_id", how="left").drop(columns=["run_id"])
    return rows.merge(programs, on="program_id", how="left"), fp


def config_cap_s(config: str | dict | None) -> float | None:
    """The per-call timeout a collection ran with (``ctk collect --timeout``: ``timeout`` in the run's
    config), or None when the run did not record one."""
    import json

    if isinstance(config, str):
        try:
            config = json.loads(config)
        except ValueError:
            return None
    if not isinstance(config, dict):
        return None
    v = config.get("timeout")
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and v > 0 else None


def train_model(
    frame: pd.DataFrame,
    config: TrainConfig,
    cost: CostModel,
    progress: Progress | None = None,
    skipped_rows: int = 0,
    store_info: dict | None = None,
) -> tuple[ModelFile, dict]:
    """Evaluate on held-out programs, fit on all rows, build the TTL tables; returns (model, evaluation)."""
    config.validate()
    names = [config.predictor] + [b for b in config.baselines if b != config.predictor]
    params = {n: {"levels": config.levels, **config.params.get(n, {})} for n in names}
    if frame["program_id"].nunique() < 2:
        raise DataError("need at least 2 programs to hold some out for evaluation")
    folds = config.eval_folds or (5 if len(frame) < AUTO_FOLDS_ROWS else 1)
    evaluation = evaluate_frame(
        frame,
        names,
        cost,
        folds=folds,
        seed=config.seed,
        loso=config.loso,
        params=params,
        progress=progress,
    )
    fitted: dict[str, Predictor] = {}
    for i, name in enumerate(names):  # the model file holds predictors fitted on all rows
        fitted[name] = make_predictor(name, **params[name]).fit(frame)
        if progress:
            progress("fit on all rows", i + 1, len(names))
    primary = fitted[config.predictor]
    if isinstance(primary, RunningMeanPredictor):
        tables = primary.mean_tables(cost)
    else:
        tables = build_tables(primary, frame, cost)
    if progress:
        progress("TTL tables", 1, 1)
    now = time.time()
    model = ModelFile(
        tables=tables,
        cost=cost,
        predictor=config.predictor,
        predictors={n: p.to_dict() for n, p in fitted.items()},
        evaluation=evaluation,
        quantile_levels=list(config.levels),
        feature_spec=FeatureSpec().to_dict(),
        training_data={
            "rows": len(frame),
            "fingerprint": rows_fingerprint(frame),
            "programs": int(frame["program_id"].nunique()),
            "sources": {str(k): int(v) for k, v in frame["source"].value_counts().items()},
            "censored_rows": int(frame["censored"].sum()),
            "killed_rows": int(frame["killed"].sum()),
            "skipped_rows": int(skipped_rows),
            **(store_info or {}),
        },
        train_config={
            "eval_folds": folds,
            "loso": config.loso,
            "seed": config.seed,
            "serve_cap_s": config.serve_cap_s,
        },
        harness_caps=caps_to_dict(learn_caps(frame)),
        calibration=fitted[config.predictor].to_dict().get("calibration", {}),
        feature_importance=primary.feature_importance() if hasattr(primary, "feature_importance") else {},
        ctk_version=ctk.__version__,
        created_unix_s=now,
        created_utc=datetime.fromtimestamp(now, UTC).isoformat(),
    )
    return model, evaluation


def train_from_store(
    db: str | Path,
    config: TrainConfig,
    cost: CostModel,
    sources: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> tuple[ModelFile, dict]:
    rows, store_fp = load_rows(db, sources)
    frame, skipped = prepare_frame(rows, serve_cap_s=config.serve_cap_s)
    return train_model(
        frame, config, cost, progress, skipped, {"store": str(db), "store_fingerprint": store_fp}
    )


# -- training on the programs a benchmark does not replay ------------------------------------------


def training_store(db: Path, exclude: set[str], time_scale: float, out: Path) -> Path:
    """Copy ``db`` without the ``exclude``d programs, tool durations multiplied by ``time_scale``."""
    out.unlink(missing_ok=True)
    with TraceStore(db, read_only=True) as src, TraceStore(out) as dst:
        progs = src.table("programs")
        progs = progs[~progs["program_id"].isin(exclude)]
        llm = src.table("llm_calls")
        tools = src.table("tool_calls")
        tools = tools[~tools["program_id"].isin(exclude)].copy()
        tools["duration_s"] = tools["duration_s"] * time_scale
        for b in range(0, len(progs), 200):
            ids = set(progs["program_id"].iloc[b : b + 200])
            dst.add_programs(
                progs[progs["program_id"].isin(ids)],
                llm[llm["program_id"].isin(ids)],
                tools[tools["program_id"].isin(ids)],
            )
    return out


def train_ttl_model(
    train_db: Path,
    out: Path,
    profile: Path | None = None,
    block_size: int | None = None,
    config: TrainConfig | None = None,
) -> Path:
    """What ``ctk train --db train_db -o out [--profile] [--block-size]`` does, in this process
    (:func:`train_from_store`); a failure is a TrainError with the whole message."""
    from ctk.predict.profile import cost_model_from

    try:
        cost = cost_model_from(profile, block_size_tokens=block_size)
        model, _ = train_from_store(train_db, config or TrainConfig(), cost)
        model.save(out)
    except (CtkError, ValueError, OSError) as exc:
        raise TrainError(f"training the TTL model on {train_db} failed: {exc}") from exc
    return out
