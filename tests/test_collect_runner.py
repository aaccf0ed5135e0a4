"""The collection skeleton with a small real collector: program ids, resume, repeats, failures, summary.

Programs write through the real StoreWriter process into a real DuckDB file; only the agent is trivial.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from collect_fixtures import read_table

from ctk.collect.recorder import Stamp
from ctk.collect.runner import CollectError, CollectOptions, Program, collect
from ctk.collect.swebench import SwebenchOptions


@dataclass
class CountingCollector:
    """Each task: ``steps`` LLM calls with one tool call each; ``fail_at`` raises at that step."""

    options: CollectOptions
    kind: str = "collect-test"
    agent: str = "counting-agent"
    sessions: int = 0

    def task_id(self, task: dict[str, Any]) -> str:
        return task["id"]

    def prepare(self) -> None:
        if self.options.model == "refused":
            raise CollectError("model refused")

    def run_config(self) -> dict[str, Any]:
        return {"own": 1}

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        self.sessions += 1
        yield

    def run_program(self, program: Program) -> str:
        rec = program.record(dataset="toy")
        for step in range(program.task["steps"]):
            program.check_stop()
            rec.next_turn()
            rec.llm_call(Stamp.now(), Stamp.now())
            if step == program.task.get("fail_at"):
                raise RuntimeError("the agent broke")
            rec.tool_call(Stamp.now(), Stamp.now(), command="ls", exit_status="0")
        return program.finish("done")


TASKS = [{"id": "a", "steps": 2}, {"id": "b", "steps": 3, "fail_at": 1}]


def test_programs_resume_and_summary(tmp_path: Path) -> None:
    db = tmp_path / "r.duckdb"
    opts = CollectOptions(db=db, source="toy", repeats=2, workers=2)
    first = collect(CountingCollector(opts), TASKS)
    assert (first.completed, first.failed, first.planned) == (2, 2, 4)
    assert first.outcomes == {"done": 2} and len(first.errors) == 2 and "the agent broke" in first.errors[0]
    # committed calls count for failed programs too: a 2 x (2 + 2) LLM calls, b 2 x (1 + 1)
    assert (first.n_llm_calls, first.n_tool_calls) == (8, 6)
    programs = read_table(db, "programs").set_index("program_id")
    assert sorted(programs.index) == ["toy/a#0", "toy/a#1", "toy/b#0", "toy/b#1"]
    assert programs["complete"].to_dict() == {
        "toy/a#0": True,
        "toy/a#1": True,
        "toy/b#0": False,
        "toy/b#1": False,
    }
    assert set(programs["agent"]) == {"counting-agent"} and set(programs["dataset"]) == {"toy"}
    runs = read_table(db, "runs")
    assert len(runs) == 1 and runs.iloc[0]["kind"] == "collect-test"
    assert '"own": 1' in runs.iloc[0]["config"] and '"workers": 2' in runs.iloc[0]["config"]

    with pytest.raises(CollectError, match="--resume"):  # never silently duplicates
        collect(CountingCollector(opts), TASKS)

    fixed = [TASKS[0], {"id": "b", "steps": 3}]
    collector = CountingCollector(CollectOptions(db=db, source="toy", repeats=2, resume=True))
    again = collect(collector, fixed)
    assert (again.skipped_complete, again.redone_incomplete, again.completed, again.failed) == (2, 2, 2, 0)
    llm = read_table(db, "llm_calls")
    assert (
        read_table(db, "programs")["complete"].all()
        and not llm.duplicated(["program_id", "turn_index"]).any()
    )
    assert (llm.program_id == "toy/b#0").sum() == 3  # the unfinished attempt's steps were discarded

    nothing = CountingCollector(CollectOptions(db=db, source="toy", repeats=2, resume=True))
    assert collect(nothing, fixed).skipped_complete == 4 and nothing.sessions == 0  # no session when idle


def test_bad_options_write_nothing(tmp_path: Path) -> None:
    db = tmp_path / "bad.duckdb"
    for opts, message in [
        (CollectOptions(db=db, repeats=0), "--repeats"),
        (CollectOptions(db=db, workers=0), "--workers"),
        (CollectOptions(db=db, model="refused"), "model refused"),
    ]:
        with pytest.raises(CollectError, match=message):
            collect(CountingCollector(opts), TASKS)
    with pytest.raises(ValueError, match="--rate"):
        collect(CountingCollector(CollectOptions(db=db, arrival="poisson")), TASKS)
    assert not db.exists()


def test_stop_leaves_programs_incomplete(tmp_path: Path) -> None:
    db = tmp_path / "s.duckdb"
    stop = threading.Event()
    stop.set()  # already stopping: the programs started are stopped before their first LLM call
    summary = collect(CountingCollector(CollectOptions(db=db)), TASKS, stop=stop)
    assert summary.interrupted and summary.completed == 0 and summary.failed == 0


def test_options_from_cli_params() -> None:
    params = {"db": Path("x.duckdb"), "configs": ["a.yaml"], "workers": 3, "instances": "bundled"}
    opts = SwebenchOptions.from_params(params)
    assert opts.configs == ["a.yaml"] and opts.workers == 3 and opts.source == "collect-swebench"
