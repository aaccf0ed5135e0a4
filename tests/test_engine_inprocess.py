"""The ctk scheduler inside a real vLLM CPU engine (in-process ``vllm.LLM``, tiny model, 63 KV blocks)."""

from __future__ import annotations

import random
import time

import pytest
from engine_fixtures import LONG_TTL_KEY, SHORTEST_TTL_KEY, TEST_TTLS, scheduler_of

pytestmark = pytest.mark.engine

PROMPT = 1500  # tokens: 11 full blocks of 128 (93 of 16) + a partial one


@pytest.fixture
def sched(engine_llm, ttl_model_file):
    s = scheduler_of(engine_llm)
    s.ctk_reconfigure(policy="ttl", ttl_model=str(ttl_model_file), max_pin_share=0.5, online=False)
    yield s
    s.ctk_reconfigure(policy="ttl", ttl_model=str(ttl_model_file))  # releases whatever a test left


def toks(rng: random.Random, n: int = PROMPT) -> list[int]:
    return [rng.randrange(10, 4000) for _ in range(n)]


def params(max_tokens: int = 4, **xargs):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, extra_args=xargs or None)


def gen(llm, prompts, sps):
    return llm.generate([{"prompt_token_ids": p} for p in prompts], sps, use_tqdm=False)


def free_blocks(s) -> int:
    return s.kv_cache_manager.block_pool.get_num_free_blocks()


def all_blocks(s) -> int:
    return s.kv_cache_manager.block_pool.num_gpu_blocks - 1  # minus the null block


def turn_blocks(s, tokens: int = PROMPT + 4) -> int:
    """KV blocks of one turn (a PROMPT-token prompt and 4 output tokens): 12 of 128 tokens, 94 of 16."""
    return -(-tokens // s.block_size)


def next_turn(prompt, out, rng, extra=60):
    return prompt + list(out.outputs[0].token_ids) + toks(rng, extra)


def flood(llm, rng, n=12):
    """Enough distinct prompts (n x 12 blocks) to cycle the whole prefix cache (63 blocks)."""
    gen(llm, [toks(rng) for _ in range(n)], params(2))


def test_prefix_survives_a_flood_with_ttl_and_is_evicted_with_stock(engine_llm, sched):
    cached = {}
    for policy, seed in (("vllm", 1), ("ttl", 2)):
        sched.ctk_reconfigure(policy=policy)
        rng = random.Random(seed)
        a1 = toks(rng)
        out = gen(engine_llm, [a1], params(program_id=f"A-{policy}", tool=LONG_TTL_KEY))[0]
        assert len(sched.ctk_pinned_request_ids()) == (1 if policy == "ttl" else 0)
        flood(engine_llm, rng)
        a2 = next_turn(a1, out, rng)
        out2 = gen(engine_llm, [a2], params(program_id=f"A-{policy}", tool=LONG_TTL_KEY))[0]
        cached[policy] = out2.num_cached_tokens
    assert cached["vllm"] == 0  # stock: the flood evicted A's prefix
    bs = sched.block_size
    assert cached["ttl"] >= (PROMPT // bs) * bs  # ctk: every full block of A's first turn hit
    assert sched.ctk.stats.pin_hits == 1 and sched.ctk.stats.releases.get("hit") == 1


def test_expiry_frees_the_blocks_even_without_engine_steps(engine_llm, sched):
    rng = random.Random(3)
    before = free_blocks(sched)
    gen(engine_llm, [toks(rng)], params(program_id="E", tool=SHORTEST_TTL_KEY))
    assert sched.ctk_pinned_request_ids() and sched.ctk.pinned_blocks == turn_blocks(sched)
    assert free_blocks(sched) == before - turn_blocks(sched)
    time.sleep(TEST_TTLS[SHORTEST_TTL_KEY] + 0.2)
    sched.has_requests()  # what the idle engine loop asks: it must run the expiry
    assert sched.ctk_pinned_request_ids() == [] and sched.ctk.pinned_blocks == 0
    assert free_blocks(sched) == before
    assert sched.ctk.stats.releases.get("expired") == 1


def test_a_pin_counts_only_the_blocks_nobody_else_holds(engine_llm, sched):
    """Two programs with a common 4-block prefix (a shared system prompt): the second pin costs only its own
    blocks, so the budget and the price see memory held once, not once per pin."""
    rng = random.Random(5)
    shared = 4 * sched.block_size
    system = toks(rng, shared)
    gen(engine_llm, [system + toks(rng, PROMPT - shared)], params(program_id="S1", tool=LONG_TTL_KEY))
    gen(engine_llm, [system + toks(rng, PROMPT - shared)], params(program_id="S2", tool=LONG_TTL_KEY))
    first, second = (p for p in sched.ctk.pins.values() if p.program_id in ("S1", "S2"))
    n = turn_blocks(sched)
    assert (first.blocks, second.blocks) == (n, n - 4)  # the prefix was the first pin's when S2 finished
    assert sched.ctk.pinned_blocks == 2 * n - 4 and free_blocks(sched) == all_blocks(sched) - (2 * n - 4)


def test_abort_of_the_next_turn_frees_the_pin(engine_llm, sched):
    rng = random.Random(4)
    out = gen(engine_llm, [a1 := toks(rng)], params(program_id="B", tool=LONG_TTL_KEY))[0]
    assert sched.ctk.pinned_blocks == turn_blocks(sched)
    eng = engine_llm.llm_engine
    eng.add_request(
        "b-turn-2", {"prompt_token_ids": next_turn(a1, out, rng)}, params(program_id="B", tool=LONG_TTL_KEY)
    )
    eng.abort_request(["b-turn-2"])
    while eng.has_unfinished_requests():
        eng.step()
    assert sched.ctk.pinned_blocks == 0 and sched.ctk.stats.releases.get("abort") == 1
    assert free_blocks(sched) == all_blocks(sched)


def test_last_turn_and_final_answers_never_pin(engine_llm, sched):
    rng = random.Random(5)
    gen(engine_llm, [toks(rng)], params(program_id="L", tool=LONG_TTL_KEY, last_turn=True))
    gen(engine_llm, [toks(rng)], params(program_id="M"))  # no hint, random text: no tool call
    gen(engine_llm, [toks(rng)], params(tool=LONG_TTL_KEY))  # no program id
    assert sched.ctk_pinned_request_ids() == [] and sched.ctk.stats.pins_created == 0
    assert free_blocks(sched) == all_blocks(sched)


def test_tool_call_is_detected_from_real_output_tokens(engine_llm, sched):
    tok = engine_llm.get_tokenizer()

    class Fake:
        output_token_ids = tok.encode("THOUGHT: list\n```bash\nls -la /repo\n```", add_special_tokens=False)

    from ctk.policy.detect import detect_tool_call

    assert detect_tool_call(sched.ctk_door.text_of(Fake())).command == "ls -la /repo"


@pytest.mark.parametrize("policy", ["ttl", "continuum"])
def test_more_pins_than_memory_all_complete_and_pins_go_before_preemption(engine_llm, sched, policy):
    """8 programs x 12 pinned blocks > 63 blocks: pins are released (by the price as soon as memory keeps a
    request out, or by the valve when an allocation fails, Continuum's only way); no preemption with pins."""
    sched.ctk_reconfigure(policy=policy, max_pin_share=1.0, continuum_ttl_s=30.0)
    preempted_with_pins = []
    orig = sched._preempt_request

    def spy(request, *a, **kw):
        preempted_with_pins.append(len(sched.ctk.pins))
        return orig(request, *a, **kw)

    sched._preempt_request = spy
    try:
        rng = random.Random(6)
        firsts = [toks(rng) for _ in range(8)]
        # one at a time: nothing waits, so memory is free to price and every turn pins (30 s) until the valve
        # must make room for the next admission
        outs = [
            gen(engine_llm, [f], params(program_id=f"P{i}", tool=LONG_TTL_KEY))[0]
            for i, f in enumerate(firsts)
        ]
        assert all(len(o.outputs[0].token_ids) == 4 for o in outs)
        assert sched.ctk.stats.pins_created == 8
        released = sched.ctk.stats.releases
        assert released.get("pressure", 0) + released.get("price", 0) >= 3  # 8 x 12 blocks > 63
        if policy == "continuum":  # no price: the valve did it
            assert released.get("pressure", 0) >= 3
        assert sched.ctk.pinned_blocks <= all_blocks(sched)
        seconds = [next_turn(p, o, rng) for p, o in zip(firsts, outs, strict=True)]
        outs2 = gen(engine_llm, seconds, [params(12, program_id=f"P{i}", last_turn=True) for i in range(8)])
        assert all(len(o.outputs[0].token_ids) == 12 for o in outs2)
    finally:
        del sched._preempt_request
    assert all(n == 0 for n in preempted_with_pins)
    assert sched.ctk.pinned_blocks == 0 and free_blocks(sched) == all_blocks(sched)


def admission_order(llm, sched, tag):
    """Admission order of a newer program's request vs a later turn of an older program, slots busy."""
    eng = llm.llm_engine
    rng = random.Random(7)
    eng.add_request(f"{tag}old-1", {"prompt_token_ids": toks(rng, 200)}, params(1, program_id=f"{tag}old"))
    while eng.has_unfinished_requests():
        eng.step()
    admitted = []

    def spy(*args, **kwargs):  # what vLLM admits, whatever the policy
        out = type(sched).schedule(sched, *args, **kwargs)
        admitted.extend(new.req_id for new in out.scheduled_new_reqs)
        return out

    sched.schedule = spy
    for i in (1, 2):
        prompt = {"prompt_token_ids": toks(rng, 200)}
        eng.add_request(f"{tag}blocker-{i}", prompt, params(24, program_id=f"{tag}x{i}"))
    eng.step()  # both blockers run: the 2 slots are busy
    eng.add_request(f"{tag}new-1", {"prompt_token_ids": toks(rng, 200)}, params(1, program_id=f"{tag}new"))
    eng.add_request(f"{tag}old-2", {"prompt_token_ids": toks(rng, 200)}, params(1, program_id=f"{tag}old"))
    while eng.has_unfinished_requests():
        eng.step()
    del sched.schedule
    # the engine appends a random suffix to request ids
    return [r[len(tag) :].split("-")[0] for r in admitted if r.startswith((f"{tag}new-1", f"{tag}old-2"))]


def test_program_fcfs_admits_older_programs_first(engine_llm, sched):
    """With both running slots busy, a later turn of an older program overtakes a newer program."""
    sched.ctk_reconfigure(age_min_s=60.0)  # keep the age bound out of this test
    assert admission_order(engine_llm, sched, "ctk-") == ["old", "new"]
    sched.ctk_reconfigure(policy="continuum", age_min_s=60.0)
    assert admission_order(engine_llm, sched, "cont-") == ["old", "new"]
    sched.ctk_reconfigure(policy="vllm")  # stock order: arrival
    assert admission_order(engine_llm, sched, "stock-") == ["new", "old"]


def test_random_workload_with_aborts_leaks_nothing(engine_llm, sched):
    eng = engine_llm.llm_engine
    rng = random.Random(8)
    live: dict[str, int] = {}
    n = 0
    for _ in range(60):
        r = rng.random()
        if r < 0.5:
            n += 1
            rid = f"rw-{n}"
            prog = f"rw-prog-{rng.randrange(6)}"
            key = rng.choice([SHORTEST_TTL_KEY, SHORTEST_TTL_KEY, "make", None])
            xargs = {"program_id": prog, "last_turn": rng.random() < 0.15}
            if key:
                xargs["tool"] = key
            eng.add_request(
                rid,
                {"prompt_token_ids": toks(rng, rng.randrange(100, 1200))},
                params(rng.randrange(1, 12), **xargs),
            )
            live[rid] = 1
        elif r < 0.65 and live:
            victim = rng.choice(sorted(live))
            eng.abort_request([victim])
            live.pop(victim)
        for out in eng.step():
            if out.finished:
                live.pop(out.request_id, None)
    while eng.has_unfinished_requests():
        for out in eng.step():
            live.pop(out.request_id, None)
    assert sched.ctk.stats.pins_created > 0
    assert sched.ctk.pinned_blocks == sum(p.blocks for p in sched.ctk.pins.values())
    time.sleep(TEST_TTLS[SHORTEST_TTL_KEY] + 0.2)  # the longest TTL used here
    sched.has_requests()
    assert sched.ctk.pins == {} and sched.ctk_pinned_request_ids() == []
    assert free_blocks(sched) == all_blocks(sched)  # no leaked blocks
    assert sched.requests == {}


def test_async_scheduler_pins_and_hits_through_the_same_mixin(engine_llm, sched):
    """The GPU default ``AsyncScheduler`` (CPU forces sync) built on the live engine's configuration and
    driven at its hooks without a model: admission, a natural finish pinned, the next turn's hit."""
    from vllm.v1.request import Request, RequestStatus

    from ctk.engine_patch.emulation import engine_config
    from ctk.engine_patch.scheduler import CTKAsyncScheduler

    live = engine_llm.llm_engine.engine_core.engine_core
    s = CTKAsyncScheduler(
        vllm_config=engine_config(sched.vllm_config, async_scheduling=True),
        kv_cache_config=sched.kv_cache_config,
        structured_output_manager=sched.structured_output_manager,
        block_size=sched.block_size,
    )
    s.ctk_reconfigure(policy="ttl", ttl_model=sched.ctk.config.ttl_model, online=False)
    assert type(s.waiting).__name__ == "KeyedRequestQueue" and s.ctk_door.total_blocks == all_blocks(s)
    rng = random.Random(9)
    first = toks(rng)

    def request(rid, prompt):
        sp = params(4, program_id="AS", tool=LONG_TTL_KEY)
        return Request(rid, prompt, sp, None, block_hasher=live.request_block_hasher)

    s.add_request(request("as-1", first))
    out = s.schedule()
    assert [n.req_id for n in out.scheduled_new_reqs] == ["as-1"]
    s.finish_requests("as-1", RequestStatus.FINISHED_STOPPED)
    assert s.ctk_pinned_request_ids() == ["as-1"] and "as-1" not in s.requests
    assert free_blocks(s) == all_blocks(s) - -(-PROMPT // s.block_size)  # the pinned turn's blocks stay
    s.add_request(request("as-2", first + toks(rng, 60)))
    out = s.schedule()
    bs = s.block_size
    assert out.scheduled_new_reqs[0].num_computed_tokens == (PROMPT // bs) * bs  # the pinned prefix
    assert s.ctk.stats.pin_hits == 1 and s.ctk_pinned_request_ids() == []
    s.finish_requests("as-2", RequestStatus.FINISHED_ABORTED)
    assert free_blocks(s) == all_blocks(s) and s.requests == {}
    s.shutdown()


def test_a_stop_string_finish_is_pinned_like_an_eos_finish(engine_llm, sched):
    """vLLM's front end finds a stop string in the detokenized text and aborts the request in the engine
    core (``FINISHED_ABORTED``): ctk tells it from a client abort by the stop string in the output's tail and
    pins it, its context ending where the stop string ends."""
    from vllm import SamplingParams

    rng = random.Random(21)
    prompt = toks(rng, 600)
    greedy = {"max_tokens": 40, "temperature": 0.0, "ignore_eos": True}
    text = gen(engine_llm, [prompt], SamplingParams(**greedy))[0].outputs[0].text
    at = next(
        i for i in range(12, len(text) - 6) if text.find(text[i : i + 6]) == i and text[i : i + 6].strip()
    )
    stop = text[at : at + 6]
    before = sched.ctk.stats.pins_created
    hinted = SamplingParams(**greedy, stop=[stop], extra_args={"program_id": "STOP", "tool": LONG_TTL_KEY})
    out = gen(engine_llm, [prompt], hinted)[0]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop
    assert out.outputs[0].text == text[:at]
    assert sched.ctk.stats.pins_created == before + 1
    (pinned,) = sched.ctk.pins.values()
    assert pinned.program_id == "STOP" and len(prompt) < pinned.context_tokens < len(prompt) + 40
