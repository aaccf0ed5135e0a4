"""CLI: ``ctk collect swebench``, ``ctk collect bfcl`` and ``ctk proxy``."""

from __future__ import annotations

from pathlib import Path

import typer

from ctk.options import NON_NEGATIVE, PORT, POSITIVE

#: One name for "the OpenAI-compatible server ctk talks to" in every command (old names still accepted).
URL_HELP = "OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1"
DB_HELP = "trace store (DuckDB file; created if missing)"
#: ``ctk proxy``'s default cap on a request body (an agent's whole context is far below this).
MAX_BODY_MB = 32.0

collect_app = typer.Typer(help="Record real agent runs into a trace store.", no_args_is_help=True)


def _fail(msg: str, code: int = 2) -> None:
    typer.secho(f"error: {msg}", err=True, fg="red")
    raise typer.Exit(code)


class _Progress:
    """A rich progress bar over programs, with a running count of outcomes."""

    def __init__(self, total: int, label: str):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
            transient=False,
        )
        self.task = self.progress.add_task(label, total=total, status="")
        self.ok = self.failed = self.stopped = self.running = 0

    def on_start(self, key: str) -> None:
        self.running += 1
        self._update()

    def on_done(self, res) -> None:
        from ctk.collect.swebench import was_stopped

        self.running -= 1
        if res.ok:
            self.ok += 1
        elif was_stopped(res):  # the same rule as the summary: stopped by Ctrl-C is not failed
            self.stopped += 1
        else:
            self.failed += 1
        self.progress.advance(self.task)
        self._update()

    def _update(self) -> None:
        status = f"running {self.running}, ok {self.ok}, failed {self.failed}"
        if self.stopped:
            status += f", stopped {self.stopped}"
        self.progress.update(self.task, status=status)

    def __enter__(self) -> _Progress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()


def _print_summary(summary, db: Path) -> None:
    typer.echo(
        f"{summary.completed} programs recorded, {summary.failed} failed, {summary.skipped_complete} already "
        f"complete (skipped), {summary.redone_incomplete} unfinished redone; "
        f"{summary.n_llm_calls} LLM calls, {summary.n_tool_calls} tool calls -> {db}"
    )
    if summary.outcomes:
        typer.echo("outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(summary.outcomes.items())))
    for err in summary.errors[:20]:
        typer.secho(f"  {err}", err=True, fg="yellow")
    if len(summary.errors) > 20:
        typer.secho(f"  ... and {len(summary.errors) - 20} more", err=True, fg="yellow")
    if summary.interrupted:
        typer.secho(
            f"interrupted: {summary.stopped} unfinished program(s) stay marked incomplete (their finished "
            "steps are kept); re-run with --resume",
            err=True,
            fg="yellow",
        )


@collect_app.command("swebench")
def swebench(
    db: Path = typer.Option(..., "--db", help=DB_HELP),
    base_url: str = typer.Option(None, "--url", "--base-url", help=URL_HELP),
    model: str = typer.Option("default", "--model", "-m", help="model name sent to the endpoint"),
    api_key: str = typer.Option(None, "--api-key", envvar="CTK_API_KEY", help="API key (never logged)"),
    instances: str = typer.Option(
        None, "--instances", help="JSON/JSONL file or folder of instances, or 'bundled'"
    ),
    subset: str = typer.Option(
        None, "--subset", help="SWE-bench subset from the hub: verified|lite|full|..."
    ),
    split: str = typer.Option("test", "--split"),
    slice_spec: str = typer.Option("", "--slice", help="start:stop[:step] over the selected instances"),
    filter_spec: str = typer.Option("", "--filter", help="regex on instance ids"),
    env: str = typer.Option("local", "--env", help="local (a git working copy per instance) or docker"),
    repo_dir: Path = typer.Option(
        None, "--repo-dir", help="local env: folder of repositories/archives by name"
    ),
    config: list[str] = typer.Option(
        [], "--config", "-c", help="mini-swe-agent config spec(s); default swebench.yaml"
    ),
    model_class: str = typer.Option(
        None, "--model-class", help="mini-swe-agent model class (default litellm)"
    ),
    step_limit: int = typer.Option(None, "--step-limit", help="max LLM calls per program", min=1),
    timeout: int = typer.Option(None, "--timeout", help="seconds per tool call before it is killed", min=1),
    retries: int = typer.Option(
        None, "--retries", help="retries of a failed LLM call, 4 s, 4 s, 8 s, ... apart [default: 2]", min=0
    ),
    workers: int = typer.Option(1, "--workers", "-w", help="programs run concurrently", min=1),
    arrival: str = typer.Option("fixed", "--arrival", help="fixed (concurrency = workers) or poisson"),
    rate: float = typer.Option(None, "--rate", help="poisson arrivals: programs per second", parser=POSITIVE),
    seed: int = typer.Option(0, "--seed"),
    repeats: int = typer.Option(1, "--repeats", help="runs per instance (program ids get #k)", min=1),
    resume: bool = typer.Option(False, "--resume", help="skip complete programs, redo unfinished ones"),
    source: str = typer.Option(
        "collect-swebench", "--source", help="source label; program ids are SOURCE/ID"
    ),
    workdir: Path = typer.Option(
        None, "--workdir", help="local env: where working copies go (default: temp)"
    ),
    keep_workdirs: bool = typer.Option(False, "--keep-workdirs"),
    traj_dir: Path = typer.Option(None, "--traj-dir", help="also save mini-swe-agent *.traj.json files here"),
    send_metadata: bool = typer.Option(
        True,
        "--send-metadata/--no-send-metadata",
        help="send session_id / vllm_xargs (turn this off for non-vLLM APIs)",
    ),
) -> None:
    """Run mini-swe-agent over SWE-bench instances and record every LLM and tool call."""
    from ctk.collect.arrival import ArrivalError
    from ctk.collect.swebench import CollectError, SwebenchOptions, collect_swebench
    from ctk.datasets.instances import InstanceError, load_instances
    from ctk.store import StoreError

    try:
        rows = load_instances(instances, subset, split, filter_spec, slice_spec)
    except InstanceError as exc:
        _fail(str(exc))
    if not rows:
        _fail("no instances selected (check --filter / --slice)")
    opts = SwebenchOptions(
        db=db,
        base_url=base_url,
        model=model,
        api_key=api_key,
        model_class=model_class,
        env=env,
        configs=list(config),
        step_limit=step_limit,
        timeout=timeout,
        workers=workers,
        arrival=arrival,
        rate=rate,
        seed=seed,
        resume=resume,
        repeats=repeats,
        source=source,
        repo_dir=repo_dir,
        workdir=workdir,
        keep_workdirs=keep_workdirs,
        traj_dir=traj_dir,
        send_metadata=send_metadata,
        retries=retries,
    )
    try:
        with _Progress(len(rows) * repeats, "swebench") as prog:
            summary = collect_swebench(opts, rows, on_start=prog.on_start, on_done=prog.on_done)
    except (CollectError, ArrivalError, StoreError) as exc:
        _fail(str(exc))
    _print_summary(summary, db)
    if summary.interrupted:
        raise typer.Exit(130)
    if summary.failed:
        raise typer.Exit(1)


@collect_app.command("bfcl")
def bfcl(
    db: Path = typer.Option(..., "--db", help=DB_HELP),
    base_url: str = typer.Option(..., "--url", "--base-url", help=URL_HELP + " (with tool calling)"),
    model: str = typer.Option("default", "--model", "-m"),
    api_key: str = typer.Option(None, "--api-key", envvar="CTK_API_KEY", help="API key (never logged)"),
    category: list[str] = typer.Option(["base"], "--category", help="base|miss_func|miss_param|long_context"),
    slice_spec: str = typer.Option("", "--slice", help="start:stop[:step] over the selected entries"),
    filter_spec: str = typer.Option(
        "", "--filter", help="regex on entry ids, e.g. '^multi_turn_base_(0|1)$'"
    ),
    tool_latency: str = typer.Option(
        None,
        "--tool-latency",
        help="inject latency per call: SECONDS, exp:MEAN, uniform:LO,HI, "
        "lognormal:MEDIAN,SIGMA, or a trace store / CSV to sample from",
    ),
    latency_max: float = typer.Option(
        300.0, "--latency-max", help="cap on one injected latency (s)", parser=POSITIVE
    ),
    max_steps: int = typer.Option(20, "--max-steps", help="model steps per user turn (BFCL uses 20)", min=1),
    temperature: float = typer.Option(0.0, "--temperature", parser=NON_NEGATIVE),
    max_tokens: int = typer.Option(None, "--max-tokens", min=1),
    stream: bool = typer.Option(True, "--stream/--no-stream", help="stream (records time to first token)"),
    workers: int = typer.Option(1, "--workers", "-w", min=1),
    arrival: str = typer.Option("fixed", "--arrival", help="fixed or poisson"),
    rate: float = typer.Option(None, "--rate", help="poisson arrivals: programs per second", parser=POSITIVE),
    seed: int = typer.Option(0, "--seed"),
    resume: bool = typer.Option(False, "--resume", help="skip complete programs, redo unfinished ones"),
    source: str = typer.Option("collect-bfcl", "--source"),
    send_metadata: bool = typer.Option(True, "--send-metadata/--no-send-metadata"),
) -> None:
    """Run BFCL multi-turn tasks (bfcl-eval's simulated APIs) and record every LLM and tool call."""
    from ctk.collect.arrival import ArrivalError
    from ctk.collect.bfcl import BfclOptions, collect_bfcl, load_entries
    from ctk.collect.swebench import CollectError
    from ctk.store import StoreError

    opts = BfclOptions(
        db=db,
        base_url=base_url,
        model=model,
        api_key=api_key,
        categories=list(category),
        tool_latency=tool_latency,
        latency_max_s=latency_max,
        max_steps=max_steps,
        temperature=temperature,
        max_tokens=max_tokens,
        stream=stream,
        workers=workers,
        arrival=arrival,
        rate=rate,
        seed=seed,
        resume=resume,
        source=source,
        send_metadata=send_metadata,
    )
    try:
        entries = load_entries(opts.categories, filter_spec, slice_spec)
        if not entries:
            _fail("no BFCL entries selected (check --filter / --slice)")
        with _Progress(len(entries), "bfcl") as prog:
            summary = collect_bfcl(opts, entries, on_start=prog.on_start, on_done=prog.on_done)
    except (CollectError, ArrivalError, StoreError) as exc:
        _fail(str(exc))
    _print_summary(summary, db)
    if summary.interrupted:
        raise typer.Exit(130)
    if summary.failed:
        raise typer.Exit(1)


def proxy(
    upstream: str = typer.Option(..., "--url", "--upstream", help="upstream " + URL_HELP),
    db: Path = typer.Option(..., "--db", help=DB_HELP),
    host: str = typer.Option("127.0.0.1", "--host", help="bind address (default: loopback only)"),
    port: int = typer.Option(8080, "--port", parser=PORT),
    source: str = typer.Option("proxy", "--source", help="source label of the recorded programs"),
    idle_finish: float = typer.Option(
        600.0, "--idle-finish", help="finish a program after this many idle s", parser=POSITIVE
    ),
    timeout: float = typer.Option(600.0, "--timeout", help="upstream request timeout (s)", parser=POSITIVE),
    max_body_mb: float = typer.Option(
        MAX_BODY_MB, "--max-body-mb", help="refuse larger request bodies (HTTP 413)", parser=POSITIVE
    ),
    model: str = typer.Option(None, "--model", help="model label stored with the programs"),
) -> None:
    """Record LLM calls (and the tool pauses between them) of any agent pointed at this proxy."""
    from ctk.collect.proxy import ProxyOptions, check_upstream, serve_proxy
    from ctk.store import StoreError, TraceStore

    try:
        check_upstream(upstream)
    except ValueError as exc:
        _fail(str(exc))
    try:  # fail early and clearly on a bad store path
        TraceStore(db).close()
    except StoreError as exc:
        _fail(str(exc))
    typer.echo(f"ctk proxy: http://{host}:{port}/v1 -> {upstream}, recording into {db}")
    serve_proxy(
        ProxyOptions(
            upstream=upstream,
            db=db,
            source=source,
            idle_finish_s=idle_finish,
            timeout_s=timeout,
            model=model,
            max_body_bytes=int(max_body_mb * 1e6),
        ),
        host=host,
        port=port,
    )


def register(app: typer.Typer) -> None:
    app.add_typer(collect_app, name="collect")
    app.command("proxy")(proxy)
