"""Predictor quality on the real agent traces: running-mean vs histogram vs LightGBM, side by side, one run.

Imports ``tool_calls.csv`` of the shared agent traces into a temporary trace store (as ``ctk import`` does),
then evaluates the three predictors exactly as ``ctk evaluate --db traces.duckdb`` does: grouped 5-fold by
program (no program on both sides) plus leave-one-source-out. Prints pinball loss and coverage per quantile,
decision regret against the oracle, and the checks of issue 3:

- mean pinball loss over {0.5, 0.9}: lightgbm < histogram < running-mean;
- the 0.9 quantile's coverage on held-out programs within 0.85-0.95 (lightgbm);
- lightgbm's decision regret below the 2 s rule's (running-mean).

Usage: ``python bench/predictors.py [--traces ../shared/data/agent-traces] [--folds 5] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from ctk.predict.cost import CostModel
from ctk.predict.dataset import prepare_frame
from ctk.predict.evaluate import evaluate_frame, render

REPO = Path(__file__).resolve().parents[1]
NAMES = ("running-mean", "histogram", "lightgbm")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--traces", type=Path, default=REPO.parent / "shared" / "data" / "agent-traces")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seeds", default="0,1,2", help="fold seeds; full tables for the first, checks for each")
    ap.add_argument("--json", type=Path, default=None, help="also write the full result as JSON")
    args = ap.parse_args()

    from ctk.datasets.importer import import_paths
    from ctk.datasets.samples import sample_traces_dir
    from ctk.store import TraceStore

    csv = args.traces / "tool_calls.csv"
    if not csv.exists():
        csv = sample_traces_dir() / "tool_calls.csv.gz"
        print(f"{args.traces} not found: using the bundled sample {csv}")
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "traces.duckdb"
        with TraceStore(db) as store:
            import_paths(store, [csv])
            rows = store.tool_calls()
    frame, skipped = prepare_frame(rows)
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    all_ok = True
    for i, seed in enumerate(seeds):
        t0 = time.perf_counter()
        result = evaluate_frame(frame, NAMES, CostModel(), folds=args.folds, seed=seed, loso=(i == 0))
        elapsed = time.perf_counter() - t0
        if i == 0:
            render(result)
            first = result
            print(f"\n{csv}: {len(frame)} calls ({skipped} skipped), {result['program_split']['programs']} "
                  f"programs")
        rep = result["program_split"]["predictors"]
        pin = {n: rep[n]["pinball_mean"] for n in NAMES}
        cov9 = rep["lightgbm"]["coverage"]["0.9"]
        reg = {n: rep[n]["regret"]["mean"] for n in NAMES}
        print(f"\nseed {seed} ({args.folds}-fold by program, {elapsed:.1f} s): mean pinball {{0.5,0.9}} (s): "
              + ", ".join(f"{n} {v:.3f}" for n, v in pin.items()))
        checks = [
            ("pinball: lightgbm < histogram < running-mean",
             pin["lightgbm"] < pin["histogram"] < pin["running-mean"]),
            (f"lightgbm q0.9 coverage {cov9:.3f} within 0.85-0.95", 0.85 <= cov9 <= 0.95),
            (f"regret: lightgbm {reg['lightgbm']:.4f} s < 2 s rule {reg['running-mean']:.4f} s "
             f"({reg['running-mean'] / max(reg['lightgbm'], 1e-12):.1f}x lower)",
             reg["lightgbm"] < reg["running-mean"]),
        ]
        for text, ok in checks:
            all_ok &= ok
            print(f"[{'PASS' if ok else 'FAIL'}] {text}")
    print(f"\nall checks on all seeds: {'PASS' if all_ok else 'FAIL'}")
    result = first
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
