"""Working-set admission (ctk.policy.admit): new programs wait while the admitted working set fills the cache;
resumed turns never do; new programs pass in arrival order and none starves."""

from __future__ import annotations

from gate_fixtures import started, tick

from ctk.policy.admit import WorkingSetGate
from ctk.policy.config import ServeConfig
from ctk.policy.rules import make_rule


def gate(**kw) -> WorkingSetGate:
    return started(WorkingSetGate(**kw))


def admit(g: WorkingSetGate, pid: str, tokens: int, now: float) -> bool:
    g.arrived(pid, tokens, now)
    return g.may_admit(pid)


def test_a_new_program_waits_while_the_working_set_does_not_fit_and_enters_when_it_does():
    g = gate(fill=1.0, horizon_s=60.0)
    assert admit(g, "a", 9000, 0.0) and admit(g, "b", 5000, 0.1)  # 14,000 of 16,000
    assert not admit(g, "c", 3000, 0.2)  # 17,000 > 16,000: held although the engine may have room
    assert g.holding and not g.may_admit("c")
    g.finished("b", 5200, True, 1.0)  # b's last turn: it leaves the working set (9,000)
    assert g.may_admit("c") and not g.holding
    assert g.working_set == 12_000


def test_resumed_turns_are_never_held_even_over_the_cache():
    g = gate(fill=0.5)
    assert admit(g, "a", 7000, 0.0)
    g.finished("a", 7500, False, 1.0)
    g.arrived("a", 20_000, 2.0)  # its context outgrew the fill share (and the cache)
    assert g.may_admit("a")
    assert not admit(g, "new", 100, 2.5)  # ... while a new program waits behind it


def test_new_programs_pass_in_arrival_order():
    g = gate(fill=1.0)
    assert admit(g, "a", 12_000, 0.0)
    assert not admit(g, "big", 6000, 1.0)
    assert not admit(g, "small", 100, 2.0)  # would fit, but the older program waits first
    g.finished("a", 12_500, True, 3.0)
    assert not g.may_admit("small") and g.may_admit("big") and g.may_admit("small")


def test_no_starvation_an_empty_working_set_admits_the_oldest_and_tool_calls_leave_after_the_horizon():
    g = gate(fill=1.0, horizon_s=30.0)
    assert admit(g, "huge", 40_000, 0.0)  # larger than the cache: nothing else is admitted, it goes
    g.finished("huge", 41_000, False, 5.0)  # in a tool call: still in the working set
    assert not admit(g, "next", 1000, 6.0)
    tick(g, 20.0)
    assert not g.may_admit("next")
    tick(g, 35.0)  # 30 s into its tool call: out of the working set until its next turn arrives
    assert g.working_set == 0 and g.may_admit("next")
    g.arrived("huge", 42_000, 40.0)  # back: counted again, and never held
    assert g.may_admit("huge") and g.working_set == 43_000


def test_an_aborted_waiting_program_leaves_the_queue():
    g = gate(fill=1.0)
    assert admit(g, "a", 15_000, 0.0)
    assert not admit(g, "b", 5000, 1.0) and not admit(g, "c", 500, 2.0)
    g.aborted("b", 3.0)
    assert g.may_admit("c") and not g.holding
    g.aborted("a", 4.0)
    assert g.working_set == 500


def test_ttl_and_the_oracle_get_the_same_gate_from_the_settings():
    from ctk.predict.tables import TTLTables

    tables = TTLTables.build({"*": [0.3, 1.5, 1.6]}, {"*": 50}, [0.5, 0.9, 0.99])
    cfg = ServeConfig(admit_fill=0.9, admit_horizon_s=45.0)
    for policy in ("ttl", "oracle"):
        rule = make_rule(policy, cfg, tables)
        assert isinstance(rule.gate, WorkingSetGate)
        assert (rule.gate.fill, rule.gate.horizon_s) == (0.9, 45.0)
        assert make_rule(policy, ServeConfig(), tables).gate is None  # off by default


def test_simulated_engine_holds_new_programs_and_finishes_every_program():
    from ctk.measure.workload import ProgramSpec, TurnSpec
    from ctk.simulate.profiles import load_profile
    from ctk.simulate.run import SimConfig, simulate
    from ctk.simulate.workload import Arrivals

    progs = []
    for i in range(16):
        ts = [TurnSpec(k, 32, 400, 3.0 if i % 2 else 0.5, "pytest -q") for k in range(5)]
        ts[-1].last_turn, ts[-1].tool_duration_s, ts[-1].observation_tokens = True, 0.0, 0
        progs.append(ProgramSpec(f"p{i}", "test", 1024, ts))
    prof = load_profile("cpu", "tiny")
    cfg = SimConfig(arrivals=Arrivals(concurrency=16), serve={"admit_fill": 0.5, "admit_horizon_s": 10.0})
    res = simulate(progs, prof, "oracle", cfg)
    s = res.summary()
    assert s["failed_programs"] == 0 and s["programs"] == 16
    g = res.engines[0].driver.gate
    assert isinstance(g, WorkingSetGate) and g.held > 0  # new programs waited for the working set
    assert not g.admitted and not g.waiting and g.working_set == 0  # every program left it
    e = res.engines[0]
    e.pool.check()
    assert not e.held and not e.running and not e.waiting
