"""The simulator's engine model: block pool (prefix cache, LRU of freed blocks, ref counts), batching,
preemption, and the fleet's routers."""

from __future__ import annotations

import pytest

from ctk.simulate.blocks import BlockPool
from ctk.simulate.engine import EngineConfig, SimEngine, SimRequest
from ctk.simulate.fleet import ConsistentHash, LeastLoaded, RoundRobin
from ctk.simulate.profiles import PREFILL_TERMS, HardwareProfile, load_profile


def flat_profile(step_s: float = 0.01, **kw) -> HardwareProfile:
    base = dict(
        name="flat",
        hardware="test",
        model="test",
        kv_blocks=64,
        block_size=4,
        max_num_batched_tokens=64,
        max_num_seqs=8,
        max_model_len=4096,
        step_overhead_s=step_s,
        linear_tokens=[0, 1000],
        linear_s=[0.0, 0.0],
        attn_prefill_s=0.0,
        attn_decode_s=0.0,
        decode_seq_s=0.0,
        rtt_s=0.0,
    )
    base.update(kw)
    return HardwareProfile(**base)


# -- block pool ------------------------------------------------------------------------------------------


def test_pool_prefix_hit_after_free_and_no_leak():
    pool = BlockPool(20, 4)
    a = pool.chain("a")
    pool.allocate(5)
    assert pool.num_free == 15
    pool.release(a, 0, 5, full_blocks=4)  # 4 full computed blocks keep their hash, the partial one does not
    assert pool.num_free == 20 and pool.queued == 4
    assert pool.cached_prefix(a, 10) == 4
    pool.touch(a, 3)
    assert pool.num_free == 17 and pool.queued == 1
    pool.check()
    pool.release(a, 3, 3, 3)
    pool.check()
    assert pool.num_free == 20


def test_pool_evicts_least_recently_freed_first_and_tail_first():
    pool = BlockPool(8, 4)
    a, b = pool.chain("a"), pool.chain("b")
    pool.allocate(4)
    pool.allocate(4)
    pool.release(a, 0, 4, 4)  # freed first: evicted first
    pool.release(b, 0, 4, 4)
    pool.allocate(2)  # two blocks: a's tail goes first
    assert pool.cached_prefix(a, 4) == 2
    assert pool.cached_prefix(b, 4) == 4
    pool.allocate(4)  # the rest of a, then b's tail
    assert pool.cached_prefix(a, 4) == 0
    assert pool.cached_prefix(b, 4) == 2
    assert pool.evicted == 6
    pool.check()


def test_pool_referenced_blocks_are_never_evicted():
    pool = BlockPool(6, 4)
    a = pool.chain("a")
    pool.allocate(4)
    pool.release(a, 0, 4, 4)
    pool.touch(a, 4)  # a running request references them again
    assert pool.num_free == 2
    pool.allocate(2)
    assert pool.cached_prefix(a, 4) == 4
    pool.check()
    # a second reference (a pin and the next turn): one release keeps them out of the free queue
    pool.touch(a, 4)
    pool.release(a, 4, 4, 4)
    assert pool.num_free == 0
    pool.release(a, 4, 4, 4)
    assert pool.num_free == 4
    pool.check()


def test_pool_held_request_and_next_turn_share_the_prefix_but_not_the_partial_tail():
    pool = BlockPool(12, 4)
    a = pool.chain("a")
    pool.allocate(3)  # turn 1: 2 full blocks + a partial tail
    pool.promote(a, 0, 2)  # finished and pinned: its full blocks get their hash
    pool.touch(a, 2)  # turn 2 hits them ...
    pool.allocate(4)  # ... and computes its own blocks from position 2 on (the tail is not shared)
    assert pool.num_free == 12 - 3 - 4
    pool.release(a, 2, 3, 2)  # the pin goes: its partial tail is freed, the shared blocks stay referenced
    assert pool.num_free == 6
    pool.release(a, 2, 6, 5)  # turn 2 finishes
    pool.check()
    assert pool.num_free == 12 and pool.cached_prefix(a, 10) == 5


# -- scheduler -------------------------------------------------------------------------------------------


def run_until_idle(
    engine: SimEngine, now: float = 0.0, limit: int = 10_000
) -> tuple[float, list[SimRequest]]:
    done = []
    for _ in range(limit):
        if engine.idle:
            return now, done
        dt = engine.begin_step(now)
        assert dt is not None, "engine stuck"
        now += dt
        done += engine.end_step(now)
    raise AssertionError("did not finish")


def test_second_turn_hits_the_prefix_of_the_first():
    e = SimEngine(EngineConfig(num_blocks=64, block_size=4, max_num_batched_tokens=64), flat_profile())
    r1 = SimRequest("p-0", "p", 30, 5, None)
    e.add(r1, 0.0)
    now, done = run_until_idle(e)
    assert done == [r1] and r1.num_output == 5 and r1.cached_tokens == 0
    r2 = SimRequest("p-1", "p", 30 + 5 + 6, 3, None)  # prompt = previous prompt + output + observation
    e.add(r2, now)
    run_until_idle(e, now)
    # full blocks of the 34 computed tokens: 8 blocks = 32 tokens
    assert r2.cached_tokens == 32
    e.pool.check()
    assert e.pool.num_free == 64


def test_every_agents_system_prompt_stays_resident():
    """One resident system prompt per agent (``shared_prefixes``): the pool keeps them all out of use, and a
    request still skips only its own prompt's blocks (each starts with one of them)."""
    base = dict(num_blocks=64, block_size=4, max_num_batched_tokens=64, shared_prefix_tokens=8)
    one = SimEngine(EngineConfig(**base), flat_profile())
    three = SimEngine(EngineConfig(**base, shared_prefixes=3), flat_profile())
    assert one.pool.num_free == 62 and three.pool.num_free == 58
    for e in (one, three):
        r = SimRequest("p-0", "p", 30, 5, None)
        e.add(r, 0.0)
        run_until_idle(e)
        e.pool.check()
    assert one.pool.num_free == 62 and three.pool.num_free == 58  # nothing left behind either way


def test_a_comparisons_simulation_keeps_as_many_system_prompts_as_its_replay_sent():
    from ctk.measure.presets import bench_config
    from ctk.measure.workload import ProgramSpec
    from ctk.simulate.run import comparison_sim_config

    specs = [ProgramSpec(f"p{i}", source=src, first_prompt_tokens=200) for i, src in enumerate("aab")]
    cfg = bench_config()
    prof = load_profile("cpu", "tiny")
    assert comparison_sim_config(cfg, prof, programs=specs).shared_prefixes == 2
    cfg.workload.system_prompt_per_source = False
    assert comparison_sim_config(cfg, prof, programs=specs).shared_prefixes == 1


def test_token_budget_chunks_a_long_prefill_and_running_goes_first():
    e = SimEngine(EngineConfig(num_blocks=200, block_size=4, max_num_batched_tokens=16), flat_profile())
    long = SimRequest("long", "a", 40, 2, None)
    e.add(long, 0.0)
    e.begin_step(0.0)
    assert long.num_computed == 0 and e._scheduled == [(long, 16)]
    e.end_step(0.01)
    short = SimRequest("short", "b", 4, 2, None)
    e.add(short, 0.01)
    e.begin_step(0.01)
    # the running prefill takes the whole budget: the new request waits
    assert e._scheduled == [(long, 16)] and list(e.waiting) == [short]


def test_waiting_loop_stops_at_the_first_request_that_does_not_fit():
    e = SimEngine(EngineConfig(num_blocks=10, block_size=4, max_num_batched_tokens=100), flat_profile())
    big = SimRequest("big", "a", 36, 4, None)  # 9 blocks of 10
    e.add(big, 0.0)
    e.begin_step(0.0)
    e.end_step(0.01)
    too_big = SimRequest("too-big", "b", 12, 1, None)  # 3 blocks: does not fit the 1 left
    tiny = SimRequest("tiny", "c", 2, 1, None)  # would fit, but stands behind
    e.add(too_big, 0.01)
    e.add(tiny, 0.01)
    e.begin_step(0.01)
    assert [r.request_id for r in e.waiting] == ["too-big", "tiny"]


def test_recompute_preemption_of_the_last_running_request():
    e = SimEngine(EngineConfig(num_blocks=10, block_size=4, max_num_batched_tokens=100), flat_profile())
    a = SimRequest("a", "a", 11, 20, None)  # 3 blocks, grows to 8: both cannot finish together
    b = SimRequest("b", "b", 11, 20, None)
    e.add(a, 0.0)
    e.add(b, 0.0)
    now, done = run_until_idle(e)
    assert {r.request_id for r in done} == {"a", "b"}
    assert b.preemptions >= 1 and a.preemptions == 0  # the later one (last in the running list) is the victim
    assert e.preemptions == b.preemptions
    e.pool.check()
    assert e.pool.num_free == 10


def test_fused_decode_steps_give_the_same_result():
    def run(fused: int):
        prof = flat_profile(step_s=0.01, decode_seq_s=0.001)
        e = SimEngine(EngineConfig(num_blocks=400, block_size=4, max_fused_steps=fused), prof)
        reqs = [SimRequest(f"r{i}", f"p{i}", 10 + i, 50 + 7 * i, None) for i in range(4)]
        for r in reqs:
            e.add(r, 0.0)
        now, _ = run_until_idle(e)
        return now, [r.finish_s for r in reqs], e.steps

    t1, f1, s1 = run(1)
    t2, f2, s2 = run(64)
    assert s1 == s2
    assert t2 == pytest.approx(t1, rel=1e-9)
    assert f2 == pytest.approx(f1, rel=1e-9)


# -- profiles and routers --------------------------------------------------------------------------------


def test_bundled_gpu_profiles_are_in_the_published_range():
    p8 = load_profile("h100", "llama-3.1-8b")
    assert 350_000 < p8.kv_tokens < 450_000  # ~400k tokens of KV on one H100 (CONTEXT.md §6)
    assert 0.4 < p8.prefill_time_s(20_000) < 2.0  # 20k-token prefill: about a second
    assert 0.005 < p8.step_s(0, 0.0, 32, 32 * 2000) < 0.05  # decode step at batch 32
    p70 = load_profile("h100x4", "llama-3.1-70b")
    assert p70.prefill_time_s(20_000) > p8.prefill_time_s(20_000)
    for p in (p8, p70):
        assert set(p.sources) >= {"linear_s", "kv_blocks", "attn_prefill_s", "attn_decode_s"}


def test_routers():
    engines = [SimEngine(EngineConfig(num_blocks=16, block_size=4), flat_profile()) for _ in range(3)]
    rr = RoundRobin()
    assert [rr.route("p", engines) for _ in range(4)] == [0, 1, 2, 0]
    ch = ConsistentHash(3)
    owners = {ch.route(f"prog-{i}", engines) for i in range(60)}
    assert owners == {0, 1, 2}
    assert all(ch.route("prog-7", engines) == ch.route("prog-7", engines) for _ in range(3))
    engines[0].add(SimRequest("x", "x", 4, 1, None), 0.0)
    assert LeastLoaded().route("p", engines) == 1


def test_profile_recalibration_to_a_measured_speed():
    p = load_profile("cpu", "tiny")
    assert p.speed_factor(p.prefill_profile()) == pytest.approx(1.0, rel=1e-3)
    slow = p.scaled(2.5, "test")
    assert slow.step_s(300, 300 * 150.0, 4, 4000) == pytest.approx(2.5 * p.step_s(300, 300 * 150.0, 4, 4000))
    assert slow.rtt_s == p.rtt_s and "scaled" in slow.sources
    # a measurement of prefill recalibrates prefill's work, not the step overhead or decode
    slow = p.scaled(2.5, "test", PREFILL_TERMS)
    assert p.speed_factor(slow.prefill_profile()) == pytest.approx(2.5, rel=1e-3)
    assert slow.step_s(0, 0.0, 4, 4000) == pytest.approx(p.step_s(0, 0.0, 4, 4000) + 1.5 * p.linear(4))
    assert slow.step_s(1024, 1024 * 512.0, 0, 0) - p.step_overhead_s == pytest.approx(
        2.5 * (p.step_s(1024, 1024 * 512.0, 0, 0) - p.step_overhead_s)
    )
