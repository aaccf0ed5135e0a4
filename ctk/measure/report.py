"""``ctk report``: one HTML page with PNG plots of the traces, the TTL model and the replay results.

Plots (each only when its data is there; the page says what is missing):
tool-duration distributions per tool, predictor calibration (coverage of the model's quantiles), TTL
chosen vs true duration, JCT CDF per policy, TTFT tail per policy, pinned blocks and KV usage over time.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ctk.measure.results import ReplayResult
from ctk.predict.cost import CONTINUUM_PIN_S
from ctk.predict.plots import pyplot

POLICY_COLORS = {"vllm": "#7f7f7f", "continuum": "#1f77b4", "ttl": "#d62728", "oracle": "#2ca02c"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class Figure:
    title: str
    file: str | None  # PNG file name in the report folder; None when skipped
    caption: str
    skipped: str | None = None  # why the plot is missing


@dataclass
class ReportInputs:
    tool_calls: pd.DataFrame | None = None  # from the store: tool_name, main_program, command_or_args, ...
    tables: object | None = None  # ctk.predict.tables.TTLTables
    duration_scale: float = 1.0  # the model's clock relative to the store's durations (compare: time_scale)
    results: list[ReplayResult] = field(default_factory=list)
    figures_json: dict | None = None  # a comparison's figures keyed by policy (the table)
    simulate: list[dict] = field(default_factory=list)  # ``ctk simulate --json`` files (rates x policies)


def _save(fig, out_dir: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out_dir / name, dpi=110)
    pyplot().close(fig)
    return name


def _color(label: str, i: int) -> str:
    return POLICY_COLORS.get(label, f"C{i + 4}")


# -- trace plots -------------------------------------------------------------------------------------


def plot_tool_durations(tools: pd.DataFrame, out_dir: Path, top: int = 12) -> Figure:
    title = "Tool-call durations per tool"
    df = tools[tools["duration_s"].notna() & (tools["duration_s"] > 0)].copy()
    if df.empty:
        return Figure(title, None, "", "the store has no tool calls with a duration")
    df["tool"] = df["main_program"].fillna(df["tool_name"]).fillna("?").astype(str)
    counts = df["tool"].value_counts()
    tools_top = list(counts.index[:top])
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(tools_top) + 1.6))
    data = [np.log10(df.loc[df["tool"] == t, "duration_s"].to_numpy()) for t in tools_top]
    fliers = {"markersize": 2, "alpha": 0.4}
    ax.boxplot(data, orientation="horizontal", showfliers=True, flierprops=fliers, widths=0.6)
    ax.set_yticks(range(1, len(tools_top) + 1), [f"{t} (n={counts[t]})" for t in tools_top])
    ax.invert_yaxis()
    ticks = [-3, -2, -1, 0, 1, 2, 3]
    ax.set_xticks(ticks, ["1 ms", "10 ms", "0.1 s", "1 s", "10 s", "100 s", "1000 s"])
    ax.axvline(math.log10(CONTINUUM_PIN_S), color="#1f77b4", ls="--", lw=1, label="Continuum's fixed 2 s pin")
    ax.set_xlabel("duration (log scale)")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    name = _save(fig, out_dir, "tool_durations.png")
    share = (df["duration_s"] < 1).mean()
    return Figure(
        title,
        name,
        f"{len(df)} calls, {counts.size} tools; {share:.0%} finish under 1 s. "
        f"Boxes: quartiles; whiskers 1.5 IQR; the {top} most frequent tools.",
    )


def _quantiles_for(tables, command, tool) -> list[float] | None:
    from ctk.predict.features import command_keys

    for key in command_keys(
        command if isinstance(command, str) else None, tool if isinstance(tool, str) else None
    ):
        q = tables.quantiles_s.get(key)
        if q is not None:
            return q
    return None


def calibration_figure(tools: pd.DataFrame, tables, out_dir: Path, scale: float = 1.0) -> Figure:
    """Coverage: the share of true durations at or below each predicted quantile (diagonal = calibrated)."""
    title = "Predictor calibration"
    levels = np.asarray(tables.quantile_levels, dtype=float)
    hits = np.zeros(len(levels))
    seen = np.zeros(len(levels))
    for row in tools.itertuples(index=False):
        if row.duration_s is None or not np.isfinite(row.duration_s):
            continue
        q = _quantiles_for(tables, row.command_or_args, row.tool_name)
        if q is None:
            continue
        d = float(row.duration_s) * scale
        q = np.asarray(q, dtype=float)
        below = d <= q
        if bool(getattr(row, "censored", False)):  # a lower bound: only "above" is known
            known = ~below
            seen += known
        else:
            hits += below
            seen += 1
    if seen.max(initial=0) == 0:
        return Figure(title, None, "", "no tool call matched a key of the model")
    cover = np.divide(hits, seen, out=np.full(len(levels), np.nan), where=seen > 0)
    from ctk.predict.plots import plot_calibration

    name = plot_calibration({"ctk model (table quantiles)": (levels, cover)}, out_dir).name
    err = float(np.nanmean(np.abs(cover - levels)))
    return Figure(
        title,
        name,
        f"{int(seen.max())} calls; mean |coverage - level| = {err:.3f}. Above the diagonal "
        "the predicted quantiles are too long (pins too long), below too short.",
    )


def plot_ttl_vs_duration(tools: pd.DataFrame, tables, out_dir: Path, scale: float = 1.0) -> Figure:
    from ctk.predict.features import command_keys

    title = "TTL chosen vs true duration"
    pressure = float(np.median(tables.cost_model.pressure_levels))
    rows = []
    for row in tools.itertuples(index=False):
        if row.duration_s is None or not np.isfinite(row.duration_s):
            continue
        keys = command_keys(
            row.command_or_args if isinstance(row.command_or_args, str) else None,
            row.tool_name if isinstance(row.tool_name, str) else None,
        )
        ctx = getattr(row, "context_tokens", None)
        ctx = int(ctx) if ctx is not None and not pd.isna(ctx) else 2048
        dec = tables.engine_decision(keys, ctx, pressure)
        rows.append((float(row.duration_s) * scale, dec.ttl_s))
    if not rows:
        return Figure(title, None, "", "no tool calls")
    d, ttl = np.array(rows).T
    floor = max(1e-3, float(np.min(d[d > 0])) if (d > 0).any() else 1e-3)
    hit = (ttl > 0) & (d <= ttl)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    pinned = ttl > 0
    rng = np.random.default_rng(0)
    jitter = 10 ** rng.normal(0, 0.03, size=len(ttl))
    ax.scatter(
        np.maximum(d[hit], floor),
        ttl[hit] * jitter[hit],
        s=6,
        alpha=0.5,
        color="#2ca02c",
        label=f"pinned, tool back in time ({hit.sum()})",
    )
    miss = pinned & ~hit
    ax.scatter(
        np.maximum(d[miss], floor),
        ttl[miss] * jitter[miss],
        s=6,
        alpha=0.5,
        color="#d62728",
        label=f"pinned, TTL expired first ({miss.sum()})",
    )
    nop = ~pinned
    ax.scatter(
        np.maximum(d[nop], floor),
        np.full(nop.sum(), floor) * jitter[nop],
        s=6,
        alpha=0.5,
        color="#7f7f7f",
        label=f"not pinned ({nop.sum()}, drawn at the bottom)",
    )
    lim = [floor, max(float(d.max()), float(ttl.max()), 10 * floor)]
    ax.plot(lim, lim, color="#999", ls="--", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("true tool duration (s, replay clock)")
    ax.set_ylabel("TTL chosen (s)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    name = _save(fig, out_dir, "ttl_vs_duration.png")
    return Figure(
        title,
        name,
        f"TTL from the model's tables at KV pressure {pressure:.2f}; "
        f"{hit.mean():.0%} of calls would return within their pin.",
    )


# -- replay plots ------------------------------------------------------------------------------------


def plot_jct_cdf(results: list[ReplayResult], out_dir: Path) -> Figure:
    title = "Job completion time per policy"
    if not any(len(r.jcts()) for r in results):
        return Figure(title, None, "", "no replay results")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, r in enumerate(results):
        j = np.sort(r.jcts())
        if len(j):
            ax.step(
                j,
                np.arange(1, len(j) + 1) / len(j),
                where="post",
                color=_color(r.label, i),
                label=f"{r.label} (mean {j.mean():.1f} s)",
            )
    ax.set_xlabel("job completion time (s)")
    ax.set_ylabel("share of programs finished")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return Figure(
        title, _save(fig, out_dir, "jct_cdf.png"), "Empirical CDF of per-program JCT; left is better."
    )


def plot_ttft_tail(results: list[ReplayResult], out_dir: Path) -> Figure:
    title = "TTFT tail per policy"
    if not any(len(r.ttfts()) for r in results):
        return Figure(title, None, "", "no replay results")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, r in enumerate(results):
        t = np.sort(r.ttfts())
        if len(t):
            ccdf = 1.0 - np.arange(len(t)) / len(t)
            ax.step(
                t,
                ccdf,
                where="post",
                color=_color(r.label, i),
                label=f"{r.label} (p99 {np.percentile(t, 99):.2f} s)",
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("time to first token (s)")
    ax.set_ylabel("share of turns slower")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return Figure(
        title,
        _save(fig, out_dir, "ttft_tail.png"),
        "Complementary CDF of per-turn TTFT (log-log); "
        "lower-left is better, the right end is the worst turn.",
    )


def plot_timeline(results: list[ReplayResult], out_dir: Path) -> Figure:
    title = "Pinned blocks and KV usage over time"
    with_tl = [r for r in results if r.timeline]
    if not with_tl:
        return Figure(title, None, "", "the results hold no /metrics timeline")
    pin_key = next(
        (k for r in with_tl for row in r.timeline for k in row if "pinned" in k and "block" in k), None
    )
    plt = pyplot()
    n = 2 if pin_key else 1
    fig, axes = plt.subplots(n, 1, figsize=(8, 3 * n + 0.5), sharex=True, squeeze=False)
    for i, r in enumerate(results):
        if not r.timeline:
            continue
        tl = pd.DataFrame(r.timeline)
        if "kv_usage" in tl:
            axes[0, 0].plot(tl["t_s"], tl["kv_usage"] * 100, color=_color(r.label, i), label=r.label, lw=1.2)
        if pin_key and pin_key in tl:
            axes[1, 0].plot(tl["t_s"], tl[pin_key], color=_color(r.label, i), label=r.label, lw=1.2)
    axes[0, 0].set_ylabel("KV cache used (%)")
    axes[0, 0].legend(fontsize=8)
    axes[0, 0].grid(alpha=0.3)
    if pin_key:
        axes[1, 0].set_ylabel(f"pinned blocks\n({pin_key})")
        axes[1, 0].grid(alpha=0.3)
    axes[-1, 0].set_xlabel("time since the replay started (s)")
    cap = "Sampled from /metrics during each replay."
    if not pin_key:
        cap += " The server exported no pinned-blocks gauge (stock vLLM has none)."
    return Figure(title, _save(fig, out_dir, "timeline.png"), cap)


# -- the page ----------------------------------------------------------------------------------------


def _table_html(figs: dict) -> str:
    cols = [
        ("mean JCT s", "mean_jct_s"),
        ("p50 JCT s", "p50_jct_s"),
        ("p99 JCT s", "p99_jct_s"),
        ("p50 admission wait s", "p50_admission_wait_s"),
        ("p99 admission wait s", "p99_admission_wait_s"),
        ("p99 resume TTFT s", "p99_resume_ttft_s"),
        ("programs/hour", "programs_per_hour"),
        ("p99 TTFT s", "p99_ttft_s"),
        ("max TTFT s", "max_ttft_s"),
        ("hit rate", "hit_rate"),
        ("pins", "pins"),
        ("preemptions", "preemptions"),
        ("mean JCT x vllm", "mean_jct_x_vs_vllm"),
        ("mean JCT x continuum", "mean_jct_x_vs_continuum"),
        ("p99 JCT x vllm", "p99_jct_x_vs_vllm"),
        ("p99 resume TTFT x vllm", "p99_resume_ttft_x_vs_vllm"),
        ("p99 TTFT x vllm", "p99_ttft_x_vs_vllm"),
    ]
    head = "".join(f"<th>{html.escape(c)}</th>" for c, _ in cols)
    body = []
    for policy, s in figs.items():
        cells = "".join(f"<td>{'-' if s.get(k) is None else f'{s[k]:.3g}'}</td>" for _, k in cols)
        body.append(f"<tr><th>{html.escape(policy)}</th>{cells}</tr>")
    return f"<table><tr><th>policy</th>{head}</tr>{''.join(body)}</table>"


def plot_rates(data: dict[str, Any], out_dir: Path, name: str = "simulate-jct-vs-rate.png") -> Path | None:
    """The figure from a ``ctk simulate --json`` file's content; None when it has fewer than two rates."""
    per_rate = {float(r): v for r, v in data.get("rates", {}).items() if r != "closed"}
    if len(per_rate) < 2:
        return None
    plt = pyplot()
    rates = sorted(per_rate)
    policies = list(dict.fromkeys(p for r in rates for p in per_rate[r]))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for policy in policies:
        pts = [(r, per_rate[r].get(policy) or {}) for r in rates]
        pts = [(r, s) for r, s in pts if s.get("mean_jct_s") is not None]
        ax1.plot([r for r, _ in pts], [s["mean_jct_s"] for _, s in pts], marker="o", label=policy)
        ax2.plot([r for r, _ in pts], [s.get("p99_resume_ttft_s") for _, s in pts], marker="o", label=policy)
    ax1.set(xlabel="program arrival rate (programs/s)", ylabel="mean JCT (s)", title="job completion time")
    ax2.set(
        xlabel="program arrival rate (programs/s)",
        ylabel="p99 resume TTFT (s)",
        title="first token of a turn after a tool call",
    )
    ax1.legend()
    cfg = data.get("config", {})
    where = f"{cfg.get('profile', '')}, {cfg.get('replicas', 1)} replica(s), {cfg.get('routing', '')}"
    fig.suptitle(f"ctk simulate: {where}")
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _simulate_html(sim: dict, out: Path, i: int) -> list[str]:
    """A ``ctk simulate`` sweep: one table per arrival rate and the JCT-vs-rate figure."""
    cfg = sim.get("config", {})
    title = (
        f"Simulated: {cfg.get('profile', '?')}, {cfg.get('replicas', 1)} replica(s), {cfg.get('routing', '')}"
    )
    parts = [f"<h2>{html.escape(title)}</h2>"]
    png = plot_rates(sim, out, name=f"simulate-{i}-jct-vs-rate.png")
    if png is not None:
        parts.append(
            f"<figure><img src='{html.escape(png.name)}' alt='JCT vs arrival rate'><figcaption>Mean JCT and "
            "p99 resume TTFT (a turn after a tool call) per policy against the program arrival rate "
            "(simulated engines running ctk's policy "
            "code).</figcaption></figure>"
        )
    for rate, per in sim.get("rates", {}).items():
        label = "closed loop" if rate == "closed" else f"{rate} programs/s"
        parts.append(f"<h3>{html.escape(label)}</h3>" + _table_html(per))
    kv = sim.get("vllm_kv80_rate")
    if kv is not None:
        parts.append(f"<p>Stock vLLM's mean KV usage reaches 80% at {kv:g} programs/s.</p>")
    return parts


def build_report(inputs: ReportInputs, out_dir: str | Path) -> Path:
    """Write ``index.html`` and the PNGs into ``out_dir``; returns the HTML path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures: list[Figure] = []
    if inputs.tool_calls is not None:
        figures.append(plot_tool_durations(inputs.tool_calls, out))
        if inputs.tables is not None:
            figures.append(calibration_figure(inputs.tool_calls, inputs.tables, out, inputs.duration_scale))
            figures.append(plot_ttl_vs_duration(inputs.tool_calls, inputs.tables, out, inputs.duration_scale))
        else:
            figures += [
                Figure("Predictor calibration", None, "", "no model given (--model)"),
                Figure("TTL chosen vs true duration", None, "", "no model given (--model)"),
            ]
    results = inputs.results
    if results:
        figures += [plot_jct_cdf(results, out), plot_ttft_tail(results, out), plot_timeline(results, out)]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>ctk report</title><style>",
        "body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}",
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;"
        "text-align:right}figure{margin:1.5em 0}img{max-width:100%;border:1px solid #eee}"
        ".skip{color:#a00}</style></head><body><h1>ctk report</h1>",
    ]
    if inputs.figures_json:
        parts.append("<h2>Policy comparison</h2>" + _table_html(inputs.figures_json))
        parts.append("<p>Ratios are baseline / policy: above 1 the policy is better.</p>")
    for i, sim in enumerate(inputs.simulate):
        parts += _simulate_html(sim, out, i)
    for f in figures:
        parts.append(f"<h2>{html.escape(f.title)}</h2>")
        if f.file:
            parts.append(
                f"<figure><img src='{html.escape(f.file)}' alt='{html.escape(f.title)}'>"
                f"<figcaption>{html.escape(f.caption)}</figcaption></figure>"
            )
        else:
            parts.append(f"<p class='skip'>Not drawn: {html.escape(f.skipped or '')}.</p>")
    parts.append("</body></html>")
    page = out / "index.html"
    page.write_text("\n".join(parts))
    return page


def load_inputs(
    db: Path | None, results: list[Path], model: Path | None = None, duration_scale: float = 1.0
) -> ReportInputs:
    """Read the store's tool calls, the model's TTL tables and replay/comparison results.

    Bad input raises ``ValueError`` (store, model) or :class:`ctk.measure.results.ResultsError`.
    """
    import json

    from ctk.measure.results import load_results

    inputs = ReportInputs(duration_scale=duration_scale)
    if db is not None:
        from ctk.store import StoreError, TraceStore

        try:
            with TraceStore(db, read_only=True) as store:
                inputs.tool_calls = store.tool_calls()
        except StoreError as exc:
            raise ValueError(str(exc)) from None
    if model is not None:
        from ctk.predict.modelfile import ModelFileError, load_ttl_tables

        try:
            inputs.tables = load_ttl_tables(model)
        except ModelFileError as exc:
            raise ValueError(str(exc)) from None
    for path in results:
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            d = None
        if isinstance(d, dict) and isinstance(d.get("rates"), dict):  # a ``ctk simulate --json`` sweep
            inputs.simulate.append(d)
            continue
        inputs.results.extend(load_results(path))
        if d is None:
            continue
        if isinstance(d, dict) and isinstance(d.get("policies"), dict):
            inputs.figures_json = d["policies"]
    return inputs


def referenced_images(page: Path) -> list[Path]:
    """The image files an HTML page references (to check a report is whole)."""
    import re

    return [page.parent / m for m in re.findall(r"<img src='([^']+)'", page.read_text())]


def is_valid_png(path: Path) -> bool:
    """A PNG with its signature, a header chunk, and a non-empty image that decodes."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    if not data.startswith(PNG_MAGIC):
        return False
    try:
        img = pyplot().imread(path)
    except Exception:
        return False
    return img.ndim >= 2 and img.shape[0] > 10 and img.shape[1] > 10 and float(np.ptp(img)) > 0
