"""``ctk collect swebench``: run mini-swe-agent over SWE-bench instances and record every step.

mini-swe-agent's own ``DefaultAgent`` loop, prompt templates, model classes and environments are used
as installed; ctk only wraps ``model.query`` and ``env.execute`` (:mod:`ctk.collect.recorder`). Each
request carries the program identity (vLLM ``session_id`` in the body and ``X-Session-ID`` header) and
``vllm_xargs`` with ``program_id``, ``turn_index`` and ``last_turn`` when the step limit makes it known.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctk.collect.recorder import RecordingEnvironment, RecordingModel
from ctk.collect.runner import CollectError, CollectOptions, Program, session_fields
from ctk.datasets.instances import ARCHIVE_SUFFIXES, find_repo_source
from ctk.wire import session_headers

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


@dataclass
class SwebenchOptions(CollectOptions):
    model_class: str | None = None  # mini-swe-agent model class (default: litellm, native tool calls)
    env: str = "local"
    configs: list[str] = field(default_factory=list)  # mini-swe-agent config specs (default swebench.yaml)
    step_limit: int | None = None
    timeout: int | None = None  # per tool call, seconds
    source: str = "collect-swebench"
    repo_dir: Path | None = None
    workdir: Path | None = None
    keep_workdirs: bool = False
    traj_dir: Path | None = None
    # LLM-call retries after the first attempt (mini-swe-agent's back-off: 4 s, 4 s, 8 s, ...); None: its
    # MSWEA_MODEL_RETRY_STOP_AFTER_ATTEMPT if set, else DEFAULT_RETRIES (mini-swe-agent's own default is 9)
    retries: int | None = None


WORKROOT_PREFIX = "ctk-collect-"
#: The PID of the collection that owns a work folder; a folder whose owner is gone is stale.
OWNER_FILE = ".ctk-owner-pid"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another account's process
        return True
    return True


def clean_stale_workroots(tmp: Path) -> int:
    """Remove ``ctk-collect-*`` work folders whose owning collection no longer runs (it was killed before
    its clean-up); returns how many. Folders without an owner file or of a live process are left alone."""
    removed = 0
    for folder in tmp.glob(f"{WORKROOT_PREFIX}*"):
        try:
            pid = int((folder / OWNER_FILE).read_text().strip())
        except (OSError, ValueError):
            continue
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed


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
        last = step_limit > 0 and turn + 1 >= step_limit
        fields = session_fields(program_id, turn, last, base_body.get("vllm_xargs"))
        return {
            "extra_body": {**base_body, **fields},
            "extra_headers": {**base_headers, **session_headers(program_id)},
        }

    return kwargs


class _StoppableModel(RecordingModel):
    def __init__(self, *args: Any, program: Program, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._program = program

    def query(self, messages: list[dict], **kwargs: Any) -> dict:
        self._program.check_stop()
        return super().query(messages, **kwargs)


def _preload(config: dict[str, Any]) -> None:
    import minisweagent.agents.default  # noqa: F401
    from minisweagent.models import get_model_class

    model_cfg = config.get("model") or {}
    try:
        get_model_class(model_cfg.get("model_name") or "", model_cfg.get("model_class") or "")
    except ValueError as exc:
        raise CollectError(f"mini-swe-agent model class: {exc}") from None


class SwebenchCollector:
    """mini-swe-agent's ``DefaultAgent`` on one SWE-bench instance per program (a local git working copy
    or its docker image), with the model and the environment wrapped by the recorder."""

    kind = "collect-swebench"
    agent = "mini-swe-agent"

    def __init__(self, options: SwebenchOptions):
        self.options = options
        self.config: dict[str, Any] = {}
        self.workroot = Path()

    def task_id(self, task: dict[str, Any]) -> str:
        return task["instance_id"]

    def prepare(self) -> None:
        opts = self.options
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
        if opts.retries is not None and opts.retries < 0:
            raise CollectError("--retries must be at least 0")
        self.config = build_config(opts)
        if opts.retries is not None:
            os.environ[_RETRY_KNOB] = str(opts.retries + 1)
        else:
            os.environ.setdefault(_RETRY_KNOB, str(DEFAULT_RETRIES + 1))
        quiet_litellm()
        model_cfg = self.config.get("model") or {}
        if not opts.base_url and "litellm" in (model_cfg.get("model_class") or "litellm"):
            check_provider(str(model_cfg.get("model_name") or opts.model))

    def run_config(self) -> dict[str, Any]:
        opts = self.options
        return {
            "env": opts.env,
            "configs": opts.configs,
            "step_limit": opts.step_limit,
            "timeout": opts.timeout,
        }

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """A root for the working copies (removed after unless ``--workdir`` / ``--keep-workdirs``)."""
        opts = self.options
        if opts.workdir:
            self.workroot = Path(opts.workdir)
        else:
            clean_stale_workroots(Path(tempfile.gettempdir()))  # left by a collection that was SIGKILLed
            self.workroot = Path(tempfile.mkdtemp(prefix=WORKROOT_PREFIX))
            (self.workroot / OWNER_FILE).write_text(str(os.getpid()))
        self.workroot.mkdir(parents=True, exist_ok=True)
        if opts.traj_dir is not None:
            Path(opts.traj_dir).mkdir(parents=True, exist_ok=True)
        _preload(self.config)  # heavy imports now, so that arrivals are not delayed by the first program's
        try:
            yield
        finally:
            if not opts.workdir and not opts.keep_workdirs:
                shutil.rmtree(self.workroot, ignore_errors=True)

    def _make_env(self, instance: dict[str, Any], program_id: str) -> tuple[Any, Path | None]:
        from minisweagent.environments import get_environment

        env_cfg = {k: v for k, v in (self.config.get("environment") or {}).items()}
        if self.options.env == "docker":
            from minisweagent.run.benchmarks.swebench import get_sb_environment

            env_cfg["environment_class"] = "docker"
            return get_sb_environment({**self.config, "environment": env_cfg}, instance), None
        src = find_repo_source(instance, self.options.repo_dir)
        safe = program_id.replace("/", "__").replace("#", "_")
        workdir = prepare_working_copy(src, self.workroot / safe / "repo", instance.get("base_commit"))
        env_vars = {k: v for k, v in (env_cfg.get("env") or {}).items() if k != "BASH_ENV"}
        local_cfg = {"environment_class": "local", "cwd": str(workdir), "env": env_vars}
        if "timeout" in env_cfg:
            local_cfg["timeout"] = env_cfg["timeout"]
        return get_environment(local_cfg), workdir

    def run_program(self, program: Program) -> str:
        """Run one instance with mini-swe-agent; returns the agent's exit status."""
        from minisweagent.agents.default import DefaultAgent
        from minisweagent.models import get_model

        opts, instance, program_id = self.options, program.task, program.program_id
        env, workdir = self._make_env(instance, program_id)
        try:
            model_cfg = self.config.get("model") or {}
            agent_cfg = dict(self.config.get("agent") or {})
            if workdir is not None and "instance_template" in agent_cfg:
                agent_cfg["instance_template"] = agent_cfg["instance_template"].replace(
                    "/testbed", str(workdir)
                )
            if opts.traj_dir is not None:
                agent_cfg["output_path"] = opts.traj_dir / f"{program_id.replace('/', '__')}.traj.json"
            model = get_model(config=model_cfg)
            recorder = program.record(instance.get("ctk_dataset") or instance.get("repo"))
            step_limit = int(agent_cfg.get("step_limit") or 0)
            request_kwargs = (
                _session_kwargs(program_id, step_limit, model_cfg.get("model_kwargs") or {})
                if opts.send_metadata and opts.base_url
                else None
            )
            rmodel = _StoppableModel(model, recorder, request_kwargs, program=program)
            agent = DefaultAgent(rmodel, RecordingEnvironment(env, recorder), **agent_cfg)
            info = agent.run(instance["problem_statement"])
            return program.finish(str(info.get("exit_status") or "unknown"))
        finally:
            cleanup = getattr(env, "cleanup", None)
            if callable(cleanup):
                try:
                    cleanup()
                except Exception as exc:  # noqa: BLE001 - cleanup must not hide the result
                    log.warning("environment cleanup failed: %s", exc)
            if workdir is not None and not opts.keep_workdirs:
                shutil.rmtree(workdir.parent, ignore_errors=True)
