"""CLI: ``ctk train``, ``ctk evaluate``, ``ctk predict``, ``ctk inspect``, ``ctk profile``.

Heavy libraries (pandas, lightgbm, matplotlib) are imported inside the commands so ``ctk --help`` stays fast.
Every expected failure (bad store, bad model file, bad input) ends with a one-line error and exit code 2.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ctk.errors import print_error
from ctk.options import FRACTION, NON_NEGATIVE, POSITIVE, at_least
from ctk.predict.cost import REPRESENTATIVE_PRICES

console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

DEFAULT_LEVELS_TEXT = "0.1,0.25,0.5,0.75,0.9,0.95,0.99"


def _fail(msg: str) -> typer.Exit:
    print_error(err_console, msg)
    return typer.Exit(2)


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Turn the expected error types into a clear message and exit code 2 (never a traceback)."""
    from ctk.files import OutputError
    from ctk.predict.dataset import DataError
    from ctk.predict.modelfile import ModelFileError
    from ctk.predict.profile import ProfileError
    from ctk.store import StoreError

    try:
        yield
    except (ModelFileError, StoreError, DataError, ProfileError, OutputError) as exc:
        raise _fail(str(exc)) from None
    except ValueError as exc:
        raise _fail(str(exc)) from None
    except OSError as exc:
        raise _fail(f"{getattr(exc, 'filename', '') or ''}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def _progress() -> Iterator:
    """The ``Progress`` callback of train/evaluate/profile: ctk's progress bar on stderr (one line per step
    when piped)."""
    from ctk.progress import progress_bar

    with progress_bar(console=err_console, only_on_terminal=True) as prog:
        tasks: dict[str, int] = {}

        def update(step: str, done: int, total: int) -> None:
            if step not in tasks:
                tasks[step] = prog.add_task(step, total=total)
                if prog.disable:  # piped output: one line per step instead of a bar
                    err_console.print(f"{step} ...", highlight=False)
            prog.update(tasks[step], completed=done, total=total)

        yield update


def _levels(text: str) -> tuple[float, ...]:
    try:
        return tuple(sorted({float(x) for x in text.split(",") if x.strip()}))
    except ValueError:
        raise _fail(f"--levels: not a comma-separated list of numbers: {text!r}") from None


def _cost(profile: Path | None, block_size: int | None, requeue_delay: float | None):
    from ctk.predict.profile import cost_model_from

    return cost_model_from(profile, block_size_tokens=block_size, requeue_delay_s=requeue_delay)


def _open_rows(path: Path, sources: list[str] | None):
    """Tool-call rows from a trace store (.duckdb) or an agent-traces CSV."""
    import pandas as pd

    from ctk.predict.train import load_rows

    if not path.exists():
        raise _fail(f"{path}: no such file")
    if path.suffix.lower() in (".csv", ".gz"):
        try:
            df = pd.read_csv(path)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise _fail(f"{path}: not a readable CSV ({exc})") from None
        if sources and "source" in df.columns:
            df = df[df["source"].isin(sources)]
        return df, None
    return load_rows(path, sources)


# -- train -----------------------------------------------------------------------------------------------


def train(
    db: Annotated[Path, typer.Option("--db", help="Trace store to train on.")] = Path("traces.duckdb"),
    predictor: Annotated[str, typer.Option(help="lightgbm | histogram | running-mean")] = "lightgbm",
    output: Annotated[Path, typer.Option("--output", "-o", help="Model file to write.")] = Path("model.pkl"),
    levels: Annotated[
        str, typer.Option(help="Quantile levels (must include 0.5 and 0.9).")
    ] = DEFAULT_LEVELS_TEXT,
    source: Annotated[
        list[str] | None, typer.Option(help="Train on these sources only (repeatable).")
    ] = None,
    folds: Annotated[
        int,
        typer.Option(
            help="Evaluation: 1 = one 25% program hold-out; k = k-fold by program; 0 = auto (5 below "
            "100k calls, else 1).",
            min=0,
        ),
    ] = 0,
    loso: Annotated[bool, typer.Option(help="Also evaluate leave-one-source-out.")] = False,
    profile: Annotated[Path | None, typer.Option(help="Prefill profile JSON from `ctk profile`.")] = None,
    block_size: Annotated[
        int | None, typer.Option(help="KV block size in tokens (cost model).", parser=at_least(1))
    ] = None,
    requeue_delay: Annotated[
        float | None, typer.Option(help="Re-queue delay after eviction, s.", parser=NON_NEGATIVE)
    ] = None,
    plots: Annotated[Path | None, typer.Option(help="Write calibration / per-tool PNG plots here.")] = None,
    seed: Annotated[int, typer.Option(help="Split / boosting seed.")] = 0,
    serve_cap: Annotated[
        float | None,
        typer.Option(
            help="Predict pauses for a harness that kills tool calls at this many seconds (default: each "
            "source's own cap, as recorded). Longer than a source's cap: its killed calls become censored "
            "run times.",
            parser=POSITIVE,
        ),
    ] = None,
) -> None:
    """Train a tool-duration predictor, evaluate it on held-out programs, write model.pkl with TTL tables."""
    from ctk.files import check_output
    from ctk.predict.evaluate import plot, render
    from ctk.predict.train import TrainConfig, train_from_store

    with _errors():
        cost = _cost(profile, block_size, requeue_delay)
        config = TrainConfig(
            predictor=predictor,
            levels=_levels(levels),
            eval_folds=folds,
            loso=loso,
            seed=seed,
            serve_cap_s=serve_cap,
        )
        config.validate()
        if not db.exists():
            raise _fail(f"{db}: no such trace store")
        check_output(output)  # before training, not after it
        with _progress() as update:
            model, evaluation = train_from_store(db, config, cost, source, update)
        render(evaluation, console)
        model.save(output)
        if plots:
            for p in plot(evaluation, plots):
                console.print(f"plot: {p}")
    td = model.training_data
    console.print(
        f"wrote {output}: {predictor}, {td['rows']} calls from {td['programs']} programs "
        f"(fingerprint {td['fingerprint']}), {len(model.ttl_tables().keys())} table keys"
    )


# -- evaluate --------------------------------------------------------------------------------------------


def evaluate(
    db: Annotated[Path, typer.Option("--db", help="Trace store (or agent-traces CSV) to evaluate on.")],
    model: Annotated[
        Path | None, typer.Option(help="Evaluate this trained model on ALL rows of --db.")
    ] = None,
    predictors: Annotated[str, typer.Option(help="Without --model: predictors to compare.")] = (
        "running-mean,histogram,lightgbm"
    ),
    folds: Annotated[
        int, typer.Option(help="Without --model: k-fold by program (1 = one 25% hold-out).", min=1)
    ] = 5,
    loso: Annotated[bool, typer.Option(help="Without --model: also leave-one-source-out.")] = True,
    levels: Annotated[str, typer.Option(help="Quantile levels.")] = DEFAULT_LEVELS_TEXT,
    source: Annotated[list[str] | None, typer.Option(help="Only these sources (repeatable).")] = None,
    profile: Annotated[Path | None, typer.Option(help="Prefill profile JSON (cost model).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON only.")] = False,
    plots: Annotated[Path | None, typer.Option(help="Write calibration / per-tool PNG plots here.")] = None,
    seed: Annotated[int, typer.Option(help="Split seed.")] = 0,
    online: Annotated[
        bool, typer.Option("--online", help="With --model: replay calls in start order, adapting online.")
    ] = False,
) -> None:
    """Evaluate predictors on held-out programs, or a trained model on another store's programs."""
    from ctk.predict.dataset import prepare_frame
    from ctk.predict.evaluate import evaluate_fitted, evaluate_frame, plot, render
    from ctk.predict.modelfile import ModelFile
    from ctk.predict.predictors import PREDICTOR_NAMES

    with _errors():
        rows, _ = _open_rows(db, source)
        if online:
            return _evaluate_online(rows, model, as_json)
        frame, skipped = prepare_frame(rows)
        if model is not None:
            m = ModelFile.load(model)
            cost = _cost(profile, None, None) if profile else m.cost
            result = evaluate_fitted(frame, m.fitted(), cost, {m.predictor: m.ttl_tables()})
            result["model"] = {"path": str(model), "predictor": m.predictor, "training_data": m.training_data}
        else:
            names = [n.strip() for n in predictors.split(",") if n.strip()]
            bad = [n for n in names if n not in PREDICTOR_NAMES]
            if bad or not names:
                raise _fail(f"unknown predictor(s) {bad}; choose from {', '.join(PREDICTOR_NAMES)}")
            lv = _levels(levels)
            with _progress() as update:
                result = evaluate_frame(
                    frame,
                    names,
                    _cost(profile, None, None),
                    folds=folds,
                    seed=seed,
                    loso=loso,
                    params={n: {"levels": lv} for n in names},
                    progress=update,
                )
        result["skipped_rows"] = skipped
        if as_json:
            sys.stdout.write(json.dumps(_jsonable(result), indent=1) + "\n")
        else:
            render(result, console)
        if plots:
            paths = plot(result, plots)
            if not as_json:
                for p in paths:
                    console.print(f"plot: {p}")


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# -- predict ---------------------------------------------------------------------------------------------


def predict(
    input_path: Annotated[
        Path, typer.Argument(metavar="INPUT", help="tool_calls CSV or trace store (.duckdb).")
    ],
    model: Annotated[Path, typer.Option(help="Model file from `ctk train`.")] = Path("model.pkl"),
    output: Annotated[Path, typer.Option("--output", "-o", help="Output CSV (or .parquet).")] = Path(
        "predictions.csv"
    ),
    pressure: Annotated[
        float, typer.Option(help="KV-cache usage (0..1) the TTL is chosen for.", parser=FRACTION)
    ] = 0.9,
    predictor: Annotated[str | None, typer.Option(help="Use this predictor of the model file.")] = None,
    online: Annotated[
        bool,
        typer.Option(
            "--online",
            help="Replay INPUT in start order: each call predicted by the tables + the engine's online "
            "adaptation from the calls finished before it started.",
        ),
    ] = False,
) -> None:
    """Predict duration quantiles, the TTL and P(T <= TTL) for every tool call of INPUT."""
    from ctk.predict.modelfile import ModelFile
    from ctk.predict.prediction import predict_rows

    with _errors():
        m = ModelFile.load(model)
        m.predictor_name(predictor)  # a wrong --predictor fails before INPUT is read
        rows, _ = _open_rows(input_path, None)
        pred = predict_rows(m, rows, pressure, predictor, online)
        _write_rows(pred.rows, output)
    console.print(
        json.dumps(
            {
                "rows": len(pred.rows),
                "skipped_rows": pred.skipped_rows,
                "predictor": pred.predictor,
                "output": str(output),
            }
        )
    )


def _evaluate_online(rows, model: Path | None, as_json: bool) -> None:
    from ctk.predict.modelfile import ModelFile
    from ctk.predict.online_eval import evaluate_online, render_online

    if model is None:
        raise _fail("--online evaluates a trained model: give --model model.pkl")
    result = evaluate_online(rows, ModelFile.load(model))
    if as_json:
        sys.stdout.write(json.dumps(_jsonable(result), indent=1) + "\n")
    else:
        render_online(result, console)


def _write_rows(out, output: Path) -> None:
    """Write a prediction table atomically as CSV (or Parquet by suffix)."""
    from ctk.files import write_atomically

    if output.suffix.lower() == ".parquet":
        write_atomically(output, lambda tmp: out.to_parquet(tmp, index=False))
    else:
        write_atomically(output, lambda tmp: out.to_csv(tmp, index=False))


# -- inspect ---------------------------------------------------------------------------------------------


def inspect(
    model: Annotated[Path, typer.Argument(help="Model file to describe.")],
    keys: Annotated[int, typer.Option(help="How many table keys to list.", min=0)] = 15,
    as_json: Annotated[bool, typer.Option("--json", help="Print metadata as JSON.")] = False,
) -> None:
    """Print what is inside a model file (refuses anything but plain data; never runs code)."""
    from ctk.predict.evaluate import render
    from ctk.predict.modelfile import ModelFile

    with _errors():
        m = ModelFile.load(model)
        tables = m.ttl_tables()
    meta = {k: getattr(m, k) for k in ("format_version", "ctk_version", "created_utc", "predictor")}
    meta["quantile_levels"] = m.quantile_levels or None
    meta["training_data"] = m.training_data
    meta["cost_model"] = m.cost.to_dict()
    meta["calibration"] = m.calibration
    meta["predictors"] = sorted(m.predictors)
    meta["table_keys"] = len(tables.keys())
    meta["harness_caps"] = m.harness_caps
    if tables.fixed_pins:  # hand-set: each key pinned for a fixed TTL (see TTLTables)
        meta["fixed_pins"] = {k: p._asdict() for k, p in tables.fixed_pins.items()}
    top = sorted(tables.keys(), key=lambda k: -tables.n_samples.get(k, 0))[:keys]
    engine = engine_ttls(tables, top, inspect_context(tables))
    meta["engine_ttl"] = {
        "context_tokens": inspect_context(tables),
        "unit": "TTL s per key at live price (JCT-s per token-s)",
        "ttl_s": engine,
    }
    if as_json:
        meta["feature_importance"] = m.feature_importance
        meta["evaluation"] = m.evaluation
        sys.stdout.write(json.dumps(_jsonable(meta), indent=1, default=str) + "\n")
        return
    t = Table(title=f"{model}", show_header=False)
    for k in ("format_version", "ctk_version", "created_utc", "predictor", "quantile_levels", "predictors"):
        t.add_row(k, str(meta[k]))
    for k, v in meta["training_data"].items():
        t.add_row(f"training_data.{k}", str(v))
    cm = meta["cost_model"]
    t.add_row(
        "cost_model",
        f"block {cm.get('block_size_tokens')} tokens, re-queue {cm.get('requeue_delay_s')} s, "
        f"profile {cm.get('profile_source')}",
    )
    cal = meta["calibration"]
    if cal:
        t.add_row(
            "calibration",
            f"{cal.get('method')}; {cal.get('rows')} rows; shifts (log s) "
            f"{[round(s, 3) for s in cal.get('shifts_log', [])]}",
        )
    console.print(t)
    _print_caps(m.harness_caps, m.train_config.get("serve_cap_s"))
    what = "quantiles or a hand-set fixed pin" if tables.fixed_pins else "quantiles"
    tt = Table(
        title=f"{len(tables.keys())} table keys: {what}, and the TTL the engine's ttl rule decides "
        "from them at a live memory price (JCT-s per token-s)"
    )
    tt.add_column("key")
    tt.add_column("n", justify="right")
    for lv in (0.5, 0.9):
        if lv in tables.quantile_levels:
            tt.add_column(f"q{lv:g} s", justify="right")
    ctx = inspect_context(tables)
    for p in REPRESENTATIVE_PRICES:
        tt.add_column(f"TTL s @price {p:g} ({ctx} tok)", justify="right")
    for k in top:
        q = [] if k in tables.fixed_pins else tables.quantiles_s.get(k, [])
        qcells = [
            f"{q[tables.quantile_levels.index(lv)]:.3g}" if q else "-"
            for lv in (0.5, 0.9)
            if lv in tables.quantile_levels
        ]
        ttls = [f"{engine[k][f'{p:g}']:.3g}" for p in REPRESENTATIVE_PRICES]
        label = f"{k} (fixed {tables.fixed_pins[k].ttl_s:g} s)" if k in tables.fixed_pins else k
        tt.add_row(label, str(tables.n_samples.get(k, 0)), *qcells, *ttls)
    console.print(tt)
    fi = m.feature_importance
    if fi:
        console.print(
            "feature importance (gain, q0.5): "
            + ", ".join(f"{k} {v:.2f}" for k, v in sorted(fi.items(), key=lambda kv: -kv[1])[:8])
        )
    if m.evaluation.get("program_split"):
        render(m.evaluation, console)


#: The context ``ctk inspect`` shows the engine's decisions at (tokens).
INSPECT_CONTEXT_TOKENS = 4096


def inspect_context(tables) -> int:
    """The context ``ctk inspect`` shows decisions at: :data:`INSPECT_CONTEXT_TOKENS`."""
    return INSPECT_CONTEXT_TOKENS


def engine_ttls(tables, keys: list[str], context_tokens: int) -> dict[str, dict[str, float]]:
    """Per key: the TTL the engine's ``ttl`` rule decides at each representative live price (its own rule,
    :meth:`ctk.predict.tables.TTLTables.live_decision`)."""
    return {
        k: {f"{p:g}": tables.live_decision((k,), context_tokens, p).ttl_s for p in REPRESENTATIVE_PRICES}
        for k in keys
    }


def _print_caps(caps: dict, serve_cap_s: float | None) -> None:
    """The harness caps the model's pauses were learned under (one row per capped source)."""
    served = f"served under a {serve_cap_s:g} s cap" if serve_cap_s else "each source under its own cap"
    if not caps:
        console.print(f"harness caps: none known ({served})")
        return
    t = Table(title=f"Harness caps: a killed call is an exact pause at its cap ({served})")
    for c in ("source", "cap s", "pause bound s", "killed calls", "from"):
        t.add_column(c, justify="left" if c in ("source", "from") else "right")
    for src, c in sorted(caps.items()):
        t.add_row(
            src,
            f"{c['cap_s']:.2f}",
            f"{c['bound_s']:.2f}",
            f"{c['killed_calls']} of {c['calls']}",
            c["origin"],
        )
    console.print(t)


# -- profile ---------------------------------------------------------------------------------------------


def profile(
    url: Annotated[str, typer.Option(help="Base URL of a running OpenAI-compatible server.")] = (
        "http://127.0.0.1:8000/v1"
    ),
    model: Annotated[str | None, typer.Option(help="Served model name (default: the first listed).")] = None,
    lengths: Annotated[str, typer.Option(help="Prompt lengths in tokens.")] = "16,256,1024,2048,4096",
    repeats: Annotated[int, typer.Option(help="Requests per length (median taken).", min=1)] = 3,
    output: Annotated[Path, typer.Option("--output", "-o", help="Profile JSON to write.")] = Path(
        "prefill_profile.json"
    ),
) -> None:
    """Time prefill at several prompt lengths against a running server (input for `ctk train --profile`)."""
    from ctk.predict.profile import measure_prefill, save_profile

    with _errors():
        try:
            lens = [int(x) for x in lengths.split(",") if x.strip()]
        except ValueError:
            raise _fail(f"--lengths: not a comma-separated list of integers: {lengths!r}") from None
        with _progress() as update:
            prof = measure_prefill(url, model, lens, repeats, progress=update)
        save_profile(prof, output)
    t = Table(
        title=f"Prefill profile of {prof['model']} at {prof['url']} (overhead {prof['overhead_s']:.4f} s)"
    )
    t.add_column("prompt tokens", justify="right")
    t.add_column("prefill s", justify="right")
    for n, s in zip(prof["prefill_tokens"], prof["prefill_s"], strict=True):
        t.add_row(str(n), f"{s:.4f}")
    console.print(t)
    console.print(f"wrote {output}")


def register(app: typer.Typer) -> None:
    app.command("train", help="Train a tool-duration predictor and write model.pkl with TTL tables.")(train)
    app.command("evaluate", help="Evaluate predictors on held-out programs (or a model on another store).")(
        evaluate
    )
    app.command(
        "predict", help="Predict duration quantiles and TTLs for tool calls in a CSV or trace store."
    )(predict)
    app.command("inspect", help="Show what is inside a model file (safe: plain data only).")(inspect)
    app.command("profile", help="Measure prefill time vs prompt length against a running server.")(profile)
