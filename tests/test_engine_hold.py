"""Held-back admission inside a real vLLM CPU engine (in-process, tiny model): a waiting request the rule's
admission gate holds back is skipped by vLLM's waiting loop although it fits, the requests behind it run,
and it is admitted once the gate lets it (ThunderAgent: a paused program, resumed only under its target)."""

from __future__ import annotations

import random

import pytest
from engine_fixtures import scheduler_of

from ctk.policy.pause import PausedProgram

pytestmark = pytest.mark.engine


@pytest.fixture
def sched(engine_llm, ttl_model_file):
    s = scheduler_of(engine_llm)
    s.ctk_reconfigure(policy="thunderagent")
    yield s
    s.ctk_reconfigure(policy="ttl", ttl_model=str(ttl_model_file))


def _add(llm, rid: str, program: str, rng: random.Random) -> None:
    from vllm import SamplingParams

    prompt = {"prompt_token_ids": [rng.randrange(10, 4000) for _ in range(200)]}
    params = SamplingParams(max_tokens=4, ignore_eos=True, extra_args={"program_id": program})
    llm.llm_engine.add_request(rid, prompt, params)


def _steps(llm, n: int) -> None:
    for _ in range(n):
        llm.llm_engine.step()


def test_a_paused_programs_request_waits_while_usage_is_above_the_resume_ceiling(engine_llm, sched):
    rng = random.Random(3)
    gate = sched.ctk.gate
    cap = gate.capacity_tokens
    assert cap == sched.ctk_door.total_blocks * sched.ctk_door.block_size > 0
    # a big program in a tool call keeps ThunderAgent's usage at 0.9: above the resume ceiling (0.85),
    # under the pause threshold (0.95); the program "held" is paused
    big = gate.programs["big"] = PausedProgram(tokens=int(cap * 0.9) - gate.buffer, steps=2, reasoning=False)
    big.acting_since = 1e12  # not idle (no expiry in this test)
    gate.used += gate._weight(big)
    gate.programs["small"] = PausedProgram(tokens=200, steps=2, reasoning=False)  # active, in a tool call
    gate.used += gate._weight(gate.programs["small"])
    gate.programs["held"] = PausedProgram(tokens=200, steps=1, reasoning=False)
    gate.programs["held"].paused = True
    gate.paused["held"] = None
    gate.next_tick = 0.0  # a tick at every step
    _add(engine_llm, "held-1", "held", rng)
    _add(engine_llm, "free-1", "free", rng)  # a new program while one is paused: paused too
    _add(engine_llm, "known-1", "small", rng)  # an active program's turn goes through
    _steps(engine_llm, 12)
    waiting = sorted(r.request_id.split("-")[0] for r in sched.waiting)  # vLLM suffixes the ids
    assert waiting == ["free", "held"]
    assert not any(rid.startswith("known") for rid in sched.requests)  # ran and finished
    free = sched.ctk_door.free_blocks()
    assert free > 2 * (200 // sched.ctk_door.block_size + 1)  # both fit: held back, not refused
    assert gate.usage() >= gate.pause_target
    # the big program ends: usage drops under the ceiling, the next tick resumes both; they run to the end
    gate.finished("big", 0, True, 0.0)
    while engine_llm.llm_engine.has_unfinished_requests():
        engine_llm.llm_engine.step()
    assert not gate.paused and gate.resumes >= 2
    assert not sched.requests and not sched.deferred_waiting
