"""The store writer: a separate process that owns the trace store while a collection runs.

A DuckDB commit costs 1–2 ms of CPU and holds Python's GIL for much of it (more under contention), so
committing from a thread of the agent's process would slow the agent itself. The collectors therefore
only put records on a ``multiprocessing`` queue (a few microseconds) and this process commits them in
order. Records arriving within ``linger_s`` of each other are handled together: their tool calls share
one transaction (a program's rows are always written before its ``finish``).

Durability: every record that reached the queue is committed, also when the collecting process is
killed (the writer notices its parent is gone, drains the queue and exits). Ctrl-C in a terminal is
ignored here; the collector drains and closes the writer itself.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import signal
import time
from pathlib import Path
from typing import Any

from ctk.store import StoreError, TraceStore

_OPS = ("begin", "llm", "tool", "finish")
_POLL_S = 0.5


def open_store(path: str | Path, wait_s: float = 20.0, read_only: bool = False) -> TraceStore:
    """Open a trace store, waiting up to ``wait_s`` while another process still holds its lock."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return TraceStore(path, read_only=read_only)
        except StoreError as exc:
            if "lock" not in str(exc).lower() or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _apply(store: TraceStore, op: str, payload: Any) -> None:
    if op == "begin":
        store.begin_program(payload)
    elif op == "llm":
        store.add_llm_call(payload)
    elif op == "tools":
        store.add_tool_calls(payload)
    elif op == "finish":
        store.finish_program(**payload)
    else:
        raise ValueError(f"unknown write {op!r}")


def _writer_main(path: str, inbox: Any, outbox: Any, parent_pid: int, linger_s: float) -> None:
    from ctk.datasets.shell import split_command

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        store = open_store(path)
    except Exception as exc:  # report to the parent, which raises it
        outbox.put(("error", f"{type(exc).__name__}: {exc}"))
        return
    outbox.put(("ready",))
    errors: list[str] = []
    written = 0
    tools: list[Any] = []  # tool calls wait (at most linger_s) to share one transaction

    def write_tools() -> None:
        nonlocal written, tools
        if tools:
            written += _safe(store, "tools", tools, errors)
            tools = []

    try:
        while True:
            try:
                items = [inbox.get(timeout=linger_s if tools else _POLL_S)]
            except queue.Empty:
                write_tools()
                if os.getppid() != parent_pid:  # the collector died: everything it sent is written
                    break
                continue
            deadline = time.monotonic() + linger_s
            while len(items) < 1000:  # gather what arrives within the linger window
                try:
                    items.append(inbox.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            stop = False
            for item in items:
                if item is None:
                    stop = True
                    break
                op, payload = item
                if op == "tool":
                    if payload.tool_name is None and payload.command_or_args:
                        payload.tool_name, payload.main_program = split_command(payload.command_or_args)
                    tools.append(payload)
                elif op == "llm" or op == "begin":  # independent of pending tool rows: no need to wait
                    written += _safe(store, op, payload, errors)
                elif op == "flush":
                    write_tools()
                    outbox.put(("flushed", payload))
                else:  # finish: its program's rows first
                    write_tools()
                    written += _safe(store, op, payload, errors)
            write_tools()
            if stop:
                break
    finally:
        write_tools()
        store.close()
        outbox.put(("closed", errors, written, time.process_time()))


def _safe(store: TraceStore, op: str, payload: Any, errors: list[str]) -> int:
    try:
        _apply(store, op, payload)
        return len(payload) if op == "tools" else 1
    except Exception as exc:  # keep writing the rest; the collector reports these
        errors.append(f"store write {op} failed: {exc}")
        return 0


class StoreWriter:
    """Commits records to the trace store at ``path`` from a writer process, in submission order.

    The caller must not hold the store open for writing meanwhile (DuckDB allows one writing process).
    """

    def __init__(self, path: str | Path, start_timeout_s: float = 60.0, linger_s: float = 0.25):
        self.path = Path(path)
        ctx = mp.get_context("spawn")
        self._inbox = ctx.Queue()
        self._outbox = ctx.Queue()
        self._proc = ctx.Process(
            target=_writer_main,
            name="ctk-store-writer",
            daemon=False,
            args=(str(self.path), self._inbox, self._outbox, os.getpid(), linger_s),
        )
        self._proc.start()
        self.errors: list[str] = []
        self.n_written = 0
        self.cpu_s = 0.0  # CPU time the writer process used (known after close)
        self._flush_token = 0
        self._closed = False
        msg = self._receive(start_timeout_s)
        if msg[0] != "ready":
            self._proc.join(5)
            raise StoreError(msg[1] if len(msg) > 1 else f"{self.path}: the store writer did not start")

    def _receive(self, timeout: float | None) -> tuple:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                return self._outbox.get(timeout=_POLL_S)
            except queue.Empty:
                if not self._proc.is_alive():
                    with contextlib.suppress(queue.Empty):
                        return self._outbox.get(timeout=0.1)
                    return ("error", f"{self.path}: the store writer exited (code {self._proc.exitcode})")
                if deadline is not None and time.monotonic() > deadline:
                    return ("timeout",)

    def submit(self, op: str, payload: Any) -> None:
        """Queue one write: ``op`` is ``begin`` (ProgramRecord), ``llm``, ``tool`` or ``finish`` (kwargs)."""
        if op not in _OPS:
            raise ValueError(f"unknown write {op!r}")
        self._inbox.put((op, payload))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is committed; False on timeout."""
        self._flush_token += 1
        token = self._flush_token
        self._inbox.put(("flush", token))
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            msg = self._receive(left)
            if msg[0] == "flushed" and msg[1] == token:
                return True
            if msg[0] in ("timeout", "error"):
                return False
            if msg[0] == "closed":
                self._take_closed(msg)
                return False

    def _take_closed(self, msg: tuple) -> None:
        self.errors += list(msg[1])
        self.n_written = int(msg[2])
        self.cpu_s = float(msg[3])
        self._closed = True

    def close(self, timeout: float | None = None) -> None:
        """Commit everything queued, stop the writer, and collect its errors into :attr:`errors`."""
        if self._closed:
            return
        if self._proc.is_alive():
            self._inbox.put(None)
        while not self._closed:
            msg = self._receive(timeout)
            if msg[0] == "closed":
                self._take_closed(msg)
            elif msg[0] in ("timeout", "error"):
                self.errors.append(
                    msg[1] if len(msg) > 1 else f"{self.path}: the store writer did not finish"
                )
                self._closed = True
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
