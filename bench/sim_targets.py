"""Issue 22's simulator targets over several seeds: ``ctk simulate --json`` files in, per-rate medians and
spreads out, one met/missed line per target.

    python bench/sim_targets.py sim-*.json [--policy ttl] [--knee-factor 1.25]

Files of the same profile and seed are merged (e.g. a run of the baselines and a later run of ``ttl`` and
the oracle on the same programs: every run that includes ``ttl`` holds out the same half of the programs to
train its model). Each ratio is the baseline's figure over the policy's (above 1: the policy is better),
taken per seed and then the median over seeds, with the min–max. A target is judged on the median and says
when a seed misses it.

The knee is where stock vLLM starts to queue, and it moves with the seed (the same rate draws different
programs): a seed's rate is **past the knee** when stock's mean JCT there is at least ``--knee-factor``
(1.25) times stock's mean JCT at that seed's lowest rate, else below it. At each rate the seeds on each side
are judged apart (a median over one seed below the knee and two past it would judge neither).

Targets (issue 22), for ``--policy`` (default ``ttl``), past the knee:
mean JCT ≥ 1.5× stock's, ≥ 0.95× the oracle's, ≥ 1.1× Continuum's, Progress-TTL's and ThunderAgent's; at
every rate p99 JCT and p99 resume TTFT ≤ stock's; below the knee mean JCT within 1% of stock's and request
p99 TTFT ≤ stock's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

STOCK = "vllm"
PAST_KNEE = {"vllm": 1.5, "oracle": 0.95, "continuum": 1.1, "progress-ttl": 1.1, "thunderagent": 1.1}


def load(files: list[Path]) -> dict[str, dict[int, dict[str, dict[str, dict]]]]:
    """profile -> seed -> rate -> policy -> summary (files of one profile and seed merged)."""
    runs: dict[str, dict[int, dict[str, dict[str, dict]]]] = defaultdict(dict)
    for f in files:
        d = json.loads(f.read_text())
        cfg = d["config"]
        per_seed = runs[cfg["profile"]].setdefault(cfg["workload"]["seed"], {})
        for rate, per in d["rates"].items():
            per_seed.setdefault(rate, {}).update(per)
    return runs


def ratio(base: dict | None, pol: dict | None, key: str) -> float | None:
    if not base or not pol or not base.get(key) or not pol.get(key):
        return None
    return base[key] / pol[key]


def spread(values: list[float]) -> tuple[float, float, float] | None:
    return (statistics.median(values), min(values), max(values)) if values else None


def fmt(s: tuple[float, float, float] | None) -> str:
    return "—" if s is None else f"{s[0]:.2f} ({s[1]:.2f}–{s[2]:.2f})"


def median_of(per_seed: list[dict], policy: str, key: str) -> float:
    values = [p[policy][key] for p in per_seed if policy in p and p[policy].get(key) is not None]
    return statistics.median(values) if values else float("nan")


def ratios(per_seed: list[dict], base: str, policy: str, key: str) -> tuple[float, float, float] | None:
    return spread([x for p in per_seed if (x := ratio(p.get(base), p[policy], key))])


Target = tuple[str, "tuple[float, float, float] | None", float]


def past_knee(per_rate: dict[str, dict], rate: str, factor: float) -> bool:
    """Stock's mean JCT at ``rate`` is at least ``factor`` × its mean JCT at the seed's lowest rate."""
    lowest = per_rate[min(per_rate, key=float)].get(STOCK, {}).get("mean_jct_s")
    here = per_rate[rate].get(STOCK, {}).get("mean_jct_s")
    return bool(lowest and here and here >= factor * lowest)


def targets_at(past: bool, per_seed: list[dict], policy: str) -> list[Target]:
    """(name, median/min/max ratio, threshold) of every target on this side of the knee."""
    if past:
        out = [
            (f"mean JCT x {b}", ratios(per_seed, b, policy, "mean_jct_s"), t) for b, t in PAST_KNEE.items()
        ]
    else:
        out = [
            ("mean JCT x vllm (within 1%)", ratios(per_seed, STOCK, policy, "mean_jct_s"), 0.99),
            ("p99 TTFT x vllm", ratios(per_seed, STOCK, policy, "p99_ttft_s"), 1.0),
        ]
    return out + [
        ("p99 JCT x vllm", ratios(per_seed, STOCK, policy, "p99_jct_s"), 1.0),
        ("p99 resume TTFT x vllm", ratios(per_seed, STOCK, policy, "p99_resume_ttft_s"), 1.0),
    ]


def table_row(rate: str, per_seed: list[dict], policy: str) -> str:
    m = lambda pol, key: median_of(per_seed, pol, key)  # noqa: E731
    row = [rate, f"{m(STOCK, 'mean_jct_s'):.0f} → {m(policy, 'mean_jct_s'):.0f}"]
    row += [fmt(ratios(per_seed, b, policy, "mean_jct_s")) for b in PAST_KNEE]
    row += [fmt(ratios(per_seed, STOCK, policy, k)) for k in ("p99_jct_s", "p99_resume_ttft_s", "p99_ttft_s")]
    row.append(
        f"{m(STOCK, 'p50_admission_wait_s'):.1f} / {m(STOCK, 'p99_admission_wait_s'):.1f} → "
        f"{m(policy, 'p50_admission_wait_s'):.1f} / {m(policy, 'p99_admission_wait_s'):.1f}"
    )
    row.append(f"{m(STOCK, 'programs_per_hour'):.0f} / {m(policy, 'programs_per_hour'):.0f}")
    row.append(f"{m(STOCK, 'hit_rate'):.2f} / {m(policy, 'hit_rate'):.2f}")
    return "| " + " | ".join(row) + " |"


COLUMNS = (
    ["rate /s", "mean JCT s stock → policy"]
    + [f"× {b}" for b in PAST_KNEE]
    + ["p99 JCT × stock", "p99 resume TTFT × stock", "p99 TTFT × stock"]
    + ["admission wait p50 / p99 s stock → policy", "programs/h stock / policy", "hit rate stock / policy"]
)


def check(runs: dict, policy: str, knee_factor: float) -> bool:
    """Print each profile's table and target lines; True when every target is met."""
    ok = True
    for profile, seeds in sorted(runs.items()):
        rates = sorted({r for per in seeds.values() for r in per}, key=float)
        print(f"\n{profile}: {policy}, seeds {sorted(seeds)} (ratios: median over seeds, min–max)\n")
        print("| " + " | ".join(COLUMNS) + " |\n" + "|---" * len(COLUMNS) + "|")
        lines: list[str] = []
        for rate in rates:
            sides: dict[bool, list[dict]] = {False: [], True: []}
            for per in seeds.values():
                if policy in per.get(rate, {}):
                    sides[past_knee(per, rate, knee_factor)].append(per[rate])
            for past, per_seed in sides.items():
                if not per_seed:
                    continue
                label = f"{rate} ({'past' if past else 'below'} the knee, {len(per_seed)} seeds)"
                print(table_row(label, per_seed, policy))
                for name, s, threshold in targets_at(past, per_seed, policy):
                    if s is None:
                        lines.append(f"- rate {label}: {name} >= {threshold}: no baseline run")
                        continue
                    met = s[0] >= threshold
                    ok &= met
                    note = f" (a seed misses: min {s[1]:.3f})" if met and s[1] < threshold else ""
                    verdict = "met" if met else "MISSED"
                    lines.append(f"- rate {label}: {name} >= {threshold}: {s[0]:.3f} {verdict}{note}")
        print("\n" + "\n".join(lines))
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", type=Path, help="ctk simulate --json files")
    p.add_argument("--policy", default="ttl", help="the policy judged (default ttl)")
    p.add_argument(
        "--knee-factor",
        type=float,
        default=1.25,
        help="past the knee: stock's mean JCT >= this x its lowest-rate one",
    )
    a = p.parse_args(argv)
    met = check(load(a.files), a.policy, a.knee_factor)
    print(f"\nall targets {'met' if met else 'NOT met'}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
