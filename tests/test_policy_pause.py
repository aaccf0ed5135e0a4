"""ThunderAgent's pause/resume loop (ctk.policy.pause) on sequences of engine states; its simulator arm."""

from __future__ import annotations

import pytest
from gate_fixtures import CAP, started, tick

from ctk.policy.pause import ThunderAgentGate


def gate(**kw) -> ThunderAgentGate:
    return started(ThunderAgentGate(**kw))


def run_turn(g: ThunderAgentGate, pid: str, tokens: int, now: float) -> None:
    """A turn of ``tokens`` context arrives and finishes at ``now`` (the program is then in a tool call)."""
    g.arrived(pid, tokens, now)
    g.finished(pid, tokens, False, now)


def test_pause_above_threshold_drains_smallest_idle_programs_to_the_target():
    g = gate()
    sizes = {"a": 2000, "b": 3000, "c": 4000, "d": 6200}  # + 100 each: 15,600 = 0.975 of the cache
    for i, (pid, n) in enumerate(sizes.items()):
        run_turn(g, pid, n, float(i))
    assert g.usage() == pytest.approx(15_600 / CAP)
    tick(g, 5.0)
    # smallest first until usage <= 0.80 (12,800): a (-2,100) -> 13,500, b (-3,100) -> 10,400
    assert list(g.paused) == ["a", "b"]
    assert g.usage() == pytest.approx(10_400 / CAP)
    assert not g.may_admit("a") and g.may_admit("c")


def test_no_resume_until_usage_drops_below_threshold_minus_hysteresis():
    g = gate()
    for i, (pid, n) in enumerate({"a": 2000, "b": 3000, "c": 4000, "d": 6200}.items()):
        run_turn(g, pid, n, float(i))
    tick(g, 5.0)  # a, b paused; usage 0.65
    # 0.65 is under the ceiling 0.85 with room 13,600 - 10,400 = 3,200: the smallest (a: 2,100) fits, b not
    g.arrived("a", 0, 6.0)  # a's next turn waits (paused)
    tick(g, 10.0)
    assert list(g.paused) == ["b"] and g.may_admit("a")
    # c grows to 5,400: usage (2,100 + 5,500 + 6,300) / 16,000 = 0.87 > 0.85 -> b stays paused, nobody paused
    g.arrived("c", 5400, 11.0)
    tick(g, 15.0)
    assert list(g.paused) == ["b"] and g.usage() == pytest.approx(13_900 / CAP)
    g.finished("d", 6200, True, 16.0)  # d's last turn: released
    tick(g, 20.0)
    assert not g.paused and g.may_admit("b")


def test_a_new_program_queues_behind_a_paused_one_and_a_turn_in_flight_is_marked():
    g = gate()
    run_turn(g, "a", 1000, 0.0)
    g.arrived("big", 14_500, 0.5)  # reasoning: cannot be paused now
    tick(g, 5.0)  # 15,700 > 0.95: a (acting) paused; still above 0.80 -> big marked
    assert list(g.paused) == ["a"]
    g.arrived("new", 10, 6.0)
    assert not g.may_admit("new")  # behind the paused program
    g.finished("big", 14_600, False, 7.0)
    assert not g.may_admit("big")  # marked: paused at its turn's end
    tick(g, 10.0)  # smallest first under the 0.85 ceiling; big alone is 0.92: it waits (timeout)
    assert list(g.paused) == ["big"] and g.may_admit("new") and g.may_admit("a")


def test_forced_resume_after_the_timeout_and_idle_programs_expire():
    g = gate(resume_timeout_s=60.0, idle_ttl_s=600.0)
    run_turn(g, "a", 8000, 0.0)
    run_turn(g, "b", 7500, 0.0)  # 15,700
    tick(g, 5.0)  # the smallest (b: 7,600) pauses: 8,100 <= 12,800
    assert list(g.paused) == ["b"]
    g.arrived("a", 12_000, 6.0)  # a grows: usage 12,100 / 16,000 = 0.756; ceiling room 1,500 < b's 7,600
    g.arrived("b", 0, 7.0)
    tick(g, 60.0)
    assert list(g.paused) == ["b"]
    tick(g, 67.0)  # b's turn waited 60 s
    assert not g.paused and g.forced_resumes == 1
    g.finished("a", 12_000, False, 70.0)
    g.finished("b", 7600, False, 70.0)
    tick(g, 669.0)
    assert set(g.programs) == {"a", "b"}
    tick(g, 670.0)
    assert not g.programs and g.used == 0


def test_simulator_arm_pauses_under_load_and_finishes_every_program():
    from ctk.measure.workload import ProgramSpec, TurnSpec
    from ctk.simulate.profiles import load_profile
    from ctk.simulate.run import SimConfig, simulate
    from ctk.simulate.workload import Arrivals

    progs = []
    for i in range(16):
        ts = [TurnSpec(k, 32, 400, 6.0 if i % 2 else 0.5, "pytest -q") for k in range(6)]
        ts[-1].last_turn, ts[-1].tool_duration_s, ts[-1].observation_tokens = True, 0.0, 0
        progs.append(ProgramSpec(f"p{i}", "test", 1024, ts))
    prof = load_profile("cpu", "tiny")
    res = simulate(progs, prof, "thunderagent", SimConfig(arrivals=Arrivals(concurrency=16)))
    s = res.summary()
    assert s["failed_programs"] == 0 and s["programs"] == 16
    g = res.engines[0].driver.gate
    assert g.pauses > 0 and g.resumes > 0 and not g.paused
    e = res.engines[0]
    e.pool.check()
    assert not e.held and not e.running and not e.waiting
