"""A sweep: every policy at every arrival rate on the same programs; the table, the JSON, the figure.

JSON (``ctk simulate --json``)::

    {"rates": {"<rate>": {"<policy>": {"mean_jct_s", "p50_jct_s", "p99_jct_s", "p50_admission_wait_s",
                                        "p99_admission_wait_s", "p99_resume_ttft_s", "programs_per_hour",
                                        "hit_rate", "p99_ttft_s", "preemptions", "pins", "kv_usage_mean",
                                        ...}}},
     "config": {...}, "vllm_kv80_rate": <rate at which stock vLLM's mean KV usage passes 0.8, or null>}
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctk.measure.workload import ProgramSpec
from ctk.simulate.profiles import HardwareProfile
from ctk.simulate.run import SimConfig, simulate_arm

KV_USAGE_MARK = 0.8


@dataclass
class Sweep:
    rates: list[float | None]  # None: the closed loop of cfg.arrivals.concurrency
    policies: list[str]
    results: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def add(self, rate: float | None, policy: str, summary: dict[str, Any]) -> None:
        self.results.setdefault(rate_key(rate), {})[policy] = summary

    def figures(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Per rate and policy: the summary with ratios vs ``vllm`` and ``continuum`` (> 1: better)."""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for rate, per in self.results.items():
            out[rate] = {p: dict(s) for p, s in per.items()}
            for base in ("vllm", "continuum"):
                b = per.get(base)
                if b is None:
                    continue
                for s in out[rate].values():
                    for key in RATIO_KEYS:
                        v = s.get(key)
                        ratio = b[key] / v if b.get(key) and v else None
                        s[f"{key.removesuffix('_s')}_x_vs_{base}"] = ratio
        return out

    def kv80_rate(self, policy: str = "vllm") -> float | None:
        """The lowest swept rate at which ``policy``'s mean KV usage reaches 80% (None: never)."""
        for rate in sorted(r for r in self.rates if r is not None):
            s = self.results.get(rate_key(rate), {}).get(policy)
            if s and (s.get("kv_usage_mean") or 0) >= KV_USAGE_MARK:
                return rate
        return None

    def to_json(self) -> dict[str, Any]:
        return {"rates": self.figures(), "config": self.config, "vllm_kv80_rate": self.kv80_rate()}

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1, default=str))
        return path


def rate_key(rate: float | None) -> str:
    return "closed" if rate is None else f"{rate:g}"


def run_sweep(
    programs: list[ProgramSpec],
    profile: HardwareProfile,
    policies: list[str],
    rates: list[float | None],
    cfg: SimConfig,
    tables=None,
    ttl_model: str | None = None,
    progress: Callable[[int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> Sweep:
    """Simulate every (rate, policy) pair; the same programs and seed everywhere. A policy may be an arm of
    the policy comparison (``ttl@age_factor=2``, ``oracle@age_bound=true``, ``vllm/program-fcfs``)."""
    cost = tables.cost_model if tables is not None else profile.cost_model()
    sweep = Sweep(list(rates), list(policies))
    for rate in rates:
        arrivals = dataclasses.replace(cfg.arrivals, rate=rate)
        if rate is not None and cfg.arrivals.rate is None and cfg.arrivals.concurrency:
            arrivals.concurrency = None  # a Poisson sweep is open loop unless a rate was the base
        run_cfg = dataclasses.replace(cfg, arrivals=arrivals)
        for policy in policies:
            res = simulate_arm(programs, profile, policy, run_cfg, tables, ttl_model, cost, progress)
            s = res.summary()
            sweep.add(rate, policy, s)
            if log is not None:
                log(
                    f"[rate {rate_key(rate)}] {policy}: mean JCT {s['mean_jct_s'] or 0:.2f} s, hit rate "
                    f"{s['hit_rate'] or 0:.2f}, pins {s['pins']}, {res.wall_s:.1f} s wall"
                )
    cfg_dict = dataclasses.asdict(cfg)
    cfg_dict.update(profile=profile.name, policies=list(policies), n_programs=len(programs))
    sweep.config = cfg_dict
    return sweep


#: Figures also given as baseline / policy (``<key>_x_vs_vllm``; above 1 the policy is better).
RATIO_KEYS = ("mean_jct_s", "p99_jct_s", "p99_ttft_s", "p99_resume_ttft_s")

TABLE_COLUMNS = (
    ("mean JCT s", "mean_jct_s", "{:.2f}"),
    ("p50 JCT s", "p50_jct_s", "{:.2f}"),
    ("p99 JCT s", "p99_jct_s", "{:.2f}"),
    ("p50 adm s", "p50_admission_wait_s", "{:.2f}"),
    ("p99 adm s", "p99_admission_wait_s", "{:.2f}"),
    ("p99 resume s", "p99_resume_ttft_s", "{:.3f}"),
    ("prog/h", "programs_per_hour", "{:.0f}"),
    ("p99 TTFT s", "p99_ttft_s", "{:.3f}"),
    ("hit rate", "hit_rate", "{:.3f}"),
    ("preempt", "preemptions", "{:.0f}"),
    ("pins", "pins", "{:.0f}"),
    ("KV use", "kv_usage_mean", "{:.2f}"),
    ("JCT x vllm", "mean_jct_x_vs_vllm", "{:.2f}"),
    ("JCT x cont.", "mean_jct_x_vs_continuum", "{:.2f}"),
)


def format_tables(sweep: Sweep) -> str:
    """One plain-text table per rate (ratios: baseline / policy, so > 1 means the policy is better)."""
    blocks = []
    for rate, per in sweep.figures().items():
        title = "closed loop" if rate == "closed" else f"rate {rate} programs/s"
        header = ["policy"] + [c[0] for c in TABLE_COLUMNS]
        rows = [header]
        for policy, s in per.items():
            rows.append([policy] + ["-" if s.get(k) is None else f.format(s[k]) for _, k, f in TABLE_COLUMNS])
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = [
            "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
            for r in rows
        ]
        lines.insert(1, "-" * len(lines[0]))
        blocks.append(title + "\n" + "\n".join(lines))
    kv = sweep.kv80_rate()
    if any(r is not None for r in sweep.rates):
        blocks.append(
            f"stock vLLM's mean KV usage reaches {KV_USAGE_MARK:.0%} at rate {kv:g}"
            if kv is not None
            else f"stock vLLM's mean KV usage stays under {KV_USAGE_MARK:.0%} at every swept rate"
        )
    return "\n\n".join(blocks)


def plot_jct_vs_rate(sweep: Sweep, out_dir: Path) -> Path | None:
    """Mean JCT and p99 resume TTFT vs arrival rate per policy; None without two rates."""
    from ctk.measure.report import plot_rates

    return plot_rates(sweep.to_json(), out_dir)
