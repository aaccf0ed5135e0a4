"""CLI: ``ctk import``, ``ctk stats``, ``ctk export`` (the trace store's own commands)."""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from ctk.errors import print_error
from ctk.files import check_output, write_atomically
from ctk.progress import progress_bar
from ctk.store import TABLES, StoreError, TraceStore

if TYPE_CHECKING:
    from ctk.datasets.importer import ImportSummary

# Piped output (CI logs, tests) gets a wide console instead of rich's 80 columns.
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

DbOption = Annotated[Path, typer.Option("--db", help="DuckDB trace store (must exist).")]
NewDbOption = Annotated[
    Path, typer.Option("--db", help="DuckDB trace store (created when something was imported).")
]


def open_store(path: Path, read_only: bool = False) -> TraceStore:
    """Open a trace store or exit with a clear message (shared by every command that takes --db).

    A store locked by a writer (``ctk proxy``, ``ctk collect``) is read from a copy taken now, with a notice.
    """
    try:
        store = TraceStore(path, read_only=read_only)
    except StoreError as exc:
        print_error(err_console, str(exc))
        raise typer.Exit(2) from None
    if store.snapshot is not None:
        err_console.print(
            f"[yellow]note:[/yellow] {path} is being written by another process; reading a copy taken now",
            highlight=False,
        )
    return store


@contextlib.contextmanager
def _stop_on_ctrl_c() -> Iterator[threading.Event]:
    """The first Ctrl-C asks the import to stop after the current batch (DuckDB is never interrupted
    mid-query); a second one stops at once."""
    stop = threading.Event()

    def handler(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def import_cmd(
    paths: Annotated[list[Path], typer.Argument(help="Trajectory files/folders or agent-traces CSVs.")],
    db: NewDbOption = Path("traces.duckdb"),
    fmt: Annotated[str, typer.Option("--format", help="auto | mswea-traj | agent-traces-csv")] = "auto",
    source: Annotated[str, typer.Option(help="Source label for trajectories (CSV rows carry their own).")] = (
        "mini-swe-agent"
    ),
    batch_programs: Annotated[int, typer.Option(help="Programs per committed transaction.", min=1)] = 200,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every committed batch.")] = False,
) -> None:
    """Import mini-swe-agent trajectories or agent-traces CSVs into the trace store (idempotent)."""
    from ctk.datasets.importer import discover, import_paths

    if fmt not in ("auto", "mswea-traj", "agent-traces-csv"):
        print_error(err_console, f"unknown --format {fmt!r}")
        raise typer.Exit(2)
    missing = [p for p in paths if not p.exists()]
    if missing:
        print_error(err_console, f"{missing[0]}: no such file or folder")
        raise typer.Exit(2)
    found = discover(paths, fmt)  # type: ignore[arg-type]
    if not found:
        where = ", ".join(map(str, paths))
        print_error(err_console, f"no trajectory or trace table (CSV / Parquet) under {where}")
        raise typer.Exit(2)
    created = not db.exists()
    if not created:  # a damaged store is refused before a byte is written: it stays as it was
        with open_store(db, read_only=True) as existing:
            existing.verify()
    store = open_store(db)
    total = len(found)
    with progress_bar(status=True, console=err_console, only_on_terminal=True) as progress:
        task = progress.add_task("importing", total=total, status="")

        def advance(path: Path) -> None:
            progress.update(task, advance=1, status=path.name[:40])

        def committed(n_programs: int) -> None:
            if verbose:
                err_console.print(f"committed {n_programs} programs", highlight=False)

        try:
            with _stop_on_ctrl_c() as stop:
                summary = import_paths(
                    store,
                    paths,
                    fmt,
                    source=source,
                    on_file=advance,  # type: ignore[arg-type]
                    batch_programs=batch_programs,
                    on_commit=committed,
                    should_stop=stop.is_set,
                )
        except BaseException:
            store.close()  # every committed batch stays; the CLI entry reports Ctrl-C (exit 130)
            raise
    counts = store.counts()
    store.close()

    nothing = summary.programs_added + summary.programs_already_present + summary.runs_added == 0
    if nothing and not summary.interrupted:
        if created:  # do not leave an empty store behind for `ctk train` to stumble on
            for leftover in (db, db.with_name(db.name + ".wal")):
                leftover.unlink(missing_ok=True)
        message = _nothing_imported(summary, len(found)) + ("" if created else f"; {db} is unchanged")
        print_error(err_console, message)
        raise typer.Exit(1)
    for path, reason in summary.skipped_files:
        err_console.print(f"[yellow]skipped[/yellow] {path}: {reason}", highlight=False)
    if summary.interrupted and summary.programs_added == 0 and created:
        for leftover in (db, db.with_name(db.name + ".wal")):
            leftover.unlink(missing_ok=True)
    table = Table(title=f"import into {db}")
    table.add_column("what")
    table.add_column("count", justify="right")
    for label, value in [
        ("files read", summary.files_read),
        ("files skipped", len(summary.skipped_files)),
        ("rows skipped (no key / unreadable duration)", summary.rows_skipped),
        ("impossible tool durations (flagged, not used)", summary.impossible_durations),
        ("impossible LLM latencies (flagged, not used)", summary.impossible_latencies),
        ("programs added", summary.programs_added),
        ("programs already present", summary.programs_already_present),
        ("tool calls added", summary.tool_calls_added),
        ("llm calls added", summary.llm_calls_added),
        ("programs in store", counts["programs"]),
        ("tool calls in store", counts["tool_calls"]),
    ]:
        table.add_row(label, str(value))
    console.print(table)
    if summary.interrupted:
        err_console.print(
            f"[yellow]interrupted:[/yellow] {summary.programs_added} programs committed and kept; run the "
            "same import again to add the rest",
            highlight=False,
        )
        raise typer.Exit(130)


def _nothing_imported(summary: ImportSummary, n_files: int) -> str:
    """One line for an import that read no program: the reason, for the first file that has one."""
    if not summary.skipped_files:
        return f"nothing imported: no program could be read from {n_files} file(s)"
    path, reason = summary.skipped_files[0]
    more = len(summary.skipped_files) - 1
    return f"nothing imported: {path}: {reason}" + (f" (and {more} more file(s) skipped)" if more else "")


def _fmt_s(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def stats_cmd(
    db: DbOption = Path("traces.duckdb"),
    by: Annotated[str, typer.Option(help="Group by: tool (source + main program) | source")] = "tool",
    min_count: Annotated[int, typer.Option(help="Hide groups with fewer calls (table only).")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON records instead of a table.")] = False,
) -> None:
    """Tool-call duration statistics per source and tool: count, p50/p90/p99, shares, censored share."""
    if by not in ("tool", "source"):
        print_error(err_console, "--by must be 'tool' or 'source'")
        raise typer.Exit(2)
    store = open_store(db, read_only=True)
    keys = ("source", "main_program") if by == "tool" else ("source",)
    df = store.stats(keys)
    store.close()
    if as_json:
        sys.stdout.write(df.to_json(orient="records", indent=2) + "\n")
        return
    table = Table(title=f"tool-call durations in {db} (seconds)")
    for col in [*keys, "n", "p50", "p90", "p99", "<1s", "<2s", "<10s", "censored"]:
        table.add_column(col, justify="left" if col in keys else "right")
    for row in df[df["n"] >= min_count].itertuples(index=False):
        r = row._asdict()
        table.add_row(
            *[str(r[k]) if isinstance(r[k], str) else "-" for k in keys],
            str(r["n"]),
            _fmt_s(r["p50_s"]),
            _fmt_s(r["p90_s"]),
            _fmt_s(r["p99_s"]),
            f"{r['share_lt_1s']:.0%}",
            f"{r['share_lt_2s']:.0%}",
            f"{r['share_lt_10s']:.0%}",
            f"{r['censored_share']:.0%}",
        )
    console.print(table)
    hidden = int((df["n"] < min_count).sum())
    if hidden:
        console.print(
            f"({hidden} groups with fewer than {min_count} calls not shown; --min-count 1 shows all)"
        )


def export_cmd(
    db: DbOption = Path("traces.duckdb"),
    table: Annotated[str, typer.Option(help=f"One of: {', '.join(TABLES)}")] = "tool_calls",
    output: Annotated[Path, typer.Option("-o", "--output", help="FILE.csv or FILE.parquet")] = Path(
        "tool_calls.csv"
    ),
) -> None:
    """Export a table of the trace store to CSV or Parquet (tool calls use the agent-traces CSV names)."""
    if table not in TABLES:
        print_error(err_console, f"unknown table {table!r}; choose one of {', '.join(TABLES)}")
        raise typer.Exit(2)
    suffix = output.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        print_error(err_console, "output must end in .csv or .parquet")
        raise typer.Exit(2)
    check_output(output)  # before reading the store
    store = open_store(db, read_only=True)
    df = store.export_frame(table)
    store.close()
    if suffix == ".csv":
        write_atomically(output, lambda tmp: df.to_csv(tmp, index=False))
    else:
        write_atomically(output, lambda tmp: df.to_parquet(tmp, index=False))
    console.print(json.dumps({"table": table, "rows": len(df), "output": str(output)}))


def register(app: typer.Typer) -> None:
    app.command("import", help="Import mini-swe-agent trajectories or agent-traces CSVs into a trace store.")(
        import_cmd
    )
    app.command("stats", help="Per-source, per-tool duration statistics of a trace store.")(stats_cmd)
    app.command("export", help="Export a trace-store table to CSV or Parquet.")(export_cmd)
