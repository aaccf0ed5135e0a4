"""The policy core (no vLLM): identity, detection, pin decisions, release rules, valve, ordering, online."""

from __future__ import annotations

import math
import random

import pytest

from ctk.policy.config import ConfigError, ServeConfig
from ctk.policy.core import PolicyCore
from ctk.policy.detect import detect_tool_call
from ctk.policy.events import EngineState, Finished
from ctk.policy.hints import RequestHints, parse_hints
from ctk.policy.rules import Policy, make_rule
from ctk.predict.online import OnlineDurations, blend_quantiles
from ctk.predict.tables import FixedPin, TTLDecision, TTLTables

LEVELS = [0.1, 0.5, 0.9]


def tables() -> TTLTables:
    """Hand-set tables (fixed pins): ``ls`` pins 5 s, ``sleep`` 1 s, anything else (``*``) is not pinned."""
    return TTLTables(
        quantile_levels=LEVELS,
        fixed_pins={"ls": FixedPin(5.0, 0.9), "sleep": FixedPin(1.0, 0.5), "*": FixedPin(0.0)},
        quantiles_s={"ls": [0.01, 0.02, 0.1], "sleep": [0.5, 1.0, 3.0], "*": [1.0, 10.0, 100.0]},
        n_samples={"ls": 100, "sleep": 10, "*": 1000},
    )


def one_wait_measured(c: PolicyCore, now: float = 0.0) -> PolicyCore:
    """An admission with no wait: the age bound is measured (its floor), no longer unmeasured (strict)."""
    c.arrived("warm-up", hints(), now=now)
    c.admitted("warm-up", 0, now=now)
    return c


def core(policy="ttl", **kw) -> PolicyCore:
    kw.setdefault("age_min_waits", 1)  # the bound from the first measured wait (the default waits for 100)
    cfg = ServeConfig(policy=policy, ttl_model="x.pkl", **kw).validate()
    return PolicyCore(cfg, make_rule(cfg.policy, cfg, tables() if policy == "ttl" else None), block_size=16)


def state(now=0.0, free=90, total=100, **kw) -> EngineState:
    return EngineState(now=now, free_blocks=free, total_blocks=total, block_size=16, **kw)


def hints(program="p1", **kw) -> RequestHints:
    return parse_hints(None, {"program_id": program, **kw})


def fin(rid, h, text="", tokens=320, blocks=20, natural=True) -> Finished:
    return Finished(
        rid,
        h,
        text,
        prompt_tokens=tokens - 10,
        num_tokens=tokens,
        output_tokens=10,
        blocks=blocks,
        natural=natural,
    )


# -- hints and detection --------------------------------------------------------------------------------


def test_program_identity_precedence_and_garbage():
    assert parse_hints("s1", {"program_id": "p"}).program_id == "s1"
    assert parse_hints(None, {"session_id": "s2", "program_id": "p"}).program_id == "s2"
    assert parse_hints(None, {"program_id": "p"}).program_id == "p"
    bad = parse_hints(
        None,
        {
            "program_id": {"x": 1},
            "turn_index": "abc",
            "last_turn": "maybe",
            "tool": 5,
            "tool_duration_s": "nan",
        },
    )
    assert bad == RequestHints()  # everything ignored ...
    assert len(bad.warnings) == 5  # ... with a warning each
    assert parse_hints(None, ["not", "a", "dict"]).warnings
    h = parse_hints(
        None,
        {"program_id": 7, "turn_index": 3.0, "last_turn": 1, "tool": " ls -la ", "tool_duration_s": "2.5"},
    )
    assert (h.program_id, h.turn_index, h.last_turn, h.tool, h.tool_duration_s) == (
        "7",
        3,
        True,
        "ls -la",
        2.5,
    )


def test_detect_fenced_bash_tool_call_and_openai_json():
    t = detect_tool_call("THOUGHT: look\n```bash\ncd /repo && ls -la\n```\n")
    assert (t.kind, t.command) == ("bash", "cd /repo && ls -la")
    t = detect_tool_call('ok <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>')
    assert (t.kind, t.name, t.command) == ("tool_call", "get_weather", '{"city": "Paris"}')
    t = detect_tool_call(
        '{"tool_calls": [{"type": "function", "function": {"name": "cd", "arguments": "{}"}}]}'
    )
    assert (t.kind, t.name) == ("openai", "cd")
    t = detect_tool_call('<tool_call>{"name": "trunc", "argu')  # truncated by max_tokens
    assert t.name == "trunc"
    assert detect_tool_call("The answer is 42.") is None
    assert detect_tool_call("```python\nprint(1)\n```") is None
    # configurable: only the detectors asked for
    assert detect_tool_call("```bash\nls\n```", detectors=("tool_call",)) is None
    assert detect_tool_call("x" * 10**6 + "```bash\nls\n```").command == "ls"


def test_detection_skips_a_detector_only_where_it_finds_nothing(monkeypatch):
    """detect_tool_call tests each detector's first need (``_NEEDS``) before calling it: the same answers
    as calling every detector."""
    import random

    from ctk.policy import detect

    pieces = [
        "```",
        "```bash\n",
        "ls -la",
        "\n",
        "<tool_call>",
        "</tool_call>",
        '"name"',
        ": ",
        '"f"',
        "{",
        "}",
        "[",
        "]",
        '"arguments"',
        "{}",
        "tool_calls",
        "function",
        "x",
        " ",
        '"',
        "<",
        "`",
    ]
    rng = random.Random(0)
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randrange(0, 30))) for _ in range(3000)]
    orders = [detect.DETECTORS, ("openai", "bash"), ("tool_call",), ("nope", "bash")]
    fast = [detect_tool_call(t, o) for t in texts for o in orders]
    monkeypatch.setattr(detect, "_NEEDS", {})
    assert fast == [detect_tool_call(t, o) for t in texts for o in orders]
    assert any(f is not None for f in fast) and any(f is None for f in fast)


# -- pin decision and release rules --------------------------------------------------------------------


def test_ttl_pin_from_fixed_pins_at_any_pressure():
    c = core()
    c.arrived("r1", hints(), now=0.0)
    pinned, rel = c.finished(fin("r1", hints(), "```bash\nls -la\n```"), state(now=10))
    assert pinned and not rel
    pin = c.pins["r1"]
    assert (pin.ttl_s, pin.expires, pin.key) == (5.0, 15.0, "ls")
    assert c.pinned_blocks == 20
    # sleep: a fixed pin does not read the KV usage (only the live price, here 0, decides whether it pays)
    c.arrived("r2", hints("p2"), now=0.0)
    assert c.finished(fin("r2", hints("p2"), "```bash\nsleep 1\n```"), state(free=90))[0]
    c.arrived("r3", hints("p3"), now=0.0)
    assert c.finished(fin("r3", hints("p3"), "```bash\nsleep 1\n```"), state(free=20))[0]
    assert c.pins["r2"].ttl_s == c.pins["r3"].ttl_s == 1.0 and c.pins["r3"].p_hit == 0.5
    # unknown tool falls back to '*' whose TTL is 0; no tool call: no pin
    c.arrived("r4", hints("p4"), now=0.0)
    assert not c.finished(fin("r4", hints("p4"), "```bash\nmake all\n```"), state())[0]
    c.arrived("r5", hints("p5"), now=0.0)
    assert not c.finished(fin("r5", hints("p5"), "final answer"), state())[0]


def test_client_tool_hint_overrides_output_parsing():
    c = core()
    h = hints(tool="ls")
    c.arrived("r1", h, now=0.0)
    assert c.finished(fin("r1", h, "no tool call in this text"), state())[0]
    h2 = hints("p2", tool="make all")
    c.arrived("r2", h2, now=0.0)
    assert not c.finished(fin("r2", h2, "```bash\nls\n```"), state())[0]


def test_no_pin_without_program_after_last_turn_or_abort():
    c = core()
    anon = parse_hints(None, {})
    c.arrived("a", anon, now=0.0)
    assert not c.finished(fin("a", anon, "```bash\nls\n```"), state())[0]
    last = hints(last_turn=True)
    c.arrived("b", last, now=0.0)
    assert not c.finished(fin("b", last, "```bash\nls\n```"), state())[0]
    c.arrived("c", hints("p9"), now=0.0)
    assert not c.finished(fin("c", hints("p9"), "```bash\nls\n```", natural=False), state())[0]
    assert not c.pins


def test_release_on_admission_hit_and_miss():
    c = core()
    c.arrived("r1", hints(), now=0.0)
    c.finished(fin("r1", hints(), "```bash\nls\n```", tokens=330), state(now=0))
    c.arrived("r2", hints(), now=0.2)
    assert c.pins["r1"].next_request_id == "r2"
    assert c.step(state(now=100)) == []  # next turn is here: no expiry while it waits
    rel = c.admitted("r2", cached_tokens=320, now=0.3)  # 320 = the pinned full blocks (330 // 16 * 16)
    assert [(r.request_id, r.reason) for r in rel] == [("r1", "hit")]
    assert c.stats.pin_hits == 1 and c.pinned_blocks == 0
    c.finished(fin("r2", hints(), "```bash\nls\n```", tokens=400), state(now=1))
    c.arrived("r3", hints(), now=1.1)
    assert c.admitted("r3", cached_tokens=16, now=0.0)[0].reason == "miss"


def test_expiry_abort_and_last_turn_release():
    c = core()
    c.arrived("r1", hints(), now=0.0)
    c.finished(fin("r1", hints(), "```bash\nls\n```"), state(now=0))
    assert c.next_deadline() == 5.0
    assert c.step(state(now=4.9)) == []
    assert [r.reason for r in c.step(state(now=5.0))] == ["expired"]
    assert not c.pins and c.next_deadline() is None
    # abort of the program's next request frees the program's pin
    c.finished(fin("r2", hints(), "```bash\nls\n```"), state(now=10))
    c.arrived("r3", hints(), now=10.5)
    assert [(r.request_id, r.reason) for r in c.aborted("r3", now=0.0)] == [("r2", "abort")]
    # last turn: its own finish never pins, and a pin still held by the program is released
    c.arrived("r4", hints("q"), now=0.0)
    c.finished(fin("r4", hints("q"), "```bash\nls\n```"), state(now=20))
    last = hints("q", last_turn=True)
    c.arrived("r5", last, now=20.1)
    pinned, rel = c.finished(fin("r5", last, "```bash\nls\n```"), state(now=21))
    assert not pinned and [r.request_id for r in rel] == ["r4"]
    assert c.pinned_blocks == 0


def test_pin_budget_share_and_value_order():
    c = core(max_pin_share=0.5)
    for i in range(3):  # 3 x 20 blocks of 'ls' = 60 > 50
        h = hints(f"p{i}")
        c.arrived(f"r{i}", h, now=0.0)
        c.finished(fin(f"r{i}", h, "```bash\nls\n```"), state(now=0))
    assert c.pinned_blocks <= 50 and len(c.pins) == 2 and c.stats.pins_skipped_budget == 1
    # a 'sleep' pin (returns within 1 s with p 0.5) is worth more per token-second still to hold than an
    # 'ls' pin (returns spread over 5 s with p 0.9): it displaces one
    h = hints("px")
    c.arrived("rx", h, now=0.0)
    pinned, rel = c.finished(fin("rx", h, "```bash\nsleep 1\n```"), state(now=0.1))
    assert pinned and [r.reason for r in rel] == ["budget"] and rel[0].request_id in ("r0", "r1")
    assert c.pinned_blocks <= 50
    # and the other way round an 'ls' pin cannot displace the 'sleep' pin nor the other 'ls' pin
    h = hints("py")
    c.arrived("ry", h, now=0.2)
    pinned, rel = c.finished(fin("ry", h, "```bash\nls\n```"), state(now=0.2))
    assert not pinned and rel == [] and "rx" in c.pins


def test_pressure_valve_releases_lowest_value_first():
    c = core(max_pin_share=1.0)
    for i, cmd in enumerate(["ls", "sleep 1", "ls"]):
        h = hints(f"p{i}")
        c.arrived(f"r{i}", h, now=0.0)
        c.finished(fin(f"r{i}", h, f"```bash\n{cmd}\n```"), state(now=0))
    first = c.release_for_pressure(now=0.1)
    # an 'ls' pin (its return is spread over 5 s) before the 'sleep' pin (due within 1 s)
    assert (first.request_id, first.reason) == ("r0", "pressure")
    assert c.release_for_pressure(now=0.1).request_id == "r2"
    assert c.release_for_pressure(now=0.1).request_id == "r1"
    assert c.release_for_pressure(now=0.1) is None and c.pinned_blocks == 0


def test_valve_keeps_pins_from_admissions_that_are_not_overdue():
    c = core(max_pin_share=1.0, age_min_s=5.0)
    for i in range(2):  # programs p0 (older) and p1 pin their caches
        h = hints(f"p{i}")
        c.arrived(f"r{i}", h, now=float(i))
        c.finished(fin(f"r{i}", h, "```bash\nls\n```"), state(now=float(i)))
    h = hints("p2")  # a newer program's first request waits for memory while others run
    c.arrived("new", h, now=2.0)
    assert c.release_for_pressure(now=2.1, admitting="new", engine_busy=True) is None
    assert c.stats.valve_deferred == 1 and c.pinned_blocks > 0
    # an older program's request waits too (the running requests will give memory back) ...
    c.arrived("r0b", hints("p0"), now=2.2)
    assert c.release_for_pressure(now=2.3, admitting="r0b", engine_busy=True) is None
    # ... a running request that would be preempted takes any pin, the one whose program is back last
    assert c.release_for_pressure(now=2.35, admitting=None, engine_busy=True).request_id == "r1"
    # nothing running: any pin goes, so pins never deadlock the engine
    assert c.release_for_pressure(now=2.4, admitting="new", engine_busy=False).request_id == "r0"
    assert c.pinned_blocks == 0


def test_valve_lets_an_overdue_admission_take_any_pin():
    c = one_wait_measured(core(max_pin_share=1.0, age_min_s=1.0, age_bound=True))
    h = hints("old")
    c.arrived("r0", h, now=0.0)
    c.finished(fin("r0", h, "```bash\nls\n```"), state(now=0.0))
    c.arrived("late", hints("young"), now=1.0)
    assert c.release_for_pressure(now=1.5, admitting="late", engine_busy=True) is None
    overdue_at = 1.0 + c.order.age_bound_s
    rel = c.release_for_pressure(now=overdue_at + 0.01, admitting="late", engine_busy=True)
    assert overdue_at == 2.0 and rel is not None and rel.request_id == "r0"


def test_a_fresh_core_lets_no_flood_take_a_pin_before_fcfs_waits_are_measured():
    """Issue 22: with no wait measured the age bound was 0, so every waiting request of a flood of new
    programs was overdue and took the pin of a program about to return. Unmeasured, nobody is overdue; the
    p99 needs 100 waits (``age_min_waits``)."""
    for bounded in (True, None):  # --age-bound, and the default strict order
        c = core(max_pin_share=1.0, age_bound=bounded, age_min_waits=100)
        h = hints("old")
        c.arrived("r0", h, now=0.0)
        c.admitted("r0", 0, now=0.0)  # one wait measured, 0 s: not yet a p99
        c.finished(fin("r0", h, "```bash\nls\n```"), state(now=0.1))
        for k in range(12):
            c.arrived(f"new{k}", hints(f"n{k}"), now=0.1)
            assert c.release_for_pressure(now=30.0, admitting=f"new{k}", engine_busy=True) is None, bounded
        assert c.order.age_bound_s == math.inf and c.pins
        for _ in range(99):  # 100 waits measured (FCFS would have made the flood wait 29.9 s): a bound
            c.order.arrived(30.0)
            c.order.admitted(30.0)
        assert (c.order.age_bound_s < math.inf) is bool(bounded)
        taken = c.release_for_pressure(now=31.0, admitting="new0", engine_busy=True)
        assert (taken is not None) is bool(bounded)


def test_resume_valve_bounds_a_resumed_turns_wait_by_fcfs_tail_under_strict_order():
    """ttl's strict order never lets a new program's first turn take a pin while something runs; with
    ``resume_valve`` a resumed turn that missed its pin may, once it has waited FCFS's measured tail wait, so
    finishing turns do not keep taking the freed memory as new pins while it queues. Unmeasured, nobody may
    (cold start); without ``resume_valve`` (the default) the strict deferral holds."""
    for valve in (True, False):
        c = core(max_pin_share=1.0, age_min_s=1.0, age_min_waits=1, resume_valve=valve)
        c.arrived("a0", hints("back"), now=0.0)  # the program whose turn will miss: seen before
        c.admitted("a0", 0, now=0.0)
        c.finished(fin("a0", hints("back"), "```bash\nls\n```", blocks=0), state(now=0.05))
        h = hints("held")
        c.arrived("r0", h, now=0.0)
        c.finished(fin("r0", h, "```bash\nls\n```"), state(now=0.1))
        assert "r0" in c.pins and math.isinf(c.order.age_bound_s)  # strict: no age bound of the order
        c.arrived("resumed", hints("back"), now=1.0)
        c.arrived("first", hints("new"), now=1.0)
        assert c.release_for_pressure(now=1.5, admitting="resumed", engine_busy=True) is None  # under 1 s
        assert c.release_for_pressure(now=2.5, admitting="first", engine_busy=True) is None  # strict
        rel = c.release_for_pressure(now=2.5, admitting="resumed", engine_busy=True)
        assert (rel is not None) is valve, valve
        if valve:
            assert rel.request_id == "r0" and rel.reason == "pressure"
    fresh = core(max_pin_share=1.0, age_min_waits=100, resume_valve=True)  # nothing measured: it waits
    fresh.arrived("a0", hints("back"), now=0.0)
    h = hints("held")
    fresh.arrived("r0", h, now=0.0)
    fresh.finished(fin("r0", h, "```bash\nls\n```"), state(now=0.1))
    fresh.arrived("resumed", hints("back"), now=1.0)
    assert fresh.release_for_pressure(now=60.0, admitting="resumed", engine_busy=True) is None


def test_resume_valve_opens_by_itself_while_the_pin_budget_binds():
    """By default (``resume_valve`` None) the resume valve applies while the pin budget binds: the share of
    recent pins that met ``max_pin_share`` (:class:`BudgetContention`) at ``resume_valve_contention`` or
    more. Measured: pins of 20 blocks under a 50-block budget meet it from the third on; with no budget
    (share 1) it stays 0."""
    for share, binds in ((0.5, True), (1.0, False)):
        c = core(max_pin_share=share)
        for k in range(30):
            h = hints(f"p{k}")
            c.arrived(f"r{k}", h, now=0.0)
            c.finished(fin(f"r{k}", h, "```bash\nls\n```", blocks=20), state(now=0.1, free=100))
        assert c.stats.pins_created == 30 - c.stats.pins_skipped_budget
        assert (c.contention.share >= c.config.resume_valve_contention) is binds, (share, c.contention.share)
        assert c._resume_valve_open() is binds
    # the valve's decision follows the measure, unless set either way
    for forced, contention, opens in (
        (None, 0.2, True), (None, 0.05, False), (True, 0.0, True), (False, 0.9, False)
    ):
        c = core(max_pin_share=1.0, age_min_s=1.0, age_min_waits=1, resume_valve=forced)
        c.arrived("a0", hints("back"), now=0.0)
        c.admitted("a0", 0, now=0.0)
        c.finished(fin("a0", hints("back"), "```bash\nls\n```", blocks=0), state(now=0.05))
        h = hints("held")
        c.arrived("r0", h, now=0.0)
        c.finished(fin("r0", h, "```bash\nls\n```"), state(now=0.1))
        c.arrived("resumed", hints("back"), now=1.0)
        c.contention.share = contention
        rel = c.release_for_pressure(now=2.5, admitting="resumed", engine_busy=True)
        assert (rel is not None) is opens, (forced, contention)


def test_resume_valve_setting_reads_unset_as_automatic():
    assert ServeConfig().resume_valve is None
    assert ServeConfig.from_mapping({"resume_valve": "default"}).resume_valve is None
    assert ServeConfig.from_mapping({"resume_valve": "true"}).resume_valve is True
    assert ServeConfig.from_env({"CTK_RESUME_VALVE": "0"}).resume_valve is False
    with pytest.raises(ConfigError, match="resume_valve_contention"):
        ServeConfig.from_mapping({"resume_valve_contention": "0"})


def test_vllm_policy_never_pins_nor_reorders():
    c = core("vllm")
    c.arrived("r1", hints(), now=0.0)
    assert not c.finished(fin("r1", hints(), "```bash\nls\n```"), state())[0]
    c.arrived("r2", hints("b"), now=0.0)
    assert c.order_waiting(["r1", "r2"], now=0.0) is None


def test_continuum_running_mean_fixed_ttl_release_on_next_finish():
    c = core("continuum")
    h = hints()
    c.arrived("r1", h, now=0)
    assert c.finished(fin("r1", h, "```bash\npython train.py\n```"), state(now=1))[0]  # no history yet
    assert c.pins["r1"].ttl_s == 2.0
    c.arrived("r2", h, now=6)  # the tool took 5 s: mean 5 > 2 from now on
    assert c.admitted("r2", 320, now=0.0) == []  # continuum does not release at admission ...
    pinned, rel = c.finished(fin("r2", h, "```bash\npython train.py\n```"), state(now=7))
    assert [r.request_id for r in rel] == ["r1"]  # ... but when the next request finishes
    assert not pinned  # running mean 5 s > 2 s: no pin
    assert c.rule.means["python"] == (5.0, 1)


def test_oracle_pins_true_duration_when_it_pays():
    c = core("oracle", oracle_slack_s=0.1, program_fcfs=False)  # FCFS: pins always pay
    short = hints(tool_duration_s=0.5)
    c.arrived("r1", short, now=0.0)
    assert c.finished(fin("r1", short, "", tokens=2000), state())[0]  # no tool text needed: hint...
    assert math.isclose(c.pins["r1"].ttl_s, 0.6)
    # memory is short (6 requests wait for 6000 tokens, 16 of 1600 are free): the price rises to ~6/1600
    # JCT-s per token-s and re-judges r1 (0.55 s more of 320 tokens costs more than its re-prefill) ...
    short_state = state(now=0.05, free=1, num_waiting=6, waiting_demand_tokens=6000)
    assert [(r.request_id, r.reason) for r in c.step(short_state)] == [("r1", "price")]
    # ... and a 10 000 s pin is not taken at that price
    long = hints("p2", tool_duration_s=10_000.0)
    c.arrived("r2", long, now=0.0)
    assert not c.finished(fin("r2", long, "```bash\nls\n```", tokens=2000), short_state)[0]
    # when nothing waits memory is free: the same long call is pinned (the price will re-judge it)
    c.step(state(now=0.1))
    c.arrived("r3", hints("p3", tool_duration_s=10_000.0), now=0.1)
    assert c.finished(fin("r3", hints("p3", tool_duration_s=10_000.0), "", tokens=2000), state(now=0.2))[0]


def test_oracle_without_duration_never_pins():
    c = core("oracle")
    c.arrived("r1", hints(), now=0.0)
    assert not c.finished(fin("r1", hints(), "```bash\nls\n```"), state())[0]


# -- ordering -------------------------------------------------------------------------------------------


def test_program_fcfs_pinned_first_and_age_bound():
    c = one_wait_measured(core(age_factor=2.0, age_min_s=5.0, age_bound=True))
    c.arrived("old1", hints("old"), now=0)
    c.finished(fin("old1", hints("old"), "final"), state(now=1))
    c.arrived("new1", hints("new"), now=2)
    c.arrived("old2", hints("old"), now=3)  # a later turn of an older program
    assert c.order_waiting(["new1", "old2"], now=3.5) == [1, 0]  # older program first
    # a program holding a pin goes before older programs
    c.arrived("pin1", hints("pinned"), now=3.6)
    c.finished(fin("pin1", hints("pinned"), "```bash\nls\n```"), state(now=3.7))
    c.arrived("pin2", hints("pinned"), now=3.8)
    assert c.order_waiting(["new1", "old2", "pin2"], now=3.9) == [2, 1, 0]
    # age bound: after 5 s of waiting new1 is overdue and goes first
    assert c.order_waiting(["new1", "old2", "pin2"], now=7.5) == [0, 2, 1]


def test_ttl_serves_resumed_turns_fcfs_and_admits_new_programs_by_program_order():
    """ttl's default (strict) order: a resumed turn of a younger program that arrived first is not
    overtaken by an older program's later turn (the resume-TTFT guard); first turns of new programs wait
    behind every resumed turn, oldest program first. The oracle orders as ttl; ``--age-bound`` keeps
    program FCFS."""
    for policy, age_bound, want in (
        ("ttl", None, ["young2", "old2", "new-a", "new-b"]),
        ("ttl", True, ["old2", "young2", "new-a", "new-b"]),
        ("oracle", None, ["young2", "old2", "new-a", "new-b"]),
        ("oracle", True, ["old2", "young2", "new-a", "new-b"]),
    ):
        c = core(policy, age_bound=age_bound, age_min_waits=100)  # no request overdue here
        c.arrived("old1", hints("old"), now=0)
        c.arrived("young1", hints("young"), now=1)
        c.arrived("new-a", hints("new-a"), now=2)  # a program whose first turn still waits
        c.arrived("new-b", hints("new-b"), now=2.5)
        for rid, prog in (("old1", "old"), ("young1", "young")):
            c.admitted(rid, 0, now=2)
            c.finished(fin(rid, hints(prog), "final"), state(now=3))
        c.arrived("young2", hints("young"), now=4)
        c.arrived("old2", hints("old"), now=5)
        waiting = ["new-b", "old2", "new-a", "young2"]
        order = c.order_waiting(waiting, now=6)
        assert [waiting[i] for i in order] == want, (policy, age_bound)


def test_preemption_victim_is_the_youngest_program_not_on_its_last_turn():
    c = core()
    c.arrived("old", hints("A"), now=0)
    c.arrived("young-last", hints("C", last_turn=True), now=2)
    c.arrived("young", hints("B"), now=1)
    c.arrived("old-2", hints("A"), now=3)
    order = c.order_running(["young", "old", "young-last", "old-2"])
    ids = [["young", "old", "young-last", "old-2"][i] for i in order]
    assert ids[-1] == "young" and ids[0] == "young-last"
    assert core("vllm").order_running(["a", "b"]) is None


def test_order_is_recomputed_only_when_something_changed():
    c = one_wait_measured(core(age_factor=1.0, age_min_s=5.0, age_bound=True))
    c.arrived("a", hints("A"), now=0)
    c.arrived("b", hints("B"), now=1)
    assert c.needs_reorder(2, now=1.5)
    assert c.order_waiting(["a", "b"], now=1.5) == [0, 1]
    assert not c.needs_reorder(2, now=2.0)  # nothing happened
    assert c.needs_reorder(3, now=2.0)  # the queue changed under us (e.g. a preemption)
    assert c.needs_reorder(2, now=5.0)  # 'a' becomes overdue at 0 + 5 s
    c.order_waiting(["a", "b"], now=5.0)
    assert not c.needs_reorder(2, now=5.5)
    c.arrived("c", hints("C"), now=5.6)
    assert c.needs_reorder(2, now=5.6)  # an arrival
    assert not core("vllm").needs_reorder(5, now=0)


def test_no_starvation_under_a_stream_of_older_programs():
    """A young program's request is served within the age bound although older programs keep coming."""
    c = one_wait_measured(core(age_factor=2.0, age_min_s=1.0, age_bound=True))
    for i in range(5):
        c.arrived(f"o{i}", hints(f"old{i}"), now=0)
    c.arrived("y", hints("young"), now=1)
    waiting, now, served_at = [f"o{i}" for i in range(5)] + ["y"], 1.0, None
    k = 0
    while served_at is None and now < 100:
        order = c.order_waiting(waiting, now=now)
        rid = waiting.pop(order[0])
        c.admitted(rid, 0, now=now)
        if rid == "y":
            served_at = now
        k += 1
        c.arrived(f"o{k}b", hints(f"old{k % 5}"), now=now)  # older programs' next turns keep arriving
        waiting.append(f"o{k}b")
        now += 0.5
    assert served_at is not None and served_at - 1 <= c.order.age_bound_s + 0.5


def test_strict_fcfs_for_continuum_can_starve():
    c = core("continuum")
    c.arrived("o", hints("old"), now=0)
    c.arrived("y", hints("young"), now=1)
    c.arrived("o2", hints("old"), now=2)
    assert c.order_waiting(["y", "o2"], now=1000) == [1, 0]


# -- online adaptation ----------------------------------------------------------------------------------


def test_blend_quantiles_moves_from_prior_to_observations():
    prior = [1.0, 10.0, 100.0]
    assert blend_quantiles(LEVELS, prior, 20, []) == pytest.approx(prior, rel=0.05)
    obs = [0.2] * 200
    q = blend_quantiles(LEVELS, prior, 20, obs)
    assert q[1] == pytest.approx(0.2) and q[0] <= q[1] <= q[2]


def test_online_observations_refresh_the_table():
    t = tables()
    on = OnlineDurations(t, min_samples=5, prior_weight=5, min_interval_s=0.0)
    assert t.engine_decision(["make", "*"], 100, 0.1) == TTLDecision(0.0, 0.0, "*")  # '*': fixed at 0 s
    for i in range(50):
        on.observe(["make", "*"], 0.05, now=i)
    d = t.engine_decision(["make", "*"], 100, 0.1)
    assert d.key == "make" and d.ttl_s > 0  # 'make' proved fast here: now pinned
    assert t.fixed_pins["*"].ttl_s == 0.0  # adaptation learns quantiles, never rewrites a fixed pin


def test_core_measures_tool_durations_and_adapts():
    c = core(online_min_samples=3)
    seen = []
    c.sink.tool_observed = seen.append  # type: ignore[method-assign]
    now = 0.0
    for turn in range(6):
        rid = f"r{turn}"
        c.arrived(rid, hints(), now=now)
        c.admitted(rid, 0, now=now)
        c.finished(fin(rid, hints(), "```bash\nmake all\n```"), state(now=now + 0.1))
        now += 0.1 + 0.3  # the tool takes 0.3 s
    assert len(seen) == 5 and all(o.duration_s == pytest.approx(0.3) for o in seen)
    assert seen[0].keys[0] == "make:all" and seen[0].turn_index == 0
    # 'make:all' was learned online (the hand-set table says '*': no pin): it is now priced and pinned
    c.arrived("r9", hints(), now=now)
    pinned, _ = c.finished(fin("r9", hints(), "```bash\nmake all\n```"), state(now=now + 0.1))
    assert pinned and c.pins["r9"].key == "make:all"


# -- invariants -----------------------------------------------------------------------------------------


class FakeEngine:
    """A block ledger standing in for the engine: running requests and pins hold blocks, the rest is free.

    Applies the core's releases exactly as an engine would (free the pinned request's blocks once) and fails
    on a release of something not pinned (double free) or a pin the ledger does not know (leak)."""

    def __init__(self, core: PolicyCore, total: int = 100):
        self.core, self.total = core, total
        self.running: dict[str, int] = {}  # request id -> blocks
        self.pinned: dict[str, int] = {}
        self.waiting: list[tuple[str, int]] = []  # (request id, blocks needed)

    @property
    def free(self) -> int:
        return self.total - sum(self.running.values()) - sum(self.pinned.values())

    def apply(self, releases) -> None:
        for rel in releases:
            assert self.pinned.pop(rel.request_id) == rel.blocks  # KeyError: double free / unknown pin

    def state(self, now: float) -> EngineState:
        demand = sum(b for _, b in self.waiting) * 16
        return EngineState(
            now,
            self.free,
            self.total,
            len(self.waiting),
            16,
            len(self.running),
            demand,
            sum(self.pinned.values()),
        )

    def admit_head(self, now: float) -> bool:
        """Admit the first waiting request, opening the valve as the engine would; False: it must wait."""
        rid, need = self.waiting[0]
        while self.free < need:
            if not self.core.valve_open(len(self.running)):
                return False
            rel = self.core.release_for_pressure(now, admitting=rid, engine_busy=bool(self.running))
            if rel is None:
                return False
            self.apply([rel])
        self.waiting.pop(0)
        self.running[rid] = need
        self.apply(self.core.admitted(rid, self.core.block_size * need if self.core.pins else 0, now))
        return True


@pytest.mark.parametrize("policy", [p.value for p in Policy])
def test_random_workload_no_deadlock_no_leaked_block(policy):
    """Aborts, last turns, pressure and price moves: block accounting stays exact, nothing deadlocks (with
    nothing running the head of the queue always gets in), and every pin is gone at the end."""
    rng = random.Random(7)
    c = core(policy, max_pin_share=0.4)
    eng = FakeEngine(c)
    now, rid, hinted = 0.0, 0, {}
    for _ in range(3000):
        now += rng.random() * 0.2
        op = rng.random()
        prog = f"p{rng.randrange(12)}"
        if op < 0.3:
            rid += 1
            h = hints(prog, last_turn=rng.random() < 0.1, tool_duration_s=rng.choice([0.1, 1.0, 30.0]))
            hinted[f"r{rid}"] = h
            c.arrived(f"r{rid}", h, now=now)
            eng.waiting.append((f"r{rid}", rng.randint(1, 30)))
        elif op < 0.55 and eng.waiting:
            idle = not eng.running
            admitted = eng.admit_head(now)
            assert admitted or not idle, "deadlock: nothing runs and the head of the queue cannot get in"
        elif op < 0.8 and eng.running:
            r = rng.choice(sorted(eng.running))
            blocks = eng.running.pop(r)
            text = rng.choice(["```bash\nls\n```", "```bash\nsleep 2\n```", "done", ""])
            tokens = rng.choice([320, 20_000])  # progress-ttl pins only contexts worth re-prefilling
            pinned, rel = c.finished(fin(r, hinted.pop(r), text, tokens, blocks), eng.state(now))
            eng.apply(rel)
            if pinned:
                eng.pinned[r] = blocks
        elif op < 0.9 and (eng.running or eng.waiting):
            if eng.waiting and rng.random() < 0.5:
                r = eng.waiting.pop(rng.randrange(len(eng.waiting)))[0]
            elif eng.running:
                r = rng.choice(sorted(eng.running))
                eng.running.pop(r)
            else:
                continue
            hinted.pop(r)
            eng.apply(c.aborted(r, now=now))
        eng.apply(c.step(eng.state(now)))
        assert c.pinned_blocks == sum(p.blocks for p in c.pins.values()) == sum(eng.pinned.values())
        assert set(c.pins) == set(eng.pinned) and eng.free >= 0
        assert c.pinned_blocks <= max(40, c.rule.max_pin_share * 100)
        assert all(p.program_id in c.programs and c.programs[p.program_id].pin is p for p in c.pins.values())
    if c.rule.pins:
        assert c.stats.pins_created > 0
    for r, _ in list(eng.waiting):
        eng.apply(c.aborted(r, now=now))
    for r in list(eng.running):
        eng.apply(c.aborted(r, now=now))
    eng.waiting.clear()
    eng.running.clear()
    eng.apply(c.step(eng.state(now + 100)))
    assert not c.pins and c.pinned_blocks == 0 and not eng.pinned


def test_config_errors_are_clear():
    with pytest.raises(ConfigError, match="policy must be one of"):
        ServeConfig(policy="fast").validate()
    with pytest.raises(ConfigError, match="needs a TTL model"):
        ServeConfig(policy="ttl").validate()
    with pytest.raises(ConfigError, match="unknown ctk setting"):
        ServeConfig.from_mapping({"nope": 1})
    with pytest.raises(ConfigError, match="age_quantile"):
        ServeConfig(policy="vllm", age_quantile=1.5).validate()
    cfg = ServeConfig.from_env({"CTK_POLICY": "oracle", "CTK_MAX_PIN_SHARE": "0.3", "CTK_DETECTORS": "bash"})
    assert (cfg.policy, cfg.max_pin_share, cfg.detectors) == ("oracle", 0.3, ("bash",))
    assert ServeConfig.from_env(cfg.to_env()) == cfg


def test_admit_order_size_admits_the_smallest_new_program_first():
    """``admit_order="size"`` (the admission probe): new programs by the ``program_size`` their first
    request carries, smallest first; resumed turns first as in ttl's order; the default: arrival order."""
    for order, expected in (("size", [2, 0, 1]), ("arrival", [2, 1, 0])):
        c = core(admit_order=order)
        c.arrived("old-t0", hints("old"), now=0.0)
        c.admitted("old-t0", 0, now=0.0)
        c.arrived("big", hints("big", program_size=40.0), now=1.0)
        c.arrived("small", hints("small", program_size=0.5), now=2.0)
        c.arrived("old-t1", hints("old", turn_index=1), now=3.0)
        assert c.order_waiting(["small", "big", "old-t1"], now=4.0) == expected, order
    assert parse_hints(None, {"program_size": -1}).program_size is None  # ignored, with a warning
    with pytest.raises(ConfigError):
        ServeConfig(admit_order="largest").validate()


def test_admit_order_agent_predicts_a_new_programs_size_from_its_agents_finished_programs():
    """``admit_order="agent"``: a new program is sized by the mean work (Σ turn contexts / 1000) of its
    agent's finished programs, learned online; an agent not seen finishing gets the mean over all agents."""
    c = core(admit_order="agent", admit_round=False)  # the unrounded mean
    for pid, agent, tokens in (("a1", "big", 9000), ("b1", "small", 500)):
        c.arrived(f"{pid}-t0", hints(pid, agent=agent), now=0.0)
        c.admitted(f"{pid}-t0", 0, now=0.0)
        c.finished(fin(f"{pid}-t0", hints(pid, agent=agent, last_turn=True), tokens=tokens), state(now=1.0))
    c.arrived("big2", hints("a2", agent="big"), now=2.0)
    c.arrived("new", hints("c1", agent="unseen"), now=3.0)  # the mean over agents: 4.75
    c.arrived("small2", hints("b2", agent="small"), now=4.0)
    assert c.order_waiting(["big2", "new", "small2"], now=5.0) == [2, 1, 0]
    assert c._sizing.estimate("big") == 9.0


def test_admit_round_keeps_one_agents_programs_in_arrival_order_while_its_mean_drifts():
    from ctk.policy.ordering import AgentSizes

    sizes = AgentSizes(rounded=True)
    sizes.finished("a", 3.1)
    first = sizes.estimate("a")
    sizes.finished("a", 2.9)  # the mean drifts from 3.1 to 3.0: the same power of 2
    assert first == sizes.estimate("a") == 4.0
    assert AgentSizes(rounded=False).estimate("a") == 0.0  # nothing finished: 0 (arrival order)


def test_resume_order_attained_serves_the_resumed_turn_of_the_least_served_program_first():
    """``resume_order="attained"``: resumed turns by their program's work so far (Σ turn contexts / 1000),
    least first; new programs after them by arrival."""
    c = core(resume_order="attained")
    for pid, tokens in (("heavy", 9000), ("light", 500)):
        c.arrived(f"{pid}-t0", hints(pid), now=0.0)
        c.admitted(f"{pid}-t0", 0, now=0.0)
        c.finished(fin(f"{pid}-t0", hints(pid), tokens=tokens), state(now=1.0))
    c.arrived("heavy-t1", hints("heavy", turn_index=1), now=2.0)
    c.arrived("new", hints("new"), now=2.5)
    c.arrived("light-t1", hints("light", turn_index=1), now=3.0)
    assert c.order_waiting(["heavy-t1", "new", "light-t1"], now=4.0) == [2, 0, 1]


def test_default_admits_new_programs_by_their_agents_learned_size():
    """ttl's default (``admit_order="agent"``, rounded): once each agent has a finished program, a new program
    of the smaller agent overtakes an older one of the larger; ``admit_order="arrival"`` keeps arrival order.
    Without agents (no hint) every program is one agent's: arrival order."""
    for settings, expected in (({}, [1, 0]), ({"admit_order": "arrival"}, [0, 1])):
        c = core(**settings)
        for pid, agent, tokens in (("a1", "big", 9000), ("b1", "small", 500)):
            c.arrived(f"{pid}-t0", hints(pid, agent=agent), now=0.0)
            c.admitted(f"{pid}-t0", 0, now=0.0)
            last = hints(pid, agent=agent, last_turn=True)
            c.finished(fin(f"{pid}-t0", last, tokens=tokens), state(now=1.0))
        c.arrived("big2", hints("a2", agent="big"), now=2.0)
        c.arrived("small2", hints("b2", agent="small"), now=4.0)
        assert c.order_waiting(["big2", "small2"], now=5.0) == expected, settings
    c = core()
    for k in range(3):
        c.arrived(f"n{k}", hints(f"n{k}"), now=float(k))
    assert c.order_waiting(["n0", "n1", "n2"], now=5.0) == [0, 1, 2]


def test_default_admits_a_request_without_a_program_ahead_of_new_agent_programs():
    """A plain chat request (no program id) is a one-turn program of size 0: under the agent order it goes
    ahead of the new agent programs (it used to wait behind all of them) that arrived less than their size /
    ``admit_aging`` before it, behind a resumed turn, and plain requests keep arrival order among themselves.
    Before any program finished every size is 0: arrival order (``admit_aging`` 0: plain requests first)."""
    for aging, expected in ((None, [2, 0, 1]), (0.0, [2, 1, 0])):  # no size learned yet
        c0 = core() if aging is None else core(admit_aging=aging)
        c0.arrived("chat0", parse_hints(None, None), now=0.5)
        c0.arrived("new0", hints("n0", agent="a"), now=0.6)
        c0.arrived("chat1", parse_hints(None, None), now=0.7)
        assert c0.order_waiting(["new0", "chat1", "chat0"], now=1.0) == expected
    c = core()
    c.arrived("chat0", parse_hints(None, None), now=0.5)
    c.arrived("new0", hints("n0", agent="a"), now=0.6)
    c.arrived("chat1", parse_hints(None, None), now=0.7)
    c.admitted("chat0", 0, now=1.0)
    c.admitted("new0", 0, now=1.0)
    c.finished(fin("new0", hints("n0", agent="a", last_turn=True), tokens=4000), state(now=1.5))
    c.arrived("r-t0", hints("r"), now=2.0)
    c.admitted("r-t0", 0, now=2.0)
    c.finished(fin("r-t0", hints("r"), tokens=1000), state(now=2.5))
    c.arrived("new1", hints("n1", agent="a"), now=3.0)
    c.arrived("r-t1", hints("r"), now=4.0)  # a resumed turn
    c.arrived("chat2", parse_hints(None, None), now=5.0)
    waiting = ["chat1", "new1", "chat2", "r-t1"]
    assert c.order_waiting(waiting, now=6.0) == [3, 0, 2, 1]
    assert core(admit_order="arrival").order.key(5.0, None, False, 0, 0)[0] == 3  # the arrival order's class


@pytest.mark.parametrize("policy", ["ttl", "continuum", "progress-ttl", "thunderagent", "vllm"])
def test_an_arrival_never_releases_a_pin(policy):
    """A program's pin awaits its next request's admission (hit or miss there): the request's arrival releases
    nothing, whatever pins are held (random programs, tool calls, admissions, finishes and aborts)."""
    c = core(policy)
    rng = random.Random(7)
    now, seq, pending = 0.0, 0, []
    for _ in range(600):
        now += rng.uniform(0.0, 0.5)
        step = rng.random()
        if step < 0.4 or not pending:
            seq += 1
            rid, h = (
                f"r{seq}",
                hints(f"p{rng.randrange(12)}", **({"last_turn": True} if rng.random() < 0.1 else {})),
            )
            assert c.arrived(rid, h, now=now, prompt_tokens=rng.randrange(100, 4000)) == []
            pending.append((rid, h))
        elif step < 0.6:
            rid, _ = rng.choice(pending)
            c.admitted(rid, rng.randrange(0, 4000), now=now)
        elif step < 0.95:
            rid, h = pending.pop(rng.randrange(len(pending)))
            c.admitted(rid, 0, now=now)
            text = rng.choice(["```bash\nls -la\n```", "```bash\nsleep 1\n```", "done"])
            c.finished(
                fin(rid, h, text, tokens=rng.randrange(64, 4000)), state(now, free=rng.randrange(0, 100))
            )
        else:
            rid, _ = pending.pop(rng.randrange(len(pending)))
            c.aborted(rid, now)
        c.step(state(now, free=rng.randrange(0, 100)))
    if policy in ("ttl", "continuum"):  # (these pin in this setting: pins were held as programs came back)
        assert c.stats.pins_created > 0 and c.stats.pin_hits + c.stats.pin_misses > 0
