"""N ctk-patched vLLM replicas behind vllm-router: one OpenAI endpoint, program affinity, one lifetime.

``ctk serve MODEL --replicas N`` runs a :class:`Fleet`: N ``ctk serve`` replicas on free loopback ports and
vllm-router (PyPI ``vllm-router``, a Rust binary with a Python launcher) in front on ``--host``/``--port``.
Routing is one of the small :class:`Routing` classes: ``consistent-hash`` (the default: the router's
``consistent_hash`` policy on ``X-Session-ID`` plus its Program binding, so a program's next turn reaches the
replica holding its pin, and stays on the replica it moved to when one dies), ``round-robin`` (the baseline
that scatters turns), and ``program-scheduling`` (vllm-router's own Program Scheduling with Progress-TTL:
the nearest peer, meant for stock engines).

On CPU each replica gets a disjoint share of the usable cores (``VLLM_CPU_OMP_THREADS_BIND``) and, when no KV
size is given, 1/N of the memory vLLM would reserve alone; on GPUs one device each. Every other vLLM
argument is applied to each replica. A replica that dies is reported and the router's health check (every
second) takes it out; :meth:`Fleet.stop` (Ctrl-C) stops the router and every replica's process group.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ctk.engine_patch.serve.server import ServerError, free_port, launch_server, stop_server, wait_ready
from ctk.policy.config import ConfigError, ServeConfig

#: vLLM flags that belong to the router in a fleet (replicas always bind to 127.0.0.1 on free ports).
ROUTER_FLAGS = ("--host", "--port")
KV_FLAGS = ("--kv-cache-memory-bytes", "--gpu-memory-utilization")
DEFAULT_MEMORY_UTILIZATION = 0.9  # vLLM's default share of memory for one server


class Routing(Protocol):
    """How vllm-router picks a replica for a request."""

    name: str

    def router_args(self) -> list[str]: ...


@dataclass(frozen=True)
class ConsistentHash:
    """Consistent hashing on ``X-Session-ID`` plus the router's program binding (no admission control)."""

    name: str = "consistent-hash"

    def router_args(self) -> list[str]:
        binding = {"binding_only": True, "program_scheduling_enable_key": "auto"}
        return [
            "--policy",
            "consistent_hash",
            "--enable-program-scheduling",
            "--program-scheduling-config-json",
            json.dumps(binding),
        ]


@dataclass(frozen=True)
class RoundRobin:
    """Requests in turn: a program's next turn usually misses the replica holding its pin."""

    name: str = "round-robin"

    def router_args(self) -> list[str]:
        return ["--policy", "round_robin"]


@dataclass(frozen=True)
class ProgramScheduling:
    """vllm-router's Program Scheduling: request pool, admission and Progress-TTL in the router."""

    name: str = "program-scheduling"
    config: tuple[tuple[str, object], ...] = ()  # overrides of the router's defaults

    def router_args(self) -> list[str]:
        cfg = {"program_scheduling_enable_key": "auto", "global_queue": True, **dict(self.config)}
        return [
            "--policy",
            "consistent_hash",
            "--enable-program-scheduling",
            "--program-scheduling-config-json",
            json.dumps(cfg),
        ]


ROUTINGS: dict[str, Routing] = {r.name: r for r in (ConsistentHash(), RoundRobin(), ProgramScheduling())}


def routing_by_name(name: str) -> Routing:
    try:
        return ROUTINGS[name]
    except KeyError:
        raise ConfigError(f"unknown routing {name!r}; choose from {', '.join(ROUTINGS)}") from None


# -- resources of one replica ---------------------------------------------------------------------------


def usable_cpus() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def core_shares(n: int, cpus: Sequence[int]) -> list[list[int]]:
    """Disjoint, contiguous core lists for ``n`` replicas (replicas share cores only when n > cores)."""
    if n <= len(cpus):
        size, extra = divmod(len(cpus), n)
        out, start = [], 0
        for i in range(n):
            k = size + (i < extra)
            out.append(list(cpus[start : start + k]))
            start += k
        return out
    return [[cpus[i % len(cpus)]] for i in range(n)]


def _cpu_list(cores: Sequence[int]) -> str:
    return ",".join(map(str, cores))


def replica_envs(n: int, base: dict[str, str] | None = None) -> list[dict[str, str]]:
    """Per-replica environment: its cores on CPU, its device on GPUs; the user's own settings win."""
    base = dict(os.environ if base is None else base)
    if base.get("VLLM_TARGET_DEVICE", "cpu") == "cpu":
        if "VLLM_CPU_OMP_THREADS_BIND" in base:
            return [dict(base) for _ in range(n)]
        return [{**base, "VLLM_CPU_OMP_THREADS_BIND": _cpu_list(c)} for c in core_shares(n, usable_cpus())]
    devices = base.get("CUDA_VISIBLE_DEVICES", "").split(",") if base.get("CUDA_VISIBLE_DEVICES") else None
    devices = devices or [str(i) for i in range(n)]
    return [{**base, "CUDA_VISIBLE_DEVICES": devices[i % len(devices)]} for i in range(n)]


def _has_flag(args: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def split_args(args: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """(router flags ``--host``/``--port`` with their values, every other vLLM argument)."""
    router: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        name = a.split("=", 1)[0]
        if name in ROUTER_FLAGS:
            if "=" in a:
                router[name] = a.split("=", 1)[1]
            elif i + 1 < len(args):
                router[name] = args[i + 1]
                i += 1
        else:
            rest.append(a)
        i += 1
    return router, rest


def replica_args(args: Sequence[str], n: int, env: dict[str, str] | None = None) -> list[str]:
    """``args`` for each replica; on CPU without a KV size, each replica asks for 1/N of vLLM's default."""
    env = dict(os.environ if env is None else env)
    args = list(args)
    cpu = env.get("VLLM_TARGET_DEVICE", "cpu") == "cpu"
    if cpu and not any(_has_flag(args, f) for f in KV_FLAGS) and not env.get("VLLM_CPU_KVCACHE_SPACE"):
        args += ["--gpu-memory-utilization", f"{DEFAULT_MEMORY_UTILIZATION / n:.4f}"]
    return args


def replica_record(record: str | None, index: int) -> str | None:
    """Each replica records into its own store (DuckDB has one writer): ``x.duckdb`` -> ``x.r0.duckdb``."""
    if not record:
        return None
    p = Path(record)
    return str(p.with_name(f"{p.stem}.r{index}{p.suffix or '.duckdb'}"))


# -- the router -----------------------------------------------------------------------------------------


def router_executable() -> str:
    """The ``vllm-router`` launcher of this Python environment; ConfigError when it is not installed."""
    exe = Path(sys.executable).with_name("vllm-router")
    if exe.exists():
        return str(exe)
    found = shutil.which("vllm-router")
    if found:
        return found
    raise ConfigError("vllm-router is not installed: pip install 'ctk[router]' (or pip install vllm-router)")


@dataclass
class Router:
    """One vllm-router process in front of ``workers``; :meth:`start` returns once it answers."""

    workers: list[str]
    routing: Routing = field(default_factory=ConsistentHash)
    port: int = 0  # 0: a free port
    host: str = "127.0.0.1"
    log_path: str | None = None
    health_check_interval_s: int = 1
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{'127.0.0.1' if self.host in ('0.0.0.0', '') else self.host}:{self.port}"

    def args(self) -> list[str]:
        return [
            router_executable(),
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--worker-urls",
            *self.workers,
            *self.routing.router_args(),
            "--prometheus-host",
            "127.0.0.1",
            "--prometheus-port",
            str(free_port()),
            "--health-check-interval-secs",
            str(self.health_check_interval_s),
            "--health-failure-threshold",
            "1",
            "--health-success-threshold",
            "1",
            "--log-level",
            "warning",
            *self.extra_args,
        ]

    def start(self, timeout: float = 60.0) -> Router:
        self.port = self.port or free_port()
        if self.log_path is None:
            fd, self.log_path = tempfile.mkstemp(prefix=f"ctk-router-{self.port}-", suffix=".log")
            os.close(fd)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.args(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.proc.log_path = self.log_path  # type: ignore[attr-defined]
        wait_ready(self.url, timeout=timeout, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_server(self.proc, timeout=10)


# -- the fleet ------------------------------------------------------------------------------------------


@dataclass
class Replica:
    index: int
    port: int
    proc: subprocess.Popen
    reported: bool = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Fleet:
    """N replicas of ``ctk serve`` and the router in front; use as a context manager or start/stop."""

    model: str
    replicas: int
    config: ServeConfig = field(default_factory=ServeConfig)
    vllm_args: list[str] = field(default_factory=list)  # every vLLM argument, --host/--port = the router's
    routing: Routing = field(default_factory=ConsistentHash)
    log_dir: str | None = None
    startup_timeout_s: float = 600.0
    say: Callable[[str], None] = field(default=lambda msg: print(msg, file=sys.stderr, flush=True))
    members: list[Replica] = field(default_factory=list)
    router: Router | None = None

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ConfigError("--replicas must be at least 1")

    @property
    def url(self) -> str:
        assert self.router is not None, "the fleet is not started"
        return self.router.url

    def start(self) -> Fleet:
        router_flags, args = split_args(self.vllm_args)
        args = replica_args(args, self.replicas)
        log_dir = Path(self.log_dir or tempfile.mkdtemp(prefix="ctk-fleet-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        try:
            for i, env in enumerate(replica_envs(self.replicas)):
                port = free_port()
                cfg = dataclasses.replace(self.config, record=replica_record(self.config.record, i))
                proc = launch_server(
                    self.model,
                    port,
                    config=cfg,
                    extra_args=[*args, "--host", "127.0.0.1"],
                    log_path=log_dir / f"replica-{i}.log",
                    env=env,
                )
                self.members.append(Replica(i, port, proc))
                self.say(f"replica {i}: {self.members[-1].url} (pid {proc.pid}, log {proc.log_path})")
            for r in self.members:
                wait_ready(r.url, timeout=self.startup_timeout_s, proc=r.proc)
            self.router = Router(
                [r.url for r in self.members],
                self.routing,
                port=int(router_flags.get("--port", 8000)),
                host=router_flags.get("--host", "127.0.0.1"),
                log_path=str(log_dir / "router.log"),
            ).start()
            self.say(
                f"router ({self.routing.name}): {self.router.url}/v1 in front of {self.replicas} replicas "
                f"(pid {self.router.proc.pid}, log {self.router.log_path})"
            )
        except BaseException:
            self.stop()
            raise
        return self

    def check(self) -> list[Replica]:
        """Replicas that died since the last check (each reported once); ServerError when the router died."""
        dead = []
        for r in self.members:
            if not r.reported and r.proc.poll() is not None:
                r.reported = True
                dead.append(r)
                left = sum(m.proc.poll() is None for m in self.members)
                self.say(
                    f"replica {r.index} ({r.url}) exited with code {r.proc.returncode}; the router's health "
                    f"check takes it out ({left} of {self.replicas} left, log {r.proc.log_path})"
                )
        if self.router is not None and self.router.proc is not None and self.router.proc.poll() is not None:
            code, log = self.router.proc.returncode, self.router.log_path
            raise ServerError(f"the router exited with code {code} (log {log})")
        if self.members and all(r.proc.poll() is not None for r in self.members):
            raise ServerError("every replica has exited")
        return dead

    def pids(self) -> list[int]:
        """Every process of the fleet now (router, replicas and their engine processes)."""
        import psutil

        roots = [r.proc.pid for r in self.members]
        if self.router is not None and self.router.proc is not None:
            roots.append(self.router.proc.pid)
        out = []
        for pid in roots:
            try:
                p = psutil.Process(pid)
                out += [pid, *(c.pid for c in p.children(recursive=True))]
            except psutil.NoSuchProcess:
                pass
        return out

    def stop(self) -> None:
        """Stop the router first (no new requests), then every replica's process group."""
        if self.router is not None:
            self.router.stop()
        for r in self.members:
            stop_server(r.proc)

    def serve_forever(self, poll_s: float = 1.0) -> int:
        """Report dying replicas until Ctrl-C / SIGTERM; then stop everything. Returns the exit code."""

        def on_term(signum, frame):
            raise KeyboardInterrupt

        old = signal.signal(signal.SIGTERM, on_term)
        code = 0
        try:
            while True:
                self.check()
                time.sleep(poll_s)
        except KeyboardInterrupt:
            self.say("stopping the router and the replicas ...")
        except ServerError as exc:
            self.say(f"error: {exc}; stopping the fleet")
            code = 1
        finally:
            signal.signal(signal.SIGTERM, old)
            old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave orphans
            try:
                self.stop()
            finally:
                signal.signal(signal.SIGINT, old_int)
        return code

    def __enter__(self) -> Fleet:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
