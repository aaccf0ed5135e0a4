"""mini-swe-agent 2.x trajectories (``*.traj.json``) as trace-store records.

mini-swe-agent stamps ``extra.timestamp`` on each assistant message right after the LLM response and on
each observation message (role ``tool``, or ``user`` for the text-based models) right after the command
returned. So, per turn:

- tool-call duration = observation timestamp − assistant timestamp (for several actions in one turn the
  observations are stamped together after the last one: the first call gets the batch time, the others
  the rest, and all are flagged ``batched``);
- LLM latency = assistant timestamp − previous observation timestamp (unknown for the first turn);
- tokens from ``extra.response.usage``; exit status from ``extra.returncode``;
- a command killed by the environment's timeout (``TimeoutExpired``) is censored: it ran at least that long;
- the submit step ends the program without an observation: it is recorded with ``is_final`` and no
  duration.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ctk.datasets.agent_traces_csv import FormatError
from ctk.datasets.shell import split_command
from ctk.store import LLMCallRecord, ProgramRecord, ToolCallRecord
from ctk.wire import clip_command, is_timeout

TRAJ_SUFFIX = ".traj.json"
OBSERVATION_ROLES = ("tool", "user")


def is_trajectory_file(path: Path) -> bool:
    return path.name.endswith(TRAJ_SUFFIX)


def _usage(message: dict) -> dict[str, Any]:
    response = message.get("extra", {}).get("response")
    if not isinstance(response, dict):
        return {}
    usage = response.get("usage") or {}
    return usage if isinstance(usage, dict) else {}


def _cached_tokens(usage: dict) -> int | None:
    details = usage.get("prompt_tokens_details") or {}
    value = details.get("cached_tokens") if isinstance(details, dict) else None
    return int(value) if isinstance(value, int | float) else None


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def read_trajectory(
    path: Path, source: str = "mini-swe-agent"
) -> tuple[ProgramRecord, list[LLMCallRecord], list[ToolCallRecord]]:
    """Parse one trajectory file; raises :class:`FormatError` naming the reason when it is not valid."""
    raw = path.read_bytes()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path}: not valid JSON (truncated?): {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        raise FormatError(f"{path}: no 'messages' list: not a mini-swe-agent trajectory")
    messages = [m for m in data["messages"] if isinstance(m, dict)]
    info = data.get("info") if isinstance(data.get("info"), dict) else {}
    instance_id = data.get("instance_id") or path.name.removesuffix(TRAJ_SUFFIX)
    program_id = f"{instance_id}@{hashlib.sha1(raw).hexdigest()[:12]}"
    model_cfg = info.get("config", {}).get("model", {}) if isinstance(info.get("config"), dict) else {}
    model_name = model_cfg.get("model_name") if isinstance(model_cfg, dict) else None

    llm_calls: list[LLMCallRecord] = []
    tool_calls: list[ToolCallRecord] = []
    last_obs_ts: float | None = None
    turn = 0
    i = 0
    while i < len(messages):
        msg = messages[i]
        if msg.get("role") != "assistant":
            ts = msg.get("extra", {}).get("timestamp") if isinstance(msg.get("extra"), dict) else None
            if msg.get("role") in OBSERVATION_ROLES and isinstance(ts, int | float):
                last_obs_ts = float(ts)
            i += 1
            continue
        turn += 1
        extra = msg.get("extra") if isinstance(msg.get("extra"), dict) else {}
        ts = extra.get("timestamp")
        if not isinstance(ts, int | float):
            raise FormatError(f"{path}: assistant message of turn {turn} has no extra.timestamp")
        ts = float(ts)
        usage = _usage(msg)
        content = msg.get("content") if isinstance(msg.get("content"), str) else ""
        response = extra.get("response") if isinstance(extra.get("response"), dict) else {}
        choices = response.get("choices") or [{}]
        finish_reason = choices[0].get("finish_reason") if isinstance(choices[0], dict) else None
        llm_calls.append(
            LLMCallRecord(
                program_id=program_id,
                turn_index=turn,
                source=source,
                sent_unix_s=last_obs_ts,
                finished_unix_s=ts,
                latency_s=(ts - last_obs_ts) if last_obs_ts is not None else None,
                prompt_tokens=_int(usage.get("prompt_tokens")),
                completion_tokens=_int(usage.get("completion_tokens")),
                cached_tokens=_cached_tokens(usage),
                finish_reason=finish_reason,
                response_chars=len(content),
                provenance="traj_assistant_ts_minus_prev_observation_ts",
            )
        )
        actions = [a for a in extra.get("actions", []) if isinstance(a, dict)]
        # The observations of this turn are the tool/user messages that follow, up to the next assistant.
        j = i + 1
        observations = []
        exit_msg = None
        while j < len(messages) and messages[j].get("role") != "assistant":
            role = messages[j].get("role")
            obs_extra = messages[j].get("extra") if isinstance(messages[j].get("extra"), dict) else {}
            if role == "exit":
                exit_msg = messages[j]
            elif role in OBSERVATION_ROLES and "timestamp" in obs_extra and "returncode" in obs_extra:
                observations.append(messages[j])
            if role in OBSERVATION_ROLES and isinstance(obs_extra.get("timestamp"), int | float):
                last_obs_ts = float(obs_extra["timestamp"])  # the next turn's request starts after this
            j += 1
        prev_end = ts
        for k, action in enumerate(actions):
            command = action.get("command") if isinstance(action.get("command"), str) else None
            tool_name, main_program = split_command(command)
            base = dict(
                program_id=program_id,
                turn_index=turn,
                source=source,
                call_index=k,
                tool_name=tool_name,
                main_program=main_program,
                command_or_args=clip_command(command),
                context_tokens=_int(usage.get("prompt_tokens")),
                llm_output_tokens=_int(usage.get("completion_tokens")),
                llm_output_chars=len(content),
            )
            if k < len(observations):
                obs_extra = observations[k]["extra"]
                end = float(obs_extra["timestamp"])
                censored = is_timeout(obs_extra.get("exception_type"))
                flag = "timeout_censored" if censored else ("batched" if len(actions) > 1 else "ok")
                raw_output = obs_extra.get("raw_output")
                tool_calls.append(
                    ToolCallRecord(
                        **base,
                        duration_s=end - prev_end,  # negative: the store flags it impossible_duration
                        start_unix_s=prev_end,
                        end_unix_s=end,
                        exit_status="timeout" if censored else str(obs_extra.get("returncode")),
                        output_chars=len(raw_output) if isinstance(raw_output, str) else None,
                        censored=censored,
                        quality_flag=flag,
                        provenance="traj_observation_ts_minus_assistant_ts",
                    )
                )
                prev_end = end
            elif exit_msg is not None:
                # The environment raised Submitted: the program ends here, no observation, no duration.
                exit_status = (
                    exit_msg.get("extra", {}).get("exit_status")
                    if isinstance(exit_msg.get("extra"), dict)
                    else None
                )
                tool_calls.append(
                    ToolCallRecord(
                        **base,
                        duration_s=None,
                        start_unix_s=prev_end,
                        exit_status=exit_status,
                        is_final=True,
                        quality_flag="final_no_observation",
                        provenance="traj_submit_step",
                    )
                )
        i = j
    if turn == 0:
        raise FormatError(f"{path}: no assistant messages: nothing to import")

    start = min((c.sent_unix_s for c in llm_calls if c.sent_unix_s is not None), default=None)
    end_candidates = [c.finished_unix_s for c in llm_calls] + [
        t.end_unix_s for t in tool_calls if t.end_unix_s
    ]
    program = ProgramRecord(
        program_id=program_id,
        source=source,
        task_id=str(instance_id),
        dataset=data.get("dataset") if isinstance(data.get("dataset"), str) else None,
        agent=f"mini-swe-agent {info.get('mini_version', '')}".strip(),
        model=model_name,
        start_unix_s=start if start is not None else llm_calls[0].finished_unix_s,
        end_unix_s=max(e for e in end_candidates if e is not None),
        outcome=info.get("exit_status") or None,
        n_turns=turn,
        complete=True,
    )
    return program, llm_calls, tool_calls
