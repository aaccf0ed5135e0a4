"""The policy comparison: the same programs, the same seed, one fresh server per arm and round, one table.

Used by ``bench/policies.py``, ``ctk demo`` and the measure tests. An *arm* is a policy (``vllm``,
``continuum``, ``progress-ttl``, ``ttl``, ``oracle``), optionally with its program ordering forced
(``vllm/program-fcfs``, ``oracle/fcfs``: the factorial that separates caching from ordering). For each arm,
``rounds`` times in rotated order (:mod:`ctk.measure.rounds`), a server is started on the tiny model with a
KV cache smaller than the working set, warmed up, the programs are replayed, ``/metrics`` is read, and the
server is stopped. ``ttl`` and ``oracle`` are served with the same model file: a TTL model trained once per
run (``ctk train``, called in-process) on the store's other programs, never on the replayed ones, with tool
durations on the replay's clock (multiplied by ``time_scale``) and the served engine's prefill cost
(``ctk profile``, in-process too).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from ctk.errors import CtkError
from ctk.measure import server_metrics
from ctk.measure.replay import ReplayConfig, run_replay
from ctk.measure.results import ReplayResult
from ctk.measure.rounds import (
    BOUNDED_ORACLE,
    check_targets,
    median_figures,
    rotated_orders,
    round_figures,
)
from ctk.measure.workload import ProgramSpec, WorkloadConfig, load_programs
from ctk.policy.arms import Arm, ArmError
from ctk.policy.rules import POLICY_NAMES, RULES, Policy
from ctk.predict.profile import ProfileError, profile_prefill
from ctk.predict.train import TrainError, train_ttl_model, training_store
from ctk.store import TraceStore

if TYPE_CHECKING:
    from ctk.predict.train import TrainConfig

#: {stock eviction, oracle pins} x {FCFS, program FCFS}.
FACTORIAL_ARMS = ("vllm/fcfs", "vllm/program-fcfs", "oracle/fcfs", "oracle/program-fcfs")
#: ``bench/policies.py --both-orders``: ttl and the oracle each in strict program order and under the age
#: bound, next to the baselines: what ttl loses to its predictions at one order, and what the order costs.
BOTH_ORDERS_ARMS = (
    "vllm",
    "continuum",
    "progress-ttl",
    "ttl",
    "ttl@age_bound=true",
    "oracle",
    BOUNDED_ORACLE,
)
#: Server flags every replayed server needs: cached tokens and queue time in each response.
REPLAY_SERVER_ARGS = ("--enable-prompt-tokens-details", "--enable-per-request-metrics")


class CompareError(CtkError, RuntimeError):
    """The comparison cannot run (a server does not start, training fails); the message says why."""


def server_args(arm: Arm) -> list[str]:
    """Stock vLLM with program ordering still needs ctk's scheduler class (``ctk serve`` adds it only
    for pin policies)."""
    if arm.program_fcfs and not RULES[arm.policy].needs_ctk_scheduler:
        from ctk.engine_patch.serve.server import SCHEDULER_CLS

        return ["--scheduler-cls", SCHEDULER_CLS]
    return []


@dataclass
class ServerConfig:
    """The served model and its memory: small enough that the working set does not fit."""

    kv_cache_bytes: int = 24 * 2**20
    max_num_seqs: int = 16
    max_model_len: int | None = None  # None: the workload's max_context_tokens
    block_size: int | None = None  # None: the engine's default
    startup_timeout_s: float = 600.0  # a loaded 2-core machine took over 300 s once (issue 22 bench)
    extra_args: list[str] = field(default_factory=list)

    def args(self, max_model_len: int = 8192) -> list[str]:
        a = [
            "--kv-cache-memory-bytes",
            str(self.kv_cache_bytes),
            "--max-num-seqs",
            str(self.max_num_seqs),
            "--max-model-len",
            str(self.max_model_len or max_model_len),
            *REPLAY_SERVER_ARGS,
        ]
        if self.block_size:
            a += ["--block-size", str(self.block_size)]
        return a + list(self.extra_args)


@dataclass
class CompareConfig:
    policies: list[str] = field(default_factory=lambda: list(POLICY_NAMES))  # arm names (see Arm.parse)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    rounds: int = 1  # every arm this many times, in rotated order
    ttl_model: Path | None = None  # None: train one on the store's other programs
    train: TrainConfig | None = None  # how the TTL model is trained (None: ``ctk train``'s defaults)
    port: int | None = None  # None: a free port

    def arms(self) -> list[Arm]:
        """The arms to run, in table order; raises CompareError on an unknown or repeated name."""
        if not self.policies:
            raise CompareError("no policy to compare")
        if len(set(self.policies)) != len(self.policies):
            raise CompareError(f"a policy is listed twice in {self.policies}")
        try:
            return [Arm.parse(p) for p in self.policies]
        except ArmError as exc:
            raise CompareError(str(exc)) from None

    def validate(self) -> None:
        self.arms()
        if self.rounds < 1:
            raise CompareError("rounds must be at least 1")


def default_launcher(
    model_path: Path,
    port: int,
    policy: str,
    ttl_model: Path | None,
    extra_args: list[str],
    log_path: Path,
    settings: Mapping[str, Any] | None = None,
) -> subprocess.Popen:
    """``ctk serve``'s launcher (the serve part's ``launch_server``); ``settings`` are ServeConfig fields.
    Any :data:`Launcher` takes these arguments and returns the server's process (stopped with
    ``stop_server``)."""
    from ctk.engine_patch.serve.server import launch_server

    return launch_server(
        model_path,
        port,
        str(policy),
        ttl_model=ttl_model,
        extra_args=tuple(extra_args),
        settings=dict(settings) if settings else None,
        log_path=log_path,
    )


#: Starts a server for one arm: called as :func:`default_launcher` is, returns its process.
Launcher = Callable[..., subprocess.Popen]


def warm_up(base_url: str, model: str | None = None) -> None:
    """One short request, so the first replayed turn does not pay the engine's first-step overhead."""
    from ctk.measure.replay import served_model

    model = model or served_model(base_url)
    body = {"model": model, "prompt": list(range(3900, 3964)), "max_tokens": 4, "ignore_eos": True}
    httpx.post(base_url + "/v1/completions", json=body, timeout=120.0).raise_for_status()


# -- the comparison ----------------------------------------------------------------------------------


@dataclass
class Comparison:
    """Results per round and arm plus the figures of the table (medians over rounds, with spreads)."""

    rounds: list[dict[str, ReplayResult]]  # one {arm: result} per round, arms in table order
    config: dict[str, Any]

    @classmethod
    def single(cls, results: dict[str, ReplayResult], config: dict[str, Any]) -> Comparison:
        """A comparison of one round."""
        return cls([results], config)

    def round_figures(self) -> list[dict[str, dict[str, Any]]]:
        return [round_figures({arm: r.summary() for arm, r in rnd.items()}) for rnd in self.rounds]

    def figures(self) -> dict[str, dict[str, Any]]:
        """Per arm: medians over rounds of the summary and of the ratios against ``vllm``, ``continuum``
        and ``progress-ttl`` (>1: the arm is better), ``spread`` (min, max) and the per-round ``rounds``."""
        return median_figures(self.round_figures())

    @property
    def results(self) -> dict[str, ReplayResult]:
        """One result per arm: the round whose mean JCT is nearest the arm's median (for plots)."""
        figs = self.figures()
        out = {}
        for arm, f in figs.items():
            runs = [rnd[arm] for rnd in self.rounds if arm in rnd]
            median = f.get("mean_jct_s")
            out[arm] = min(runs, key=lambda r: abs((r.summary()["mean_jct_s"] or 0.0) - (median or 0.0)))
        return out

    def targets(self) -> dict[str, Any]:
        """The issue's targets, each with its median, min–max over rounds and whether it is met."""
        return check_targets(self.figures())

    def to_json(self) -> dict[str, Any]:
        return {
            "rounds": len(self.rounds),
            "order": self.config.get("order"),
            "policies": self.figures(),
            "targets": self.targets(),
            "config": self.config,
        }

    def save(self, out_dir: Path) -> Path:
        """``compare-results.json``: the figures and one result per arm (``ctk report`` draws them)."""
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "compare-results.json"
        body = {**self.to_json(), "results": [r.to_dict() for r in self.results.values()]}
        path.write_text(json.dumps(body, indent=1, default=str))
        return path


def run_comparison(
    db: Path,
    model_dir: Path,
    out_dir: Path,
    cfg: CompareConfig,
    launcher: Launcher = default_launcher,
    log: Callable[[str], None] = print,
) -> Comparison:
    """Replay the same programs once per arm and round (rotated order); each result is saved as it ends."""
    cfg.validate()
    arms = {a.name: a for a in cfg.arms()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with TraceStore(db, read_only=True) as store:
        programs = load_programs(store, cfg.workload)
    log(
        f"{len(programs)} programs, {sum(len(p.turns) for p in programs)} turns, "
        f"{sum(p.total_tool_s for p in programs) * cfg.replay.time_scale:.0f} s of tool pauses (scaled)"
    )
    model = _ModelMaker(db, programs, out_dir, cfg, launcher, log)
    orders = rotated_orders(list(arms), cfg.rounds)
    config = {
        "db": str(db),
        "model_dir": str(model_dir),
        "ttl_model": None,
        "workload": asdict(cfg.workload),
        "replay": asdict(cfg.replay),
        "server": asdict(cfg.server),
        "policies": cfg.policies,
        "rounds": cfg.rounds,
        "order": orders,
    }
    rounds: list[dict[str, ReplayResult]] = []
    for r, order in enumerate(orders):
        done: dict[str, ReplayResult] = {}
        for name in order:
            arm = arms[name]
            ttl_model = model.get(model_dir) if arm.uses_model_file else None
            config["ttl_model"] = str(model.path) if model.path else None
            suffix = f"-r{r}" if cfg.rounds > 1 else ""
            if cfg.rounds > 1:
                log(f"round {r + 1}/{cfg.rounds}: {name}")
            done[name] = run_policy(
                arm,
                programs,
                model_dir,
                ttl_model,
                out_dir,
                cfg,
                launcher,
                log,
                after_replay=model.profile,
                suffix=suffix,
            )
        rounds.append({name: done[name] for name in arms})
        Comparison(rounds, config).save(out_dir)  # what finished survives an interrupted later round
    return Comparison(rounds, config)


class _ModelMaker:
    """The model file of ``ttl`` and ``oracle``: given, or trained once per run on the programs that are
    not replayed, with the served engine's prefill cost (profiled on the first server that replays)."""

    def __init__(
        self,
        db: Path,
        programs: list[ProgramSpec],
        out_dir: Path,
        cfg: CompareConfig,
        launcher: Launcher,
        log: Callable[[str], None],
    ):
        self.db, self.programs, self.out_dir, self.cfg = db, programs, out_dir, cfg
        self.launcher, self.log = launcher, log
        self.path: Path | None = cfg.ttl_model
        self.profile_path = out_dir / "prefill_profile.json"
        self.profile_path.unlink(missing_ok=True)
        self.engine: dict[str, str] = {}
        self.profiled = False  # tried once (a failed profile is not retried on every server)

    def profile(self, base_url: str) -> None:
        """On the first server, once its replay is done: the served model's prefill cost for ``ctk train``."""
        if self.path is not None or self.profiled:
            return
        self.profiled = True
        self.engine.update(server_metrics.info_labels(base_url))
        try:
            profile_prefill(
                base_url,
                self.profile_path,
                self.cfg.server.max_model_len or self.cfg.workload.max_context_tokens,
            )
            self.log(
                f"profiled prefill -> {self.profile_path} "
                f"(KV block size {self.engine.get('block_size', '?')})"
            )
        except ProfileError as exc:
            self.log(f"warning: {exc}; training with the default cost model")

    def get(self, model_dir: Path) -> Path:
        if self.path is not None:
            return self.path
        if not self.profiled:
            # the first arm needs the model: profile a stock server first, never train on the default cost
            self.log("profiling the served model on a stock server before training")
            with serving(
                Arm("vllm", Policy.VLLM),
                model_dir,
                None,
                self.out_dir,
                self.cfg,
                self.launcher,
                self.log,
                "-profile",
            ) as base_url:
                self.profile(base_url)
        exclude = {p.program_id for p in self.programs}
        train_db = training_store(self.db, exclude, self.cfg.replay.time_scale, self.out_dir / "train.duckdb")
        profile = self.profile_path if self.profile_path.exists() else None
        block = self.engine.get("block_size", "")
        block_size = int(block) if block.isdigit() else None
        try:
            model_path = self.out_dir / "model.pkl"
            self.path = train_ttl_model(train_db, model_path, profile, block_size, self.cfg.train)
        except TrainError as exc:
            raise CompareError(str(exc)) from exc
        self.log(f"trained {self.path} on {self.db} minus the {len(exclude)} replayed programs")
        return self.path


@contextlib.contextmanager
def serving(
    arm: Arm,
    model_dir: Path,
    ttl_model: Path | None,
    out_dir: Path,
    cfg: CompareConfig,
    launcher: Launcher,
    log: Callable[[str], None],
    suffix: str = "",
) -> Iterator[str]:
    """A warmed-up server for ``arm`` (log in ``server-<arm><suffix>.log``); yields its URL, then stops it."""
    from ctk.engine_patch.serve.server import ServerError, free_port, stop_server, wait_ready

    port = cfg.port or free_port()
    base_url = f"http://127.0.0.1:{port}"
    log_path = out_dir / f"server-{arm.tag}{suffix}.log"
    log_path.unlink(missing_ok=True)  # the launcher appends
    t0 = time.monotonic()
    args = cfg.server.args(cfg.workload.max_context_tokens) + server_args(arm)
    proc = launcher(Path(model_dir), port, arm.policy.value, ttl_model, args, log_path, arm.settings())
    try:
        try:
            wait_ready(base_url, cfg.server.startup_timeout_s, proc)
        except ServerError as exc:
            raise CompareError(f"[{arm.name}] {exc}") from None
        warm_up(base_url)
        log(f"[{arm.name}] server ready in {time.monotonic() - t0:.0f} s")
        yield base_url
    finally:
        stop_server(proc)


def run_policy(
    arm: Arm,
    programs: list[ProgramSpec],
    model_dir: Path,
    ttl_model: Path | None,
    out_dir: Path,
    cfg: CompareConfig,
    launcher: Launcher = default_launcher,
    log: Callable[[str], None] = print,
    after_replay: Callable[[str], None] | None = None,
    suffix: str = "",
) -> ReplayResult:
    """One arm, one round: serve, replay, save ``replay-<arm><suffix>.json``."""
    with serving(arm, model_dir, ttl_model, out_dir, cfg, launcher, log, suffix) as base_url:
        rcfg = dataclasses.replace(cfg.replay, base_url=base_url, label=arm.name)
        result = run_replay(programs, cfg.workload, rcfg)
        if after_replay is not None and not result.interrupted:
            after_replay(base_url)
    result.config["server_log"] = str(out_dir / f"server-{arm.tag}{suffix}.log")
    result.config["arm"] = {"policy": arm.policy.value, "ttl_model": str(ttl_model) if ttl_model else None}
    result.config["arm"].update(arm.settings())
    result.save(out_dir / f"replay-{arm.tag}{suffix}.json")
    s = result.summary()
    log(
        f"[{arm.name}] {s['programs']} programs in {s['wall_s'] or 0:.0f} s: "
        f"mean JCT {s['mean_jct_s'] or 0:.2f} s, "
        f"p99 TTFT {s['p99_ttft_s'] or 0:.3f} s, hit rate {s['hit_rate'] or 0:.2f}"
    )
    if result.interrupted:
        raise KeyboardInterrupt
    return result
