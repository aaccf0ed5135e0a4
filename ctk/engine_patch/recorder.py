"""``--record traces.duckdb``: serving writes the tool durations it observes into a trace store.

An :class:`~ctk.policy.events.EventSink` whose ``tool_observed`` only puts the observation on a
bounded queue; a daemon thread owns the :class:`~ctk.store.TraceStore` and writes one committed row per
observation (``source = "serve"``, ``provenance = "serve:finish_to_next_arrival"``), so the scheduler loop
never waits on DuckDB and a crash loses at most the queued rows. When the queue is full, observations are
dropped and counted, never blocking the engine. Rows that cannot be written (e.g. a program id already used
by another source for the same turn) are skipped and counted.
"""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path

from ctk.policy.events import NullSink, ToolObservation
from ctk.wire import clip_command

logger = logging.getLogger("ctk.engine_patch")

SOURCE = "serve"
_STOP = object()


class TraceRecorder(NullSink):
    def __init__(
        self, path: str | Path, model: str | None = None, config: dict | None = None, max_queue: int = 100_000
    ):
        self.path = Path(path)
        self.model = model
        self.config = dict(config or {})
        self.queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self.written = 0
        self.dropped = 0
        self.skipped = 0
        self.error: str | None = None
        self._programs: set[str] = set()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ctk-trace-recorder", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self.error:
            raise RuntimeError(self.error)

    # -- EventSink ---------------------------------------------------------------------------------------

    def tool_observed(self, obs: ToolObservation) -> None:
        try:
            self.queue.put_nowait(obs)
        except queue.Full:
            self.dropped += 1

    # -- writer thread -----------------------------------------------------------------------------------

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued, then stop the thread."""
        if self._thread.is_alive():
            self.queue.put(_STOP)
            self._thread.join(timeout)

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until every queued observation is written (for tests and shutdown)."""
        done = threading.Event()
        self.queue.put(done)
        done.wait(timeout)

    def _run(self) -> None:
        from ctk.store import RunRecord, StoreError, TraceStore

        try:
            store = TraceStore(self.path)
            self.run_id = store.add_run(
                RunRecord(kind="serve", source=SOURCE, model=self.model, config=self.config)
            )
        except (StoreError, OSError) as exc:
            self.error = f"--record {self.path}: {exc}"
            self._ready.set()
            return
        self._ready.set()
        try:
            while True:
                item = self.queue.get()
                if item is _STOP:
                    return
                if isinstance(item, threading.Event):
                    item.set()
                    continue
                try:
                    self._write(store, item)
                    self.written += 1
                except Exception as exc:  # a bad row must not stop recording
                    self.skipped += 1
                    logger.warning("ctk: trace recorder skipped an observation (%s)", exc)
        finally:
            store.close()

    def _write(self, store, obs: ToolObservation) -> None:
        from ctk.store import ProgramRecord, ToolCallRecord

        tool = obs.tool
        name = tool.name if tool is not None else None
        if tool is not None and tool.kind in ("bash", "hint") and tool.command:
            name = tool.command.split()[0]
        call = ToolCallRecord(
            program_id=obs.program_id,
            turn_index=obs.turn_index,
            source=SOURCE,
            tool_name=name,
            main_program=obs.keys[-2] if len(obs.keys) >= 2 else None,
            command_or_args=clip_command(tool.command) if tool is not None and tool.command else None,
            duration_s=obs.duration_s,
            start_unix_s=obs.finished_unix_s,
            end_unix_s=obs.finished_unix_s + obs.duration_s,
            provenance="serve:finish_to_next_arrival",
            context_tokens=obs.context_tokens,
            llm_output_tokens=obs.output_tokens,
        )
        if obs.program_id not in self._programs:
            self._programs.add(obs.program_id)
            prog = ProgramRecord(
                program_id=obs.program_id,
                source=SOURCE,
                run_id=self.run_id,
                model=self.model,
                start_unix_s=obs.finished_unix_s,
            )
            if store.add_programs([prog], tool_calls=[call]):
                return
        store.add_tool_call(call)
