"""``ctk train`` time on 1,000,000 synthetic tool calls (target: <= 120 s on 2 cores).

Builds a real DuckDB trace store of synthetic programs (~20 calls each, commands from templates with random
paths/arguments so most texts are distinct, lognormal durations with per-program speed, timeouts censored
at 30 s), then runs the same code path as ``ctk train --db ... --predictor lightgbm -o model.pkl`` and
prints the time of each phase. Baseline measured in the same run: the histogram predictor trained through
the same path (load, features, evaluation, fit, tables), so the ratio shows what the LightGBM model costs.

Usage: ``python bench/train_scale.py [--rows 1000000] [--skip-baseline]``
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ctk.predict.cost import CostModel
from ctk.predict.dataset import prepare_frame
from ctk.predict.train import TrainConfig, load_rows, train_model
from ctk.store import TraceStore

TARGET_S = 120.0
TEMPLATES = [
    ("ls -la /w/{a}", 0.02, 0.4),
    ("cat /w/{a}/file{b}.py", 0.03, 0.4),
    ("grep -rn pattern{b} /w/{a} | head -20", 0.05, 0.6),
    ("python -c 'print({b})'", 0.3, 0.4),
    ("cd /w/{a} && python train.py --epochs {b}", 12.0, 0.8),
    ("cd /w/{a} && python -m pytest -k case{b}", 4.0, 0.6),
    ("pip install pkg{b}", 15.0, 0.5),
    ("git status", 0.05, 0.3),
    ("git clone https://example.org/r{b}", 3.0, 0.5),
    ("timeout 60 make -C /w/{a} test", 8.0, 0.7),
    ("cat <<'EOF' > /w/{a}/s{b}.py\nimport os\nEOF", 0.02, 0.3),
    ("npm install --prefix /w/{a}", 20.0, 0.6),
]


def synthetic_calls(n: int, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(10, 31, size=n // 10)
    sizes = sizes[np.cumsum(sizes) <= n]
    n = int(sizes.sum())
    n_prog = len(sizes)
    pid = np.repeat(np.arange(n_prog), sizes)
    turn = np.concatenate([np.arange(1, s + 1) for s in sizes])
    speed = np.exp(rng.normal(0, 0.7, n_prog))[pid]
    t = rng.integers(len(TEMPLATES), size=n)
    med = np.array([m for _, m, _ in TEMPLATES])[t]
    sd = np.array([s for _, _, s in TEMPLATES])[t]
    dur = med * speed * np.exp(rng.normal(0, 1, n) * sd)
    cens = dur > 30.0
    a = rng.integers(0, 5000, n)
    b = rng.integers(0, 200, n)
    cmd = [
        TEMPLATES[ti][0].format(a=ai, b=bi)
        for ti, ai, bi in zip(t.tolist(), a.tolist(), b.tolist(), strict=True)
    ]
    pids = np.array([f"syn-{i:07d}" for i in range(n_prog)])[pid]
    source = np.where(pid % 3 == 0, "synthetic-a", "synthetic-b")
    calls = pd.DataFrame(
        {
            "program_id": pids,
            "turn_index": turn,
            "source": source,
            "tool_name": [c.split()[0] for c in cmd],
            "main_program": None,
            "command_or_args": cmd,
            "duration_s": np.minimum(dur, 30.0),
            "call_index": 0,
            "censored": cens,
            "quality_flag": np.where(cens, "timeout_censored", "ok"),
            "output_chars": rng.integers(10, 5000, n),
            "llm_output_chars": rng.integers(50, 900, n),
            "injected": False,
            "is_final": False,
        }
    )
    progs = pd.DataFrame(
        {
            "program_id": np.array([f"syn-{i:07d}" for i in range(n_prog)]),
            "source": np.where(np.arange(n_prog) % 3 == 0, "synthetic-a", "synthetic-b"),
            "n_turns": sizes,
            "complete": True,
        }
    )
    return progs, calls


def timed_train(db: Path, predictor: str, out: Path) -> dict[str, float]:
    phases: dict[str, float] = {}
    t0 = time.perf_counter()
    rows, fp = load_rows(db)
    phases["load store"] = time.perf_counter() - t0
    t = time.perf_counter()
    frame, skipped = prepare_frame(rows)
    phases["features"] = time.perf_counter() - t
    t = time.perf_counter()
    marks = {"start": t}

    def progress(step: str, done: int, total: int) -> None:
        if done == total:
            marks[step] = time.perf_counter()

    model, _ = train_model(
        frame,
        TrainConfig(predictor=predictor),
        CostModel(),
        progress,
        skipped,
        {"store": str(db), "store_fingerprint": fp},
    )
    end = time.perf_counter()
    prev = marks.pop("start")
    for step, at in marks.items():
        phases[step] = at - prev
        prev = at
    t = time.perf_counter()
    phases["rest"] = t - prev if prev < end else 0.0
    model.save(out)
    phases["write model.pkl"] = time.perf_counter() - t
    phases["total"] = time.perf_counter() - t0
    return phases


def main() -> None:
    print(f"load average before the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--skip-baseline", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "synthetic.duckdb"
        t = time.perf_counter()
        progs, calls = synthetic_calls(args.rows)
        with TraceStore(db) as store:
            store.add_programs(progs, tool_calls=calls)
        print(
            f"store: {len(calls):,} calls in {len(progs):,} programs, built {time.perf_counter() - t:.1f} s"
            f" ({calls['censored'].mean():.1%} censored, {calls['command_or_args'].nunique():,} distinct"
            " commands)"
        )
        res = {"lightgbm": timed_train(db, "lightgbm", Path(tmp) / "lgb.pkl")}
        if not args.skip_baseline:
            res["histogram"] = timed_train(db, "histogram", Path(tmp) / "hist.pkl")
        size = (Path(tmp) / "lgb.pkl").stat().st_size
    for name, ph in res.items():
        print(f"\nctk train --predictor {name}:")
        for k, v in ph.items():
            print(f"  {k:28s} {v:8.1f} s")
    total = res["lightgbm"]["total"]
    print(f"\nmodel.pkl: {size / 1e6:.1f} MB")
    if "histogram" in res:
        print(f"lightgbm / histogram (same path, same run): {total / res['histogram']['total']:.2f}x")
    verdict = "MEETS" if total <= TARGET_S else "MISSES"
    print(
        f"ctk train (lightgbm) on {args.rows:,} rows: {total:.1f} s vs target {TARGET_S:.0f} s: {verdict} "
        f"({total / TARGET_S:.2f}x of budget)"
    )


if __name__ == "__main__":
    main()
