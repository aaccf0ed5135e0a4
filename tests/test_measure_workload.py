"""Replay workloads synthesised from real traces: shape, caps, determinism, bad input."""

from __future__ import annotations

import dataclasses

import pytest

from ctk.measure.workload import WorkloadConfig, WorkloadError, load_programs, synthetic_ids
from ctk.store import LLMCallRecord, ProgramRecord, ToolCallRecord, TraceStore
from tests.measure_fixtures import MSWEA_SOURCE


def _store_with(tmp_path, turns: list[tuple[float | None, int | None]]) -> TraceStore:
    """One program; each turn (duration or None for no tool call, observation chars)."""
    store = TraceStore(tmp_path / "t.duckdb")
    llm, tools = [], []
    for k, (dur, obs) in enumerate(turns):
        llm.append(LLMCallRecord("p1", k, "s", response_chars=400))
        if dur is not None:
            tools.append(ToolCallRecord("p1", k, "s", "python", "python", f"python run{k}.py", dur,
                                        output_chars=obs))
    store.add_programs([ProgramRecord("p1", "s")], llm, tools)
    return store


def test_turn_sizes_pauses_and_last_turn_come_from_the_trace(tmp_path):
    with _store_with(tmp_path, [(0.5, 400), (None, None), (3.0, 40_000), (1.0, 8)]) as store:
        cfg = WorkloadConfig(n_programs=None, token_scale=0.5, max_observation_tokens=300, max_pause_s=2.0,
                             min_turns=2)
        (p,) = load_programs(store, cfg)
    assert [t.turn_index for t in p.turns] == [0, 1, 2, 3]
    # 400 response chars / 4 chars per token x 0.5
    assert [t.output_tokens for t in p.turns] == [50, 50, 50, 50]
    # 400 obs chars -> 50 tokens; a turn without a tool call -> default; 40k chars capped at 300
    assert [t.observation_tokens for t in p.turns[:3]] == [50, cfg.default_observation_tokens, 300]
    assert [t.tool_duration_s for t in p.turns[:3]] == [0.5, 0.0, 2.0]  # no tool: no pause; 3 s capped at 2
    assert p.turns[0].tool == "python run0.py" and p.turns[1].tool is None
    last = p.turns[-1]
    assert last.last_turn and last.tool_duration_s == 0 and last.observation_tokens == 0 and last.tool is None
    assert not any(t.last_turn for t in p.turns[:-1])


def test_context_cap_cuts_the_program_and_marks_the_new_last_turn(tmp_path):
    with _store_with(tmp_path, [(0.1, 4000)] * 10) as store:
        cfg = WorkloadConfig(n_programs=None, system_prompt_tokens=100, task_prompt_tokens=100,
                             max_context_tokens=1500, max_observation_tokens=1000)
        (p,) = load_programs(store, cfg)
    assert 2 <= len(p.turns) < 10
    assert p.final_context_tokens <= cfg.max_context_tokens
    assert p.turns[-1].last_turn


def test_sample_is_seeded_and_stable(sample_store):
    cfg = WorkloadConfig(n_programs=5, seed=3, sources=[MSWEA_SOURCE])
    with TraceStore(sample_store, read_only=True) as store:
        a = load_programs(store, cfg)
        b = load_programs(store, cfg)
        c = load_programs(store, WorkloadConfig(n_programs=5, seed=4, sources=[MSWEA_SOURCE]))
    assert [p.program_id for p in a] == [p.program_id for p in b]
    assert [p.program_id for p in a] != [p.program_id for p in c]
    assert all(p.source == MSWEA_SOURCE for p in a)
    for p in a:
        assert len(p.turns) >= cfg.min_turns and len(p.turns) <= cfg.max_turns
        assert all(cfg.min_output_tokens <= t.output_tokens <= cfg.max_output_tokens for t in p.turns)
        assert p.final_context_tokens <= cfg.max_context_tokens


def test_synthetic_ids_are_a_pure_function_of_seed_and_key():
    cfg = WorkloadConfig(seed=1, token_id_low=10, token_id_high=20)
    a = synthetic_ids(cfg, 50, "prog", 3, "obs")
    assert a == synthetic_ids(cfg, 50, "prog", 3, "obs")
    assert a != synthetic_ids(cfg, 50, "prog", 4, "obs")
    assert all(10 <= x < 20 for x in a)
    assert synthetic_ids(cfg, 0, "x") == []


def test_first_prompts_share_their_agents_system_prompt_and_agents_differ():
    """Programs of one source start with one system prompt, another source's differs (the engine can tell
    agents apart by the prompt's prefix when the replay sends no agent name: ``send_agent=False``)."""
    from ctk.measure.workload import ProgramSpec, TurnSpec, first_prompt_ids, replay_xargs

    cfg = WorkloadConfig(seed=1, system_prompt_tokens=64)
    specs = [ProgramSpec(f"p{i}", source=src, first_prompt_tokens=200) for i, src in enumerate("aab")]
    a1, a2, b = (first_prompt_ids(cfg, s) for s in specs)
    assert len(a1) == len(b) == 200
    assert a1[:64] == a2[:64] != b[:64] and a1[64:] != a2[64:]
    turn = TurnSpec(turn_index=0, output_tokens=4, observation_tokens=4, tool_duration_s=1.0, tool="ls")
    assert replay_xargs("r", turn, 1.0, False, first_turn=True, agent="a")["agent"] == "a"
    assert "agent" not in replay_xargs("r", turn, 1.0, False, first_turn=True, agent=None)


def test_one_system_prompt_for_all_when_not_per_source_and_the_count_the_simulator_keeps():
    """``system_prompt_per_source=False`` replays as before 2026-12-07 (one system prompt for every program);
    :func:`system_prompts` counts the distinct prompts a replay sends, the prefixes the simulator keeps
    resident (``SimConfig.shared_prefixes``)."""
    from ctk.measure.workload import ProgramSpec, first_prompt_ids, system_prompts

    specs = [ProgramSpec(f"p{i}", source=src, first_prompt_tokens=200) for i, src in enumerate("aab")]
    shared = WorkloadConfig(seed=1, system_prompt_tokens=64, system_prompt_per_source=False)
    a1, a2, b = (first_prompt_ids(shared, s) for s in specs)
    assert a1[:64] == a2[:64] == b[:64] and a1[64:] != b[64:]
    assert system_prompts(shared, specs) == 1
    per_source = WorkloadConfig(seed=1, system_prompt_tokens=64)
    assert system_prompts(per_source, specs) == 2 and system_prompts(per_source, specs[:2]) == 1


def test_empty_or_unusable_store_gives_a_clear_error(tmp_path):
    with TraceStore(tmp_path / "empty.duckdb") as store, pytest.raises(WorkloadError, match="no LLM or tool"):
        load_programs(store, WorkloadConfig())
    with _store_with(tmp_path, [(0.1, 10)]) as store, pytest.raises(WorkloadError, match="no program has 2"):
        load_programs(store, WorkloadConfig())  # one turn only
    with pytest.raises(WorkloadError):
        WorkloadConfig(token_id_low=5, token_id_high=5).validate()


def test_long_pause_selection_takes_the_programs_with_the_most_long_pause_time(sample_store):
    base = WorkloadConfig(n_programs=None, sources=[MSWEA_SOURCE], max_turns=8, max_pause_s=30.0)
    with TraceStore(sample_store, read_only=True) as store:
        every = load_programs(store, base)
        longest = dataclasses.replace(base, n_programs=3, long_pause_s=2.0)
        picked, again = load_programs(store, longest), load_programs(store, longest)
    totals = sorted((p.long_pause_total_s(2.0) for p in every), reverse=True)
    assert totals[2] > 0  # the sample has long pauses to choose by
    assert [p.long_pause_total_s(2.0) for p in picked] == totals[:3]  # longest first
    assert [p.program_id for p in picked] == [p.program_id for p in again]
    assert all(p.turns[k].tool_duration_s <= 30.0 for p in picked for k in range(len(p.turns)))
    with pytest.raises(WorkloadError, match="long_pause_s"):
        WorkloadConfig(long_pause_s=-1.0).validate()
