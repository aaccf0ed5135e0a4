"""CLI: ``ctk collect swebench``, ``ctk collect bfcl`` and ``ctk proxy``."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from ctk.options import NON_NEGATIVE, PORT, POSITIVE
from ctk.wire import MAX_BODY_BYTES

#: One name for "the OpenAI-compatible server ctk talks to" in every command (old names still accepted).
URL_HELP = "OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1"
DB_HELP = "trace store (DuckDB file; created if missing)"
#: ``ctk proxy``'s default cap on a request body (an agent's whole context is far below this).
MAX_BODY_MB = MAX_BODY_BYTES / 1e6  # the option's default, in MB, from the one limit in ctk.wire

collect_app = typer.Typer(help="Record real agent runs into a trace store.", no_args_is_help=True)

# Options every collector takes; parameter names are CollectOptions' field names (see from_params).
DbOpt = Annotated[Path, typer.Option("--db", help=DB_HELP)]
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="model name sent to the endpoint")]
ApiKeyOpt = Annotated[
    str | None, typer.Option("--api-key", envvar="CTK_API_KEY", help="API key (never logged)")
]
SliceOpt = Annotated[str, typer.Option("--slice", help="start:stop[:step] over the selected tasks")]
SourceOpt = Annotated[str, typer.Option("--source", help="source label; program ids are SOURCE/ID")]


def _option(name: str, kind: Any, default: Any, *decls: str, **option: Any) -> inspect.Parameter:
    """One keyword option ``name`` of type ``kind``, declared as a typer option with ``decls``."""
    annotation = Annotated[kind, typer.Option(*decls, **option)]
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


#: How programs are run and started, the same for every collector: added to each command's options by
#: :func:`_with_run_options`.
RUN_OPTIONS = [
    _option("workers", int, 1, "--workers", "-w", help="programs run concurrently", min=1),
    _option("arrival", str, "fixed", "--arrival", help="fixed (concurrency = workers) or poisson"),
    _option(
        "rate", float | None, None, "--rate", help="poisson arrivals: programs per second", parser=POSITIVE
    ),
    _option("seed", int, 0, "--seed"),
    _option("repeats", int, 1, "--repeats", help="runs per task (program ids get #k)", min=1),
    _option("resume", bool, False, "--resume", help="skip complete programs, redo unfinished ones"),
    _option(
        "send_metadata",
        bool,
        True,
        "--send-metadata/--no-send-metadata",
        help="send session_id / vllm_xargs (turn this off for non-vLLM APIs)",
    ),
]


def _with_run_options(command: Callable[..., None]) -> Callable[..., None]:
    """Add :data:`RUN_OPTIONS` to a collect command, after its own options. The command takes them as
    ``**run_options`` and builds its options object from ``ctx.params``, which holds every option."""
    own = inspect.signature(command, eval_str=True).parameters.values()
    params = [p for p in own if p.kind is not inspect.Parameter.VAR_KEYWORD]
    command.__signature__ = inspect.Signature([*params, *RUN_OPTIONS])  # type: ignore[attr-defined]
    return command


def _fail(msg: str, code: int = 2) -> None:
    typer.secho(f"error: {msg}", err=True, fg="red")
    raise typer.Exit(code)


class _Progress:
    """A progress bar over programs, with a running count of outcomes."""

    def __init__(self, total: int, label: str):
        from ctk.progress import progress_bar

        self.progress = progress_bar(status=True, transient=False)
        self.task = self.progress.add_task(label, total=total, status="")
        self.ok = self.failed = self.stopped = self.running = 0

    def on_start(self, key: str) -> None:
        self.running += 1
        self._update()

    def on_done(self, res) -> None:
        from ctk.collect.runner import was_stopped

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


def _collect(collector, tasks: list[dict], label: str) -> None:
    """Run ``collector`` over ``tasks`` under a progress bar, print the summary, exit with its status
    (130 interrupted, 1 when a program failed)."""
    from ctk.collect.arrival import ArrivalError
    from ctk.collect.runner import CollectError, collect
    from ctk.store import StoreError

    opts = collector.options
    try:
        with _Progress(len(tasks) * opts.repeats, label) as prog:
            summary = collect(collector, tasks, on_start=prog.on_start, on_done=prog.on_done)
    except (CollectError, ArrivalError, StoreError) as exc:
        _fail(str(exc))
    _print_summary(summary, opts.db)
    if summary.interrupted:
        raise typer.Exit(130)
    if summary.failed:
        raise typer.Exit(1)


@collect_app.command("swebench")
@_with_run_options
def swebench(
    ctx: typer.Context,
    db: DbOpt,
    base_url: Annotated[str | None, typer.Option("--url", "--base-url", help=URL_HELP)] = None,
    model: ModelOpt = "default",
    api_key: ApiKeyOpt = None,
    instances: Annotated[
        str | None, typer.Option("--instances", help="JSON/JSONL file or folder of instances, or 'bundled'")
    ] = None,
    subset: Annotated[
        str | None, typer.Option("--subset", help="SWE-bench subset from the hub: verified|lite|full|...")
    ] = None,
    split: Annotated[str, typer.Option("--split")] = "test",
    slice_spec: SliceOpt = "",
    filter_spec: Annotated[str, typer.Option("--filter", help="regex on instance ids")] = "",
    env: Annotated[
        str, typer.Option("--env", help="local (a git working copy per instance) or docker")
    ] = "local",
    repo_dir: Annotated[
        Path | None, typer.Option("--repo-dir", help="local env: folder of repositories/archives by name")
    ] = None,
    configs: Annotated[
        list[str], typer.Option("--config", "-c", help="mini-swe-agent config spec(s); default swebench.yaml")
    ] = [],  # noqa: B006 - typer reads the default, never mutates it
    model_class: Annotated[
        str | None, typer.Option("--model-class", help="mini-swe-agent model class (default litellm)")
    ] = None,
    step_limit: Annotated[
        int | None, typer.Option("--step-limit", help="max LLM calls per program", min=1)
    ] = None,
    timeout: Annotated[
        int | None, typer.Option("--timeout", help="seconds per tool call before it is killed", min=1)
    ] = None,
    retries: Annotated[
        int | None,
        typer.Option(
            "--retries", help="retries of a failed LLM call, 4 s, 4 s, 8 s, ... apart [default: 2]", min=0
        ),
    ] = None,
    source: SourceOpt = "collect-swebench",
    workdir: Annotated[
        Path | None, typer.Option("--workdir", help="local env: where working copies go (default: temp)")
    ] = None,
    keep_workdirs: Annotated[bool, typer.Option("--keep-workdirs")] = False,
    traj_dir: Annotated[
        Path | None, typer.Option("--traj-dir", help="also save mini-swe-agent *.traj.json files here")
    ] = None,
    **run_options: Any,
) -> None:
    """Run mini-swe-agent over SWE-bench instances and record every LLM and tool call."""
    from ctk.collect.swebench import SwebenchCollector, SwebenchOptions
    from ctk.datasets.instances import InstanceError, load_instances

    try:
        rows = load_instances(instances, subset, split, filter_spec, slice_spec)
    except InstanceError as exc:
        _fail(str(exc))
    if not rows:
        _fail("no instances selected (check --filter / --slice)")
    _collect(SwebenchCollector(SwebenchOptions.from_params(ctx.params)), rows, "swebench")


@collect_app.command("bfcl")
@_with_run_options
def bfcl(
    ctx: typer.Context,
    db: DbOpt,
    base_url: Annotated[str, typer.Option("--url", "--base-url", help=URL_HELP + " (with tool calling)")],
    model: ModelOpt = "default",
    api_key: ApiKeyOpt = None,
    categories: Annotated[
        list[str], typer.Option("--category", help="base|miss_func|miss_param|long_context")
    ] = ["base"],  # noqa: B006 - typer reads the default, never mutates it
    slice_spec: SliceOpt = "",
    filter_spec: Annotated[
        str, typer.Option("--filter", help="regex on entry ids, e.g. '^multi_turn_base_(0|1)$'")
    ] = "",
    tool_latency: Annotated[
        str | None,
        typer.Option(
            "--tool-latency",
            help="inject latency per call: SECONDS, exp:MEAN, uniform:LO,HI, "
            "lognormal:MEDIAN,SIGMA, or a trace store / CSV to sample from",
        ),
    ] = None,
    latency_max_s: Annotated[
        float, typer.Option("--latency-max", help="cap on one injected latency (s)", parser=POSITIVE)
    ] = 300.0,
    max_steps: Annotated[
        int, typer.Option("--max-steps", help="model steps per user turn (BFCL uses 20)", min=1)
    ] = 20,
    temperature: Annotated[float, typer.Option("--temperature", parser=NON_NEGATIVE)] = 0.0,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", min=1)] = None,
    stream: Annotated[
        bool, typer.Option("--stream/--no-stream", help="stream (records time to first token)")
    ] = True,
    source: SourceOpt = "collect-bfcl",
    **run_options: Any,
) -> None:
    """Run BFCL multi-turn tasks (bfcl-eval's simulated APIs) and record every LLM and tool call."""
    from ctk.collect.bfcl import BfclCollector, BfclOptions, load_entries
    from ctk.collect.runner import CollectError

    try:
        entries = load_entries(categories, filter_spec, slice_spec)
    except CollectError as exc:
        _fail(str(exc))
    if not entries:
        _fail("no BFCL entries selected (check --filter / --slice)")
    _collect(BfclCollector(BfclOptions.from_params(ctx.params)), entries, "bfcl")


def proxy(
    upstream: Annotated[str, typer.Option("--url", "--upstream", help="upstream " + URL_HELP)],
    db: DbOpt,
    host: Annotated[str, typer.Option("--host", help="bind address (default: loopback only)")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", parser=PORT)] = 8080,
    source: Annotated[str, typer.Option("--source", help="source label of the recorded programs")] = "proxy",
    idle_finish: Annotated[
        float, typer.Option("--idle-finish", help="finish a program after this many idle s", parser=POSITIVE)
    ] = 600.0,
    timeout: Annotated[
        float, typer.Option("--timeout", help="upstream request timeout (s)", parser=POSITIVE)
    ] = 600.0,
    max_body_mb: Annotated[
        float, typer.Option("--max-body-mb", help="refuse larger request bodies (HTTP 413)", parser=POSITIVE)
    ] = MAX_BODY_MB,
    model: Annotated[str | None, typer.Option("--model", help="model label stored with the programs")] = None,
) -> None:
    """Record LLM calls (and the tool pauses between them) of any agent pointed at this proxy."""
    from ctk.collect.proxy import ProxyOptions, check_listen, check_upstream, serve_proxy
    from ctk.store import StoreError, TraceStore

    try:
        check_upstream(upstream)
        check_listen(host, port)  # before the banner and before the store gets a run row
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
