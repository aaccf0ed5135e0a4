"""Timing wrappers and store writes shared by the collectors.

The agent's thread only takes clock readings and enqueues records; the writer process
(:class:`~ctk.collect.writer.StoreWriter`) commits them to the trace store in order, so DuckDB's commits
cost the agent nothing. A kill loses only records not yet handed over (normally none);
:meth:`StoreWriter.close` drains the queue on Ctrl-C and normal exit.

Durations come from ``time.monotonic()``; wall-clock ``*_unix_s`` stamps are stored alongside.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ctk.collect.writer import StoreWriter
from ctk.store import LLMCallRecord, ProgramRecord, ToolCallRecord
from ctk.wire import clip_command, is_timeout

log = logging.getLogger(__name__)


@dataclass
class Stamp:
    """A pair of clock readings: monotonic for durations, wall-clock for alignment."""

    mono: float
    unix: float

    @classmethod
    def now(cls) -> Stamp:
        return cls(time.monotonic(), time.time())


@dataclass
class ProgramRecorder:
    """Records one program (agent run) step by step through a :class:`StoreWriter`."""

    writer: StoreWriter
    program: ProgramRecord
    provenance: str = "ctk-collect"
    turn: int = -1
    last_prompt_tokens: int | None = None
    last_completion_tokens: int | None = None
    last_response_chars: int | None = None
    n_tool_calls: int = 0
    _call_index: int = 0
    _finished: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        if self.program.start_unix_s is None:
            self.program.start_unix_s = time.time()
        self.writer.submit("begin", self.program)

    @property
    def program_id(self) -> str:
        return self.program.program_id

    def next_turn(self) -> int:
        self.turn += 1
        self._call_index = 0
        return self.turn

    def llm_call(
        self,
        sent: Stamp,
        finished: Stamp,
        *,
        first_token: Stamp | None = None,
        usage: dict[str, Any] | None = None,
        finish_reason: str | None = None,
        response_chars: int | None = None,
        quality_flag: str = "ok",
        turn: int | None = None,
    ) -> LLMCallRecord:
        usage = usage or {}
        details = usage.get("prompt_tokens_details") or {}
        rec = LLMCallRecord(
            program_id=self.program_id,
            turn_index=self.turn if turn is None else turn,
            source=self.program.source,
            sent_unix_s=sent.unix,
            first_token_unix_s=first_token.unix if first_token else None,
            finished_unix_s=finished.unix,
            latency_s=finished.mono - sent.mono,
            ttft_s=(first_token.mono - sent.mono) if first_token else None,
            prompt_tokens=_int_or_none(usage.get("prompt_tokens")),
            completion_tokens=_int_or_none(usage.get("completion_tokens")),
            cached_tokens=_int_or_none(details.get("cached_tokens") if isinstance(details, dict) else None),
            finish_reason=finish_reason,
            response_chars=response_chars,
            quality_flag=quality_flag,
            provenance=self.provenance,
        )
        self.last_prompt_tokens = rec.prompt_tokens
        self.last_completion_tokens = rec.completion_tokens
        self.last_response_chars = response_chars
        self.writer.submit("llm", rec)
        return rec

    def tool_call(
        self,
        start: Stamp,
        end: Stamp,
        *,
        command: str | None,
        tool_name: str | None = None,
        exit_status: str | None = None,
        output_chars: int | None = None,
        censored: bool = False,
        injected: bool = False,
        is_final: bool = False,
        provenance: str | None = None,
        quality_flag: str = "ok",
        turn: int | None = None,
    ) -> ToolCallRecord:
        # a named tool (function call) is its own name; a shell command is named by the writer process
        # (split_command costs ~40 us, off the agent's path there)
        tool, main = (tool_name, tool_name) if tool_name is not None else (None, None)
        rec = ToolCallRecord(
            program_id=self.program_id,
            turn_index=self.turn if turn is None else turn,
            source=self.program.source,
            tool_name=tool,
            main_program=main,
            command_or_args=clip_command(command),
            duration_s=end.mono - start.mono,
            call_index=self._call_index,
            start_unix_s=start.unix,
            end_unix_s=end.unix,
            exit_status=exit_status,
            output_chars=output_chars,
            censored=censored,
            quality_flag=quality_flag,
            provenance=provenance or self.provenance,
            injected=injected,
            is_final=is_final,
            context_tokens=self.last_prompt_tokens,
            llm_output_tokens=self.last_completion_tokens,
            llm_output_chars=self.last_response_chars,
        )
        self._call_index += 1
        self.n_tool_calls += 1
        self.writer.submit("tool", rec)
        return rec

    def finish(self, outcome: str | None) -> None:
        """Mark the program complete (only call when the agent ended on its own terms)."""
        if self._finished:
            return
        self._finished = True
        self.writer.submit(
            "finish",
            {
                "program_id": self.program_id,
                "outcome": outcome,
                "end_unix_s": time.time(),
                "n_turns": self.turn + 1,
            },
        )


def _int_or_none(v: Any) -> int | None:
    try:
        return int(v) if v is not None else None
    except (TypeError, ValueError):
        return None


# -- mini-swe-agent wrappers (duck-typed: no mini-swe-agent import at module load) ---------------------


def _to_dict(obj: Any) -> dict:
    if obj is None:
        return {}
    if isinstance(obj, dict):
        return obj
    for name in ("model_dump", "dict"):
        fn = getattr(obj, name, None)
        if callable(fn):
            try:
                return fn()
            except Exception:  # noqa: S112 - try the next representation
                continue
    return {}


def _response_facts(message: dict) -> tuple[dict, str | None, int]:
    """(usage, finish_reason, response_chars) from a mini-swe-agent model message."""
    extra = message.get("extra") or {}
    response = _to_dict(extra.get("response"))
    usage = _to_dict(response.get("usage"))
    finish = None
    choices = response.get("choices") or []
    if choices:
        finish = _to_dict(choices[0]).get("finish_reason")
    chars = len(message.get("content") or "")
    for tc in message.get("tool_calls") or []:
        fn = _to_dict(tc).get("function") or {}
        chars += len(_to_dict(fn).get("arguments") or "")
    return usage, finish, chars


class RecordingModel:
    """Wraps a mini-swe-agent model: times ``query`` and passes program metadata to the endpoint.

    ``request_kwargs(turn)`` returns extra keyword arguments for the model's ``query`` (e.g. litellm's
    ``extra_body`` / ``extra_headers`` carrying the vLLM ``session_id`` and ``vllm_xargs``).
    """

    def __init__(
        self,
        model: Any,
        recorder: ProgramRecorder,
        request_kwargs: Callable[[int], dict[str, Any]] | None = None,
    ):
        self._model = model
        self._recorder = recorder
        self._request_kwargs = request_kwargs

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def query(self, messages: list[dict], **kwargs: Any) -> dict:
        rec = self._recorder
        turn = rec.next_turn()
        if self._request_kwargs is not None:
            kwargs = {**self._request_kwargs(turn), **kwargs}
        sent = Stamp.now()
        try:
            message = self._model.query(messages, **kwargs)
        except Exception as exc:
            end = Stamp.now()
            inner = (getattr(exc, "messages", None) or [None])[0]
            if type(exc).__name__ == "FormatError" and isinstance(inner, dict):
                usage, finish, chars = _response_facts(inner)
                rec.llm_call(
                    sent, end, usage=usage, finish_reason=finish or "format_error", response_chars=chars
                )
            else:
                rec.llm_call(sent, end, finish_reason="error", quality_flag="error")
            raise
        end = Stamp.now()
        usage, finish, chars = _response_facts(message)
        rec.llm_call(sent, end, usage=usage, finish_reason=finish, response_chars=chars)
        return message


class RecordingEnvironment:
    """Wraps a mini-swe-agent environment: times every ``execute`` call on the monotonic clock."""

    def __init__(self, env: Any, recorder: ProgramRecorder):
        self._env = env
        self._recorder = recorder

    def __getattr__(self, name: str) -> Any:
        return getattr(self._env, name)

    def execute(self, action: dict, *args: Any, **kwargs: Any) -> dict:
        command = action.get("command", "") if isinstance(action, dict) else str(action)
        start = Stamp.now()
        try:
            output = self._env.execute(action, *args, **kwargs)
        except Exception as exc:
            end = Stamp.now()
            if type(exc).__name__ == "Submitted":  # the submit step: ran fine, ends the program
                inner = (getattr(exc, "messages", None) or [{}])[0]
                self._recorder.tool_call(
                    start,
                    end,
                    command=command,
                    exit_status="0",
                    is_final=True,
                    output_chars=len(_to_dict(inner).get("content") or ""),
                )
            else:
                self._recorder.tool_call(
                    start, end, command=command, exit_status="error", quality_flag="error"
                )
            raise
        end = Stamp.now()
        extra = output.get("extra") or {}
        timed_out = is_timeout(extra.get("exception_type"))
        rc = output.get("returncode")
        self._recorder.tool_call(
            start,
            end,
            command=command,
            exit_status="timeout" if timed_out else (str(rc) if rc is not None else None),
            output_chars=len(output.get("output") or ""),
            censored=timed_out,
        )
        return output
