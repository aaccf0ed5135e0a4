"""Overhead of recording: mini-swe-agent steps with and without ctk's wrappers, measured in the same run.

Both arms run mini-swe-agent's own ``DefaultAgent`` with its litellm model against the scripted model
server over real HTTP and its ``LocalEnvironment`` running a real (fast) command per step, so the
per-step time is small and any recording cost shows. The recorded arm wraps ``model.query`` and
``env.execute`` (:mod:`ctk.collect.recorder`) and writes to a real DuckDB trace store through the
writer process.

Measured in this run:
- the time ctk's wrappers add on the agent's path per step in real runs (outer minus inner time of the
  wrapped ``query`` and ``execute``): robust to a loaded machine, the headline figure;
- paired steps: within each program, even steps go through the recording wrappers and
  odd steps through the bare model/environment; a step is timed from the model query's start to the
  command's end. Neighbouring steps see the same machine load, so their difference isolates recording.
- whole programs: uninstrumented and recorded programs alternate; per-step medians (sensitive to the
  load of a shared machine: read the spread of the runs).

Run: ``.venv/bin/python bench/collect_overhead.py``. Target: ≤ 1 ms per step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("MSWEA_SILENT_STARTUP", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("MSWEA_COST_TRACKING", "ignore_errors")

from ctk.collect.recorder import ProgramRecorder, RecordingEnvironment, RecordingModel, Stamp  # noqa: E402
from ctk.collect.writer import StoreWriter  # noqa: E402
from ctk.datasets.scripted_server import BackgroundServer, Script, create_app  # noqa: E402
from ctk.store import ProgramRecord, TraceStore  # noqa: E402

AGENT = {
    "system_template": "You run commands.",
    "instance_template": "{{task}}",
    "step_limit": 0,
    "cost_limit": 0,
}


def run_program(base_url: str, steps: int, record: StoreWriter | None, pid: str) -> tuple[float, float]:
    """(wall, process CPU) seconds per step of one program of ``steps`` steps (the last one submits)."""
    from minisweagent.agents.default import DefaultAgent
    from minisweagent.environments.local import LocalEnvironment
    from minisweagent.models.litellm_model import LitellmModel

    model = LitellmModel(
        model_name="openai/scripted",
        cost_tracking="ignore_errors",
        model_kwargs={"api_base": base_url, "api_key": "EMPTY"},
    )
    env = LocalEnvironment(cwd=tempfile.gettempdir())
    if record is not None:
        rec = ProgramRecorder(record, ProgramRecord(program_id=pid, source="bench"))
        model, env = RecordingModel(model, rec), RecordingEnvironment(env, rec)
    agent = DefaultAgent(model, env, **AGENT)
    t0, c0 = time.perf_counter(), time.process_time()
    info = agent.run("bench")
    elapsed = time.perf_counter() - t0
    assert info["exit_status"] == "Submitted", info
    if record is not None:
        rec.finish("Submitted")
        record.flush()
    return elapsed / steps, (time.process_time() - c0) / steps


class _Toggle:
    """Routes even steps through the recording wrappers and odd steps around them; times each step."""

    def __init__(self, model, env, rec_model, rec_env):
        self.model, self.env, self.rec_model, self.rec_env = model, env, rec_model, rec_env
        self.step = -1
        self.t0 = 0.0
        self.times: dict[bool, list[float]] = {True: [], False: []}

    @property
    def recording(self) -> bool:
        return self.step % 2 == 0

    def query(self, messages, **kwargs):
        self.step += 1
        self.t0 = time.perf_counter()
        return (self.rec_model if self.recording else self.model).query(messages, **kwargs)

    def execute(self, action, *args, **kwargs):
        try:
            return (self.rec_env if self.recording else self.env).execute(action, *args, **kwargs)
        finally:
            self.times[self.recording].append(time.perf_counter() - self.t0)


class _ModelSide:
    def __init__(self, toggle: _Toggle):
        self._t = toggle

    def __getattr__(self, name):
        return getattr(self._t.model, name)

    def query(self, messages, **kwargs):
        return self._t.query(messages, **kwargs)


class _EnvSide:
    def __init__(self, toggle: _Toggle):
        self._t = toggle

    def __getattr__(self, name):
        return getattr(self._t.env, name)

    def execute(self, action, *args, **kwargs):
        return self._t.execute(action, *args, **kwargs)


def paired_steps(base_url: str, steps: int, writer: StoreWriter, pid: str) -> tuple[list[float], list[float]]:
    """Per-step seconds (recorded, bare) of one program whose steps alternate between the arms."""
    from minisweagent.agents.default import DefaultAgent
    from minisweagent.environments.local import LocalEnvironment
    from minisweagent.models.litellm_model import LitellmModel

    model = LitellmModel(
        model_name="openai/scripted",
        cost_tracking="ignore_errors",
        model_kwargs={"api_base": base_url, "api_key": "EMPTY"},
    )
    env = LocalEnvironment(cwd=tempfile.gettempdir())
    rec = ProgramRecorder(writer, ProgramRecord(program_id=pid, source="bench"))
    toggle = _Toggle(model, env, RecordingModel(model, rec), RecordingEnvironment(env, rec))
    info = DefaultAgent(_ModelSide(toggle), _EnvSide(toggle), **AGENT).run("bench")
    assert info["exit_status"] == "Submitted", info
    rec.finish("Submitted")
    # the submit step raises inside execute: drop the last step of each arm (not a normal step)
    return toggle.times[True][:-1], toggle.times[False][:-1]


def precision(writer: StoreWriter, n: int = 10, seconds: float = 0.3) -> tuple[list[float], list[float]]:
    """Recorded durations of ``sleep {seconds}`` through the wrappers, and bare perf_counter timings."""
    from minisweagent.environments.local import LocalEnvironment

    env = LocalEnvironment(cwd=tempfile.gettempdir())
    rec = ProgramRecorder(writer, ProgramRecord(program_id="precision", source="bench"))
    renv = RecordingEnvironment(env, rec)
    recorded, bare = [], []
    for _ in range(n):
        rec.next_turn()
        renv.execute({"command": f"sleep {seconds}"})
        t0 = time.perf_counter()
        env.execute({"command": f"sleep {seconds}"})
        bare.append(time.perf_counter() - t0)
    writer.flush()
    return recorded, bare


class _Timed:
    """Times calls of ``method`` on the wrapped object (inner = without ctk's wrapper)."""

    def __init__(self, obj, method: str, sink: list[float]):
        self._obj, self._method, self._sink = obj, method, sink

    def __getattr__(self, name):
        attr = getattr(self._obj, name)
        if name != self._method:
            return attr

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                self._sink.append(time.perf_counter() - t0)

        return timed


def wrapper_added_us(base_url: str, steps: int, writer: StoreWriter, pid: str) -> list[float]:
    """Per step: time spent in ctk's wrappers around the real model query and command (microseconds)."""
    from minisweagent.agents.default import DefaultAgent
    from minisweagent.environments.local import LocalEnvironment
    from minisweagent.models.litellm_model import LitellmModel

    model = LitellmModel(
        model_name="openai/scripted",
        cost_tracking="ignore_errors",
        model_kwargs={"api_base": base_url, "api_key": "EMPTY"},
    )
    env = LocalEnvironment(cwd=tempfile.gettempdir())
    inner_q: list[float] = []
    inner_x: list[float] = []
    outer_q: list[float] = []
    outer_x: list[float] = []
    rec = ProgramRecorder(writer, ProgramRecord(program_id=pid, source="bench"))
    rmodel = RecordingModel(_Timed(model, "query", inner_q), rec)
    renv = RecordingEnvironment(_Timed(env, "execute", inner_x), rec)
    agent = DefaultAgent(_Timed(rmodel, "query", outer_q), _Timed(renv, "execute", outer_x), **AGENT)
    assert agent.run("bench")["exit_status"] == "Submitted"
    rec.finish("Submitted")
    n = min(len(outer_q), len(outer_x)) - 1  # the submit step raises inside execute
    return [((outer_q[i] - inner_q[i]) + (outer_x[i] - inner_x[i])) * 1e6 for i in range(n)]


def inline_cost_us(writer: StoreWriter, n: int = 2000) -> float:
    """Microseconds the agent's thread spends in the recorder per step (one LLM + one tool call)."""
    rec = ProgramRecorder(writer, ProgramRecord(program_id="inline", source="bench"))
    t0 = time.perf_counter()
    for _ in range(n):
        rec.next_turn()
        a = Stamp.now()
        rec.llm_call(
            a,
            Stamp.now(),
            usage={"prompt_tokens": 100, "completion_tokens": 10},
            finish_reason="tool_calls",
            response_chars=40,
        )
        rec.tool_call(
            Stamp.now(), Stamp.now(), command="cd /r && python -m pytest -q", exit_status="0", output_chars=10
        )
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60, help="steps per program")
    p.add_argument("--rounds", type=int, default=4, help="programs per arm / paired programs")
    p.add_argument("--command", default="true", help="the command each step runs")
    args = p.parse_args()
    turns = [{"commands": [args.command]}] * (args.steps - 1)
    turns.append({"commands": ["echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT"]})
    script = Script.from_dict({"default": turns})
    with tempfile.TemporaryDirectory() as tmp, BackgroundServer(create_app(script)) as url:
        db = Path(tmp) / "bench.duckdb"
        with StoreWriter(db) as writer:
            run_program(url, args.steps, None, "warmup")  # imports, connections
            rec_steps: list[float] = []
            bare_steps: list[float] = []
            for r in range(args.rounds):
                a, b = paired_steps(url, args.steps, writer, f"pair{r}")
                rec_steps += a
                bare_steps += b
            base, rec, base_cpu, rec_cpu = [], [], [], []
            for r in range(args.rounds):
                w, c = run_program(url, args.steps, None, f"b{r}")
                base.append(w)
                base_cpu.append(c)
                w, c = run_program(url, args.steps, writer, f"r{r}")
                rec.append(w)
                rec_cpu.append(c)
            t0 = time.perf_counter()
            writer.flush()
            drain = time.perf_counter() - t0
            added = [
                x for r in range(args.rounds) for x in wrapper_added_us(url, args.steps, writer, f"w{r}")
            ]
            inline = inline_cost_us(writer)
            _, bare_sleep = precision(writer)
        writer_cpu_ms = writer.cpu_s * 1e3
        with TraceStore(db) as store:
            counts = store.counts()
            rec_sleep = store.query(
                "SELECT duration_s FROM tool_calls WHERE program_id = 'precision' ORDER BY turn_index"
            )["duration_s"].tolist()
    b, r = statistics.median(base) * 1e3, statistics.median(rec) * 1e3
    n = min(len(rec_steps), len(bare_steps))
    diffs = np.array([(x - y) * 1e3 for x, y in zip(rec_steps[:n], bare_steps[:n], strict=True)])
    boot = np.random.default_rng(0).choice(diffs, size=(2000, n)).mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    pr, pb = statistics.median(rec_steps) * 1e3, statistics.median(bare_steps) * 1e3
    runs = lambda xs: ", ".join(f"{x * 1e3:.1f}" for x in xs)  # noqa: E731
    print(
        f"steps per program {args.steps}, rounds {args.rounds}, command {args.command!r}, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    q = np.percentile(added, [50, 90, 99])
    print(
        f"added by the wrappers on the agent's path in real runs ({len(added)} steps): median {q[0]:.0f} us, "
        f"p90 {q[1]:.0f} us, p99 {q[2]:.0f} us, max {max(added):.0f} us per step; target <= 1000 us"
    )
    print(
        f"recorder calls alone (synthetic, 2000 steps): {inline:.1f} us per step (an LLM call + a tool call)"
    )
    print(
        f"paired steps ({n} pairs): recorded median {pr:.2f} ms, bare {pb:.2f} ms, ratio {pr / pb:.3f}; "
        f"mean pair difference {diffs.mean():+.2f} ms (95% CI {lo:+.2f} .. {hi:+.2f})"
    )
    print(
        f"whole programs, wall per step: bare {b:.2f} ms [{runs(base)}], recorded {r:.2f} ms [{runs(rec)}], "
        f"difference {r - b:+.2f} ms, ratio {r / b:.3f}"
    )
    bc, rc = statistics.median(base_cpu) * 1e3, statistics.median(rec_cpu) * 1e3
    print(
        f"whole programs, CPU per step of the agent's process (writer process excluded): bare {bc:.2f} ms, "
        f"recorded {rc:.2f} ms, difference {rc - bc:+.2f} ms"
    )
    n_records = counts["llm_calls"] + counts["tool_calls"]
    print(
        f"writer process (off the agent's path): {writer_cpu_ms / max(n_records, 1):.2f} ms CPU per record, "
        f"{writer_cpu_ms:.0f} ms for {n_records} records incl. start-up"
    )
    err = [abs(x - 0.3) * 1e3 for x in rec_sleep]
    print(
        f"precision: `sleep 0.3` recorded {statistics.median(rec_sleep):.4f} s median (|error| median "
        f"{statistics.median(err):.1f} ms, max {max(err):.1f} ms; target 20 ms); "
        f"the same command timed bare: {statistics.median(bare_sleep):.4f} s median"
    )
    print(
        f"store: {counts['llm_calls']} LLM calls, {counts['tool_calls']} tool calls; writer drained "
        f"{drain * 1e3:.0f} ms after the last program. Target: recording adds <= 1 ms per step."
    )


if __name__ == "__main__":
    main()
