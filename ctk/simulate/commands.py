"""CLI: ``ctk simulate`` (a policy × rate sweep on simulated engines)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ctk.options import at_least


def _fail(msg: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {msg}", err=True)
    return typer.Exit(code)


def _floats(text: str, name: str) -> list[float]:
    """Comma-separated positive finite numbers (``nan`` and ``inf`` refused, as every ranged option)."""
    import click

    from ctk.options import POSITIVE

    try:
        out = [POSITIVE.convert(x.strip(), None, None) for x in text.split(",") if x.strip()]
    except click.BadParameter as exc:
        raise _fail(f"--{name}: {exc.message}") from None
    if not out:
        raise _fail(f"--{name} needs positive numbers")
    return out


def simulate(
    db: Annotated[Path, typer.Option("--db", help="trace store to take the programs from")],
    hardware: Annotated[str, typer.Option(help="simulated hardware: h100, h100x4 (TP 4), cpu")] = "h100",
    model: Annotated[
        str, typer.Option(help="simulated model: llama-3.1-8b, llama-3.1-70b, tiny")
    ] = "llama-3.1-8b",
    profile_file: Annotated[
        Path | None, typer.Option("--profile", help="a profile JSON instead of a bundled one")
    ] = None,
    policies: Annotated[
        str, typer.Option(help="comma-separated policies")
    ] = "vllm,continuum,progress-ttl,ttl,oracle",
    rates: Annotated[
        str | None, typer.Option(help="Poisson program arrival rates (programs/s)")
    ] = "0.5,1,2,4",
    concurrency: Annotated[
        int | None, typer.Option(help="closed loop: programs in flight (instead of --rates)")
    ] = None,
    programs: Annotated[
        int,
        typer.Option(
            "-n",
            "--programs",
            help="programs to simulate (0: every distinct one; more: repeated)",
            parser=at_least(0),
        ),
    ] = 0,
    source: Annotated[list[str] | None, typer.Option("--source", help="only programs of this source")] = None,
    max_turns: Annotated[int, typer.Option(help="turns per program at most")] = 30,
    max_context: Annotated[int | None, typer.Option(help="context tokens per program at most")] = None,
    token_scale: Annotated[
        float | None, typer.Option(help="multiply every token count taken from the trace")
    ] = None,
    time_scale: Annotated[float, typer.Option(help="tool pause = recorded duration x this")] = 1.0,
    rtt: Annotated[
        float | None, typer.Option(help="client round trip in seconds (default: the profile's)")
    ] = None,
    replicas: Annotated[int, typer.Option(help="engines behind the router")] = 1,
    routing: Annotated[
        str, typer.Option(help="round-robin | consistent-hash | least-loaded")
    ] = "consistent-hash",
    kv_blocks: Annotated[
        int | None, typer.Option(help="KV blocks per engine (default: the profile's)")
    ] = None,
    ttl_model: Annotated[
        Path | None, typer.Option(help="TTL model for 'ttl' (default: train on other programs)")
    ] = None,
    seed: Annotated[int, typer.Option(help="program sample and arrival seed")] = 0,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="write the figures to this JSON file")
    ] = None,
    plots: Annotated[
        Path | None, typer.Option("--plots", help="write the JCT-vs-rate figure into this folder")
    ] = None,
    work_dir: Annotated[Path, typer.Option(help="folder for the trained TTL model")] = Path("out/simulate"),
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Simulate vLLM 0.32 engines running ctk's own policy code on recorded agent programs."""
    from ctk.measure.presets import bench_config, gpu_workload
    from ctk.measure.workload import WorkloadError, load_programs, system_prompts
    from ctk.policy.arms import Arm, ArmError, split_arms
    from ctk.policy.rules import POLICY_NAMES
    from ctk.simulate.fleet import ROUTINGS
    from ctk.simulate.profiles import ProfileError, load_profile
    from ctk.simulate.run import SimConfig
    from ctk.simulate.sweep import format_tables, plot_jct_vs_rate, run_sweep
    from ctk.simulate.workload import Arrivals, repeat_programs
    from ctk.store import StoreError, TraceStore

    pols = split_arms(policies)
    if not pols:
        raise _fail(f"no policies; choose from {', '.join(POLICY_NAMES)}")
    try:
        needs_ttl = any(Arm.parse(p).needs_model_file for p in pols)
    except ArmError as exc:
        raise _fail(str(exc)) from None
    if routing not in ROUTINGS:
        raise _fail(f"--routing must be one of {', '.join(ROUTINGS)}")
    if replicas < 1:
        raise _fail("--replicas must be at least 1")
    rate_list: list[float | None] = [None] if concurrency else _floats(rates or "", "rates")
    try:
        prof = load_profile(hardware, model, profile_file)
    except ProfileError as exc:
        raise _fail(str(exc)) from None
    overrides = {"max_turns": max_turns, "sources": source or None}
    overrides["max_context_tokens"] = max_context or min(prof.max_model_len, 65536)
    if token_scale is not None:
        overrides["token_scale"] = token_scale
    if prof.hardware == "cpu":  # the tiny model: the benchmark's scaled programs
        wl = bench_config(seed=seed).workload
        wl.n_programs, wl.max_turns = None, max_turns
        wl.sources = source or wl.sources
        if max_context:
            wl.max_context_tokens = max_context
        if token_scale is not None:
            wl.token_scale = token_scale
    else:
        wl = gpu_workload(None, seed, **overrides)
    train_here = needs_ttl and ttl_model is None
    try:
        with TraceStore(db, read_only=True) as store:
            distinct = load_programs(store, wl)
    except (WorkloadError, StoreError) as exc:
        raise _fail(str(exc)) from None
    if train_here:  # the ttl policy trains on the programs that are not simulated
        if len(distinct) < 4:
            raise _fail(
                f"{db}: {len(distinct)} programs, too few to train a TTL model on others (--ttl-model)"
            )
        distinct = distinct[: len(distinct) // 2]
    n = programs or len(distinct)
    progs = repeat_programs(distinct, n) if n > len(distinct) else distinct[:n]
    arrivals = Arrivals(
        rate=None,
        concurrency=concurrency,
        time_scale=time_scale,
        rtt_s=prof.rtt_s if rtt is None else rtt,
        seed=seed,
    )
    cfg = SimConfig(replicas=replicas, routing=routing, arrivals=arrivals, kv_blocks=kv_blocks)
    cfg.shared_prefix_tokens = wl.system_prompt_tokens
    cfg.shared_prefixes = system_prompts(wl, progs)
    tables, ttl_path = None, None
    if needs_ttl:
        from ctk.simulate.ttl import ttl_tables

        try:
            ttl_path, tables = ttl_tables(db, progs, prof, work_dir, time_scale, ttl_model, log=typer.echo)
        except Exception as exc:  # training or loading failed: the message says why
            raise _fail(f"TTL model: {exc}") from None
    typer.echo(
        f"{len(progs)} programs ({len(set(map(id, progs)))} distinct, {sum(len(p.turns) for p in progs)} "
        f"turns) on {replicas} x {prof.name} "
        f"({prof.kv_tokens:,} KV tokens each), routing {routing}; policies {', '.join(pols)}"
    )
    total = len(progs) * len(pols) * len(rate_list)
    bar = _progress(progress and sys.stderr.isatty(), total)
    try:
        sweep = run_sweep(
            progs,
            prof,
            pols,
            rate_list,
            cfg,
            tables=tables,
            ttl_model=str(ttl_path) if ttl_path else None,
            progress=bar.advance if bar else None,
            log=None if bar else typer.echo,
        )
    finally:
        if bar:
            bar.stop()
    sweep.config["workload"] = {k: v for k, v in vars(wl).items()}
    sweep.config["db"] = str(db)
    typer.echo(format_tables(sweep))
    if json_out:
        typer.echo(f"figures -> {sweep.save(json_out)}")
    if plots:
        path = plot_jct_vs_rate(sweep, plots)
        typer.echo(f"figure -> {path}" if path else "one rate only: no JCT-vs-rate figure")


class _Bar:
    def __init__(self, total: int):
        from ctk.progress import progress_bar

        self.p = progress_bar(unit="programs")
        self.task = self.p.add_task("simulate", total=total)
        self.p.start()

    def advance(self, n: int = 1) -> None:
        self.p.advance(self.task, n)

    def stop(self) -> None:
        self.p.stop()


def _progress(enabled: bool, total: int) -> _Bar | None:
    return _Bar(total) if enabled else None


def register(app: typer.Typer) -> None:
    app.command("simulate", help="Simulate vLLM engines running ctk's policies on recorded programs.")(
        simulate
    )
