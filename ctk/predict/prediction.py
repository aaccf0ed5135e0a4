"""Predictions of a model file for tool-call rows: what ``ctk predict`` writes, usable without the CLI."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ctk.predict.modelfile import ModelFile


@dataclass
class RowPredictions:
    """One row per predicted call (see :func:`ctk.predict.evaluate.prediction_rows` for the columns)."""

    rows: pd.DataFrame
    skipped_rows: int  # input rows that could not be featurized (or, online, had no start time)
    predictor: str  # the predictor used; ``<name>+online`` for the online replay


def predict_rows(
    model: ModelFile,
    rows: pd.DataFrame,
    pressure: float = 0.9,
    predictor: str | None = None,
    online: bool = False,
) -> RowPredictions:
    """Duration quantiles, the TTL and P(T <= TTL) of ``predictor`` (default: the model's own) for every
    row, with the decision of the model's TTL table at ``pressure`` (the KV-cache usage, 0..1).

    ``online``: replay the rows in start order, each decided by the tables plus the engine's online
    adaptation from the calls finished before it started. Raises ModelFileError / DataError.
    """
    from ctk.predict.dataset import prepare_frame
    from ctk.predict.evaluate import prediction_rows, row_costs

    name, pr = model.fitted_predictor(predictor)
    tables = model.ttl_tables()
    if online:
        from ctk.predict.online_eval import online_predictions

        out, skipped = online_predictions(rows, tables, pressure, pr)
        return RowPredictions(out, skipped, f"{name}+online")
    if "duration_s" not in rows.columns:
        rows = rows.assign(duration_s=np.nan)
    frame, skipped = prepare_frame(rows, keep_unlabelled=True)
    q = pr.predict_quantiles(frame)
    b, c = row_costs(frame, model.cost, pressure)
    ttl, hit = pr.choose_ttls(frame, q, b, c)
    ctx = frame["context_est"].fillna(0).astype(int).tolist()
    dec = [tables.engine_decision(k, x, pressure) for k, x in zip(frame["keys"], ctx, strict=True)]
    return RowPredictions(prediction_rows(frame, pr.levels, q, ttl, hit, dec), skipped, name)
