"""CLI of the measure part: ``ctk replay``, ``ctk compare``, ``ctk report`` and ``ctk demo``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def _fail(msg: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {msg}", err=True)
    return typer.Exit(code)


def replay(
    db: Annotated[Path, typer.Option("--db", help="trace store to take the programs from")],
    base_url: Annotated[
        str, typer.Option("--url", "--base-url", help="OpenAI-compatible server, e.g. http://127.0.0.1:8000")
    ],
    out: Annotated[Path, typer.Option("-o", "--output", "--out", help="results JSON")] = Path(
        "replay-results.json"
    ),
    record_db: Annotated[
        Path | None, typer.Option("--record-db", help="also write the replayed calls here")
    ] = None,
    label: Annotated[str, typer.Option(help="name of this run (e.g. the server's policy)")] = "replay",
    programs: Annotated[int, typer.Option("-n", "--programs", help="programs to replay (0: all)")] = 16,
    source: Annotated[
        list[str] | None, typer.Option("--source", help="only programs of this source (repeatable)")
    ] = None,
    seed: Annotated[int, typer.Option(help="sampling and synthetic-content seed")] = 0,
    concurrency: Annotated[
        int, typer.Option(help="programs in flight at most (0: unbounded, needs --rate)")
    ] = 8,
    rate: Annotated[float | None, typer.Option(help="Poisson arrivals, programs per second")] = None,
    time_scale: Annotated[
        float, typer.Option("--time-scale", help="tool pause = recorded duration x this")
    ] = 1.0,
    max_turns: Annotated[int, typer.Option(help="turns per program at most")] = 24,
    token_scale: Annotated[float, typer.Option(help="multiply every token count taken from the trace")] = 1.0,
    max_context: Annotated[
        int, typer.Option(help="context tokens per program at most (the program is cut)")
    ] = 6144,
    max_output: Annotated[int, typer.Option(help="output tokens per turn at most")] = 96,
    max_observation: Annotated[int, typer.Option(help="observation tokens per turn at most")] = 512,
    max_pause: Annotated[float, typer.Option(help="tool pause at most, seconds before scaling")] = 120.0,
    model: Annotated[
        str | None, typer.Option(help="model name (default: the first the server lists)")
    ] = None,
    no_oracle: Annotated[
        bool, typer.Option("--no-oracle-hint", help="do not send the true tool durations")
    ] = False,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Replay recorded programs against a live server and record JCT, TTFT, queue wait and cache hits."""
    from ctk.measure.replay import ReplayConfig, ReplayError, run_replay
    from ctk.measure.workload import WorkloadConfig, WorkloadError, load_programs
    from ctk.store import StoreError, TraceStore

    wcfg = WorkloadConfig(
        n_programs=programs or None,
        seed=seed,
        sources=source or None,
        max_turns=max_turns,
        token_scale=token_scale,
        max_context_tokens=max_context,
        max_output_tokens=max_output,
        max_observation_tokens=max_observation,
        max_pause_s=max_pause,
    )
    rcfg = ReplayConfig(
        base_url=base_url,
        model=model,
        concurrency=concurrency or None,
        rate=rate,
        time_scale=time_scale,
        seed=seed,
        label=label,
        send_oracle_duration=not no_oracle,
        progress=progress,
    )
    try:
        with TraceStore(db, read_only=True) as store:
            specs = load_programs(store, wcfg)
        result = run_replay(specs, wcfg, rcfg)
    except (StoreError, WorkloadError, ReplayError) as exc:
        raise _fail(str(exc)) from None
    result.save(out)
    if record_db is not None:
        try:
            with TraceStore(record_db) as store:
                result.to_store(store)
        except StoreError as exc:
            typer.echo(f"warning: results kept in {out}, not recorded in the store: {exc}", err=True)
    s = result.summary()
    state = "interrupted, kept" if result.interrupted else "done"
    typer.echo(
        f"{state}: {s['programs']} programs ({s['failed_programs']} failed), "
        f"mean JCT {_f(s['mean_jct_s'])} s, "
        f"p99 TTFT {_f(s['p99_ttft_s'])} s, hit rate {_f(s['hit_rate'])} -> {out}"
    )
    if s["programs"] == 0 and not result.interrupted:
        raise typer.Exit(1)


def report(
    db: Annotated[Path | None, typer.Option("--db", help="trace store (tool-duration plots)")] = None,
    results: Annotated[
        list[Path] | None, typer.Option("--results", help="replay JSON or compare-results.json (repeatable)")
    ] = None,
    model: Annotated[
        Path | None, typer.Option("--model", help="model.pkl (calibration and TTL plots)")
    ] = None,
    time_scale: Annotated[
        float,
        typer.Option(
            "--time-scale", help="the model's clock / the store's (a comparison trains on scaled durations)"
        ),
    ] = 1.0,
    out: Annotated[Path, typer.Option("-o", "--output", "--out", help="output folder")] = Path("report"),
) -> None:
    """Write an HTML report with PNG plots: durations, calibration, TTLs, JCT and TTFT per policy, pins."""
    from ctk.measure.report import ReportInputs, build_report, load_inputs
    from ctk.measure.results import ResultsError

    if db is None and not results:
        raise _fail("give --db and/or --results")
    try:
        inputs: ReportInputs = load_inputs(db, results or [], model, time_scale)
    except (ResultsError, ValueError, OSError) as exc:
        raise _fail(str(exc)) from None
    page = build_report(inputs, out)
    typer.echo(str(page))


def demo(
    out: Annotated[
        Path, typer.Option("-o", "--output", "--out", help="work folder (reused: store, model)")
    ] = Path("demo-out"),
    policies: Annotated[
        str | None, typer.Option(help="comma-separated policies (default: vllm,continuum,ttl,oracle)")
    ] = None,
    programs: Annotated[int | None, typer.Option("-n", "--programs", help="programs per policy")] = None,
) -> None:
    """The whole loop on the bundled sample: import, train, serve each policy, replay, report."""
    import os

    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ctk.measure.demo import main
    from ctk.policy.arms import split_arms

    names = split_arms(policies)
    code = main(out, names, programs)
    if code:
        raise typer.Exit(code)


def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def register(app: typer.Typer) -> None:
    app.command("replay")(replay)
    app.command("report")(report)
    app.command("demo")(demo)
