"""Every ctk command on bad input ends in one line and a non-zero exit, never a traceback; one CLI convention.

The commands run in-process through the real entry point (:func:`ctk.cli.main`), as the ``ctk`` script does.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys

import pytest
import typer

import ctk
from ctk.cli import app, main
from ctk.errors import CtkError, run_cli


def _run(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """``ctk ARGS`` through the entry point: (exit code, stdout + stderr)."""
    monkeypatch.setattr(sys, "argv", ["ctk", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out + out.err


def test_every_ctk_exception_class_derives_from_ctk_error() -> None:
    found = []
    for mod in pkgutil.walk_packages(ctk.__path__, "ctk."):
        if mod.name.startswith(("ctk.engine_patch.plugin", "ctk.engine_patch.scheduler")):
            continue  # these import vllm at module level
        module = importlib.import_module(mod.name)
        for obj in vars(module).values():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == mod.name:
                found.append(obj)
    assert len(found) >= 15
    assert [c.__name__ for c in found if not issubclass(c, CtkError)] == []


def test_entry_turns_errors_into_one_line(capsys, tmp_path) -> None:
    class Broken(CtkError):
        pass

    def raise_(exc: BaseException):
        def run() -> None:
            raise exc

        return run

    for exc, code in [
        (Broken("the store is on fire\n  (really)"), 2),
        (FileNotFoundError(2, "No such file or directory", str(tmp_path / "x.csv")), 2),
        (KeyboardInterrupt(), 130),
        (RuntimeError("Query interrupted"), 130),  # DuckDB's way of saying Ctrl-C
    ]:
        with pytest.raises(SystemExit) as info:
            run_cli(raise_(exc))
        err = capsys.readouterr().err
        assert info.value.code == code, exc
        assert "Traceback" not in err and len(err.strip().splitlines()) <= 1, err
    with pytest.raises(ValueError):  # anything else is a bug: it keeps its traceback
        run_cli(raise_(ValueError("bug")))


def _command_paths() -> list[tuple[str, ...]]:
    """Every command in the ``ctk --help`` tree (``("collect", "bfcl")`` for a group's subcommand)."""
    paths: list[tuple[str, ...]] = []
    for name, cmd in typer.main.get_command(app).commands.items():
        subs = getattr(cmd, "commands", None)
        paths += [(name, s) for s in subs] if subs else [(name,)]
    return paths


# Each command with an input that is not there ({missing}: no such file; {blocked}: a path under a regular
# file, so not even root can create it). ctk serve fails on its model file before vLLM starts.
DOWN = "http://127.0.0.1:1/v1"
MISSING_INPUT: dict[tuple[str, ...], list[str]] = {
    ("import",): ["{missing}.csv", "--db", "{tmp}/t.duckdb"],
    ("stats",): ["--db", "{missing}.duckdb"],
    ("export",): ["--db", "{missing}.duckdb", "-o", "{tmp}/x.csv"],
    ("proxy",): ["--url", DOWN, "--db", "{blocked}/p.duckdb"],
    ("train",): ["--db", "{missing}.duckdb", "-o", "{tmp}/m.pkl"],
    ("evaluate",): ["--db", "{missing}.duckdb"],
    ("predict",): ["{missing}.csv", "--model", "{missing}.pkl"],
    ("inspect",): ["{missing}.pkl"],
    ("profile",): ["--url", DOWN, "-o", "{blocked}/profile.json"],
    ("serve",): ["{missing}-model", "--ttl-model", "{missing}.pkl"],
    ("tiny-model",): ["{blocked}/tiny"],
    ("replay",): ["--db", "{missing}.duckdb", "--url", DOWN, "-o", "{tmp}/r.json"],
    ("report",): ["--db", "{missing}.duckdb", "-o", "{tmp}/report"],
    ("demo",): ["-o", "{blocked}/demo"],
    ("simulate",): ["--db", "{missing}.duckdb"],
    ("collect", "swebench"): ["--db", "{tmp}/c.duckdb", "--instances", "{missing}.jsonl"],
    ("collect", "bfcl"): ["--db", "{tmp}/c.duckdb", "--url", DOWN, "--tool-latency", "{missing}.csv"],
}


def test_every_command_has_a_missing_input_case() -> None:
    assert sorted(_command_paths()) == sorted(MISSING_INPUT)


@pytest.mark.parametrize("path", sorted(MISSING_INPUT), ids=" ".join)
def test_each_command_with_a_missing_file(monkeypatch, capsys, tmp_path, path) -> None:
    """One line on stderr, no traceback, a non-zero exit, and nothing written."""
    (tmp_path / "file").write_text("a regular file")
    where = {
        "{tmp}": str(tmp_path),
        "{missing}": str(tmp_path / "missing"),
        "{blocked}": str(tmp_path / "file"),
    }
    args = [next((a.replace(k, v) for k, v in where.items() if k in a), a) for a in MISSING_INPUT[path]]
    monkeypatch.setattr(sys, "argv", ["ctk", *path, *args])
    with pytest.raises(SystemExit) as info:
        main()
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert info.value.code not in (0, None), out
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in out.out, out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"], "a failed command left files behind"


def test_version_and_help_conventions(monkeypatch, capsys) -> None:
    code, out = _run(monkeypatch, capsys, "--version")
    assert code == 0 and out.strip() == f"ctk {ctk.__version__}"
    command = typer.main.get_command(app)
    names: list[list[str]] = []
    for name, cmd in command.commands.items():
        subs = getattr(cmd, "commands", None)
        names += [[name, s] for s in subs] if subs else [[name]]
    for path in names:
        code, out = _run(monkeypatch, capsys, *path, "--help")
        assert code == 0, path
        assert "<bool>" not in out, path  # flags take no value, so they show no value type
        usage = next(line for line in out.splitlines() if "Usage:" in line)
        assert usage == usage.split("[OPTIONS]")[0] + "[OPTIONS]" + usage.split("[OPTIONS]")[1].upper(), usage
        assert "created if missing" not in out or path[0] in ("collect", "proxy", "import"), path


@pytest.mark.parametrize(
    ("path", "option"),
    [
        (["collect", "swebench"], "--url"),
        (["collect", "bfcl"], "--url"),
        (["proxy"], "--url"),
        (["replay"], "--url"),
        (["profile"], "--url"),
        (["export"], "--output"),
        (["train"], "--output"),
        (["predict"], "--output"),
        (["replay"], "--output"),
        (["report"], "--output"),
        (["demo"], "--output"),
    ],
)
def test_one_name_for_one_idea(path, option) -> None:
    cmd = typer.main.get_command(app)
    for part in path:
        cmd = cmd.commands[part]  # type: ignore[attr-defined]
    opts = {o for p in cmd.params for o in p.opts}
    assert option in opts, (path, sorted(opts))


def test_replay_runs_against_the_scripted_server(monkeypatch, capsys, tmp_path) -> None:
    from ctk.datasets.importer import import_paths
    from ctk.datasets.samples import sample_traces_dir
    from ctk.datasets.scripted_server import BackgroundServer, Script, create_app
    from ctk.measure.results import load_results
    from ctk.store import TraceStore

    db = tmp_path / "t.duckdb"
    with TraceStore(db) as store:
        import_paths(store, [sample_traces_dir() / "tool_calls.csv.gz"])
    app_ = create_app(Script.from_dict({"default": [{"content": "done"}]}))
    with BackgroundServer(app_) as url:
        code, out = _run(
            monkeypatch, capsys, "replay", "--db", db, "--url", url, "-n", "2", "--time-scale", "0",
            "--max-turns", "3", "--no-progress", "-o", tmp_path / "r.json",
        )
        seen = app_.state.log.snapshot()
    assert code == 0, out
    [result] = load_results(tmp_path / "r.json")
    turns = [t for p in result.programs for t in p.turns]
    assert len(result.programs) == 2 and turns and not [t.error for t in turns if t.error]
    assert len(seen) == len(turns) and all(t.completion_tokens for t in turns)
    # the program identity travels as the header vllm-router routes on, too
    assert all(e["header_session_id"] and e["header_session_id"] == e["body_session_id"] for e in seen)


def test_tiny_model_files_respect_the_umask(tiny_model_dir) -> None:
    from ctk.files import new_file_mode

    files = [p for p in tiny_model_dir.iterdir() if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    assert {p.name: p.stat().st_mode & 0o777 for p in files} == {p.name: new_file_mode() for p in files}


def test_bfcl_checks_the_endpoint_before_the_first_program(monkeypatch, capsys, tmp_path) -> None:
    code, out = _run(monkeypatch, capsys, "collect", "bfcl", "--db", tmp_path / "b.duckdb",
                     "--url", "http://127.0.0.1:1/v1", "--slice", "0:1")
    assert code == 2 and "no server answers" in out and "Traceback" not in out, out
    assert not (tmp_path / "b.duckdb").exists()


@pytest.mark.parametrize("args", [["--rates", "nan"], ["--rates", "1,inf"], ["-n", "-5"]], ids=" ".join)
def test_simulate_refuses_nan_inf_and_negative_counts(monkeypatch, capsys, tmp_path, args) -> None:
    monkeypatch.chdir(tmp_path)
    code, out = _run(monkeypatch, capsys, "simulate", "--db", tmp_path / "none.duckdb", *args,
                     "--json", tmp_path / "o.json")
    assert code == 2 and "outside" in out and "Traceback" not in out, out
    assert list(tmp_path.iterdir()) == []  # no JSON, no out/simulate


def _outputs(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    return {"/proc": "/proc/p.csv", "file": str(blocker / "x.csv")}


@pytest.mark.parametrize("where", ["/proc", "file"])
def test_output_errors_name_the_users_path_and_the_cause(monkeypatch, capsys, tmp_path, where,
                                                         predict_sample_store, trained_model) -> None:
    out_path = _outputs(tmp_path)[where]
    cause = {"/proc": "cannot create files in /proc", "file": "a-file is a file, not a folder"}[where]
    for args in (["export", "--db", predict_sample_store, "-o", out_path],
                 ["predict", predict_sample_store, "--model", trained_model, "-o", out_path]):
        code, out = _run(monkeypatch, capsys, *args)
        assert code == 2 and out.startswith(f"error: {out_path}: ") and cause in out, out
        assert ".tmp" not in out and ".partial" not in out and "File exists" not in out, out


def test_train_checks_its_output_before_training(monkeypatch, capsys, predict_sample_store) -> None:
    code, out = _run(monkeypatch, capsys, "train", "--db", predict_sample_store, "-o", "/proc/m.pkl",
                     "--predictor", "histogram")
    assert code == 2 and out.strip().splitlines() == [  # nothing trained, nothing rendered
        "error: /proc/m.pkl: cannot create files in /proc (No such file or directory)"
    ]


def test_train_names_an_unknown_source_and_the_known_ones(monkeypatch, capsys, predict_sample_store) -> None:
    code, out = _run(monkeypatch, capsys, "train", "--db", predict_sample_store, "-o", "/tmp/never.pkl",
                     "--source", "nosuchsource")
    assert code == 2 and len(out.strip().splitlines()) == 1, out
    assert "--source nosuchsource: no tool calls of that source" in out and "tbench1_" in out, out


def test_train_refuses_an_all_zero_prefill_profile(monkeypatch, capsys, tmp_path, predict_sample_store):
    zero = tmp_path / "profile.json"  # what `ctk profile` measured against the scripted server
    zero.write_text('{"prefill_tokens": [0, 128, 1024], "prefill_s": [0.0, 0.0, 0.0]}')
    code, out = _run(monkeypatch, capsys, "train", "--db", predict_sample_store, "-o", tmp_path / "m.pkl",
                     "--profile", zero)
    assert code == 2 and "prefill time is zero at every prompt length" in out, out
    assert not (tmp_path / "m.pkl").exists()
