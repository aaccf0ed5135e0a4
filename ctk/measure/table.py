"""The comparison's plain-text table: medians over rounds, every ratio's min-max, the factorial, the targets.

Ratios are baseline / policy, so above 1 the policy is better (see :mod:`ctk.measure.rounds`).
"""

from __future__ import annotations

from typing import Any

from ctk.measure.compare import FACTORIAL_ARMS, Comparison
from ctk.measure.rounds import (
    BASELINES,
    BOUNDED_ORACLE,
    BOUNDED_TTL,
    MIN_ORACLE_GAIN,
    fmt_spread,
    inside_spread,
)

TABLE_COLUMNS = (
    ("mean JCT s", "mean_jct_s", "{:.2f}"),
    ("p50 JCT s", "p50_jct_s", "{:.2f}"),
    ("p99 JCT s", "p99_jct_s", "{:.2f}"),
    ("p99 adm s", "p99_admission_wait_s", "{:.2f}"),
    ("p99 resume s", "p99_resume_ttft_s", "{:.3f}"),
    ("prog/h", "programs_per_hour", "{:.0f}"),
    ("p99 TTFT s", "p99_ttft_s", "{:.3f}"),
    ("max TTFT s", "max_ttft_s", "{:.3f}"),
    ("hit rate", "hit_rate", "{:.2f}"),
    ("pins", "pins", "{:.0f}"),
    ("preempt", "preemptions", "{:.0f}"),
    ("mean JCT x vllm", "mean_jct_x_vs_vllm", "{:.2f}"),
    ("p99 JCT x vllm", "p99_jct_x_vs_vllm", "{:.2f}"),
    ("p99 resume x vllm", "p99_resume_ttft_x_vs_vllm", "{:.2f}"),
    ("p99 TTFT x vllm", "p99_ttft_x_vs_vllm", "{:.2f}"),
    ("mean JCT x cont.", "mean_jct_x_vs_continuum", "{:.2f}"),
    ("mean JCT x prog.", "mean_jct_x_vs_progress-ttl", "{:.2f}"),
    ("p99 TTFT x cont.", "p99_ttft_x_vs_continuum", "{:.2f}"),
)
#: Ratios listed with their spread under the table (baseline / arm).
SPREAD_LINES = (("mean JCT", "mean_jct"), ("p99 resume TTFT", "p99_resume_ttft"), ("p99 TTFT", "p99_ttft"))


def format_table(comp: Comparison) -> str:
    """Medians over rounds (ratios: baseline / arm, so > 1 means the arm is better), then every ratio's
    min–max over rounds, the factorial when it was run, and the targets marked met or MISSED."""
    figs = comp.figures()
    n = len(comp.rounds)
    lines = _grid(
        ["policy"] + [c[0] for c in TABLE_COLUMNS],
        [[arm] + [_cell(f.get(key), fmt) for _, key, fmt in TABLE_COLUMNS] for arm, f in figs.items()],
    )
    lines.insert(
        0, f"medians over {n} round{'s' if n > 1 else ''}" + (" (one round: no spread)" if n == 1 else "")
    )
    if n > 1:
        lines += ["", "ratios (baseline / policy; median, min-max over rounds):"]
        lines += _spread_lines(figs)
    lines += _factorial_lines(figs)
    lines.append("")
    t = figs.get("ttl", {})
    if t.get("oracle_gain_captured") is not None:
        lines.append(f"ttl captures {t['oracle_gain_captured']:.0%} of the oracle's mean-JCT gain over vllm")
    tb = figs.get(BOUNDED_TTL, {})
    if tb.get("bounded_oracle_gain_captured") is not None:
        lines.append(
            f"{BOUNDED_TTL} captures {tb['bounded_oracle_gain_captured']:.0%} of the gain of the oracle held "
            f"to the same tail bound ({BOUNDED_ORACLE})"
        )
    o = figs.get("oracle", {}).get("mean_jct_x_vs_vllm")
    if o is not None and o < 1 / (1 - MIN_ORACLE_GAIN):
        lines.append(
            f"oracle is {o:.2f}x vllm here (under {1 / (1 - MIN_ORACLE_GAIN):.2f}x): "
            "no oracle gain to capture, this configuration has no headroom for any pin policy"
        )
    for name, tg in comp.targets().items():
        if tg["value"] is None:
            continue
        state = "met" if tg["met"] else "MISSED"
        if tg["unsettled"]:
            state += f" (threshold {tg['threshold']:.2f} inside the spread: not settled)"
        lines.append(f"target {name}: {fmt_spread(tg['value'], tg['min'], tg['max'])} {state}")
    return "\n".join(lines)


def _cell(v: float | None, fmt: str) -> str:
    return "-" if v is None else fmt.format(v)


def _grid(header: list[str], rows: list[list[str]]) -> list[str]:
    rows = [header, *rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return lines


def _spread_lines(figs: dict[str, dict[str, Any]]) -> list[str]:
    out = []
    for arm, f in figs.items():
        spread = f.get("spread", {})
        for label, stem in SPREAD_LINES:
            for key in [k for k in f if k.startswith(f"{stem}_x_vs_")]:
                base = key.removeprefix(f"{stem}_x_vs_")
                if base == arm or f[key] is None or _mirror(arm, base):
                    continue
                lo, hi = spread.get(key, [None, None])
                note = "  (1.00 inside the spread: no difference shown)" if inside_spread(lo, hi) else ""
                out.append(f"  {arm} vs {base.replace('_', ' ')} {label}: {fmt_spread(f[key], lo, hi)}{note}")
    return out


def _mirror(arm: str, base: str) -> bool:
    """``vllm vs continuum`` only mirrors ``continuum vs vllm``: list a pair of baselines once."""
    return arm in BASELINES and base in BASELINES and BASELINES.index(base) > BASELINES.index(arm)


def _factorial_lines(figs: dict[str, dict[str, Any]]) -> list[str]:
    """The 2x2 {stock eviction, oracle pins} x {FCFS, program FCFS}, when every cell ran."""
    if not all(a in figs for a in FACTORIAL_ARMS):
        return []

    def jct(arm: str) -> str:
        f = figs[arm]
        return fmt_spread(f.get("mean_jct_s"), *f.get("spread", {}).get("mean_jct_s", [None, None]))

    def gain(arm: str, base: str) -> str:
        f, key = figs[arm], f"mean_jct_x_vs_{base}"
        return fmt_spread(f.get(key), *f.get("spread", {}).get(key, [None, None]))

    rows = [
        [
            "stock eviction",
            jct("vllm/fcfs"),
            jct("vllm/program-fcfs"),
            gain("vllm/program-fcfs", "vllm/fcfs"),
        ],
        [
            "oracle pins",
            jct("oracle/fcfs"),
            jct("oracle/program-fcfs"),
            gain("oracle/program-fcfs", "oracle/fcfs"),
        ],
        [
            "caching gain",
            gain("oracle/fcfs", "vllm/fcfs"),
            gain("oracle/program-fcfs", "vllm/program-fcfs"),
            "",
        ],
    ]
    return [
        "",
        "factorial: mean JCT s (median, min-max); ordering gain = FCFS / program FCFS, "
        "caching gain = stock / oracle pins (> 1: the second is faster)",
    ] + _grid(["", "FCFS", "program FCFS", "ordering gain"], rows)
