"""Simulator fidelity: the real CPU engine vs the simulator with the measured CPU profile, same programs.

    python bench/sim_fidelity.py --json f.json                  # bench/policies.py's default configuration
    python bench/sim_fidelity.py --rounds 1 --programs 8 --policies vllm,oracle   # a reduced check
    python bench/sim_fidelity.py --real out/bench-policies/compare-results.json   # reuse a real run

The real side is ``ctk.measure.compare.run_comparison`` (one fresh ``ctk serve`` per policy, the recorded
programs replayed), by default the median of 2 rounds with the policy order rotated between rounds. The
simulated side replays the same programs (same workload configuration and seed) through
``ctk.simulate`` with a CPU step model measured on this machine (decode batches, prefill alone and mixed with
decodes, :mod:`ctk.simulate.steps`): right before the real rounds, or with ``--real`` the bundled
``cpu--tiny`` scaled to the prefill speed ``ctk profile`` measured in that run; the server's KV size,
``max_num_seqs`` and the same TTL model file, and the client's timing measured in the real run's replays
(every turn draws a round trip and a client gap from them, :mod:`ctk.simulate.client_timing`; under load a
turn spends ~0.1 s outside the engine's scheduler, not the idle profile's 8 ms). Prints per policy real
vs simulated mean JCT, p99 TTFT, hit rate and preemptions with the errors (the simulated figures: the median
over ``--draws`` draws of the client timing, 5 by default; the real ones: the median over rounds), then per
policy the p99 TTFT and the longest first-turn wait of every real round and every draw, and how many of each
held a new program back longer than 10 s (under strict program order new programs' first turns queue behind
every resumed turn: in about half the real ``ttl`` rounds of 2026-12-06/07 a few of them waited 20-37 s while
the rest did not, so a median of rounds against one draw compares different outcomes), and checks the
targets: mean JCT
within 15%, hit rate within 0.05, the same ranking of policies by mean JCT, judged (issue 22) on the pairs
every real round orders alike (a faster than b in each round): pairs inside the real rounds' spread are ties.
The order of the medians is reported beside it. Apart from the simulation, the step model is checked
on the steps the real engine ran (:mod:`ctk.simulate.step_check`: the replays' decode windows, measured
against predicted). JSON: ``{"policies": {"<policy>": {"real": {...}, "sim":
{...}, "error": {...}}}, "targets": {...}, "config": {...}}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

FIGURES = ("mean_jct_s", "p99_ttft_s", "hit_rate", "preemptions")
#: Per draw / per round, beside FIGURES: the longest first-turn wait (a new program held back)
DRAW_FIGURES = (*FIGURES, "max_admission_wait_s")
#: A first turn that waited longer than this: a new program held back (the bimodal tail of strict order)
HELD_BACK_S = 10.0
JCT_TOLERANCE = 0.15
HIT_TOLERANCE = 0.05


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--db", type=Path, help="trace store (default: the shared traces, as bench/policies.py)")
    p.add_argument("--out-dir", type=Path, default=REPO / "out" / "bench-fidelity", help="work folder")
    p.add_argument("--policies", help="comma-separated (default: bench/policies.py's)")
    p.add_argument("--rounds", type=int, default=2, help="real rounds, policy order rotated; median figures")
    p.add_argument("--programs", type=int, help="programs to replay (default: the benchmark's)")
    p.add_argument("--max-turns", type=int, help="turns per program at most")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--draws",
        type=int,
        default=5,
        help="simulations per policy, each with its own draws of the client timing (client seeds: the "
        "replay's seed + k; the programs' start times stay the replay's); the simulated figures are their "
        "medians (1: one draw, as before 2026-12-07)",
    )
    p.add_argument("--real", type=Path, action="append", help="compare-results.json of real runs to reuse")
    p.add_argument(
        "--profile",
        type=Path,
        help="simulator profile JSON (default: with --real the bundled cpu--tiny; else measured on this "
        "machine right before the real rounds, ctk.simulate.derive.measure_cpu)",
    )
    p.add_argument(
        "--no-client-timing",
        action="store_true",
        help="every turn's round trip is the profile's rtt_s (default: each turn draws the round trip and "
        "the client's gap measured in the real run's replays, ctk.simulate.client_timing)",
    )
    p.add_argument(
        "--no-calibrate",
        action="store_true",
        help="use the profile as is (default with --real or --profile: scale its prefill work, per token and "
        "attention, to the prefill speed ctk profile measured in the run after its first replay; a shared "
        "machine runs slower than when the profile was made; a profile measured by this run itself is used "
        "as is)",
    )
    return p.parse_args(argv)


def median_figures(runs: list[dict[str, dict]]) -> dict[str, dict]:
    """Per policy, the median of each figure over the runs that have it."""
    out: dict[str, dict] = {}
    for policy in {p for r in runs for p in r}:
        out[policy] = {}
        for key in FIGURES:
            vals = [r[policy].get(key) for r in runs if policy in r and r[policy].get(key) is not None]
            out[policy][key] = statistics.median(vals) if vals else None
        out[policy]["rounds"] = sum(1 for r in runs if policy in r)
    return out


def median_of(values: list) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def held_back(waits: list) -> str:
    """``k of n`` rounds or draws whose longest first-turn wait exceeded :data:`HELD_BACK_S`."""
    vals = [w for w in waits if w is not None]
    return f"{sum(w > HELD_BACK_S for w in vals)} of {len(vals)}"


def errors(real: dict, sim: dict) -> dict:
    err = {}
    for key in FIGURES:
        r, s = real.get(key), sim.get(key)
        if r is None or s is None:
            err[key] = None
        elif key in ("hit_rate", "preemptions"):
            err[key] = s - r  # absolute
        else:
            err[key] = (s - r) / r if r else None
    return err


def ranking(figs: dict[str, dict]) -> list[str]:
    return sorted(
        (p for p in figs if figs[p].get("mean_jct_s") is not None), key=lambda p: figs[p]["mean_jct_s"]
    )


def pair_agreement(rank_real: list[str], rank_sim: list[str]) -> float | None:
    """The share of policy pairs the simulator orders as the real run does (1.0: the same ranking)."""
    pos = {p: i for i, p in enumerate(rank_sim)}
    pairs = [(a, b) for i, a in enumerate(rank_real) for b in rank_real[i + 1 :] if a in pos and b in pos]
    return sum(pos[a] < pos[b] for a, b in pairs) / len(pairs) if pairs else None


def round_figures(runs: list[dict[str, dict]], figure: str) -> dict[str, list[float]]:
    """Per policy, ``figure`` in every real round (a multi-round file keeps its rounds under "rounds")."""
    out: dict[str, list[float]] = {}
    for run in runs:
        for policy, figs in run.items():
            rounds = figs.get("rounds") if isinstance(figs.get("rounds"), list) else [figs]
            values = (r[figure] for r in rounds if r.get(figure) is not None)
            out.setdefault(policy, []).extend(values)
    return out


def round_jcts(runs: list[dict[str, dict]]) -> dict[str, list[float]]:
    """Per policy, the mean JCT of every real round."""
    return round_figures(runs, "mean_jct_s")


def outside_range(value: float | None, rounds: list[float], tolerance: float) -> float | None:
    """How far ``value`` lies outside the real rounds' range widened by ``tolerance`` (0.0: inside; None:
    nothing to compare). The rounds of one configuration differ by more than a median's tolerance (ttl's
    hit rate 0.54-0.69 over three rounds of one run), so a simulated figure is also judged against them."""
    if value is None or not rounds:
        return None
    return max(0.0, min(rounds) - tolerance - value, value - max(rounds) - tolerance)


def separated_pairs(jcts: dict[str, list[float]]) -> list[tuple[str, str]]:
    """(a, b): a was faster than b in every real round; the ranking the real runs establish beyond their
    own round-to-round noise (policies whose rounds overlap are tied)."""
    return [
        (a, b) for a in jcts for b in jcts if a != b and jcts[a] and jcts[b] and max(jcts[a]) < min(jcts[b])
    ]


def adopt_run_config(cfg, run_config: dict) -> None:
    """Take a real run's workload, replay and server settings (as its compare-results.json recorded them).
    A run recorded without ``system_prompt_per_source`` (before 2026-12-07, late) replayed one system prompt
    for all programs."""
    cfg.workload.system_prompt_per_source = False  # unless the run says otherwise (below)
    for section in ("workload", "replay", "server"):
        target = getattr(cfg, section)
        for key, value in (run_config.get(section) or {}).items():
            if key != "progress" and hasattr(target, key):
                current = getattr(target, key)
                setattr(target, key, tuple(value) if isinstance(current, tuple) else value)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from policies import trace_store  # bench/policies.py

    from ctk.measure.compare import run_comparison
    from ctk.measure.presets import bench_config
    from ctk.measure.workload import load_programs
    from ctk.policy.arms import Arm, split_arms
    from ctk.simulate.client_timing import load_client_timing
    from ctk.simulate.profiles import PREFILL_TERMS, load_profile
    from ctk.simulate.run import comparison_sim_config, simulate_arm
    from ctk.simulate.step_check import check_replays, profile_warnings
    from ctk.store import TraceStore

    t0 = time.monotonic()
    cfg = bench_config(seed=args.seed)
    if args.policies:
        cfg.policies = split_arms(args.policies)
    if args.programs:
        cfg.workload.n_programs = args.programs
    if args.max_turns:
        cfg.workload.max_turns = args.max_turns
    cfg.replay.progress = sys.stderr.isatty()
    out_dir = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.db is None and args.real:  # the programs the real run replayed
        recorded = json.loads(args.real[0].read_text()).get("config", {}).get("db")
        args.db = Path(recorded) if recorded and Path(recorded).exists() else None
    db = trace_store(argparse.Namespace(db=args.db), out_dir)

    # -- the real engine ---------------------------------------------------------------------------
    real_runs: list[dict[str, dict]] = []
    measured: list[Path] = []  # ctk profile of the real engine, measured in each real run
    replays: list[Path] = []  # the real runs' replay results (client timing)
    ttl_model = None
    if args.real:
        for path in args.real:
            d = json.loads(path.read_text())
            real_runs.append(d["policies"])
            ttl_model = ttl_model or d.get("config", {}).get("ttl_model")
            if len(real_runs) == 1:
                adopt_run_config(cfg, d.get("config", {}))  # simulate what was run (concurrency, KV, ...)
                if not args.policies:  # and every arm it ran (bench/policies.py --both-orders has seven)
                    cfg.policies = list(d["policies"])
            measured.append(path.parent / "prefill_profile.json")
            replays += sorted(path.parent.glob("replay-*.json"))
    else:
        model_dir = out_dir / "tiny-model"
        if not (model_dir / "config.json").exists():
            from ctk.engine_patch.serve.tiny_model import build_tiny_model

            build_tiny_model(model_dir)
        if args.profile is None:  # the step model measured on this machine now, before the real rounds
            from ctk.simulate.derive import cpu_profile, measure_cpu

            print("measuring the simulator's CPU profile (decode, prefill and mixed steps)", flush=True)
            args.profile = out_dir / "cpu-profile.json"
            args.profile.write_text(json.dumps(cpu_profile(measure_cpu(out_dir)), indent=1))
            args.no_calibrate = True  # measured minutes before the rounds: no speed to correct
        for k in range(args.rounds):
            rc = dataclasses.replace(
                cfg, policies=cfg.policies[k % len(cfg.policies) :] + cfg.policies[: k % len(cfg.policies)]
            )
            rc.ttl_model = Path(ttl_model) if ttl_model else None
            print(f"real round {k + 1}/{args.rounds}: {', '.join(rc.policies)}", flush=True)
            comp = run_comparison(
                db, model_dir, out_dir / f"round-{k}", rc, log=lambda m: print(m, flush=True)
            )
            real_runs.append(comp.figures())
            ttl_model = ttl_model or comp.config.get("ttl_model")
            measured.append(out_dir / f"round-{k}" / "prefill_profile.json")
            replays += sorted((out_dir / f"round-{k}").glob("replay-*.json"))
    real = median_figures(real_runs)

    # -- the simulator -----------------------------------------------------------------------------
    prof = load_profile("cpu", "tiny", args.profile)
    factor = 1.0
    if not args.no_calibrate:
        factors = [prof.speed_factor(json.loads(m.read_text())) for m in measured if m.exists()]
        if factors:
            factor = statistics.median(factors)
            why = "the real engine's prefill speed measured in this run"
            prof = prof.scaled(factor, why, PREFILL_TERMS)
    print(f"simulator profile {prof.name} (prefill work x {factor:.2f} of the profile's measurement)")
    step_check = None
    if replays:  # the profile on the steps the real engine ran: its decode windows, measured vs predicted
        step_check = check_replays((json.loads(p.read_text()) for p in replays), prof.step_s)
        per = [v["real_over_model"] for k, v in step_check.items() if k != "all"]
        print(
            f"real decode windows / the profile's time for the same steps: "
            f"{step_check['all']['real_over_model']:.2f} (per replay {min(per):.2f}-{max(per):.2f})"
        )
    # a profile measured on the machine in another state (only prefill work is rescaled), or off on this run
    warnings = profile_warnings(factor, step_check["all"]["real_over_model"] if step_check else None)
    for warning in warnings:
        print(f"warning: {warning}")
    with TraceStore(db, read_only=True) as store:
        programs = load_programs(store, cfg.workload)
    tables = None
    if ttl_model and any(Arm.parse(name).needs_model_file for name in cfg.policies):  # arms carry settings
        from ctk.predict.modelfile import load_ttl_tables

        tables = load_ttl_tables(str(ttl_model))
    timing = None
    if not args.no_client_timing and replays:
        timing = load_client_timing(replays, prof.prefill_time_s)
        t = timing.summary()
        print(
            f"client timing measured in {len(replays)} replays ({t['turns']} turns): round trip mean "
            f"{t['rtt_mean_s']:.3f} s (p50 {t['rtt_p50_s']:.3f}, p90 {t['rtt_p90_s']:.3f}; profile "
            f"{prof.rtt_s:.4f}), client gap mean {t['gap_mean_s']:.3f} s (p90 {t['gap_p90_s']:.3f})"
        )
    sim_cfg = comparison_sim_config(cfg, prof, timing, programs)
    sim: dict[str, dict] = {}
    draws: dict[str, dict[str, list]] = {}
    cost = tables.cost_model if tables is not None else prof.cost_model()
    for policy in cfg.policies:
        runs = []
        for k in range(max(1, args.draws)):
            arr = dataclasses.replace(sim_cfg.arrivals, client_seed=sim_cfg.arrivals.seed + k)
            drawn = dataclasses.replace(sim_cfg, arrivals=arr)
            runs.append(simulate_arm(programs, prof, policy, drawn, tables, ttl_model, cost).summary())
        draws[policy] = {key: [r[key] for r in runs] for key in DRAW_FIGURES}
        sim[policy] = {key: median_of(draws[policy][key]) for key in FIGURES}

    # -- the comparison ----------------------------------------------------------------------------
    out = {"policies": {}, "config": {}}
    print(
        f"\n{'policy':<22} {'mean JCT real':>13} {'sim':>7} {'err':>6}  {'p99 TTFT real':>13} {'sim':>7}  "
        f"{'hit real':>8} {'sim':>6} {'diff':>6}  {'preempt real':>12} {'sim':>5}"
    )
    jct_ok, hit_ok, hit_in_range = True, True, True
    hit_rounds = round_figures(real_runs, "hit_rate")
    for policy in cfg.policies:
        r, s = real.get(policy, {}), sim[policy]
        e = errors(r, s)
        e["hit_rate_outside_real_range"] = outside_range(
            s["hit_rate"], hit_rounds.get(policy, []), HIT_TOLERANCE
        )
        out["policies"][policy] = {
            "real": r,
            "sim": s,
            "error": e,
            "real_hit_rates": hit_rounds.get(policy, []),
            "real_rounds": {key: round_figures(real_runs, key).get(policy, []) for key in DRAW_FIGURES},
            "sim_draws": draws[policy],
        }
        jct_ok &= e["mean_jct_s"] is not None and abs(e["mean_jct_s"]) <= JCT_TOLERANCE
        hit_ok &= e["hit_rate"] is not None and abs(e["hit_rate"]) <= HIT_TOLERANCE
        hit_in_range &= e["hit_rate_outside_real_range"] == 0.0

        cells = [
            (r.get("mean_jct_s"), "{:.2f}", 13),
            (s["mean_jct_s"], "{:.2f}", 7),
            (e["mean_jct_s"], "{:+.0%}", 6),
            (r.get("p99_ttft_s"), "{:.3f}", 15),
            (s["p99_ttft_s"], "{:.3f}", 7),
            (r.get("hit_rate"), "{:.3f}", 10),
            (s["hit_rate"], "{:.3f}", 6),
            (e["hit_rate"], "{:+.3f}", 6),
            (r.get("preemptions"), "{:.0f}", 14),
            (s["preemptions"], "{:.0f}", 5),
        ]
        print(
            f"{policy:<22}" + " ".join(("-" if v is None else fmt.format(v)).rjust(w) for v, fmt, w in cells)
        )
    for policy in cfg.policies:
        rounds, e = hit_rounds.get(policy, []), out["policies"][policy]["error"]
        if rounds:
            off = e["hit_rate_outside_real_range"]
            print(
                f"  hit rate {policy}: real rounds {min(rounds):.3f}-{max(rounds):.3f}, sim "
                f"{sim[policy]['hit_rate']:.3f}: "
                + ("inside" if off == 0.0 else f"{off:.3f} outside")
                + f" the range +- {HIT_TOLERANCE}"
            )
    print(
        "p99 TTFT and the longest first-turn wait, per real round / per draw "
        f"(held back: > {HELD_BACK_S:.0f} s)"
    )
    for policy in cfg.policies:
        rr, dd = out["policies"][policy]["real_rounds"], draws[policy]

        def fmt(xs: list) -> str:
            return " ".join("-" if x is None else f"{x:.1f}" for x in xs) or "-"

        print(
            f"  {policy}: real p99 {fmt(rr['p99_ttft_s'])}, wait {fmt(rr['max_admission_wait_s'])} "
            f"(held back in {held_back(rr['max_admission_wait_s'])}); sim p99 {fmt(dd['p99_ttft_s'])}, wait "
            f"{fmt(dd['max_admission_wait_s'])} (held back in {held_back(dd['max_admission_wait_s'])})"
        )
    rank_real, rank_sim = ranking({k: v for k, v in real.items() if k in sim}), ranking(sim)
    pairs = [(a, b) for a, b in separated_pairs(round_jcts(real_runs)) if a in sim and b in sim]
    kept = [(a, b) for a, b in pairs if sim[a]["mean_jct_s"] < sim[b]["mean_jct_s"]]
    separated = {frozenset(p) for p in pairs}
    ties = [
        f"{a} ~ {b}"
        for i, a in enumerate(rank_real)
        for b in rank_real[i + 1 :]
        if b in sim and frozenset((a, b)) not in separated
    ]
    # Issue 22: "the same ranking" is judged on the pairs every real round orders alike; pairs inside the
    # rounds' spread are ties (either order counts). The order of the medians is reported beside it.
    out["targets"] = {
        f"mean_jct within {JCT_TOLERANCE:.0%} for every policy": jct_ok,
        f"hit_rate within {HIT_TOLERANCE} for every policy": hit_ok,
        f"hit_rate within {HIT_TOLERANCE} of the real rounds' range for every policy": hit_in_range,
        "same ranking by mean JCT (pairs every real round agrees on; the rest tied)": len(kept) == len(pairs),
    }
    agreement = pair_agreement(rank_real, rank_sim)
    out["ranking"] = {
        "real": rank_real,
        "sim": rank_sim,
        "same_order_of_medians": rank_real == rank_sim,
        "pairs_in_the_same_order": agreement,
        "separated_in_every_real_round": [f"{a} < {b}" for a, b in pairs],
        "kept_by_the_simulator": [f"{a} < {b}" for a, b in kept],
        "ties_inside_the_real_spread": ties,
    }
    out["config"] = {
        "db": str(db),
        "rounds": len(real_runs),
        "policies": cfg.policies,
        "workload": dataclasses.asdict(cfg.workload),
        "replay": dataclasses.asdict(cfg.replay),
        "server": dataclasses.asdict(cfg.server),
        "profile": prof.name,
        "speed_factor": factor,
        "step_check": step_check,
        "profile_warnings": warnings,
        "client_timing": timing.summary() if timing is not None else None,
        "draws": max(1, args.draws),
        "ttl_model": str(ttl_model) if ttl_model else None,
        "wall_s": time.monotonic() - t0,
    }
    print(f"ranking by median mean JCT: real {' < '.join(rank_real)}; sim {' < '.join(rank_sim)}")
    print(f"same order of the medians: {rank_real == rank_sim}; ties inside the real spread: {ties or '-'}")
    if agreement is not None:
        print(f"policy pairs the simulator orders as the real run: {agreement:.0%}")
    missed = [f"{a} < {b}" for a, b in pairs if (a, b) not in kept]
    agreed = ", ".join(f"{a} < {b}" for a, b in pairs) or "-"
    print(
        f"orders every real round agrees on: {len(pairs)} ({agreed}); the simulator keeps {len(kept)}"
        + (f", not {', '.join(missed)}" if missed else "")
    )
    for name, ok in out["targets"].items():
        print(f"target {name}: {'met' if ok else 'MISSED'}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))
        print(f"figures -> {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
