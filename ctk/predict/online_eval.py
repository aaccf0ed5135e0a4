"""Prequential replay: what the engine's online adaptation would have predicted, call by call.

Calls are replayed in start-time order. Each call is predicted from the model's TTL tables plus only the
calls that had finished before it started (a call finishes at ``start + duration``), fed in finishing order
to :class:`ctk.predict.online.OnlineDurations`, the class the engine itself runs. The prediction of a
call is what the engine would have read then: the quantiles of the table row its key chain picks and that
row's TTL. ``ctk predict --online`` writes these rows; ``ctk evaluate --online`` scores them beside the
model's offline prediction.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ctk.predict.dataset import DataError
from ctk.predict.modelfile import ModelFile
from ctk.predict.online import OnlineDurations
from ctk.predict.tables import TTLDecision, TTLTables

#: Calls before this many are left out of the "converged" coverage figure.
WARMUP_CALLS = 100


@dataclass(frozen=True)
class OnlineConfig:
    """The engine's online-adaptation settings (``ctk serve`` defaults)."""

    min_samples: int = 5
    prior_weight: int = 20
    window: int = 256
    min_interval_s: float = 0.5
    calibrate: bool = True
    learning_rate: float = 0.05
    duel_min_calls: int | None = 20  # None: no duel, the adapted quantiles always


def start_times(frame: pd.DataFrame) -> pd.Series:
    """Start time of each call in seconds: ``start_unix_s`` or the shared CSV's ``start_wallclock_utc``."""
    unix = pd.to_numeric(frame["start_unix_s"], errors="coerce") if "start_unix_s" in frame.columns else None
    if unix is not None and unix.notna().any():
        return unix
    if "start_wallclock_utc" in frame.columns:
        ts = pd.to_datetime(frame["start_wallclock_utc"], utc=True, errors="coerce", format="mixed")
        return (ts - pd.Timestamp(0, tz="UTC")).dt.total_seconds()
    raise DataError("online replay needs call start times (start_wallclock_utc or start_unix_s)")


def order_by_start(frame: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Rows with a start time and a duration, in start order (ties: program, turn, call).
    Returns ``(frame, n_skipped)``."""
    start = start_times(frame)
    ok = start.notna() & frame["duration_s"].notna()
    out = frame[ok].assign(start_s=start[ok])
    out = out.sort_values(["start_s", "program_id", "turn_index", "call_index"], kind="stable")
    return out.reset_index(drop=True), int((~ok).sum())


def replay(
    frame: pd.DataFrame,
    tables: TTLTables,
    config: OnlineConfig | None = None,
    pressure: float | None = None,
    offline: np.ndarray | None = None,
) -> tuple[np.ndarray, list[TTLDecision]]:
    """Per call (rows of ``frame`` in start order, see :func:`order_by_start`): the quantiles the engine's
    tables state when the call starts, after observing every call that finished before, and (``pressure``
    given) the table's decision then. ``tables`` is adapted in place (pass a copy to keep the model's).
    ``offline``: each call's own offline prediction; the online quantiles then adapt it (per key and level,
    the adapted quantile only where it has beaten the offline one on the calls before)."""
    cfg = config or OnlineConfig()
    online = OnlineDurations(
        tables,
        cfg.min_samples,
        cfg.prior_weight,
        cfg.window,
        cfg.min_interval_s,
        calibrate=cfg.calibrate,
        learning_rate=cfg.learning_rate,
        duel_min_calls=cfg.duel_min_calls,
    )
    starts = frame["start_s"].to_numpy(dtype=float)
    durations = frame["duration_s"].to_numpy(dtype=float)
    keys = frame["keys"].tolist()
    ctx = frame["context_est"].fillna(0).astype(int).tolist() if pressure is not None else []
    q = np.full((len(frame), len(tables.quantile_levels)), np.nan)
    decisions: list[TTLDecision] = []
    pending: list[tuple[float, int]] = []  # (finish time, row) of calls still running
    for i in range(len(frame)):
        while pending and pending[0][0] <= starts[i]:
            end, j = heapq.heappop(pending)
            online.observe(keys[j], durations[j], end, None if offline is None else offline[j])
        row = online.quantiles(keys[i], None if offline is None else offline[i])
        if row is not None:
            q[i] = row
        if pressure is not None:
            decisions.append(tables.engine_decision(keys[i], ctx[i], pressure))
        heapq.heappush(pending, (starts[i] + durations[i], i))
    return q, decisions


def copy_tables(tables: TTLTables) -> TTLTables:
    return TTLTables.from_dict(tables.to_dict())


def online_decisions(
    frame: pd.DataFrame,
    tables: TTLTables,
    pressure: float,
    config: OnlineConfig | None = None,
    offline: np.ndarray | None = None,
) -> pd.DataFrame:
    """``ctk predict --online``: per call the replay's quantiles and decisions, as ``ctk predict`` writes
    them (``ttl_s`` / ``p_hit``: the cost model on the row's quantiles and context; ``table_*``: the row the
    engine would have read)."""
    from ctk.predict.evaluate import prediction_rows, row_costs
    from ctk.predict.predictors import cost_model_ttls

    t = copy_tables(tables)
    q, dec = replay(frame, t, config, pressure, offline)
    known = ~np.isnan(q[:, 0])
    b, c = row_costs(frame, t.cost_model, pressure)
    ttl, hit = cost_model_ttls(t.quantile_levels, np.where(np.isnan(q), 0.0, q), b, c)
    out = prediction_rows(
        frame, t.quantile_levels, q, np.where(known, ttl, 0.0), np.where(known, hit, 0.0), dec
    )
    out["start_s"] = frame["start_s"].to_numpy(dtype=float)
    return out


def online_report(
    frame: pd.DataFrame,
    offline_q: np.ndarray,
    tables: TTLTables,
    config: OnlineConfig | None = None,
    warmup: int = WARMUP_CALLS,
) -> dict:
    """Offline vs online (plain blend, and blend + calibration) on the calls of ``frame`` in start order:
    mean pinball over q0.5/q0.9 and q0.9 coverage, over all calls and after the first ``warmup``."""
    from dataclasses import replace

    from ctk.predict.evaluate import score_rows

    cfg = config or OnlineConfig()
    levels = list(tables.quantile_levels)
    variants = {
        "offline": np.asarray(offline_q, dtype=float),
        "offline-table": replay(frame, copy_tables(tables), replace(cfg, min_samples=10**9, calibrate=False))[
            0
        ],
        "online-blend": replay(frame, copy_tables(tables), replace(cfg, calibrate=False))[0],
        "online-tables": replay(frame, copy_tables(tables), cfg)[0],
        "online-no-duel": replay(frame, copy_tables(tables), replace(cfg, duel_min_calls=None))[0],
        "online": replay(frame, copy_tables(tables), cfg, offline=np.asarray(offline_q, dtype=float))[0],
    }
    after = np.arange(len(frame)) >= warmup
    out: dict = {"calls": len(frame), "warmup_calls": warmup, "variants": {}}
    for name, q in variants.items():
        q = np.where(np.isnan(q), np.nanmax(q) if np.isfinite(q).any() else 0.0, q)
        all_s = score_rows(frame, q, levels)
        late = score_rows(frame[after], q[after], levels) if after.any() else all_s
        out["variants"][name] = {
            "pinball_mean": all_s["pinball_mean"],
            "coverage_0.9": all_s["coverage"].get("0.9"),
            "coverage_0.5": all_s["coverage"].get("0.5"),
            "pinball_mean_after_warmup": late["pinball_mean"],
            "pinball_0.5_after_warmup": late["pinball"].get("0.5"),
            "pinball_0.9_after_warmup": late["pinball"].get("0.9"),
            "coverage_0.9_after_warmup": late["coverage"].get("0.9"),
        }
    return out


def shift_durations(frame: pd.DataFrame, add_s: float) -> pd.DataFrame:
    """The same calls on a slower deployment: ``add_s`` seconds added to every duration (``docker exec``)."""
    out = frame.copy()
    out["duration_s"] = out["duration_s"] + add_s
    out["y"] = out["y"] + add_s
    return out


# -- the CLI's entry points (``ctk predict --online``, ``ctk evaluate --online``) ----------------------------


def online_predictions(
    rows: pd.DataFrame, tables: TTLTables, pressure: float, predictor=None
) -> tuple[pd.DataFrame, int]:
    """``ctk predict --online``: featurize ``rows``, order them by start time, replay, adapting
    ``predictor``'s per-call prediction (None: the tables' quantiles). ``(out, skipped)``."""
    from ctk.predict.dataset import prepare_frame

    frame, skipped = prepare_frame(rows)
    frame, no_start = order_by_start(frame)
    if frame.empty:
        raise DataError("no call has a start time and a duration to replay")
    offline = predictor.predict_quantiles(frame) if predictor is not None else None
    return online_decisions(frame, tables, pressure, offline=offline), skipped + no_start


def evaluate_online(rows: pd.DataFrame, model: ModelFile) -> dict:
    """``ctk evaluate --online``: the model's offline prediction vs the prequential online replay."""
    from ctk.predict.dataset import prepare_frame

    frame, skipped = prepare_frame(rows)
    frame, no_start = order_by_start(frame)
    if frame.empty:
        raise DataError("no call has a start time and a duration to replay")
    primary, predictor = model.fitted_predictor()
    offline = predictor.predict_quantiles(frame)
    out = online_report(frame, offline, model.ttl_tables())
    out.update({"model": model.name, "predictor": primary, "skipped_rows": skipped + no_start})
    return out


def render_online(result: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = Table(
        title=f"Prequential replay of {result['calls']} calls in start order ({result['model']}, "
        f"{result['predictor']}): each predicted from the model + calls finished before it started"
    )
    t.add_column("prediction")
    for c in ("pinball q0.5,q0.9", "cov q0.9", f"pinball after {result['warmup_calls']}", "cov q0.9 after"):
        t.add_column(c, justify="right")
    for name, v in result["variants"].items():
        t.add_row(
            name,
            f"{v['pinball_mean']:.3f}",
            f"{v['coverage_0.9']:.3f}",
            f"{v['pinball_mean_after_warmup']:.3f}",
            f"{v['coverage_0.9_after_warmup']:.3f}",
        )
    console.print(t)
