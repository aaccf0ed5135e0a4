"""Evaluation of predictors on held-out programs, shared by ``ctk train`` and ``ctk evaluate``.

Splits: scikit-learn's ``GroupKFold`` by task group (``task_id``, else the program: no task on both sides;
every row is predicted once, by a model that never saw its task; rows of a source with no other task in
the training folds are left to the leave-one-source-out split) and leave-one-source-out.
Metrics per predictor, overall and per tool:

- pinball loss per quantile level (seconds, scikit-learn's ``mean_pinball_loss``; censored rows scored with
  Powell's censored loss ``level * max(c - q, 0)``, i.e. the pinball loss against ``max(c, q)``: a prediction
  at or above the timeout is not penalised, one below it is);
- coverage per level: share of rows with ``duration <= q`` (for a timed-out row: the timeout was covered);
- MAE of the median (same censoring rule);
- decision regret: the cost-model loss of the TTL the predictor chooses, minus the loss of an oracle that
  knows the true duration (it pins exactly T when that pays, else not), per memory-pressure level. Regret
  uses the recorded duration, i.e. what the engine experiences (a timed-out tool returns at the timeout).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ctk.predict.cost import CONTINUUM_PIN_S, CostModel
from ctk.predict.dataset import program_fold
from ctk.predict.predictors import (
    Predictor,
    RunningMeanPredictor,
    build_tables,
    make_predictor,
)

HEADLINE_LEVELS = (0.5, 0.9)
#: Size of the task subsets the per-source spread is drawn at (the unseen-task set the issue was judged on).
SPREAD_CALLS = 876
SPREAD_DRAWS = 1000
EVAL_PRESSURES = (0.5, 0.8, 0.9, 0.95)
TOP_TOOLS = 12

Progress = Callable[[str, int, int], None]


def censored_target(y: np.ndarray, q: np.ndarray, censored: np.ndarray) -> np.ndarray:
    """The target a quantile is scored against: the duration, or ``max(c, q)`` for a call censored at ``c``
    (so the pinball loss is Powell's censored loss ``level * max(c - q, 0)``)."""
    return np.where(censored, np.maximum(y, q), y)


def pinball(y: np.ndarray, q: np.ndarray, level: float, censored: np.ndarray) -> np.ndarray:
    """Per-row pinball loss (censored rows: Powell's loss); its mean is :func:`mean_pinball`."""
    d = censored_target(y, q, censored) - q
    return np.maximum(level * d, (level - 1.0) * d)


def mean_pinball(y: np.ndarray, q: np.ndarray, level: float, censored: np.ndarray) -> float:
    """scikit-learn's ``mean_pinball_loss`` with censored rows scored against ``max(c, q)``."""
    from sklearn.metrics import mean_pinball_loss

    if not len(y):
        return float("nan")
    return float(mean_pinball_loss(censored_target(y, q, censored), q, alpha=level))


def tool_of(frame: pd.DataFrame) -> pd.Series:
    """The per-tool grouping of reports: the main program (or tool) level of the command-key chain."""
    return frame["keys"].map(lambda ks: ks[-2] if len(ks) >= 2 else "*")


def score_rows(frame: pd.DataFrame, q: np.ndarray, levels: Sequence[float]) -> dict:
    """Pinball / coverage per level, mean pinball over the headline levels, MAE of the median."""
    y = frame["y"].to_numpy()
    cens = frame["censored"].to_numpy(dtype=bool)
    out: dict = {"n": len(y), "pinball": {}, "coverage": {}}
    for j, lvl in enumerate(levels):
        out["pinball"][f"{lvl:g}"] = mean_pinball(y, q[:, j], lvl, cens)
        out["coverage"][f"{lvl:g}"] = float((y <= q[:, j]).mean()) if len(y) else float("nan")
    head = [out["pinball"][f"{lv:g}"] for lv in HEADLINE_LEVELS if f"{lv:g}" in out["pinball"]]
    out["pinball_mean"] = float(np.mean(head)) if head else float("nan")
    if 0.5 in levels:
        med = q[:, list(levels).index(0.5)]
        err = np.where(cens, np.maximum(y - med, 0.0), np.abs(y - med))
        out["mae_median"] = float(err.mean()) if len(y) else float("nan")
    return out


def row_costs(frame: pd.DataFrame, cost: CostModel, pressure: float) -> tuple[np.ndarray, np.ndarray]:
    """Per row: benefit B of a hit and holding cost c per second at the row's (estimated) context.

    Vectorized; equal to ``cost.benefit_s(ctx)`` and ``cost.holding_cost_per_s(ctx, pressure)`` per row.
    """
    ctx = np.floor(frame["context_est"].fillna(0).to_numpy(dtype=float))
    xs = np.asarray(cost.prefill_tokens, dtype=float)
    ys = np.asarray(cost.prefill_s, dtype=float)
    pre = np.interp(ctx, xs, ys)
    if len(xs) >= 2:  # linear extrapolation past the last profiled length, as CostModel does
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        pre = np.where(ctx > xs[-1], ys[-1] + slope * (ctx - xs[-1]), pre)
    b = np.maximum(pre, 0.0) + cost.requeue_delay_s
    blocks = np.maximum(1.0, np.ceil(ctx / cost.block_size_tokens))
    c = cost.block_second_price_at(pressure) * blocks
    return b, c


def regret_of(ttl: np.ndarray, frame: pd.DataFrame, b: np.ndarray, c: np.ndarray) -> float:
    """Mean of (cost-model loss of ``ttl``) - (oracle's loss), see :func:`ctk.predict.cost.realized_cost`."""
    d = frame["duration_s"].to_numpy(dtype=float)
    if not len(d):
        return float("nan")
    ttl = np.asarray(ttl, dtype=float)
    loss = np.where(ttl > 0, np.where(d <= ttl, 0.0, b) + c * np.minimum(d, ttl), b)
    best = np.minimum(b, c * d)
    return float((loss - best).mean())


def prediction_rows(
    frame: pd.DataFrame,
    levels: Sequence[float],
    q: np.ndarray,
    ttl: np.ndarray,
    p_hit: np.ndarray,
    decisions: Sequence,
) -> pd.DataFrame:
    """The columns ``ctk predict`` writes per call: ids, key, quantiles, the row's TTL and P(hit), and the
    engine's decision (its ``ttl`` rule on the tables' quantiles, at the live price of the pressure)."""
    out = pd.DataFrame(
        {
            "program_id": frame["program_id"],
            "turn_index": frame["turn_index"],
            "call_index": frame["call_index"],
            "key": frame["key0"],
        }
    )
    for j, lv in enumerate(levels):
        out[f"q{lv:g}"] = q[:, j]
    out["ttl_s"] = ttl
    out["p_hit"] = p_hit
    out["table_ttl_s"] = [d.ttl_s for d in decisions]
    out["table_p_hit"] = [d.p_hit for d in decisions]
    out["table_key"] = [d.key for d in decisions]
    return out


@dataclass
class Predictions:
    """Out-of-sample quantiles and TTL decisions of one predictor for the rows of a frame."""

    name: str
    levels: tuple[float, ...]
    q: np.ndarray
    ttl: dict[float, np.ndarray] = field(default_factory=dict)  # pressure -> per-row TTL (row model)
    ttl_table: dict[float, np.ndarray] = field(default_factory=dict)  # pressure -> TTL from the tables


def predict_all(
    predictor: Predictor,
    train: pd.DataFrame | None,
    test: pd.DataFrame,
    cost: CostModel,
    pressures: Sequence[float] = EVAL_PRESSURES,
    tables: bool = True,
) -> Predictions:
    """Quantiles and decisions of a fitted predictor on ``test`` (tables are built from ``train``)."""
    q = predictor.predict_quantiles(test)
    pred = Predictions(predictor.name, tuple(predictor.levels), q)
    for p in pressures:
        b, c = row_costs(test, cost, p)
        pred.ttl[p] = predictor.choose_ttls(test, q, b, c)[0]
    if tables and train is not None and not isinstance(predictor, RunningMeanPredictor):
        t = build_tables(predictor, train, cost)
        ctx = test["context_est"].fillna(0).astype(int).tolist()
        for p in pressures:
            pred.ttl_table[p] = np.array(
                [t.engine_decision(k, x, p).ttl_s for k, x in zip(test["keys"], ctx, strict=True)]
            )
    return pred


def _merge(parts: list[tuple[np.ndarray, Predictions]], n: int) -> Predictions:
    first = parts[0][1]
    q = np.zeros((n, len(first.levels)))
    out = Predictions(first.name, first.levels, q)
    for idx, pr in parts:
        q[idx] = pr.q
        for src, dst in ((pr.ttl, out.ttl), (pr.ttl_table, out.ttl_table)):
            for p, v in src.items():
                dst.setdefault(p, np.zeros(n))[idx] = v
    return out


def cross_predict(
    frame: pd.DataFrame,
    names: Sequence[str],
    folds: int,
    cost: CostModel,
    seed: int = 0,
    params: dict[str, dict] | None = None,
    progress: Progress | None = None,
    tables: bool = True,
    max_eval_rows: int = 50_000,
) -> tuple[dict[str, Predictions], np.ndarray]:
    """Out-of-fold predictions by task group. ``folds`` >= 2: grouped K-fold; 1: one held-out split
    (:data:`HELD_OUT_GROUP_SHARE` of the groups).

    Returns the predictions (arrays over all rows of ``frame``) and the mask of rows that were predicted
    (held out, of a source the training part has, and at most ``max_eval_rows`` of them, sampled, to bound
    evaluation time on large stores).
    """
    fold = fold_ids(frame, folds, seed)
    scored = fold >= 0
    src = frame["source"].astype(str).to_numpy()
    for f in np.unique(fold[scored]):  # a source held out whole is the leave-one-source-out split's job
        test_m = fold == f
        scored[test_m & ~np.isin(src, np.unique(src[~test_m]))] = False
    held = np.flatnonzero(scored)
    rounds = list(range(folds)) if folds >= 2 else [0]
    if len(held) > max_eval_rows:
        keep = np.zeros(len(frame), dtype=bool)
        keep[np.random.default_rng(seed).choice(held, max_eval_rows, replace=False)] = True
    else:
        keep = scored
    parts: dict[str, list] = {n: [] for n in names}
    total = len(rounds) * len(names)
    done = 0
    for f in rounds:
        test_idx = np.flatnonzero((fold == f) & keep)
        train = frame[fold != f]
        test = frame.iloc[test_idx]
        if len(test) == 0 or len(train) == 0:
            continue
        for name in names:
            pr = make_predictor(name, **(params or {}).get(name, {})).fit(train)
            parts[name].append((test_idx, predict_all(pr, train, test, cost, tables=tables)))
            done += 1
            if progress:
                progress("held-out evaluation", done, total)
    return {n: _merge(p, len(frame)) for n, p in parts.items() if p}, keep


def task_groups(frame: pd.DataFrame) -> np.ndarray:
    """The group a row is held out with: its task (``task_id``), else its program."""
    prog = frame["program_id"].astype(str)
    if "task_id" not in frame.columns:
        return prog.to_numpy()
    task = frame["task_id"].where(frame["task_id"].notna() & (frame["task_id"].astype(str) != ""))
    return ("task:" + task.astype(str)).where(task.notna(), "program:" + prog).to_numpy()


#: Share of the task groups :func:`fold_ids` holds out with ``folds == 1`` (by hash: the realised share of a
#: given frame is close to it, not equal).
HELD_OUT_GROUP_SHARE = 0.25


def fold_ids(frame: pd.DataFrame, folds: int, seed: int = 0) -> np.ndarray:
    """Fold of each row by task group (scikit-learn's ``GroupKFold``, shuffled by ``seed``);
    ``folds == 1``: 0 = held out (:data:`HELD_OUT_GROUP_SHARE` of the groups, by hash), -1 = train."""
    groups = task_groups(frame)
    if folds <= 1:
        return np.where(program_fold(groups, HELD_OUT_GROUP_SHARE, seed), 0, -1)
    from sklearn.model_selection import GroupKFold

    n_groups = len(np.unique(groups))
    out = np.full(len(frame), -1)
    splitter = GroupKFold(n_splits=min(folds, n_groups), shuffle=True, random_state=seed)
    for f, (_, test) in enumerate(splitter.split(np.zeros(len(frame)), groups=groups)):
        out[test] = f
    return out


def report_for(
    frame: pd.DataFrame,
    preds: dict[str, Predictions],
    cost: CostModel,
    pressures: Sequence[float] = EVAL_PRESSURES,
) -> dict:
    """Plain-data report: overall and per-tool scores, regret per pressure (row model and table)."""
    tools = tool_of(frame)
    top = tools.value_counts().index[:TOP_TOOLS].tolist()
    tool_group = tools.where(tools.isin(top), "(other)")
    out: dict = {
        "rows": len(frame),
        "programs": int(frame["program_id"].nunique()),
        "censored_rows": int(frame["censored"].sum()),
        "pressures": list(pressures),
        "predictors": {},
    }
    costs = {p: row_costs(frame, cost, p) for p in pressures}
    ref: dict = {}
    for p in pressures:
        b, c = costs[p]
        ref.setdefault("never-pin", {})[f"{p:g}"] = regret_of(np.zeros(len(frame)), frame, b, c)
        ref.setdefault("always-2s", {})[f"{p:g}"] = regret_of(
            np.full(len(frame), CONTINUUM_PIN_S), frame, b, c
        )
    out["reference_regret"] = {k: {**v, "mean": float(np.mean(list(v.values())))} for k, v in ref.items()}
    for name, pr in preds.items():
        entry = score_rows(frame, pr.q, pr.levels)
        entry["levels"] = list(pr.levels)
        reg = {f"{p:g}": regret_of(pr.ttl[p], frame, *costs[p]) for p in pressures if p in pr.ttl}
        reg["mean"] = float(np.mean(list(reg.values()))) if reg else float("nan")
        entry["regret"] = reg
        if pr.ttl_table:
            regt = {
                f"{p:g}": regret_of(pr.ttl_table[p], frame, *costs[p]) for p in pressures if p in pr.ttl_table
            }
            regt["mean"] = float(np.mean(list(regt.values())))
            entry["regret_table"] = regt
        per_tool = {}
        for tool in [*top, "(other)"]:
            m = (tool_group == tool).to_numpy()
            if m.any():
                s = score_rows(frame[m], pr.q[m], pr.levels)
                per_tool[tool] = {
                    "n": s["n"],
                    "pinball_mean": s["pinball_mean"],
                    "coverage_0.9": s["coverage"].get("0.9"),
                    "mae_median": s.get("mae_median"),
                }
        entry["per_tool"] = per_tool
        out["predictors"][name] = entry
    out["per_source"] = per_source_report(frame, preds)
    return out


def row_pinball_mean(frame: pd.DataFrame, q: np.ndarray, levels: Sequence[float]) -> np.ndarray:
    """Per row: the mean over the headline levels of the pinball loss (the summed figure's summands)."""
    y = frame["y"].to_numpy()
    cens = frame["censored"].to_numpy(dtype=bool)
    lv = list(levels)
    return np.mean([pinball(y, q[:, lv.index(h)], h, cens) for h in HEADLINE_LEVELS if h in lv], axis=0)


def task_spread(
    loss_a: np.ndarray,
    loss_b: np.ndarray,
    groups: np.ndarray,
    n_calls: int = SPREAD_CALLS,
    draws: int = SPREAD_DRAWS,
    seed: int = 0,
) -> dict:
    """How the ratio of two predictors' summed losses spreads over sets of whole unseen tasks: random task
    subsets of about ``n_calls`` calls (drawn without replacement); quantiles of ``sum(a) / sum(b)``."""
    g = pd.DataFrame({"g": groups, "a": loss_a, "b": loss_b}).groupby("g").agg(
        a=("a", "sum"), b=("b", "sum"), n=("a", "size")
    )
    a, b, n = g["a"].to_numpy(), g["b"].to_numpy(), g["n"].to_numpy()
    rng = np.random.default_rng(seed)
    ratios = []
    for _ in range(draws if len(g) > 1 else 0):
        perm = rng.permutation(len(g))
        take = perm[: int(np.searchsorted(np.cumsum(n[perm]), n_calls)) + 1]
        if b[take].sum() > 0:
            ratios.append(a[take].sum() / b[take].sum())
    qs = np.quantile(ratios, [0.05, 0.5, 0.95]) if ratios else [float("nan")] * 3
    return {
        "calls": int(min(n_calls, n.sum())),
        "tasks": len(g),
        "p05": float(qs[0]),
        "p50": float(qs[1]),
        "p95": float(qs[2]),
        "share_above_1": float(np.mean(np.asarray(ratios) >= 1.0)) if ratios else float("nan"),
    }


#: (numerator, denominator) predictor pairs whose per-source ratio spread is reported.
SPREAD_PAIRS = (("histogram", "running-mean"), ("lightgbm", "histogram"))


def per_source_report(frame: pd.DataFrame, preds: dict[str, Predictions]) -> dict:
    """Per source (never pooled): pinball per headline level per predictor, and the spread over sets of
    unseen tasks of the ratios in :data:`SPREAD_PAIRS` (a pooled mean hides a source, and one draw of
    tasks can sit far from another)."""
    out: dict = {}
    src = frame["source"].astype(str).to_numpy()
    groups = task_groups(frame)
    for s in sorted(set(src)):
        m = src == s
        sub = frame[m]
        entry: dict = {"n": int(m.sum()), "tasks": len(np.unique(groups[m])), "predictors": {}, "spread": {}}
        losses = {}
        for name, pr in preds.items():
            sc = score_rows(sub, pr.q[m], pr.levels)
            entry["predictors"][name] = {
                "pinball_mean": sc["pinball_mean"],
                "pinball_0.5": sc["pinball"].get("0.5"),
                "pinball_0.9": sc["pinball"].get("0.9"),
                "coverage_0.9": sc["coverage"].get("0.9"),
            }
            losses[name] = row_pinball_mean(sub, pr.q[m], pr.levels)
        for a, b in SPREAD_PAIRS:
            if a in losses and b in losses:
                entry["spread"][f"{a}/{b}"] = task_spread(losses[a], losses[b], groups[m])
        out[s] = entry
    return out


def evaluate_frame(
    frame: pd.DataFrame,
    names: Sequence[str],
    cost: CostModel,
    folds: int = 5,
    seed: int = 0,
    loso: bool = True,
    params: dict[str, dict] | None = None,
    progress: Progress | None = None,
) -> dict:
    """The full evaluation: program split (K-fold or one held-out split) and leave-one-source-out."""
    folds = min(folds, len(np.unique(task_groups(frame))))  # never more folds than groups (nor say so)
    preds, mask = cross_predict(frame, names, folds, cost, seed, params, progress)
    if not preds:
        raise ValueError("too few programs to hold any out for evaluation (need at least 2)")
    held = frame[mask]
    preds = {n: _subset(p, mask) for n, p in preds.items()}
    result = {
        "split": f"{folds}-fold by task group" if folds >= 2 else "25% of task groups held out",
        "program_split": report_for(held, preds, cost),
    }
    sources = sorted(frame["source"].unique())
    if loso and len(sources) >= 2:
        result["leave_one_source_out"] = {}
        for src in sources:
            test_m = (frame["source"] == src).to_numpy()
            train, test = frame[~test_m], frame[test_m]
            if train.empty:
                continue
            lp = {}
            for name in names:
                pr = make_predictor(name, **(params or {}).get(name, {})).fit(train)
                lp[name] = predict_all(pr, None, test, cost, tables=False)
            rep = report_for(test, lp, cost)
            result["leave_one_source_out"][src] = {
                n: {
                    "n": e["n"],
                    "pinball_mean": e["pinball_mean"],
                    "coverage_0.9": e["coverage"].get("0.9"),
                    "mae_median": e.get("mae_median"),
                    "regret_mean": e["regret"]["mean"],
                }
                for n, e in rep["predictors"].items()
            }
            if progress:
                progress("leave-one-source-out", sources.index(src) + 1, len(sources))
    return result


def _subset(pr: Predictions, mask: np.ndarray) -> Predictions:
    return Predictions(
        pr.name,
        pr.levels,
        pr.q[mask],
        {p: v[mask] for p, v in pr.ttl.items()},
        {p: v[mask] for p, v in pr.ttl_table.items()},
    )


def evaluate_fitted(
    frame: pd.DataFrame, predictors: dict[str, Predictor], cost: CostModel, tables: dict | None = None
) -> dict:
    """Evaluate already trained predictors on all rows of ``frame`` (e.g. another deployment's store)."""
    preds = {}
    for name, pr in predictors.items():
        preds[name] = predict_all(pr, None, frame, cost, tables=False)
        if tables and name in tables:
            t = tables[name]
            ctx = frame["context_est"].fillna(0).astype(int).tolist()
            for p in EVAL_PRESSURES:
                preds[name].ttl_table[p] = np.array(
                    [t.engine_decision(k, x, p).ttl_s for k, x in zip(frame["keys"], ctx, strict=True)]
                )
    return {
        "split": "trained model on all rows of the given store",
        "program_split": report_for(frame, preds, cost),
    }


# -- rendering -----------------------------------------------------------------------------------------------


def _f(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "-"
    return f"{x:.{digits}f}"


def render(result: dict, console=None) -> None:
    """Rich tables of an evaluation result."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    rep = result["program_split"]
    console.print(
        f"[bold]Held-out programs[/] ({result['split']}): {rep['rows']} calls, {rep['programs']} programs, "
        f"{rep['censored_rows']} censored"
    )
    names = list(rep["predictors"])
    if not names:
        return
    levels = rep["predictors"][names[0]]["levels"]
    t = Table(title="Quantile quality on held-out programs (pinball loss in s, lower is better)")
    t.add_column("predictor")
    t.add_column("pinball mean q0.5,q0.9", justify="right")
    t.add_column("q0.5", justify="right")
    t.add_column("q0.9", justify="right")
    t.add_column("MAE median", justify="right")
    t.add_column("cov q0.9", justify="right")
    for n in names:
        e = rep["predictors"][n]
        t.add_row(
            n,
            _f(e["pinball_mean"]),
            _f(e["pinball"].get("0.5")),
            _f(e["pinball"].get("0.9")),
            _f(e.get("mae_median")),
            _f(e["coverage"].get("0.9")),
        )
    console.print(t)
    c = Table(title="Calibration: share of held-out calls at or below each stated quantile")
    c.add_column("predictor")
    for lv in levels:
        c.add_column(f"q{lv:g}", justify="right")
    for n in names:
        e = rep["predictors"][n]
        c.add_row(n, *[_f(e["coverage"].get(f"{lv:g}"), 2) for lv in levels])
    console.print(c)
    r = Table(title="Decision regret vs oracle (s per tool call, cost model; lower is better)")
    r.add_column("decision")
    for p in rep["pressures"]:
        r.add_column(f"KV {p:g}", justify="right")
    r.add_column("mean", justify="right")
    for n in names:
        e = rep["predictors"][n]
        label = f"{n} (2 s rule)" if n == "running-mean" else f"{n} (per call)"
        r.add_row(
            label, *[_f(e["regret"].get(f"{p:g}"), 4) for p in rep["pressures"]], _f(e["regret"]["mean"], 4)
        )
        if "regret_table" in e:
            r.add_row(
                f"{n} (engine rule, tables)",
                *[_f(e["regret_table"].get(f"{p:g}"), 4) for p in rep["pressures"]],
                _f(e["regret_table"]["mean"], 4),
            )
    for n, v in rep.get("reference_regret", {}).items():
        r.add_row(f"[dim]{n}[/]", *[_f(v.get(f"{p:g}"), 4) for p in rep["pressures"]], _f(v["mean"], 4))
    console.print(r)
    pt = Table(title="Per tool: pinball mean{0.5,0.9} (s) / q0.9 coverage")
    pt.add_column("tool")
    pt.add_column("n", justify="right")
    for n in names:
        pt.add_column(n, justify="right")
    tools = list(rep["predictors"][names[0]]["per_tool"])
    for tool in tools:
        cells = []
        for n in names:
            e = rep["predictors"][n]["per_tool"].get(tool)
            cells.append(f"{_f(e['pinball_mean'])} / {_f(e['coverage_0.9'], 2)}" if e else "-")
        pt.add_row(tool, str(rep["predictors"][names[0]]["per_tool"][tool]["n"]), *cells)
    console.print(pt)
    ps = rep.get("per_source")
    if ps:
        st = Table(
            title="Per source, unseen tasks: pinball mean (s) / q0.9 coverage; ratio over sets of ~"
            f"{SPREAD_CALLS} calls of whole tasks (5% / 50% / 95%)"
        )
        st.add_column("source")
        st.add_column("n (tasks)", justify="right")
        for n in names:
            st.add_column(n, justify="right")
        pairs = [f"{a}/{b}" for a, b in SPREAD_PAIRS if a in names and b in names]
        for pair in pairs:
            st.add_column(pair, justify="right")
        for src, e in ps.items():
            cells = [
                f"{_f(e['predictors'][n]['pinball_mean'])} / {_f(e['predictors'][n]['coverage_0.9'], 2)}"
                for n in names
            ]
            for pair in pairs:
                sp = e["spread"].get(pair)
                cells.append(f"{_f(sp['p05'], 2)} / {_f(sp['p50'], 2)} / {_f(sp['p95'], 2)}" if sp else "-")
            st.add_row(src, f"{e['n']} ({e['tasks']})", *cells)
        console.print(st)
    loso = result.get("leave_one_source_out")
    if loso:
        lt = Table(title="Leave one source out: pinball mean (s) / q0.9 coverage / regret mean")
        lt.add_column("held-out source")
        lt.add_column("n", justify="right")
        for n in names:
            lt.add_column(n, justify="right")
        for src, per in loso.items():
            first = next(iter(per.values()))
            lt.add_row(
                src,
                str(first["n"]),
                *[
                    f"{_f(per[n]['pinball_mean'])} / {_f(per[n]['coverage_0.9'], 2)}"
                    f" / {_f(per[n]['regret_mean'], 4)}"
                    if n in per
                    else "-"
                    for n in names
                ],
            )
        console.print(lt)


def plot(result: dict, out_dir) -> list:
    """PNG plots: calibration curve (nominal vs empirical coverage) and per-tool pinball loss."""
    from pathlib import Path

    from ctk.predict.plots import plot_calibration, pyplot

    plt = pyplot()
    out_dir = Path(out_dir)
    rep = result["program_split"]
    curves = {
        n: (e["levels"], [e["coverage"][f"{x:g}"] for x in e["levels"]]) for n, e in rep["predictors"].items()
    }
    paths = [
        plot_calibration(
            curves,
            out_dir,
            "Calibration on held-out programs",
            ylabel="share of held-out calls at or below it",
        )
    ]
    names = list(rep["predictors"])
    tools = list(rep["predictors"][names[0]]["per_tool"])
    fig, ax = plt.subplots(figsize=(min(14.0, max(6.0, 0.3 * len(tools) * len(names))), 4.5))
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        vals = [rep["predictors"][n]["per_tool"].get(t, {}).get("pinball_mean", np.nan) for t in tools]
        ax.bar(np.arange(len(tools)) + i * width, vals, width, label=n)
    ax.set_xticks(np.arange(len(tools)) + 0.4 - width / 2)
    ax.set_xticklabels(tools, rotation=45, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("pinball mean{0.5,0.9} (s, log scale)")
    ax.set_title("Per-tool error on held-out programs")
    ax.legend()
    fig.tight_layout()
    p = out_dir / "per_tool_error.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths
