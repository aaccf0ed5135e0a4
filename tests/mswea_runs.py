"""Real mini-swe-agent runs for tests: its own DefaultAgent and LocalEnvironment running real commands.

The LLM is the only fake: mini-swe-agent's deterministic tool-call model, re-stamped at query time (its
``make_toolcall_output`` stamps when the script is built; a real model stamps right after the response).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

from minisweagent.agents.default import DefaultAgent
from minisweagent.environments.local import LocalEnvironment
from minisweagent.models.test_models import DeterministicToolcallModel, make_toolcall_output

SUBMIT = "echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT"


class TimedToolcallModel(DeterministicToolcallModel):
    def query(self, messages, **kwargs):
        out = copy.deepcopy(super().query(messages, **kwargs))
        out["extra"]["timestamp"] = time.time()
        return out


def script(commands: list[str]) -> list[dict]:
    outputs = []
    for i, cmd in enumerate(commands):
        call = {
            "id": f"call_{i}",
            "type": "function",
            "function": {"name": "bash", "arguments": json.dumps({"command": cmd})},
        }
        outputs.append(
            make_toolcall_output(f"step {i}", [call], [{"command": cmd, "tool_call_id": f"call_{i}"}])
        )
    return outputs


def run_agent(workdir: Path, commands: list[str], traj_path: Path, timeout_s: int = 30) -> dict:
    """Run mini-swe-agent over ``commands`` in ``workdir``; writes and returns the trajectory."""
    agent = DefaultAgent(
        TimedToolcallModel(outputs=script(commands)),
        LocalEnvironment(cwd=str(workdir), timeout=timeout_s),
        system_template="You are a test agent.",
        instance_template="Task: {{task}}",
        step_limit=len(commands) + 1,
        cost_limit=0,  # the test model bills 1.0 a call; no cost limit
        output_path=traj_path,
    )
    agent.run("make the test pass")
    return json.loads(traj_path.read_text())
