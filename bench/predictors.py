"""Predictor quality on the real agent traces: offline on held-out tasks, online on held-out sources.

Imports ``tool_calls.csv`` of the shared agent traces into a temporary trace store (as ``ctk import`` does),
then, in one run:

1. **Offline, held-out task groups of the training sources** (as ``ctk evaluate --db traces.duckdb``): 5-fold
   ``GroupKFold`` by task, rows of a source left without other tasks in training excluded (that is the
   next split's case). Checks: mean pinball over {0.5, 0.9}: lightgbm < histogram < running-mean, and
   histogram <= 0.8x running-mean; lightgbm's q0.9 coverage in 0.85-0.95; lightgbm's regret below the 2 s
   rule's. Also leave-one-source-out.
2. **Online, a source held out whole** (as ``ctk evaluate --online --model m.pkl``): the model trained on the
   other sources, the held-out source replayed in start order, as is and with +0.2 s added to every call
   (a ``docker exec`` overhead no training source had). Offline (the predictor per call), the tables alone,
   the online blend, and the online blend + calibration the engine runs. Checks: online q0.9 coverage after
   the first 100 calls in 0.85-0.95 and, over the same calls, online pinball below the offline prediction's
   (the figures over all calls, cold start included, are printed too). Also replayed, not a target: each
   source's unseen tasks (``ctk.predict.evaluate.HELD_OUT_GROUP_SHARE`` of the task groups, by hash; the
   label prints that share and the one realised).

Usage: ``python bench/predictors.py [--traces ../shared/data/agent-traces] [--seeds 0,1,2] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from ctk.predict.cost import CostModel
from ctk.predict.dataset import prepare_frame
from ctk.predict.evaluate import evaluate_frame, render

REPO = Path(__file__).resolve().parents[1]
NAMES = ("running-mean", "histogram", "lightgbm")
ONLINE_NAMES = ("histogram", "lightgbm")
#: Sources with fewer calls are not replayed online (the figure after 100 calls needs calls after 100).
MIN_ONLINE_CALLS = 300


def print_per_source(per_source: dict, label: str = "") -> None:
    """One line per source: pinball per predictor (q0.5 / q0.9), the ratios' spread over task draws."""
    for src, e in per_source.items():
        cells = ", ".join(
            f"{n} {v['pinball_mean']:.3f} ({v['pinball_0.5']:.3f}/{v['pinball_0.9']:.3f})"
            for n, v in e["predictors"].items()
        )
        print(f"  {label}{src[:40]:<40} {e['n']:>5} calls, {e['tasks']:>3} tasks: {cells}")
        for pair, sp in e["spread"].items():
            print(
                f"  {'':<40} {pair} over ~{sp['calls']}-call draws of whole tasks: 5% {sp['p05']:.2f}, "
                f"50% {sp['p50']:.2f}, 95% {sp['p95']:.2f}, share >= 1: {sp['share_above_1']:.3f}"
            )


def legacy_proxy(frame, folds: int, seed: int) -> None:
    """The design before issue 24, scored as the pauses they are: killed calls fitted as censored run
    times and no cap; shows what the per-source task-draw spread says about it."""
    from ctk.predict.evaluate import _subset, cross_predict, per_source_report

    legacy = frame.assign(censored=frame["killed"], killed=False)
    preds, mask = cross_predict(legacy, NAMES, folds, CostModel(), seed, tables=False)
    held = frame[mask].assign(censored=False)
    print("\n== Before issue 24 (killed calls fitted as censored, no cap), scored as exact pauses ==")
    print_per_source(per_source_report(held, {n: _subset(p, mask) for n, p in preds.items()}))


def offline(frame, folds: int, seeds: list[int]) -> tuple[bool, dict]:
    ok_all = True
    first = None
    for i, seed in enumerate(seeds):
        t0 = time.perf_counter()
        result = evaluate_frame(frame, NAMES, CostModel(), folds=folds, seed=seed, loso=(i == 0))
        elapsed = time.perf_counter() - t0
        if i == 0:
            render(result)
            first = result
        rep = result["program_split"]
        pin = {n: rep["predictors"][n]["pinball_mean"] for n in NAMES}
        cov9 = rep["predictors"]["lightgbm"]["coverage"]["0.9"]
        reg = {n: rep["predictors"][n]["regret"]["mean"] for n in NAMES}
        ratio = pin["histogram"] / pin["running-mean"]
        print(
            f"\nseed {seed} ({result['split']}, {rep['rows']} held-out calls of {rep['programs']} programs, "
            f"{elapsed:.1f} s): mean pinball {{0.5,0.9}} (s): "
            + ", ".join(f"{n} {v:.3f}" for n, v in pin.items())
        )
        print_per_source(rep["per_source"])
        checks = [
            (
                "pinball: lightgbm < histogram < running-mean",
                pin["lightgbm"] < pin["histogram"] < pin["running-mean"],
            ),
            (f"pinball: histogram {ratio:.2f}x running-mean (<= 0.80x)", ratio <= 0.8),
            *[
                (
                    f"{src[:40]}: histogram/running-mean {e['spread']['histogram/running-mean']['p95']:.2f} "
                    "at the 95th percentile of task draws (<= 0.80)",
                    e["spread"]["histogram/running-mean"]["p95"] <= 0.8,
                )
                for src, e in rep["per_source"].items()
            ],
            (f"lightgbm q0.9 coverage {cov9:.3f} within 0.85-0.95", 0.85 <= cov9 <= 0.95),
            (
                f"regret: lightgbm {reg['lightgbm']:.4f} s < 2 s rule {reg['running-mean']:.4f} s",
                reg["lightgbm"] < reg["running-mean"],
            ),
        ]
        for text, ok in checks:
            ok_all &= ok
            print(f"[{'PASS' if ok else 'FAIL'}] {text}")
    return ok_all, first


def online(frame, add_s_list=(0.0, 0.2)) -> tuple[bool, dict]:
    from ctk.predict.evaluate import HELD_OUT_GROUP_SHARE, fold_ids, task_groups
    from ctk.predict.online_eval import online_report, order_by_start, shift_durations
    from ctk.predict.predictors import build_tables, make_predictor

    ok_all = ok_tasks = True
    out: dict = {}
    sources = [s for s, n in frame["source"].value_counts().items() if n >= MIN_ONLINE_CALLS]
    held_task = fold_ids(frame, 1, seed=0) == 0  # HELD_OUT_GROUP_SHARE of the task groups, by hash
    groups = task_groups(frame)
    share = len(np.unique(groups[held_task])) / len(np.unique(groups))
    print(
        f"\n== Online, replayed in start order ({', '.join(ONLINE_NAMES)}): a source held out whole (offline "
        f"poor), and a source's unseen tasks ({HELD_OUT_GROUP_SHARE:.0%} of the task groups by hash, "
        f"{share:.1%} here; offline good) =="
    )
    print(
        f"{'case':<44} {'model':<9} {'+s':>4} | after 100 calls, pinball q0.5/q0.9 and q0.9 coverage: "
        "offline | online-no-duel (before issue 24) | online-tables (the engine) | "
        "online (ctk predict --online)"
    )
    cases = []
    for src in sources:
        in_src = (frame["source"] == src).to_numpy()
        cases.append((f"{src[:30]} whole", frame[~in_src], frame[in_src]))
        cases.append((f"{src[:30]} unseen tasks", frame[~(in_src & held_task)], frame[in_src & held_task]))
    for label, train, test in cases:
        test, _ = order_by_start(test)
        if len(test) < MIN_ONLINE_CALLS // 2:
            continue
        for name in ONLINE_NAMES:
            pr = make_predictor(name).fit(train)
            tables = build_tables(pr, train, CostModel())
            for add in add_s_list:
                t = shift_durations(test, add) if add else test
                t0 = time.perf_counter()
                rep = online_report(t, pr.predict_quantiles(t), tables)
                v = rep["variants"]
                cells = " | ".join(
                    f"{v[k]['pinball_0.5_after_warmup']:.3f}/{v[k]['pinball_0.9_after_warmup']:.3f} "
                    f"{v[k]['coverage_0.9_after_warmup']:.3f}"
                    for k in ("offline", "online-no-duel", "online-tables", "online")
                )
                print(f"{label:<44} {name:<9} {add:>4.1f} | {cells}  ({time.perf_counter() - t0:.1f} s)")
                cov = v["online"]["coverage_0.9_after_warmup"]
                checks = [
                    (
                        f"after 100 calls: online q0.9 coverage {cov:.3f} within 0.85-0.95",
                        0.85 <= cov <= 0.95,
                    )
                ]
                for lv in ("0.5", "0.9"):
                    p_on = v["online"][f"pinball_{lv}_after_warmup"]
                    p_off = v["offline"][f"pinball_{lv}_after_warmup"]
                    checks.append(
                        (
                            f"after 100 calls: online q{lv} pinball {p_on:.3f} < offline {p_off:.3f}",
                            p_on < p_off,
                        )
                    )
                whole = label.endswith(" whole")
                for text, ok in checks:
                    if whole:
                        ok_all &= ok
                    else:
                        ok_tasks &= ok
                    print(f"    [{'PASS' if ok else 'FAIL'}] {text}")
                out[f"{label}|{name}|+{add:g}s"] = rep
    print(
        "online checks on the unseen tasks of each source (not an issue-24 target): "
        + ("PASS" if ok_tasks else "FAIL")
    )
    return ok_all, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--traces", type=Path, default=REPO.parent / "shared" / "data" / "agent-traces")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seeds", default="0,1,2", help="fold seeds; full tables for the first, checks for each")
    ap.add_argument("--no-online", action="store_true", help="skip the online (held-out source) part")
    ap.add_argument(
        "--legacy", action="store_true", help="also score the pre-issue-24 design (censored kills, no cap)"
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the full result as JSON")
    args = ap.parse_args()

    from ctk.datasets.importer import import_paths
    from ctk.datasets.samples import sample_traces_dir
    from ctk.predict.train import load_rows
    from ctk.store import TraceStore

    csv = args.traces / "tool_calls.csv"
    if not csv.exists():
        csv = sample_traces_dir() / "tool_calls.csv.gz"
        print(f"{args.traces} not found: using the bundled sample {csv}")
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "traces.duckdb"
        with TraceStore(db) as store:
            import_paths(store, [csv])
        rows, _ = load_rows(db)
    frame, skipped = prepare_frame(rows)
    print(f"{csv}: {len(frame)} calls ({skipped} skipped), {frame['program_id'].nunique()} programs")
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    ok_off, result = offline(frame, args.folds, seeds)
    if args.legacy:
        legacy_proxy(frame, args.folds, seeds[0])
    ok_on, online_result = (True, {}) if args.no_online else online(frame)
    print(f"\noffline checks on all seeds: {'PASS' if ok_off else 'FAIL'}")
    if not args.no_online:
        print(f"online checks on every source held out whole: {'PASS' if ok_on else 'FAIL'}")
    if args.json:
        args.json.write_text(json.dumps({"offline": result, "online": online_result}, indent=1, default=str))


if __name__ == "__main__":
    main()
