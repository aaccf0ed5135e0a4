"""An agent class from the prompt's prefix when the client names no agent (``agent_prefix_tokens``): the
hash vLLM computed for the prefix's last block, read by the door at ``add_request``, in the real vLLM CPU
engine (in-process, tiny model) and in vLLM's own scheduler at the GPU block size (``emulation``)."""

from __future__ import annotations

import random

import pytest
from engine_fixtures import scheduler_of

from ctk.policy.config import ServeConfig
from ctk.policy.hints import parse_hints, prefix_agent
from ctk.wire import DERIVED_AGENT, MAX_ID_CHARS

DEFAULTS = vars(ServeConfig())
PREFIX = 256  # tokens: 2 blocks of 128 (the CPU engine's), 8 of 32, 16 of 16
HEADER = 150  # tokens both "agents" share first (a chat template's fixed header): more than a CPU block
SYSTEM = 400  # tokens of each agent's system prompt (header included): past the prefix
TASK = 120  # tokens of a program's own task text after it


def ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(10, 4000) for _ in range(n)]


_rng = random.Random(11)
_header = ids(_rng, HEADER)
SYSTEMS = {name: _header + ids(_rng, SYSTEM - HEADER) for name in ("small", "large")}


def prompt(agent: str, task_seed: int) -> list[int]:
    return SYSTEMS[agent] + ids(random.Random(task_seed), TASK)


@pytest.fixture
def sched(engine_llm, ttl_model_file):
    s = scheduler_of(engine_llm)
    model = str(ttl_model_file)
    s.ctk_reconfigure(
        policy="ttl", ttl_model=model, online=False, admit_order="agent", agent_prefix_tokens=PREFIX
    )
    yield s
    # (reconfiguring keeps the settings not named: the defaults of what these tests change, for the next file)
    s.ctk_reconfigure(
        policy="ttl", ttl_model=model, **{k: DEFAULTS[k] for k in ("admit_order", "agent_prefix_tokens")}
    )


def run(llm, requests: list[tuple[str, list[int], dict]], max_tokens: int = 2):
    """One generate call: (program id, prompt, vllm_xargs) each."""
    from vllm import SamplingParams

    sps = [
        SamplingParams(max_tokens=max_tokens, ignore_eos=True, extra_args={"program_id": pid, **xargs})
        for pid, _, xargs in requests
    ]
    return llm.generate([{"prompt_token_ids": p} for _, p, _ in requests], sps, use_tqdm=False)


def agent_of(s, pid: str) -> str | None:
    return s.ctk.programs[pid].agent


def test_two_system_prompts_give_two_classes_and_tasks_do_not_split_them(engine_llm, sched):
    tag = "groups"
    requests = [(f"{tag}-{a}{i}", prompt(a, 100 * i + len(a)), {}) for a in SYSTEMS for i in range(3)]
    run(engine_llm, requests)
    classes = {a: {agent_of(sched, f"{tag}-{a}{i}") for i in range(3)} for a in SYSTEMS}
    assert all(len(c) == 1 for c in classes.values()), classes  # one class per agent, whatever the task
    small, large = classes["small"].pop(), classes["large"].pop()
    assert small != large
    for c in (small, large):
        assert c.startswith(DERIVED_AGENT) and len(c) <= MAX_ID_CHARS
    # the class is vLLM's own hash of the prefix's last block (the door reads it, it hashes nothing)
    blocks = PREFIX // sched.hash_block_size
    assert sched.ctk_door.set_agent_prefix(PREFIX) == blocks * sched.hash_block_size


def test_the_first_block_alone_cannot_tell_agents_sharing_a_template_header(
    engine_llm, sched, ttl_model_file
):
    """Why the prefix is longer than a block: both agents' prompts start with the same header (a chat
    template's, with its date), so their first block hashes alike."""
    block = sched.hash_block_size
    if block > HEADER:
        pytest.skip(f"a block of {block} tokens holds more than the shared header")
    sched.ctk_reconfigure(
        policy="ttl", ttl_model=str(ttl_model_file), online=False, agent_prefix_tokens=block
    )
    run(engine_llm, [(f"first-block-{a}", prompt(a, 7), {}) for a in SYSTEMS])
    assert agent_of(sched, "first-block-small") == agent_of(sched, "first-block-large") is not None


def test_a_named_agent_wins_and_the_derived_namespace_is_not_a_name(engine_llm, sched):
    run(
        engine_llm,
        [
            ("named-swe", prompt("small", 1), {"agent": "swe"}),
            (
                "named-router",
                prompt("small", 2),
                {"agentic_context": '{"program_id": "named-router", "agent_id": "coder"}'},
            ),
            ("named-reserved", prompt("small", 3), {"agent": "prefix:0123456789abcdef"}),
            ("named-none", prompt("small", 4), {}),
        ],
    )
    assert agent_of(sched, "named-swe") == "swe"
    assert agent_of(sched, "named-router") == "coder"
    # a client's name in ctk's namespace is ignored (with a warning): the prompt's class, as without a name
    assert agent_of(sched, "named-reserved") == agent_of(sched, "named-none")
    assert agent_of(sched, "named-none").startswith(DERIVED_AGENT)
    assert agent_of(sched, "named-none") != "prefix:0123456789abcdef"


def test_a_prompt_shorter_than_the_prefix_gets_no_class(engine_llm, sched):
    run(
        engine_llm,
        [("short-1", SYSTEMS["small"][: PREFIX - 1], {}), ("exact-1", SYSTEMS["small"][:PREFIX], {})],
    )
    assert agent_of(sched, "short-1") is None  # the mean over all agents, as before
    assert agent_of(sched, "exact-1") == agent_of(sched, "exact-1") is not None  # the whole prefix: a class


def test_off_and_other_orders_derive_nothing(engine_llm, sched, ttl_model_file):
    for i, settings in enumerate(
        ({"agent_prefix_tokens": 0}, {"admit_order": "arrival"}, {"admit_order": "size"})
    ):
        sched.ctk_reconfigure(policy="ttl", ttl_model=str(ttl_model_file), online=False, **settings)
        run(engine_llm, [(f"off-{i}", prompt("small", 5), {})])
        assert agent_of(sched, f"off-{i}") is None, settings


def test_learned_sizes_separate_two_agents_that_differ_only_by_system_prompt(engine_llm, sched):
    """End to end, no agent hint anywhere: "small" programs run one turn, "large" ones four turns of growing
    context. Once some of each finished, the engine's size table knows two classes, and a new program of
    each is sized by its own agent's programs (the size the admission order ranks it by)."""
    rng = random.Random(5)
    for i in range(3):
        run(engine_llm, [(f"e2e-small{i}", prompt("small", 1000 + i), {"last_turn": True})])
        pid, context = f"e2e-large{i}", prompt("large", 2000 + i)
        for turn in range(4):
            last = turn == 3
            out = run(engine_llm, [(pid, context, {"turn_index": turn, "last_turn": last})], max_tokens=8)
            context = context + list(out[0].outputs[0].token_ids) + ids(rng, 200)
    sizing = sched.ctk._sizing
    small, large = agent_of(sched, "e2e-small0"), agent_of(sched, "e2e-large0")
    assert small.startswith(DERIVED_AGENT) and large.startswith(DERIVED_AGENT) and small != large
    assert sizing._n[small] == 3 and sizing._n[large] == 3  # every program finished in its own class
    assert sizing.estimate(large) >= 4 * sizing.estimate(small)
    # new programs of each are sized by their own agent's programs
    run(
        engine_llm,
        [("e2e-new-small", prompt("small", 3000), {}), ("e2e-new-large", prompt("large", 3001), {})],
    )
    sizes = sched.ctk._sizes
    rank = {p: sched.ctk.programs[p].rank for p in ("e2e-new-small", "e2e-new-large")}
    assert sizes[rank["e2e-new-small"]] == sizing.estimate(small)
    assert sizes[rank["e2e-new-large"]] == sizing.estimate(large) > sizes[rank["e2e-new-small"]]


# -- vLLM's own scheduler at the GPU block size (16), with and without prefix caching ----------------------


def _gpu_scheduler(engine_llm, ttl_model_file, *, caching: bool):
    import copy

    from ctk.engine_patch import emulation as em
    from ctk.engine_patch.scheduler import CTKScheduler

    base = scheduler_of(engine_llm).vllm_config
    cfg = em.engine_config(
        base, async_scheduling=False, ctk={"policy": "ttl", "ttl_model": str(ttl_model_file), "online": False}
    )
    if not caching:
        cfg.cache_config = copy.copy(base.cache_config)
        object.__setattr__(cfg.cache_config, "enable_prefix_caching", False)
    return em.build_scheduler(CTKScheduler, cfg, em.kv_layout(2000, 16), 16), em.RequestMaker(cfg, 16)


LLAMA_HEADER = 25  # tokens of Llama 3.1's fixed system header (with its date) before the system prompt


@pytest.mark.engine
def test_the_default_prefix_at_the_gpu_block_size(engine_llm, ttl_model_file):
    """48 tokens (the default) = 3 blocks of 16: two agents sharing a 25-token header and differing after it
    get two classes; one agent's tasks (from token 57 on, the earliest measured) one class."""
    s, make = _gpu_scheduler(engine_llm, ttl_model_file, caching=True)
    assert s.ctk.config.agent_prefix_tokens == 48
    rng = random.Random(3)
    header = ids(rng, LLAMA_HEADER)
    systems = {a: header + ids(rng, 57 - LLAMA_HEADER) for a in ("a", "b")}
    for a, system in systems.items():
        for i in range(3):
            s.add_request(make(f"{a}{i}", system + ids(rng, 300), 4, extra_args={"program_id": f"{a}{i}"}))
    got = {a: {s.ctk.programs[f"{a}{i}"].agent for i in range(3)} for a in systems}
    assert len(got["a"]) == len(got["b"]) == 1 and got["a"] != got["b"], got
    s.shutdown()


@pytest.mark.engine
def test_prefix_caching_off_gives_no_class(engine_llm, ttl_model_file):
    """Without prefix caching the engine core hashes no blocks (a premise the contract checks): requests are
    built without a block hasher, and the door derives nothing (the mean over all agents, as before)."""
    from vllm import SamplingParams
    from vllm.v1.request import Request

    s, _ = _gpu_scheduler(engine_llm, ttl_model_file, caching=False)
    assert s.ctk_door.set_agent_prefix(48) == 0
    sp = SamplingParams(max_tokens=4, extra_args={"program_id": "nocache"})
    request = Request("nocache", ids(random.Random(1), 500), sp, None, block_hasher=None)
    assert request.block_hashes == []
    s.add_request(request)
    assert s.ctk.programs["nocache"].agent is None
    s.shutdown()


def test_labels_are_bounded_and_a_reserved_name_is_ignored():
    assert prefix_agent(bytes(range(32))) == "prefix:0001020304050607"
    assert len(prefix_agent(b"\xff" * 64)) <= MAX_ID_CHARS
    h = parse_hints("s", {"agent": " prefix:abc "})
    assert h.agent is None and h.warnings
    assert parse_hints("s", {"agentic_context": {"task_id": "t", "agent_id": "prefix:x"}}).agent is None
    assert parse_hints("s", {"agent": "prefixed"}).agent == "prefixed"
