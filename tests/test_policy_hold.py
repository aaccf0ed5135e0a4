"""The hold-back hook: a rule's admission gate keeps a fitting waiting request out; the engine goes on with
the requests behind it and admits the held one once the gate lets it (simulator and core)."""

from __future__ import annotations

from ctk.policy.config import ServeConfig
from ctk.policy.core import PolicyCore
from ctk.policy.driver import PolicyDriver
from ctk.policy.events import EngineState
from ctk.policy.hints import RequestHints, parse_hints
from ctk.policy.rules import NoPins
from ctk.simulate.engine import EngineConfig, SimEngine, SimRequest
from ctk.simulate.profiles import load_profile


class HoldPrograms:
    """The smallest admission gate: holds back the programs in ``held``."""

    def __init__(self, held: set[str]):
        self.held = held
        self.capacity_tokens = 0
        self.next_tick = float("inf")
        self.asked: list[str] = []

    def arrived(self, program_id: str, prompt_tokens: int, now: float) -> None:
        pass

    def finished(self, program_id: str, context_tokens: int, last_turn: bool, now: float) -> None:
        pass

    def aborted(self, program_id: str, now: float) -> None:
        pass

    def may_admit(self, program_id: str) -> bool:
        self.asked.append(program_id)
        return program_id not in self.held

    def tick(self, state: EngineState) -> None:
        pass

    @property
    def holding(self) -> bool:
        return bool(self.held)


def gated(gate: HoldPrograms) -> PolicyCore:
    rule = NoPins()
    rule.gate = gate
    return PolicyCore(ServeConfig(policy="vllm").validate(), rule, block_size=16)


def h(program: str) -> RequestHints:
    return parse_hints(None, {"program_id": program})


def test_core_asks_the_gate_only_for_a_first_admission():
    gate = HoldPrograms({"a"})
    c = gated(gate)
    c.arrived("a1", h("a"), now=0.0)
    c.arrived("b1", h("b"), now=0.0)
    c.arrived("x", parse_hints(None, None), now=0.0)  # no program: never held
    assert not c.may_admit("a1") and c.may_admit("b1") and c.may_admit("x")
    gate.held.clear()
    assert c.may_admit("a1")
    c.admitted("a1", 0, now=1.0)
    gate.held.add("a")
    assert c.may_admit("a1")  # admitted once (a preempted request coming back is not held)
    assert gate.asked == ["a", "b", "a"]


def _engine(gate: HoldPrograms) -> SimEngine:
    prof = load_profile("cpu", "tiny")
    cfg = EngineConfig(num_blocks=200, block_size=16, max_num_batched_tokens=4096, max_num_seqs=8)
    e = SimEngine(cfg, prof)
    e.driver = PolicyDriver(gated(gate), e)
    return e


def _req(rid: str, program: str) -> SimRequest:
    r = SimRequest(rid, program, prompt_tokens=100, max_tokens=4, hints=h(program))
    return r


def test_simulated_engine_skips_a_held_request_that_fits_and_keeps_its_place():
    gate = HoldPrograms({"a"})
    e = _engine(gate)
    assert e.driver.tracking  # a gate alone makes the driver track requests
    e.add(_req("a1", "a"), 0.0)
    e.add(_req("b1", "b"), 0.0)
    e.add(_req("c1", "c"), 0.0)
    assert e.begin_step(0.0) is not None
    assert [r.request_id for r in e.running] == ["b1", "c1"]  # the held head fits (200 free blocks) but waits
    assert [r.request_id for r in e.waiting] == ["a1"]
    e.end_step(1.0)
    e.add(_req("d1", "d"), 1.0)
    gate.held.clear()
    e.begin_step(1.0)
    assert [r.request_id for r in e.running][-2:] == ["a1", "d1"]  # back at the front: admitted before d1


def test_an_idle_engine_with_a_held_request_wakes_at_the_gate_tick():
    gate = HoldPrograms({"a"})
    gate.next_tick = 5.0
    e = _engine(gate)
    e.add(_req("a1", "a"), 0.0)
    assert e.begin_step(0.0) is None  # nothing else to run
    assert e.wake_deadline == 5.0 and e.driver.next_deadline() == 5.0
