"""The policy comparison: the same programs, the same seed, one fresh server per policy, one table.

Used by ``bench/policies.py``, ``ctk compare`` and ``ctk demo``. For each policy (``vllm``, ``continuum``,
``ttl``, ``oracle``) a server is started on the tiny model with a KV cache smaller than the working set,
warmed up, the programs are replayed, ``/metrics`` is read, and the server is stopped. The ``ttl`` policy
gets a model trained (``ctk train``) on the store's other programs, never on the replayed ones, with tool
durations on the replay's clock (multiplied by ``time_scale``).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx

from ctk.errors import CtkError
from ctk.measure import server_metrics
from ctk.measure.replay import ReplayConfig, run_replay
from ctk.measure.results import ReplayResult
from ctk.measure.workload import ProgramSpec, WorkloadConfig, load_programs
from ctk.store import TraceStore

POLICIES = ("vllm", "continuum", "ttl", "oracle")
#: The oracle must beat vllm's mean JCT by this share before "share of the oracle's gain" is reported.
MIN_ORACLE_GAIN = 0.05
#: Server flags every replayed server needs: cached tokens and queue time in each response.
REPLAY_SERVER_ARGS = ("--enable-prompt-tokens-details", "--enable-per-request-metrics")


class CompareError(CtkError, RuntimeError):
    """The comparison cannot run (a server does not start, training fails); the message says why."""


@dataclass
class ServerConfig:
    """The served model and its memory: small enough that the working set does not fit."""

    kv_cache_bytes: int = 24 * 2**20
    max_num_seqs: int = 16
    max_model_len: int | None = None  # None: the workload's max_context_tokens
    block_size: int | None = None  # None: the engine's default
    startup_timeout_s: float = 300.0
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
    policies: list[str] = field(default_factory=lambda: list(POLICIES))
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    ttl_model: Path | None = None  # None: train one on the store's other programs
    train_args: list[str] = field(default_factory=list)  # extra arguments of ``ctk train``
    port: int | None = None  # None: a free port

    def validate(self) -> None:
        bad = [p for p in self.policies if p not in POLICIES]
        if bad:
            raise CompareError(f"unknown policies {bad}; choose from {', '.join(POLICIES)}")
        if not self.policies:
            raise CompareError("no policy to compare")


class Launcher(Protocol):
    """Starts a server for one policy and returns its process (stopped with ``stop_server``)."""

    def __call__(
        self,
        model_path: Path,
        port: int,
        policy: str,
        ttl_model: Path | None,
        extra_args: list[str],
        log_path: Path,
    ) -> subprocess.Popen: ...


def default_launcher(
    model_path: Path, port: int, policy: str, ttl_model: Path | None, extra_args: list[str], log_path: Path
) -> subprocess.Popen:
    """``ctk serve``'s launcher (the serve part's ``launch_server``)."""
    from ctk.engine_patch.server import launch_server

    return launch_server(
        model_path, port, policy, ttl_model=ttl_model, extra_args=tuple(extra_args), log_path=log_path
    )


def warm_up(base_url: str, model: str | None = None) -> None:
    """One short request, so the first replayed turn does not pay the engine's first-step overhead."""
    from ctk.measure.replay import served_model

    model = model or served_model(base_url)
    body = {"model": model, "prompt": list(range(3900, 3964)), "max_tokens": 4, "ignore_eos": True}
    httpx.post(base_url + "/v1/completions", json=body, timeout=120.0).raise_for_status()


# -- training the TTL model on the programs that are not replayed ------------------------------------


def training_store(db: Path, exclude: set[str], time_scale: float, out: Path) -> Path:
    """Copy ``db`` without the ``exclude``d programs, tool durations multiplied by ``time_scale``."""
    out.unlink(missing_ok=True)
    with TraceStore(db, read_only=True) as src, TraceStore(out) as dst:
        progs = src.table("programs")
        progs = progs[~progs["program_id"].isin(exclude)]
        llm = src.table("llm_calls")
        tools = src.table("tool_calls")
        tools = tools[~tools["program_id"].isin(exclude)].copy()
        tools["duration_s"] = tools["duration_s"] * time_scale
        for b in range(0, len(progs), 200):
            ids = set(progs["program_id"].iloc[b : b + 200])
            dst.add_programs(
                progs[progs["program_id"].isin(ids)],
                llm[llm["program_id"].isin(ids)],
                tools[tools["program_id"].isin(ids)],
            )
    return out


def train_ttl_model(train_db: Path, out: Path, extra_args: list[str] = ()) -> Path:
    """Run ``ctk train`` (the predict part's CLI) in a subprocess."""
    cmd = [sys.executable, "-m", "ctk.cli", "train", "--db", str(train_db), "-o", str(out), *extra_args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise CompareError("ctk train failed: " + " | ".join(tail))
    return out


def profile_prefill(base_url: str, out: Path, max_model_len: int = 8192) -> Path:
    """``ctk profile`` (the predict part's CLI) against a running server.

    ``ctk profile`` lengths are words; the tiny tokenizer splits its words into about 2.9 tokens, so the
    longest prompt is ``max_model_len / 3.1`` words.
    """
    longest = int(max_model_len / 3.1)
    lengths = sorted({min(n, longest) for n in (128, 512, longest // 2, longest)})
    cmd = [
        sys.executable,
        "-m",
        "ctk.cli",
        "profile",
        "--url",
        base_url,
        "--lengths",
        ",".join(map(str, lengths)),
        "--repeats",
        "2",
        "-o",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise CompareError("ctk profile failed: " + " | ".join(tail))
    return out


# -- the comparison ----------------------------------------------------------------------------------


@dataclass
class Comparison:
    """Results per policy plus the figures of the table."""

    results: dict[str, ReplayResult]
    config: dict[str, Any]

    def figures(self) -> dict[str, dict[str, Any]]:
        """Summary per policy with ratios against ``vllm`` and ``continuum`` (>1: the policy is better)."""
        out = {p: r.summary() for p, r in self.results.items()}
        for base in ("vllm", "continuum"):
            if base not in out:
                continue
            b = out[base]
            for s in out.values():
                for key in ("mean_jct_s", "p50_jct_s", "p99_jct_s", "p99_ttft_s", "max_ttft_s"):
                    s[f"{key.removesuffix('_s')}_x_vs_{base}"] = _ratio(b.get(key), s.get(key))
        if {"vllm", "ttl", "oracle"} <= out.keys():
            v, t, o = (out[k]["mean_jct_s"] for k in ("vllm", "ttl", "oracle"))
            # a share of a gain under MIN_ORACLE_GAIN of vllm's JCT is noise, not a figure
            if None not in (v, t, o) and v - o >= MIN_ORACLE_GAIN * v:
                out["ttl"]["oracle_gain_captured"] = (v - t) / (v - o)
        return out

    def targets(self) -> dict[str, Any]:
        """The issue's targets, each with its measured value and whether it is met."""
        f = self.figures()
        t = f.get("ttl", {})
        checks = {
            "ttl_mean_jct_x_vs_vllm >= 1.3": t.get("mean_jct_x_vs_vllm"),
            "ttl_mean_jct_x_vs_continuum >= 1.1": t.get("mean_jct_x_vs_continuum"),
            "ttl_oracle_gain_captured >= 0.8": t.get("oracle_gain_captured"),
            "ttl_p99_ttft_x_vs_vllm >= 1.0": t.get("p99_ttft_x_vs_vllm"),
        }
        out = {}
        for name, value in checks.items():
            threshold = float(name.rsplit(">=", 1)[1])
            out[name] = {"value": value, "met": None if value is None else bool(value >= threshold)}
        return out

    def to_json(self) -> dict[str, Any]:
        return {"policies": self.figures(), "targets": self.targets(), "config": self.config}

    def save(self, out_dir: Path) -> Path:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "compare-results.json"
        path.write_text(
            json.dumps(
                {
                    **self.to_json(),
                    "results": [r.to_dict() for r in self.results.values()],
                },
                indent=1,
                default=str,
            )
        )
        return path


def _ratio(base, value) -> float | None:
    if base is None or value is None or value <= 0:
        return None
    return base / value


def run_comparison(
    db: Path,
    model_dir: Path,
    out_dir: Path,
    cfg: CompareConfig,
    launcher: Launcher = default_launcher,
    log: Callable[[str], None] = print,
) -> Comparison:
    """Replay the same programs once per policy; results are saved per policy as they finish."""
    cfg.validate()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with TraceStore(db, read_only=True) as store:
        programs = load_programs(store, cfg.workload)
    log(
        f"{len(programs)} programs, {sum(len(p.turns) for p in programs)} turns, "
        f"{sum(p.total_tool_s for p in programs) * cfg.replay.time_scale:.0f} s of tool pauses (scaled)"
    )
    ttl_model = cfg.ttl_model
    profile = out_dir / "prefill_profile.json"
    profile.unlink(missing_ok=True)
    engine: dict[str, str] = {}

    def profile_server(base_url: str) -> None:
        """On the first server, once its replay is done: the served model's prefill cost for ``ctk train``."""
        if ttl_model is None and not profile.exists():
            engine.update(server_metrics.info_labels(base_url))
            try:
                profile_prefill(
                    base_url, profile, cfg.server.max_model_len or cfg.workload.max_context_tokens
                )
                log(f"profiled prefill -> {profile} (KV block size {engine.get('block_size', '?')})")
            except CompareError as exc:
                log(f"warning: {exc}; training with the default cost model")

    results: dict[str, ReplayResult] = {}
    for policy in cfg.policies:
        if policy == "ttl" and ttl_model is None:
            exclude = {p.program_id for p in programs}
            train_db = training_store(db, exclude, cfg.replay.time_scale, out_dir / "train.duckdb")
            args = list(cfg.train_args)
            if profile.exists():
                args += ["--profile", str(profile)]
            if engine.get("block_size", "").isdigit() and "--block-size" not in args:
                args += ["--block-size", engine["block_size"]]
            ttl_model = train_ttl_model(train_db, out_dir / "model.pkl", args)
            log(f"trained {ttl_model} on {db} minus the {len(exclude)} replayed programs")
        results[policy] = run_policy(
            policy, programs, model_dir, ttl_model, out_dir, cfg, launcher, log, after_replay=profile_server
        )
    config = {
        "db": str(db),
        "model_dir": str(model_dir),
        "ttl_model": str(ttl_model) if ttl_model else None,
        "workload": asdict(cfg.workload),
        "replay": asdict(cfg.replay),
        "server": asdict(cfg.server),
        "policies": cfg.policies,
    }
    comp = Comparison(results, config)
    comp.save(out_dir)
    return comp


def run_policy(
    policy: str,
    programs: list[ProgramSpec],
    model_dir: Path,
    ttl_model: Path | None,
    out_dir: Path,
    cfg: CompareConfig,
    launcher: Launcher = default_launcher,
    log: Callable[[str], None] = print,
    after_replay: Callable[[str], None] | None = None,
) -> ReplayResult:
    from ctk.engine_patch.server import ServerError, free_port, stop_server, wait_ready

    port = cfg.port or free_port()
    base_url = f"http://127.0.0.1:{port}"
    log_path = out_dir / f"server-{policy}.log"
    log_path.unlink(missing_ok=True)  # the launcher appends
    t0 = time.monotonic()
    proc = launcher(
        Path(model_dir),
        port,
        policy,
        ttl_model if policy == "ttl" else None,
        cfg.server.args(cfg.workload.max_context_tokens),
        log_path,
    )
    try:
        try:
            wait_ready(base_url, cfg.server.startup_timeout_s, proc)
        except ServerError as exc:
            raise CompareError(f"[{policy}] {exc}") from None
        warm_up(base_url)
        log(f"[{policy}] server ready in {time.monotonic() - t0:.0f} s; replaying")
        rcfg = dataclasses.replace(cfg.replay, base_url=base_url, label=policy)
        result = run_replay(programs, cfg.workload, rcfg)
        if after_replay is not None and not result.interrupted:
            after_replay(base_url)
    finally:
        stop_server(proc)
    result.config["server_log"] = str(log_path)
    result.save(out_dir / f"replay-{policy}.json")
    s = result.summary()
    log(
        f"[{policy}] {s['programs']} programs in {s['wall_s'] or 0:.0f} s: "
        f"mean JCT {s['mean_jct_s'] or 0:.2f} s, "
        f"p99 TTFT {s['p99_ttft_s'] or 0:.3f} s, hit rate {s['hit_rate'] or 0:.2f}"
    )
    if result.interrupted:
        raise KeyboardInterrupt
    return result


# -- the table -----------------------------------------------------------------------------------------

TABLE_COLUMNS = (
    ("mean JCT s", "mean_jct_s", "{:.2f}"),
    ("p50 JCT s", "p50_jct_s", "{:.2f}"),
    ("p99 JCT s", "p99_jct_s", "{:.2f}"),
    ("p99 TTFT s", "p99_ttft_s", "{:.3f}"),
    ("max TTFT s", "max_ttft_s", "{:.3f}"),
    ("hit rate", "hit_rate", "{:.2f}"),
    ("pins", "pins", "{:.0f}"),
    ("preempt", "preemptions", "{:.0f}"),
    ("mean JCT x vllm", "mean_jct_x_vs_vllm", "{:.2f}"),
    ("p99 JCT x vllm", "p99_jct_x_vs_vllm", "{:.2f}"),
    ("p99 TTFT x vllm", "p99_ttft_x_vs_vllm", "{:.2f}"),
    ("mean JCT x cont.", "mean_jct_x_vs_continuum", "{:.2f}"),
    ("p99 TTFT x cont.", "p99_ttft_x_vs_continuum", "{:.2f}"),
)


def format_table(comp: Comparison) -> str:
    """A plain-text table (ratios: baseline / policy, so > 1 means the policy is better)."""
    figs = comp.figures()
    header = ["policy"] + [c[0] for c in TABLE_COLUMNS]
    rows = [header]
    for policy, s in figs.items():
        row = [policy]
        for _, key, fmt in TABLE_COLUMNS:
            v = s.get(key)
            row.append("-" if v is None else fmt.format(v))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    t = figs.get("ttl", {})
    if "oracle_gain_captured" in t:
        lines.append(f"ttl captures {t['oracle_gain_captured']:.0%} of the oracle's mean-JCT gain over vllm")
    v, o = figs.get("vllm", {}).get("mean_jct_s"), figs.get("oracle", {}).get("mean_jct_s")
    if "ttl" in figs and v is not None and o is not None and v - o < MIN_ORACLE_GAIN * v:
        lines.append(
            f"oracle is {v / o:.2f}x vllm here (under {1 + MIN_ORACLE_GAIN:.2f}x): no oracle gain to capture"
        )
    for name, v in comp.targets().items():
        if v["value"] is not None:
            lines.append(f"target {name}: {v['value']:.2f} {'met' if v['met'] else 'MISSED'}")
    return "\n".join(lines)
