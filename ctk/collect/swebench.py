"""``ctk collect swebench``: run mini-swe-agent over SWE-bench instances and record every step.

mini-swe-agent's own ``DefaultAgent`` loop, prompt templates, model classes and environments are used
as installed; ctk only wraps ``model.query`` and ``env.execute`` (:mod:`ctk.collect.recorder`). Each
request carries the program identity (vLLM ``session_id`` in the body and ``X-Session-ID`` header) and
``vllm_xargs`` with ``program_id``, ``turn_index`` and ``last_turn`` when the step limit makes it known.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctk.collect.arrival import arrival_offsets, run_jobs
from ctk.collect.recorder import ProgramRecorder, RecordingEnvironment, RecordingModel
from ctk.collect.writer import StoreWriter, open_store
from ctk.datasets.instances import ARCHIVE_SUFFIXES, find_repo_source
from ctk.errors import CtkError
from ctk.store import ProgramRecord, RunRecord, TraceStore

log = logging.getLogger(__name__)

ENVIRONMENTS = ("local", "docker")
DEFAULT_RETRIES = 2
_RETRY_KNOB = "MSWEA_MODEL_RETRY_STOP_AFTER_ATTEMPT"  # mini-swe-agent reads it at every LLM call
_GIT_ENV = {
    "GIT_AUTHOR_NAME": "ctk",
    "GIT_AUTHOR_EMAIL": "ctk@localhost",
    "GIT_COMMITTER_NAME": "ctk",
    "GIT_COMMITTER_EMAIL": "ctk@localhost",
    "GIT_CONFIG_NOSYSTEM": "1",
}


class CollectError(CtkError, RuntimeError):
    """A collection cannot start; the message says why."""


class CollectionInterrupted(CtkError):
    """Raised inside a program when the collection is stopping (Ctrl-C): the program stays incomplete."""


@dataclass
class SwebenchOptions:
    db: Path
    base_url: str | None = None
    model: str = "default"
    api_key: str | None = None
    model_class: str | None = None  # mini-swe-agent model class (default: litellm, native tool calls)
    env: str = "local"
    configs: list[str] = field(default_factory=list)  # mini-swe-agent config specs (default swebench.yaml)
    step_limit: int | None = None
    timeout: int | None = None  # per tool call, seconds
    workers: int = 1
    arrival: str = "fixed"
    rate: float | None = None
    seed: int = 0
    resume: bool = False
    repeats: int = 1
    source: str = "collect-swebench"
    repo_dir: Path | None = None
    workdir: Path | None = None
    keep_workdirs: bool = False
    traj_dir: Path | None = None
    send_metadata: bool = True
    # LLM-call retries after the first attempt (mini-swe-agent's back-off: 4 s, 4 s, 8 s, ...); None: its
    # MSWEA_MODEL_RETRY_STOP_AFTER_ATTEMPT if set, else DEFAULT_RETRIES (mini-swe-agent's own default is 9)
    retries: int | None = None


@dataclass
class CollectSummary:
    planned: int = 0
    skipped_complete: int = 0
    redone_incomplete: int = 0
    completed: int = 0
    failed: int = 0
    interrupted: bool = False
    stopped: int = 0  # programs left unfinished by an interruption (marked incomplete)
    outcomes: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    n_llm_calls: int = 0
    n_tool_calls: int = 0


def was_stopped(res: Any) -> bool:
    """A program that ended because the collection is stopping (Ctrl-C), not because it failed."""
    error = res.error or ""
    return not res.ok and ("CollectionInterrupted" in error or "interrupted" in error)


def count_recorded(summary: CollectSummary, lock: threading.Lock, recorder: ProgramRecorder) -> None:
    """Add a program's committed LLM and tool calls to the summary, whether it finished, failed or stopped."""
    with lock:
        summary.n_llm_calls += recorder.turn + 1
        summary.n_tool_calls += recorder.n_tool_calls


def summarize(results: list, interrupted: bool, summary: CollectSummary) -> None:
    """Fold job results into ``summary``; programs stopped by Ctrl-C count as interrupted, not failed."""
    summary.interrupted = interrupted
    for res in results:
        if res.ok:
            summary.completed += 1
        elif interrupted and was_stopped(res):
            summary.stopped += 1
        else:
            summary.failed += 1
            summary.errors.append(f"{res.key}: {res.error}")


def program_id_for(source: str, instance_id: str, repeat: int, repeats: int) -> str:
    return f"{source}/{instance_id}" + (f"#{repeat}" if repeats > 1 else "")


def plan_programs(store: TraceStore, keys: list[str], resume: bool, summary: CollectSummary) -> list[str]:
    """Which program ids to run; with ``resume`` drop complete ones and discard incomplete ones."""
    todo, existing = [], []
    for pid in keys:
        status = store.program_status(pid)
        if status is None:
            todo.append(pid)
        elif not resume:
            existing.append(pid)
        elif status == "complete":
            summary.skipped_complete += 1
        else:
            store.discard_program(pid)
            summary.redone_incomplete += 1
            todo.append(pid)
    if existing:
        raise CollectError(
            f"{len(existing)} of these programs are already in {store.path} (e.g. {existing[0]!r}); "
            "pass --resume to skip complete ones and redo unfinished ones, or use another --source"
        )
    return todo


def register_run(
    db: str | Path, program_ids: list[str], run: RunRecord, resume: bool, summary: CollectSummary
) -> list[str]:
    """Which programs to run (``--resume`` rules) and the run's record; the store is closed again after,
    because the writer process owns it while programs run."""
    store = open_store(db)
    try:
        todo = plan_programs(store, program_ids, resume, summary)
        summary.planned = len(todo)
        if todo:
            store.add_run(run)
    finally:
        store.close()
    return todo


def _git(args: list[str], cwd: Path) -> None:
    proc = subprocess.run(["git", *args], cwd=cwd, env=os.environ | _GIT_ENV, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CollectError(f"git {' '.join(args)} failed in {cwd}: {proc.stderr.strip()[:500]}")


def prepare_working_copy(src: Path, dst: Path, base_commit: str | None = None) -> Path:
    """A git working copy of ``src`` (folder, git repository or archive) at ``dst``; returns ``dst``."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_file():
        if not src.name.endswith(ARCHIVE_SUFFIXES):
            raise CollectError(f"{src}: not a folder or a known archive ({', '.join(ARCHIVE_SUFFIXES)})")
        unpack = Path(tempfile.mkdtemp(prefix="unpack-", dir=dst.parent))
        shutil.unpack_archive(str(src), str(unpack))
        entries = list(unpack.iterdir())
        root = entries[0] if len(entries) == 1 and entries[0].is_dir() else unpack
        shutil.move(str(root), str(dst))
        shutil.rmtree(unpack, ignore_errors=True)
    elif (src / ".git").exists():
        _git(["clone", "-q", str(src), str(dst)], dst.parent)
        if base_commit:
            _git(["checkout", "-q", base_commit], dst)
        return dst
    elif src.is_dir():
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    else:
        raise CollectError(f"{src}: no such repository")
    if not (dst / ".git").exists():
        _git(["init", "-q"], dst)
        _git(["add", "-A"], dst)
        _git(["commit", "-q", "--no-verify", "-m", "base"], dst)
    elif base_commit:
        _git(["checkout", "-q", base_commit], dst)
    return dst


def _quiet_minisweagent() -> None:
    os.environ.setdefault("MSWEA_SILENT_STARTUP", "1")
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("MSWEA_COST_TRACKING", "ignore_errors")


def quiet_litellm() -> None:
    """No red "Provider List" banner and no "Give Feedback" lines per call: ctk reports failures itself."""
    import litellm

    litellm.suppress_debug_info = True
    litellm.set_verbose = False
    logging.getLogger("LiteLLM").setLevel(logging.CRITICAL)


def check_endpoint(base_url: str, api_key: str | None = None, timeout_s: float = 2.0) -> None:
    """Fail in a second, in one line, when no OpenAI-compatible server answers at ``base_url`` (as
    ``ctk replay`` and ``ctk profile`` do) instead of retrying every program's first LLM call for minutes."""
    import httpx

    url = base_url.rstrip("/") + "/models"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(url, headers=headers, timeout=timeout_s)
    except httpx.InvalidURL as exc:
        raise CollectError(f"--url {base_url!r} is not a URL ({exc})") from None
    except httpx.HTTPError as exc:
        raise CollectError(
            f"{base_url}: no server answers ({type(exc).__name__}: {exc}); start one (`ctk serve`) "
            "or fix --url"
        ) from None
    if r.status_code in (401, 403):
        raise CollectError(
            f"{base_url}: the server refuses the API key (HTTP {r.status_code}); pass --api-key"
        )
    if r.status_code == 404:
        raise CollectError(f"{url}: HTTP 404, not an OpenAI-compatible API (does --url end in /v1?)")


def check_provider(model_name: str) -> None:
    """Without --url the model name must name a provider litellm knows (``openai/...``, ``anthropic/...``)."""
    import litellm

    try:
        litellm.get_llm_provider(model_name)
    except Exception:  # noqa: BLE001 - litellm raises its own BadRequestError for an unknown provider
        raise CollectError(
            f"model {model_name!r} names no provider litellm knows: pass --url of an OpenAI-compatible "
            "server (e.g. http://127.0.0.1:8000/v1) or a provider model such as openai/gpt-4o-mini"
        ) from None


def build_config(opts: SwebenchOptions) -> dict[str, Any]:
    """The merged mini-swe-agent config (its swebench.yaml unless ``opts.configs`` says otherwise)."""
    _quiet_minisweagent()
    from minisweagent.config import get_config_from_spec
    from minisweagent.utils.serialize import recursive_merge

    specs = opts.configs or ["swebench.yaml"]
    try:
        configs = [get_config_from_spec(s) for s in specs]
    except (FileNotFoundError, ValueError) as exc:
        raise CollectError(f"mini-swe-agent config: {exc}") from None
    config = recursive_merge(*configs)
    model_cfg = config.setdefault("model", {})
    if opts.base_url:
        model_cfg["model_name"] = opts.model if opts.model.startswith("openai/") else f"openai/{opts.model}"
        kwargs = model_cfg.setdefault("model_kwargs", {})
        kwargs["api_base"] = opts.base_url
        kwargs["api_key"] = opts.api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
    elif opts.model != "default":
        model_cfg["model_name"] = opts.model
    if opts.model_class:
        model_cfg["model_class"] = opts.model_class
    model_cfg.setdefault("cost_tracking", "ignore_errors")
    agent_cfg = config.setdefault("agent", {})
    if opts.step_limit is not None:
        agent_cfg["step_limit"] = opts.step_limit
    env_cfg = config.setdefault("environment", {})
    if opts.timeout is not None:
        env_cfg["timeout"] = opts.timeout
    return config


def _session_kwargs(
    program_id: str, step_limit: int, base: dict[str, Any]
) -> Callable[[int], dict[str, Any]]:
    """Per-turn litellm kwargs carrying the vLLM session id and ``vllm_xargs`` (merged with the config's)."""
    base_body = dict(base.get("extra_body") or {})
    base_headers = dict(base.get("extra_headers") or {})

    def kwargs(turn: int) -> dict[str, Any]:
        xargs = {**(base_body.get("vllm_xargs") or {}), "program_id": program_id, "turn_index": turn}
        if step_limit > 0 and turn + 1 >= step_limit:
            xargs["last_turn"] = 1
        return {
            "extra_body": {**base_body, "session_id": program_id, "vllm_xargs": xargs},
            "extra_headers": {**base_headers, "X-Session-ID": program_id},
        }

    return kwargs


class _StoppableModel(RecordingModel):
    def __init__(self, *args: Any, stop: threading.Event, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._stop = stop

    def query(self, messages: list[dict], **kwargs: Any) -> dict:
        if self._stop.is_set():
            raise CollectionInterrupted("collection interrupted before this LLM call")
        return super().query(messages, **kwargs)


@dataclass
class _Context:
    opts: SwebenchOptions
    config: dict[str, Any]
    writer: StoreWriter
    run_id: str
    workroot: Path
    stop: threading.Event
    summary: CollectSummary
    lock: threading.Lock = field(default_factory=threading.Lock)


def _make_env(ctx: _Context, instance: dict[str, Any], program_id: str) -> tuple[Any, Path | None]:
    from minisweagent.environments import get_environment

    env_cfg = {k: v for k, v in (ctx.config.get("environment") or {}).items()}
    if ctx.opts.env == "docker":
        from minisweagent.run.benchmarks.swebench import get_sb_environment

        env_cfg["environment_class"] = "docker"
        return get_sb_environment({**ctx.config, "environment": env_cfg}, instance), None
    src = find_repo_source(instance, ctx.opts.repo_dir)
    safe = program_id.replace("/", "__").replace("#", "_")
    workdir = prepare_working_copy(src, ctx.workroot / safe / "repo", instance.get("base_commit"))
    env_vars = {k: v for k, v in (env_cfg.get("env") or {}).items() if k != "BASH_ENV"}
    local_cfg = {"environment_class": "local", "cwd": str(workdir), "env": env_vars}
    if "timeout" in env_cfg:
        local_cfg["timeout"] = env_cfg["timeout"]
    return get_environment(local_cfg), workdir


def _preload(config: dict[str, Any]) -> None:
    import minisweagent.agents.default  # noqa: F401
    from minisweagent.models import get_model_class

    model_cfg = config.get("model") or {}
    try:
        get_model_class(model_cfg.get("model_name") or "", model_cfg.get("model_class") or "")
    except ValueError as exc:
        raise CollectError(f"mini-swe-agent model class: {exc}") from None


def run_program(ctx: _Context, instance: dict[str, Any], program_id: str) -> str:
    """Run one instance with mini-swe-agent; returns the agent's exit status."""
    from minisweagent.agents.default import DefaultAgent
    from minisweagent.models import get_model

    env, workdir = _make_env(ctx, instance, program_id)
    recorder = None
    try:
        model_cfg = ctx.config.get("model") or {}
        agent_cfg = dict(ctx.config.get("agent") or {})
        if workdir is not None and "instance_template" in agent_cfg:
            agent_cfg["instance_template"] = agent_cfg["instance_template"].replace("/testbed", str(workdir))
        if ctx.opts.traj_dir is not None:
            agent_cfg["output_path"] = ctx.opts.traj_dir / f"{program_id.replace('/', '__')}.traj.json"
        model = get_model(config=model_cfg)
        recorder = ProgramRecorder(
            ctx.writer,
            ProgramRecord(
                program_id=program_id,
                source=ctx.opts.source,
                run_id=ctx.run_id,
                task_id=instance["instance_id"],
                dataset=instance.get("ctk_dataset") or instance.get("repo"),
                agent="mini-swe-agent",
                model=ctx.opts.model,
            ),
            provenance="ctk-monotonic-wrap",
        )
        step_limit = int(agent_cfg.get("step_limit") or 0)
        request_kwargs = (
            _session_kwargs(program_id, step_limit, model_cfg.get("model_kwargs") or {})
            if ctx.opts.send_metadata and ctx.opts.base_url
            else None
        )
        rmodel = _StoppableModel(model, recorder, request_kwargs, stop=ctx.stop)
        agent = DefaultAgent(rmodel, RecordingEnvironment(env, recorder), **agent_cfg)
        info = agent.run(instance["problem_statement"])
        status = str(info.get("exit_status") or "unknown")
        recorder.finish(status)
        with ctx.lock:
            ctx.summary.outcomes[status] += 1
        return status
    finally:
        if recorder is not None:
            count_recorded(ctx.summary, ctx.lock, recorder)
        cleanup = getattr(env, "cleanup", None)
        if callable(cleanup):
            try:
                cleanup()
            except Exception as exc:  # noqa: BLE001 - cleanup must not hide the result
                log.warning("environment cleanup failed: %s", exc)
        if workdir is not None and not ctx.opts.keep_workdirs:
            shutil.rmtree(workdir.parent, ignore_errors=True)


def collect_swebench(
    opts: SwebenchOptions,
    instances: list[dict[str, Any]],
    *,
    on_start: Callable[[str], None] | None = None,
    on_done: Callable[[Any], None] | None = None,
    stop: threading.Event | None = None,
) -> CollectSummary:
    """Run and record ``instances``; raises :class:`CollectError` for bad options."""
    if opts.env not in ENVIRONMENTS:
        raise CollectError(f"--env {opts.env!r}: choose one of {', '.join(ENVIRONMENTS)}")
    if opts.env == "local" and shutil.which("git") is None:
        raise CollectError("the local environment needs git on PATH")
    if opts.env == "docker":
        exe = os.environ.get("MSWEA_DOCKER_EXECUTABLE", "docker")
        if shutil.which(exe) is None:
            raise CollectError(
                f"--env docker needs {exe!r} on PATH (no container engine here? use --env local "
                "with --repo-dir or instances that name ctk_repo_path)"
            )
    if opts.repeats < 1:
        raise CollectError("--repeats must be at least 1")
    if opts.retries is not None and opts.retries < 0:
        raise CollectError("--retries must be at least 0")
    config = build_config(opts)
    if opts.retries is not None:
        os.environ[_RETRY_KNOB] = str(opts.retries + 1)
    else:
        os.environ.setdefault(_RETRY_KNOB, str(DEFAULT_RETRIES + 1))
    quiet_litellm()
    model_cfg = config.get("model") or {}
    if opts.base_url:
        check_endpoint(opts.base_url, opts.api_key)
    elif "litellm" in (model_cfg.get("model_class") or "litellm"):
        check_provider(str(model_cfg.get("model_name") or opts.model))
    summary = CollectSummary()
    by_pid: dict[str, dict[str, Any]] = {}
    for inst in instances:
        for r in range(opts.repeats):
            by_pid[program_id_for(opts.source, inst["instance_id"], r, opts.repeats)] = inst
    offsets = arrival_offsets(len(by_pid), opts.arrival, opts.rate, opts.seed)  # validate before any write
    run = RunRecord(
        kind="collect-swebench",
        source=opts.source,
        agent="mini-swe-agent",
        model=opts.model,
        host=platform.node(),
        config={
            "env": opts.env,
            "base_url": opts.base_url,
            "workers": opts.workers,
            "arrival": opts.arrival,
            "rate": opts.rate,
            "configs": opts.configs,
            "step_limit": opts.step_limit,
            "timeout": opts.timeout,
        },
    )
    todo = register_run(opts.db, list(by_pid), run, opts.resume, summary)
    if not todo:
        return summary
    workroot = Path(opts.workdir) if opts.workdir else Path(tempfile.mkdtemp(prefix="ctk-collect-"))
    workroot.mkdir(parents=True, exist_ok=True)
    if opts.traj_dir is not None:
        Path(opts.traj_dir).mkdir(parents=True, exist_ok=True)
    _preload(config)  # heavy imports now, so that arrivals are not delayed by the first program's imports
    stop = stop or threading.Event()
    with StoreWriter(opts.db) as writer:
        ctx = _Context(opts, config, writer, run.run_id, workroot, stop, summary)
        jobs = [(pid, (lambda pid=pid: run_program(ctx, by_pid[pid], pid))) for pid in todo]
        results, interrupted = run_jobs(
            jobs,
            workers=opts.workers,
            offsets=offsets[: len(jobs)],
            stop=stop,
            on_start=on_start,
            on_done=on_done,
        )
    summarize(results, interrupted, summary)
    summary.errors += writer.errors
    if not opts.workdir and not opts.keep_workdirs:
        shutil.rmtree(workroot, ignore_errors=True)
    return summary
