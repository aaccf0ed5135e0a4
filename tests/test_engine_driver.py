"""The driver's cost rules and the door's seams, inside a real vLLM CPU engine (in-process, tiny model)."""

from __future__ import annotations

import random

import pytest
from engine_fixtures import LONG_TTL_KEY, scheduler_of

pytestmark = pytest.mark.engine


@pytest.fixture
def sched(engine_llm, ttl_model_file):
    s = scheduler_of(engine_llm)
    s.ctk_reconfigure(policy="ttl", ttl_model=str(ttl_model_file), max_pin_share=0.5, online=False)
    yield s
    s.ctk_reconfigure(policy="ttl", ttl_model=str(ttl_model_file))


def _params(max_tokens=4, **xargs):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, extra_args=xargs or None)


def _run(llm, rng, n, **xargs):
    """``n`` requests of 300 tokens at once (2 run slots: the rest wait), stepped to the end."""
    eng = llm.llm_engine
    for i in range(n):
        prompt = {"prompt_token_ids": [rng.randrange(10, 4000) for _ in range(300)]}
        eng.add_request(f"dr-{rng.random()}-{i}", prompt, _params(6, **xargs))
    while eng.has_unfinished_requests():
        eng.step()


def _count_calls(monkeypatch, obj, name) -> list[int]:
    calls = [0]
    method = getattr(obj, name)

    def counted(*args, **kwargs):
        calls[0] += 1
        return method(*args, **kwargs)

    monkeypatch.setattr(obj, name, counted)
    return calls


def test_no_pin_no_demand_walk_no_valve(engine_llm, sched, monkeypatch):
    """Zero pins: the waiting queue is never walked for its demand during steps (only when a finish is
    judged) and allocate_slots is vLLM's own method; a held pin turns both on, its release turns them off."""
    door, kv = sched.ctk_door, sched.kv_cache_manager
    demand = _count_calls(monkeypatch, door, "waiting_demand")
    steps = _count_calls(monkeypatch, sched.ctk_driver, "step_begin")
    rng = random.Random(21)
    _run(engine_llm, rng, 6, program_id="nopin")  # no tool hint, random text: a candidate, never a pin
    assert sched.ctk.stats.pins_created == 0 and steps[0] >= 6
    assert demand[0] == 6  # one per finish (the decision's price), none per step
    assert "allocate_slots" not in vars(kv)
    _run(engine_llm, rng, 1, program_id="pinned", tool=LONG_TTL_KEY)
    assert sched.ctk_pinned_request_ids()
    door.arm_valve()
    assert "allocate_slots" not in vars(kv)  # pins held, but no allocation of a step can fail: no valve
    monkeypatch.setattr(door, "_step_blocks", door.free_blocks() + 1)
    door.arm_valve()
    assert "allocate_slots" in vars(kv)  # pins held and a step could ask for more than is free: the valve
    before = demand[0]
    _run(engine_llm, rng, 4, program_id="other")
    assert demand[0] - before > 4  # with a pin held every step prices the queue
    sched.ctk_reconfigure(policy="ttl")  # releases the pin
    assert sched.ctk_pinned_request_ids() == [] and "allocate_slots" not in vars(kv)


def test_stock_policy_tracks_nothing_and_keeps_vllm_order(engine_llm, sched, monkeypatch):
    sched.ctk_reconfigure(policy="vllm")
    door = sched.ctk_door
    reorders = _count_calls(monkeypatch, door, "reorder_waiting")
    hints = _count_calls(monkeypatch, door, "hints")
    _run(engine_llm, random.Random(22), 6, program_id="stock", tool=LONG_TTL_KEY)
    assert reorders[0] == 0 and hints[0] == 0 and sched.ctk_driver.requests == {}
    assert sched.ctk.stats.pins_created == 0 and sched.ctk_pinned_request_ids() == []


def _add(eng, rng, rid: str, program: str) -> None:
    prompt = {"prompt_token_ids": [rng.randrange(10, 4000) for _ in range(50)]}
    eng.add_request(rid, prompt, _params(1, program_id=program))


def test_strict_order_is_kept_by_the_request_queue_itself(engine_llm, sched):
    """Without an age bound (ttl's default) the order's keys are fixed while a request waits: vLLM's queue
    holds its requests in that order as they arrive (no re-order per step); a program that gains a pin has
    its waiting request moved before the next step."""
    from vllm.v1.core.sched.request_queue import RequestQueue

    queue = sched.waiting
    assert isinstance(queue, RequestQueue) and type(queue).__name__ == "KeyedRequestQueue"
    eng = engine_llm.llm_engine
    rng = random.Random(23)
    for rid, prog in (("k-a1", "ka"), ("k-b1", "kb"), ("k-a2", "ka"), ("k-c1", "kc"), ("k-b2", "kb")):
        _add(eng, rng, rid, prog)
    assert len(sched.ctk_driver.requests) == 5  # the arrivals went through the driver
    # resumed turns (a program seen before) first, by arrival; then new programs, by arrival
    order = [r.request_id for r in queue]  # (vLLM appends a suffix to each id)
    assert [rid.split("-")[1] for rid in order] == ["a2", "b2", "a1", "b1", "c1"]
    assert len(queue) == 5 and queue.peek_request().request_id == order[0]
    assert queue.head_demand(2) == (2, sum(r.num_tokens for r in list(queue)[:2]))
    assert queue.head_demand(4) == (4, sum(r.num_tokens for r in list(queue)[:4]))
    # the order class sorts the same queue the same way (what the mirror applies under an age bound)
    core = sched.ctk
    assert core.order.order([core._order_inputs(rid) for rid in order], 0.0)[0] == [0, 1, 2, 3, 4]
    while eng.has_unfinished_requests():
        eng.step()
    assert len(queue) == 0


def test_age_bounded_order_goes_through_the_request_queue(engine_llm, sched):
    """With an age bound the keys change with time: vLLM's FIFO queue is re-ordered in place by the policy
    (the core's mirror); switching back to strict order keeps the waiting requests, in the policy's order."""
    from vllm.v1.core.sched.request_queue import FCFSRequestQueue, RequestQueue

    sched.ctk_reconfigure(policy="ttl", age_bound=True)
    queue = sched.waiting
    assert isinstance(queue, FCFSRequestQueue) and isinstance(queue, RequestQueue)
    assert type(queue).__name__ == "ProgramOrderQueue" and sched.ctk_door.reorders_waiting
    eng = engine_llm.llm_engine
    rng = random.Random(23)
    for rid, prog in (("q-a1", "qa"), ("q-b1", "qb"), ("q-a2", "qa")):
        _add(eng, rng, rid, prog)
    ids = sched.ctk_door.waiting_ids()
    assert len(ids) == 3 and len(sched.ctk_driver.requests) == 3  # the arrivals went through the driver
    queue.reorder([2, 0, 1])
    assert sched.ctk_door.waiting_ids() == [ids[2], ids[0], ids[1]] and len(queue) == 3
    sched.ctk_reconfigure(policy="ttl", age_bound=False)  # strict again: the queue keeps the order itself
    assert type(sched.waiting).__name__ == "KeyedRequestQueue" and len(sched.waiting) == 3
    while eng.has_unfinished_requests():
        eng.step()


def test_hints_parsed_ahead_are_taken_not_parsed_again(engine_llm, sched, monkeypatch):
    """A request whose hints were parsed in vLLM's input thread (``VllmDoor.hints_ahead``, what the engine
    core process's ``preprocess_add_request`` runs) reaches the core with those hints, and the scheduler's
    ``add_request`` parses nothing; a request without them is parsed there."""
    from vllm.v1.request import RequestStatus

    from ctk.engine_patch import emulation as em

    door = sched.ctk_door
    make = em.RequestMaker(sched.vllm_config, sched.block_size)
    ahead = make("ahead-1", [5] * 40, 4, extra_args={"program_id": "pa", "tool": "make", "turn_index": 3})
    late = make("late-1", [6] * 40, 4, extra_args={"program_id": "pb", "last_turn": True})
    door.hints_ahead(ahead)
    parsed = ahead.ctk_hints
    assert (parsed.program_id, parsed.tool, parsed.turn_index) == ("pa", "make", 3)
    calls = _count_calls(monkeypatch, door, "hints")
    sched.add_request(ahead)
    assert calls[0] == 0 and sched.ctk_driver.requests["ahead-1"].hints is parsed
    assert not hasattr(ahead, "ctk_hints")  # taken off the request
    sched.add_request(late)
    assert calls[0] == 1 and sched.ctk_driver.requests["late-1"].hints.last_turn is True
    sched.finish_requests(["ahead-1", "late-1"], RequestStatus.FINISHED_ABORTED)
    assert not sched.ctk_driver.requests


def test_objects_built_without_init_carry_every_field(engine_llm, sched, monkeypatch):
    """The hot path builds Finished, EngineState, RequestHints, RequestEnd and Pending without their
    ``__init__``: each must still carry every field, so a field added to one of them fails here, not in a
    server."""
    from dataclasses import fields

    seen = []
    core, driver = sched.ctk, sched.ctk_driver
    finished, request_finished = core.finished, driver.request_finished

    def spy_finished(ev, state):
        seen.extend((ev, state, ev.hints, core.requests[ev.request_id]))  # (the request's Pending)
        return finished(ev, state)

    def spy_request_finished(request_id, end, now):
        if end is not None:
            seen.append(end)
        return request_finished(request_id, end, now)

    monkeypatch.setattr(core, "finished", spy_finished)
    monkeypatch.setattr(driver, "request_finished", spy_request_finished)
    _run(engine_llm, random.Random(23), 3, program_id="fields", tool=LONG_TTL_KEY)
    kinds = {type(obj).__name__ for obj in seen}
    assert kinds == {"Finished", "EngineState", "RequestHints", "RequestEnd", "Pending"}
    for obj in seen:
        cls = type(obj)
        if hasattr(obj, "__dict__"):  # every field set on the object itself, not read from a class default
            assert {f.name for f in fields(cls)} <= set(vars(obj)), cls.__name__
        rebuilt = cls(**{f.name: getattr(obj, f.name) for f in fields(cls) if f.init})
        assert rebuilt == obj, cls.__name__


def test_only_an_earlier_deadline_reaches_the_wake_timer_and_it_wakes_the_engine_then():
    """The door forwards a pin deadline to its timer thread only when it is earlier than the pending one; the
    timer puts one WAKEUP on the engine's input queue at that deadline (the idle engine then re-arms)."""
    import queue
    import time
    import types
    import weakref

    from vllm.v1.engine import EngineCoreRequestType

    from ctk.engine_patch.vllm_door import VllmDoor, _WakeTimer

    class Engine:  # (what the timer uses of vLLM's engine core)
        input_queue: queue.Queue = queue.Queue()

    engine = Engine()
    timer = _WakeTimer(weakref.ref(engine))
    door = types.SimpleNamespace(_timer=timer)
    try:
        now = time.monotonic()
        VllmDoor.wake_at(door, now + 0.3)
        assert timer.deadline == now + 0.3
        VllmDoor.wake_at(door, now + 5.0)  # later (a released pin's successor): the pending one holds
        VllmDoor.wake_at(door, None)  # no pin left: the pending one wakes the engine early at worst
        assert timer.deadline == now + 0.3
        VllmDoor.wake_at(door, now + 0.2)  # earlier (a new pin): forwarded
        assert timer.deadline == now + 0.2
        msg = engine.input_queue.get(timeout=10)
        assert msg == (EngineCoreRequestType.WAKEUP, None) and time.monotonic() >= now + 0.2
        assert timer.deadline is None  # fired: the next deadline is forwarded whatever it is
        VllmDoor.wake_at(door, time.monotonic() + 0.05)
        assert engine.input_queue.get(timeout=10) == (EngineCoreRequestType.WAKEUP, None)
        assert engine.input_queue.empty()
    finally:
        timer.stop()
