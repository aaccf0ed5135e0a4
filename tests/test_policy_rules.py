"""Pin rules and the valve on the v2 core (no engine): Belady under true durations, Progress-TTL's formula,
the priced TTL rule, the oracle, Continuum's quirks, the age bound and the program-FCFS switch."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from ctk.policy.config import ConfigError, ServeConfig
from ctk.policy.core import PolicyCore
from ctk.policy.detect import ToolCall
from ctk.policy.events import EngineState, Finished, Pin, PinCall, ReleaseReason, ToolObservation
from ctk.policy.hints import parse_hints
from ctk.policy.rules import (
    POLICY_NAMES,
    RULES,
    Policy,
    ProgressTTLRule,
    lognormal_fit,
    make_rule,
    progress_ttl,
    progress_ttl_candidates,
    progress_ttl_objective,
    router_reprefill_cost_s,
    value_by_cdf,
)
from ctk.predict.cost import CDF, CostModel
from ctk.predict.tables import TTLTables

LEVELS = [0.1, 0.5, 0.9]
COST = CostModel(prefill_tokens=(0, 10_000), prefill_s=(0.0, 1.0), requeue_delay_s=0.0)  # 0.1 ms per token


def priced_tables() -> TTLTables:
    """Trained-style tables (with a cost profile): the rule prices them live from their quantiles."""
    return TTLTables.build(
        {"fast": [0.1, 0.3, 1.0], "slow": [5.0, 30.0, 120.0], "*": [1.0, 10.0, 100.0]},
        {"fast": 100, "slow": 100, "*": 100},
        LEVELS,
        COST,
    )


def make_core(policy: str, tables=None, **kw) -> PolicyCore:
    kw.setdefault("age_min_waits", 1)  # the bound from the first measured wait (the default waits for 100)
    cfg = ServeConfig(policy=policy, ttl_model="x.pkl", **kw).validate()
    return PolicyCore(cfg, make_rule(cfg.policy, cfg, tables, COST), block_size=16)


def state(now=0.0, free=900, total=1000, **kw) -> EngineState:
    return EngineState(now, free, total, block_size=16, **kw)


def h(program, **kw):
    return parse_hints(None, {"program_id": program, **kw})


def finish(c, rid, hints, now, tokens=4000, blocks=250, text="", st=None):
    c.arrived(rid, hints, now=now - 0.01) if rid not in c.requests else None
    ev = Finished(rid, hints, text, tokens - 10, tokens, 10, blocks)
    return c.finished(ev, st or state(now))


# -- registry ------------------------------------------------------------------------------------------


def test_policy_registry_is_the_config_vocabulary():
    assert POLICY_NAMES == ("vllm", "continuum", "progress-ttl", "ttl", "oracle", "thunderagent")
    assert ServeConfig(policy="progress-ttl").validate().policy is Policy.PROGRESS_TTL
    with pytest.raises(ConfigError, match="progress-ttl"):
        ServeConfig(policy="lru").validate()
    for name in POLICY_NAMES:
        cfg = ServeConfig(policy=name, ttl_model="x.pkl").validate()
        assert make_rule(name, cfg, priced_tables()).policy == name


def test_each_rule_class_declares_what_the_rest_of_ctk_asks_of_its_policy():
    assert list(RULES) == list(Policy) and all(cls.policy is p for p, cls in RULES.items())

    def having(flag: str) -> set[str]:
        return {p.value for p, cls in RULES.items() if getattr(cls, flag)}

    assert having("needs_model_file") == {"ttl"}
    assert having("uses_model_file") == {"ttl", "oracle"}  # the oracle reads the file's cost profile
    assert having("needs_ctk_scheduler") == set(POLICY_NAMES) - {"vllm"}
    for policy, cls in RULES.items():  # the settings refuse to run a rule without the file it needs
        if cls.needs_model_file:
            with pytest.raises(ConfigError, match=f"policy '{policy}' needs a TTL model file"):
                ServeConfig(policy=policy).validate()
        else:
            assert ServeConfig(policy=policy).validate().policy is policy


def test_every_release_reason_is_emitted_and_every_emitted_one_listed():
    src = (Path(__file__).parents[1] / "ctk" / "policy" / "core.py").read_text()
    emitted = set(re.findall(r"ReleaseReason\.([A-Z_]+)", src))
    # the driver emits the three lifecycle reasons through release_all(reason)
    assert emitted | {"SHUTDOWN", "RECONFIGURE", "RESET"} == set(ReleaseReason.__members__)
    assert not re.search(r"_release\([^)]*\"", src)  # no free-string reasons


def test_program_fcfs_switch_for_any_policy():
    assert not make_core("vllm").reorders and make_core("vllm", program_fcfs=True).reorders
    assert make_core("oracle").reorders and not make_core("oracle", program_fcfs=False).reorders
    c = make_core("vllm", program_fcfs=True, age_min_s=10.0)
    c.arrived("a", h("A"), now=0.0)
    c.arrived("b", h("B"), now=1.0)
    c.arrived("a2", h("A"), now=2.0)
    assert c.order_waiting(["b", "a2"], now=2.5) == [1, 0]  # stock eviction, program FCFS order
    assert c.finished(Finished("a", h("A"), "```bash\nls\n```", 10, 20, 10, 5), state(3.0)) == (False, [])


# -- the valve: Belady under true durations ---------------------------------------------------------------


def test_oracle_valve_drops_the_program_returning_last_never_the_one_about_to_hit():
    c = make_core("oracle", oracle_slack_s=0.1)
    for i, t in enumerate([1.0, 60.0, 5.0, 20.0]):  # the same size, finished together
        assert finish(c, f"r{i}", h(f"p{i}", tool_duration_s=t), now=0.0)[0]
    order = [c.release_for_pressure(now=0.5).request_id for _ in range(4)]
    assert order == ["r1", "r3", "r2", "r0"]  # returns at 60, 20, 5, 1 s
    # later on, the pin about to hit still goes last although it was created first
    for i, (t, at) in enumerate([(4.0, 0.0), (30.0, 3.0), (10.0, 3.0)]):
        finish(c, f"s{i}", h(f"q{i}", tool_duration_s=t), now=at)
    assert c.release_for_pressure(now=3.9).request_id == "s1"  # returns at 33 s
    assert c.release_for_pressure(now=3.9).request_id == "s2"  # at 13 s; s0 (at 4 s) stays
    assert list(c.pins) == ["s0"]


def test_valve_value_is_per_token_and_a_returned_program_goes_last():
    c = make_core("oracle")
    finish(c, "big", h("p0", tool_duration_s=5.0), now=0.0, tokens=8000, blocks=500)
    finish(c, "small", h("p1", tool_duration_s=5.0), now=0.0, tokens=8000, blocks=50)
    finish(c, "late", h("p2", tool_duration_s=50.0), now=0.0, tokens=8000, blocks=50)
    c.arrived("late-next", h("p2"), now=1.0)  # p2 came back early: its pin is about to hit
    assert [c.release_for_pressure(now=1.0).request_id for _ in range(3)] == ["big", "small", "late"]


def test_ttl_valve_keeps_the_pin_whose_return_is_due():
    c = make_core("ttl", priced_tables(), max_pin_share=1.0)
    finish(c, "f", h("p0"), 0.0, text="```bash\nfast\n```")
    finish(c, "s", h("p1"), 0.0, text="```bash\nslow\n```")
    assert c.release_for_pressure(now=0.2).request_id == "s"  # 'slow' returns in ~30 s, 'fast' in 0.3 s


def test_ttl_valve_keeps_the_pin_whose_returns_are_due_within_the_horizon():
    """'soon' mostly returns within 1 s but has a long tail (cheap per token-second over its whole 60 s TTL);
    'steady' returns at 4-6 s. Through a shortage judged over the next 2 s, 'soon' is the pin to keep."""
    tables = TTLTables.build(
        {"soon": [0.5, 1.0, 60.0], "steady": [4.0, 5.0, 6.0], "*": [1.0, 10.0, 100.0]},
        {"soon": 100, "steady": 100, "*": 100},
        LEVELS,
        COST,
    )
    order = {}
    for horizon in (2.0, 0.0):  # 0: the whole TTL, as before the horizon
        c = make_core("ttl", tables, max_pin_share=1.0, valve_horizon_s=horizon)
        assert finish(c, "a", h("p0"), 0.0, text="```bash\nsoon\n```")[0]
        assert finish(c, "b", h("p1"), 0.0, text="```bash\nsteady\n```")[0]
        order[horizon] = [c.release_for_pressure(now=0.2).request_id for _ in range(2)]
    assert order == {2.0: ["b", "a"], 0.0: ["a", "b"]}
    assert ServeConfig().valve_horizon_s == 2.0  # the default judges the near hold
    # the pin budget (room for one of them) compares whole holds: 'steady' displaces 'soon' at either horizon
    for horizon in (2.0, 0.0):
        c = make_core("ttl", tables, max_pin_share=0.3, valve_horizon_s=horizon)
        assert finish(c, "a", h("p0"), 0.0, text="```bash\nsoon\n```")[0]
        pinned, released = finish(c, "b", h("p1"), 0.2, text="```bash\nsteady\n```")
        assert pinned and [(r.request_id, r.reason) for r in released] == [("a", ReleaseReason.BUDGET)]
        assert list(c.pins) == ["b"]


def _pin(name: str, cdf: CDF, ttl_s: float, tokens: int = 1000) -> Pin:
    pin = Pin(name, name, tokens // 16, tokens, ttl_s, 0.0, ttl_s, 1.0, 1.0, name, None, cdf=cdf)
    pin.held_tokens = tokens
    return pin


def test_valve_value_within_a_horizon_orders_pins_with_nothing_due_by_their_whole_value():
    due = _pin("due", CDF.window(0.0, 120.0), 120.0)  # something returns any moment, spread over 2 min
    late = _pin("late", CDF.window(5.0, 10.0), 10.0)  # nothing before 5 s
    later = _pin("later", CDF.window(5.0, 40.0), 40.0)  # nothing before 5 s, and spread over longer
    spent = _pin("spent", CDF.window(0.0, 1.0), 1.5)  # every return was due before now
    whole = {p.key: value_by_cdf(p, 1.2) for p in (due, late, later, spent)}
    near = {p.key: value_by_cdf(p, 1.2, horizon_s=2.0) for p in (due, late, later, spent)}
    assert whole["spent"] == 0.0 and near["spent"] == -math.inf  # first under either
    assert whole["due"] < whole["later"] < whole["late"]  # over the whole TTL 'due' would go first ...
    assert sorted(near, key=near.get) == ["spent", "later", "late", "due"]  # ... within 2 s it goes last
    assert near["due"] > 0.0 > near["late"] > near["later"]
    assert value_by_cdf(due, 1.2, horizon_s=200.0) == whole["due"]  # a horizon past the TTL is the whole TTL


# -- Progress-TTL (vllm-router 0.1.16+) --------------------------------------------------------------------


def _numeric_objective(d, mu, sigma, cost):
    """C·P(T<d) − E[T; T<d] − d·P(T≥d) by integrating the log-normal density (midpoint rule in log t)."""
    n, lo = 20000, mu - 12 * sigma
    step = (math.log(d) - lo) / n
    p = part = 0.0
    for k in range(n):
        x = lo + (k + 0.5) * step
        dens = math.exp(-0.5 * ((x - mu) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
        p += dens * step
        part += math.exp(x) * dens * step
    return cost * p - part - d * (1 - p)


def test_progress_ttl_worked_example_reproduces_the_router_formula():
    assert router_reprefill_cost_s(50_000) == pytest.approx((0.066 + 0.057 * 50 + 0.0044 * 2500) * 1.85)
    assert router_reprefill_cost_s(50_000) == pytest.approx(25.74, abs=0.01)  # polynomial 13.916 s x 1.85
    cands = progress_ttl_candidates(25.74)
    assert cands[:2] == [0.0, 0.05] and len(cands) == 34
    assert cands[-1] == pytest.approx(10.0) and all(a < b for a, b in zip(cands, cands[1:], strict=False))
    # gaps with median 1 s and log-sd 1: the fit, then the candidate that maximises the objective
    z = [-1.2816, -0.8416, -0.5244, -0.2533, 0.0, 0.2533, 0.5244, 0.8416, 1.2816, 0.0]  # mean 0
    sd = math.sqrt(sum(v * v for v in z) / len(z))
    gaps = [math.exp(1.0 + 1.5 * v / sd) for v in z] * 10  # ln(gap): mean 1, sd 1.5
    mu, sigma = lognormal_fit(gaps)
    assert mu == pytest.approx(1.0) and sigma == pytest.approx(1.5)
    for d in (0.05, 1.0, 4.0):
        assert progress_ttl_objective(d, mu, sigma, 5.0) == pytest.approx(
            _numeric_objective(d, mu, sigma, 5.0), abs=1e-4
        )
    c = 5.0  # C of a ~21k-token prompt
    best = max(progress_ttl_candidates(c), key=lambda d: _numeric_objective(d, mu, sigma, c) if d else 0.0)
    assert progress_ttl(mu, sigma, c) == pytest.approx(best)
    assert 2.0 < best < 3.0  # interior: where the hazard falls to 1/C
    assert progress_ttl(mu, sigma, 0.2) == 0.0  # a cheap re-prefill is never worth holding


def test_progress_ttl_rule_waits_for_a_full_window_then_pins():
    c = make_core("progress-ttl", progress_window=10, max_pin_share=1.0)
    rule = c.rule
    assert isinstance(rule, ProgressTTLRule)
    now = 0.0
    for i in range(10):
        pinned, _ = finish(c, f"r{i}", h("p"), now, tokens=21_000, text="```bash\nls\n```")
        assert not pinned  # TTL 0 until the window of gaps is full
        now += 1.0
        c.arrived(f"r{i + 1}", h("p"), now=now)  # a 1 s gap
        c.admitted(f"r{i + 1}", 0, now=now)
    assert len(rule.gaps) == 10
    pinned, _ = finish(c, "r10", h("p"), now, tokens=21_000, text="```bash\nls\n```")
    assert pinned and c.pins["r10"].ttl_s >= 1.0
    # the client's kv_retention_ttl_seconds overrides the TTL
    pinned, _ = finish(
        c, "x", h("q", kv_retention_ttl_seconds=7.5), now, tokens=21_000, text="```bash\nls\n```"
    )
    assert pinned and c.pins["x"].ttl_s == 7.5


# -- the priced TTL rule ---------------------------------------------------------------------------------


def call(keys, tokens=4000, blocks=250, **hints):
    return PinCall(
        "p", "r", ToolCall("hint", None, keys[0]), tuple(keys), tokens, blocks, 16, h("p", **hints)
    )


def test_ttl_rule_chooses_from_quantiles_under_the_live_price():
    rule = make_rule("ttl", ServeConfig(policy="ttl", ttl_model="x"), priced_tables(), COST)
    free = rule.decide(call(["fast", "*"]), state(), price=0.0)
    assert (free.ttl_s, free.key) == (1.0, "fast") and free.benefit_s == pytest.approx(0.4)
    # holding 4000 tokens at 1e-4 JCT-s per token-s costs 0.4 s per s: the 'slow' tail no longer pays
    assert rule.decide(call(["slow", "*"]), state(), price=0.0).ttl_s == 120.0
    assert rule.decide(call(["slow", "*"]), state(), price=1e-4).ttl_s == 0.0
    mid = rule.decide(call(["fast", "*"]), state(), price=1e-4)
    assert 0 < mid.ttl_s <= 1.0
    # unknown program name backs off to '*'
    assert rule.decide(call(["weird", "*"]), state(), price=0.0).key == "*"


def test_block_size_does_not_change_a_ttl_decision():
    rule = make_rule("ttl", ServeConfig(policy="ttl", ttl_model="x"), priced_tables(), COST)
    a = PinCall("p", "r", ToolCall("hint", None, "fast"), ("fast", "*"), 4000, 250, 16, h("p"))
    b = PinCall("p", "r", ToolCall("hint", None, "fast"), ("fast", "*"), 4000, 32, 125, h("p"))
    for price in (0.0, 3e-5, 1e-4, 1e-3):
        assert rule.decide(a, state(), price) == rule.decide(b, state(), price)


def test_held_pins_are_rejudged_only_when_the_price_moves():
    c = make_core("ttl", priced_tables(), max_pin_share=1.0, age_bound=True)
    c.arrived("w0", h("warm-up"), now=0.0)
    c.admitted("w0", 0, now=0.0)  # one wait measured, 0 s: the bound is 0
    finish(c, "s", h("p1"), 0.0, text="```bash\nslow\n```")  # price 0: pinned for its q0.9
    finish(c, "f", h("p2"), 0.0, text="```bash\nfast\n```")
    assert set(c.pins) == {"s", "f"}
    assert c.step(state(0.1)) == []  # nothing waits: price 0, no re-judgement
    assert c.stats.rejudged == 0
    c.arrived("w1", h("w1"), now=0.15)  # the two requests the engine reports waiting (overdue: the
    c.arrived("w2", h("w2"), now=0.15)  # measured bound is 0), so the pins pay the price
    short = state(0.2, free=10, num_waiting=2, waiting_demand_tokens=4000)
    released = c.step(short)
    assert [(r.request_id, r.reason) for r in released] == [("s", "price")]  # the long tail goes
    assert "f" in c.pins and c.stats.rejudged == 2
    assert c.step(state(0.25, free=10, num_waiting=2, waiting_demand_tokens=4000)) == []
    assert c.stats.rejudged == 2  # the price did not move: nothing re-judged


def test_client_ttl_hint_is_the_pin_ttl_unless_the_price_forbids_it():
    rule = make_rule("ttl", ServeConfig(policy="ttl", ttl_model="x"), priced_tables(), COST)
    assert rule.decide(call(["fast", "*"], kv_retention_ttl_seconds=3.0), state(), 0.0).ttl_s == 3.0
    assert rule.decide(call(["slow", "*"], kv_retention_ttl_seconds=60.0), state(), 1e-3).ttl_s == 0.0


def test_fixed_ttl_tables_of_the_engine_tests_keep_their_meaning(tmp_path):
    from ctk.predict.modelfile import load_ttl_tables
    from tests.engine_fixtures import TEST_TTLS, write_test_model

    tables = load_ttl_tables(write_test_model(tmp_path / "m.pkl"))
    assert set(tables.fixed_pins) == set(TEST_TTLS)
    rule = make_rule("ttl", ServeConfig(policy="ttl", ttl_model="x", online_min_samples=1), tables)
    for i in range(40):  # observations (once they win their duel) rewrite the quantiles of 'sleep' ...
        rule.observe(ToolObservation("p", i, None, ["sleep", "*"], 50.0, 0.0, 100, 10), now=float(i))
    assert tables.quantiles_s["sleep"][0] <= 1.0  # (learned when the tables are next read: a decision)
    for price in (0.0, 1e-6):  # ... but the hand-set TTLs still decide
        assert rule.decide(call(["ls", "*"]), state(now=60.0), price).ttl_s == TEST_TTLS["ls"] == 30.0
        assert tables.quantiles_s["sleep"][0] > 1.0
        assert rule.decide(call(["sleep", "*"]), state(now=60.0), price).ttl_s == TEST_TTLS["sleep"] == 1.0
        assert rule.decide(call(["make", "*"]), state(now=60.0), price).ttl_s == 0.0
    # a trained file (with a cost profile) round-trips as priced tables
    again = TTLTables.from_dict(priced_tables().to_dict())
    assert not again.fixed_pins and again.quantiles_s["slow"] == [5.0, 30.0, 120.0]


def test_online_learning_in_batches_learns_what_each_call_learned_at_once_would():
    """The ttl rule queues observed calls and learns them at a decision once the oldest is the learner's
    refresh interval old: a decision sees every call older than that; the learner's state is, call for
    call, that of a rule learning each call as it comes."""
    import random

    settings = dict(policy="ttl", ttl_model="x", online_min_samples=2, online_prior_weight=3)
    lazy = make_rule("ttl", ServeConfig(**settings), priced_tables(), COST)
    eager = make_rule("ttl", ServeConfig(**settings), priced_tables(), COST)
    every = lazy.online.min_interval_s
    assert every > 0
    rng = random.Random(5)
    chains = [["fast", "*"], ["slow", "*"], ["new:x", "new", "*"], ["*"]]
    now, learned, batches = 0.0, [], 0
    for i in range(600):
        now += rng.expovariate(4.0)  # (calls closer than the refresh interval, and further)
        if rng.random() < 0.6:
            obs = ToolObservation("p", i, None, rng.choice(chains), rng.lognormvariate(0, 2), now, 100, 10)
            lazy.observe(obs, now)
            eager.observe(obs, now)
            eager._learn()
            learned.append(now)
        else:
            waiting = len(lazy._unlearned)
            lazy.decide(call(rng.choice(chains), tokens=rng.randrange(100, 8000)), state(now), 1e-6)
            if waiting and not lazy._unlearned:
                batches += 1
            # every call at least the interval old is learned; none is dropped
            assert all(now - t < every for _, _, t in lazy._unlearned), i
            assert [t for _, _, t in lazy._unlearned] == learned[len(learned) - len(lazy._unlearned) :]
    assert batches > 20 and lazy._unlearned  # (the last calls wait for a decision)
    lazy._learn()
    assert lazy.tables.quantiles_s == eager.tables.quantiles_s and lazy.online.recomputes > 10
    assert lazy.online.recomputes == eager.online.recomputes
    assert lazy.online.global_cal.shifts == eager.online.global_cal.shifts


def test_hand_set_files_of_version_1_decide_as_before(tmp_path):
    """A hand-set model file as ctk wrote it before the rows went (version 1 tables: one context bucket ×
    one pressure level per key, no cost profile) loads as fixed pins and the rule decides as it did."""
    from ctk.predict.modelfile import load_ttl_tables, save_model
    from ctk.predict.tables import FixedPin

    old = {
        "context_edges": [1_000_000],
        "pressure_levels": [1.0],
        "quantile_levels": [0.5, 0.9],
        "ttl_s": {"ls": [[30.0]], "sleep": [[1.0]], "*": [[0.0]]},
        "p_hit": {"ls": [[0.9]], "sleep": [[0.9]], "*": [[0.0]]},
        "quantiles_s": {"ls": [15.0, 30.0], "sleep": [0.5, 1.0], "*": [1.0, 10.0]},
        "n_samples": {"ls": 10, "sleep": 10, "*": 10},
        "cost": {},
        "version": 1,
    }
    tables = load_ttl_tables(save_model({"ttl_tables": old}, tmp_path / "old.pkl"))
    pins = {"ls": FixedPin(30.0, 0.9), "sleep": FixedPin(1.0, 0.9), "*": FixedPin(0.0, 0.0)}
    assert tables.fixed_pins == pins
    rule = make_rule("ttl", ServeConfig(policy="ttl", ttl_model="x"), tables)
    for price in (0.0, 1e-6):
        ls = rule.decide(call(["ls", "*"]), state(), price)
        assert (ls.ttl_s, ls.p_hit, ls.key) == (30.0, 0.9, "ls")
        assert rule.decide(call(["sleep", "*"]), state(), price).ttl_s == 1.0
        assert rule.decide(call(["make", "*"]), state(), price).ttl_s == 0.0
        assert ls.ttl_s == tables.live_decision(["ls", "*"], 4000, price).ttl_s  # offline == engine


# -- the oracle ------------------------------------------------------------------------------------------


def test_oracle_pins_exactly_the_true_duration_plus_measured_round_trip():
    c = make_core("oracle", oracle_slack_s=0.2)
    assert finish(c, "a", h("p", tool_duration_s=2.0), now=0.0)[0]
    assert c.pins["a"].ttl_s == pytest.approx(2.2)
    c.arrived("b", h("p"), now=2.5)  # the client took 0.5 s more than the tool
    c.admitted("b", 4000, now=2.5)
    assert c.stats.pin_hits == 1
    assert finish(c, "b", h("p", tool_duration_s=2.0), now=3.0)[0]
    assert c.pins["b"].ttl_s == pytest.approx(2.0 + 0.5 + 0.2)  # learned round trip


def test_oracle_keeps_a_pin_while_its_benefit_exceeds_the_price_of_the_rest_of_the_hold():
    c = make_core("oracle", oracle_slack_s=0.0, program_fcfs=False)  # FCFS: pins always pay
    finish(c, "near", h("p0", tool_duration_s=1.0), now=0.0)  # B = 0.4 s, 4000 tokens
    finish(c, "far", h("p1", tool_duration_s=100.0), now=0.0)
    # 2.5e-6 JCT-s per token-s: holding 4000 tokens costs 0.01 s per s -> 'near' (0.9 s left) stays,
    # 'far' (99.9 s left, 1 s of cost for 0.4 s of benefit) goes
    price_state = state(0.1, free=0, total=50_000, num_waiting=2, waiting_demand_tokens=1000)
    assert c.price.target(price_state) == pytest.approx(2 / 8e5)  # b = n = 2, K = 800k tokens
    out = c.step(price_state)
    assert [r.request_id for r in out] == ["far"] and "near" in c.pins


# -- Continuum -----------------------------------------------------------------------------------------


def test_the_engine_rule_and_the_training_baseline_name_a_tool_alike():
    """Continuum's running mean groups calls by one name, in the engine and in the running-mean baseline."""
    import pandas as pd

    from ctk.policy.rules import continuum_tool
    from ctk.predict.dataset import continuum_tool as frame_tool

    calls = [  # (what the engine sees, the stored row: command_or_args, tool_name)
        (ToolCall("bash", None, "  python3 x.py -q"), ("  python3 x.py -q", None)),
        (ToolCall("hint", None, "make build"), ("make build", "")),
        (ToolCall("openai", "apply_patch", '{"patch": "x"}'), ('{"patch": "x"}', "apply_patch")),
        (ToolCall("tool_call", None, None), (None, None)),
        (ToolCall("bash", None, "   "), ("   ", None)),
    ]
    engine = [continuum_tool(t) for t, _ in calls]
    rows = pd.DataFrame([r for _, r in calls], columns=["command_or_args", "tool_name"])
    assert engine == ["python3", "make", "apply_patch", "?", "?"]
    assert list(frame_tool(rows["command_or_args"], rows["tool_name"])) == engine


def test_continuum_quirks_live_in_its_rule():
    c = make_core("continuum")
    assert finish(c, "r1", h("p"), 0.0, text="```bash\npython x.py\n```")[0]
    c.arrived("r2", h("p"), now=5.0)  # the tool took 5 s
    assert c.step(state(10.0)) == []  # expiry suspended while the next request is in the engine
    assert c.admitted("r2", 4000, now=10.0) == []  # no release at admission
    assert c.next_deadline() == 2.0  # once the next request runs, the expiry clock runs again ...
    c.step(state(10.0))
    assert c.stats.releases == {"expired": 1}  # ... (the public code checks expiry at every schedule())
    c = make_core("continuum")
    assert finish(c, "r1", h("p"), 0.0, text="```bash\npython x.py\n```")[0]
    c.arrived("r2", h("p"), now=5.0)
    c.admitted("r2", 4000, now=5.0)
    # no valve while something else runs, any pin when nothing does
    assert not c.valve_open(n_running=2) and c.valve_open(n_running=1)
    assert make_core("ttl", priced_tables()).valve_open(n_running=5)
    pinned, rel = c.finished(Finished("r2", h("p"), "```bash\npython x.py\n```", 10, 20, 10, 5), state(11.0))
    assert [(r.request_id, r.reason) for r in rel] == [("r1", "hit")]  # released at the next finish
    assert not pinned  # the running mean (10 s) is above 2 s
    assert c.order.age_bound_s == math.inf  # strict program FCFS


def test_programs_that_start_together_keep_the_order_they_were_seen_in():
    """Program FCFS is a strict priority even when first arrivals tie (a simulator starts a closed-loop batch
    at one instant; a real engine never sees a tie): the program seen first goes first, as on the engine."""
    for policy, settings in (("continuum", {}), ("oracle", {"age_bound": True, "age_min_waits": 100})):
        c = make_core(policy, **settings)
        c.arrived("a1", h("A"), now=0.0)
        c.arrived("b1", h("B"), now=0.0)  # same instant, seen second
        c.admitted("a1", 0, now=0.0)
        c.admitted("b1", 0, now=0.0)
        c.arrived("b2", h("B"), now=5.0)  # B comes back first ...
        c.arrived("a2", h("A"), now=6.0)
        assert c.order_waiting(["b2", "a2"], now=7.0) == [1, 0]  # ... and still waits behind A
        assert c.order_running(["b2", "a2"]) == [1, 0]  # B's request is the preemption victim


# -- the age bound ---------------------------------------------------------------------------------------


def test_age_bound_is_fcfs_tail_wait_without_a_floor():
    c = make_core("ttl", priced_tables(), age_bound=True, age_min_waits=3)
    assert c.order.age_bound_s == math.inf  # nothing measured yet: no request is overdue (issue 22)
    for k in range(3):  # three admissions without a wait: the bound is measured, 0 (no floor above stock)
        c.arrived(f"w{k}", h(f"w{k}"), now=0.0)
        assert c.order.age_bound_s == math.inf
        c.admitted(f"w{k}", 0, now=0.0)
    assert c.order.age_bound_s == 0.0
    c.arrived("o", h("old"), now=0.0)
    c.arrived("y", h("young"), now=1.0)
    c.arrived("o2", h("old"), now=1.5)
    assert c.order_waiting(["y", "o2"], now=1.6) == [0, 1]  # both overdue at once: arrival order
    c.aborted("o", now=1.7)  # never admitted: FCFS would not have admitted it either
    c.aborted("y", now=1.7)
    c.aborted("o2", now=1.7)
    # 20 requests arrive 1 s apart; the engine admits them in REVERSE order 30 s later (program order):
    # FCFS would have admitted the k-th arrival at the k-th admission time, i.e. waits of 11..49 s.
    for i in range(20):
        c.arrived(f"w{i}", h(f"w{i}"), now=10.0 + i)
    for k, i in enumerate(reversed(range(20))):
        c.admitted(f"w{i}", 0, now=40.0 + k)
    fcfs_waits = sorted(40.0 + k - (10.0 + k) for k in range(20))  # 30 s each under FCFS
    assert c.order.age_bound_s == pytest.approx(fcfs_waits[-1])  # the tail (q 0.99) of FCFS's waits
    # the bound follows FCFS's tail: 20 of 120 waits at 30 s keep the 0.99 quantile there
    for i in range(100):
        c.arrived(f"v{i}", h(f"v{i}"), now=100.0 + i)
        c.admitted(f"v{i}", 0, now=101.0 + i)
    assert c.order.age_bound_s == pytest.approx(30.0)  # 20 of 120 waits were 30 s: still the tail
    for i in range(1000):
        c.arrived(f"u{i}", h(f"u{i}"), now=300.0 + i)
        c.admitted(f"u{i}", 0, now=301.0 + i)
    assert c.order.age_bound_s == pytest.approx(1.0)  # the window (512) forgot the slow ones
    c.arrived("y3", h("young3"), now=2000.0)
    c.arrived("o3", h("old"), now=2000.2)
    assert c.order_waiting(["y3", "o3"], now=2000.5) == [1, 0]  # an older program may overtake ...
    assert c.order_waiting(["y3", "o3"], now=2001.1) == [0, 1]  # ... for at most the bound
    assert make_core("ttl", priced_tables(), age_factor=2.0, age_bound=True).order.age_factor == 2.0


def test_pins_pay_the_price_only_when_the_queue_head_goes_before_their_return():
    """Under program ordering a returning pinned program goes before every waiting request but an overdue
    one: its pin is charged the memory price only while the queue's head is overdue."""
    c = make_core("ttl", priced_tables())
    c.price.value = 1e-3
    c.order.age_bound_s = 10.0
    c.arrived("w", h("waiter"), now=0.0)
    assert c._charged_price(5.0) == 0.0  # the head waited 5 s < 10 s: the pin's return goes first
    assert c._charged_price(10.5) == 1e-3  # overdue: it goes before the return, the pin pays
    c.admitted("w", 0, now=11.0)
    assert c._charged_price(11.0) == 0.0  # nothing waits
    fcfs = make_core("ttl", priced_tables(), program_fcfs=False)
    fcfs.price.value = 1e-3
    fcfs.arrived("w", h("waiter"), now=0.0)
    assert fcfs._charged_price(0.1) == 1e-3  # FCFS: the return queues behind everyone, always pays
    oracle = make_core("oracle")  # strict program FCFS (no age bound): nothing is ever overdue
    oracle.price.value = 1e-3
    oracle.arrived("w", h("waiter"), now=0.0)
    assert oracle.order.age_bound_s == math.inf and oracle._charged_price(1e6) == 0.0


def test_cdf_value_and_hazard():
    cdf = CDF.window(10.0, 10.5)  # returns in [10, 10.5]: 8.25 s of expected holding left at 2 s
    assert cdf.value(1.0, 100, 2.0, 10.5) == pytest.approx(1.0 / (100 * 8.25))
    assert cdf.value(1.0, 100, 9.0, 10.5) > cdf.value(1.0, 100, 2.0, 10.5)  # nearer the return: worth more
    lin = CDF.linear(4.0, 1.0)  # uniform on [0, 4]: hazard 1 / (4 - t)
    assert lin.hazard(2.0) == pytest.approx(0.5) and lin.hazard(5.0) == 0.0


def test_a_returning_programs_pinned_prefix_is_not_counted_as_blocked_demand():
    c = make_core("oracle")
    finish(c, "a", h("p", tool_duration_s=1.0), now=0.0, blocks=250)  # 4000 tokens held
    c.arrived("a2", h("p"), now=1.0)  # waits; its prompt (4100 tokens) is mostly the pinned prefix
    st = state(1.0, free=10, num_waiting=1, waiting_demand_tokens=4100)
    assert c.price.target(st) > 0  # what the engine reports would look blocked ...
    c.step(st)
    assert c.price.value == 0.0  # ... but 100 new tokens fit in the 160 free ones
    assert "a" in c.pins


def test_without_program_ordering_an_admission_may_take_any_pin():
    c = make_core("oracle", program_fcfs=False)
    finish(c, "old", h("p0", tool_duration_s=30.0), now=0.0)
    c.arrived("new", h("p1"), now=1.0)
    rel = c.release_for_pressure(now=1.0, admitting="new", engine_busy=True)
    assert rel is not None and rel.request_id == "old"
    c = make_core("oracle", age_min_s=10.0)  # with program FCFS the younger program waits instead
    finish(c, "old", h("p0", tool_duration_s=30.0), now=0.0)
    c.arrived("new", h("p1"), now=1.0)
    assert c.release_for_pressure(now=1.0, admitting="new", engine_busy=True) is None


def test_a_finish_prices_with_the_state_it_is_given_not_a_stale_price():
    c = make_core("oracle", program_fcfs=False)  # FCFS: pins always pay the price
    finish(c, "a", h("p0", tool_duration_s=100.0), now=0.0)
    c.step(state(0.1, free=0, num_waiting=4, waiting_demand_tokens=8000))  # shortage: 'a' is dropped
    assert c.price.value > 0 and not c.pins
    # no pin left, so the driver stops stepping the core; the queue drains meanwhile
    assert finish(c, "b", h("p1", tool_duration_s=100.0), now=5.0, st=state(5.0))[0]
    assert c.price.value == 0.0


def test_decision_at_finish_by_hull_equals_the_knot_search():
    import random

    rng = random.Random(3)
    for _ in range(3000):
        n = rng.randint(1, 8)
        levels = sorted(rng.sample([0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99], n))
        q = sorted(rng.choice([0.01, 0.1, 1.0, 5.0, 100.0]) * rng.random() for _ in range(n))
        cdf = CDF.from_quantiles(levels, q)
        b, c = rng.choice([0.1, 1.0, 5.0]), rng.choice([0.0, 1e-3, 0.1, 1.0, 10.0]) * rng.random()
        best = max([0.0] + [cdf.fs[i] * b - c * cdf.hs[i] for i in range(1, len(cdf.ts))])
        assert cdf.best_ttl(b, c)[2] == pytest.approx(best, abs=1e-9)


def test_return_share_learns_that_pinned_programs_return_elsewhere():
    """Behind round-robin a pin's program mostly returns to another replica: the pins' expiries teach the
    core that share, and an unreturned pin's memory is then priced even while the queue's head is young."""
    from ctk.policy.core import ReturnShare

    def pin(p_hit: float) -> Pin:
        return Pin("r", "p", 4, 64, 10.0, 0.0, 10.0, p_hit, 1.0, "k", None)

    affinity, scattered = ReturnShare(alpha=0.05), ReturnShare(alpha=0.05)
    for i in range(400):
        affinity.pin_ended(pin(0.9), ReleaseReason.HIT if i % 10 else ReleaseReason.EXPIRED)  # as promised
        scattered.pin_ended(pin(0.9), ReleaseReason.HIT if i % 4 == 0 else ReleaseReason.EXPIRED)  # 1 in 4
        scattered.pin_ended(pin(0.9), ReleaseReason.PRESSURE)  # cut short: says nothing
    assert affinity.share == pytest.approx(1.0, abs=0.1)
    assert scattered.share == pytest.approx(0.25 / 0.9, abs=0.1)
    c = make_core("ttl", priced_tables())
    c.returns = scattered
    c.price.value = 1e-3
    c.order.age_bound_s = 10.0
    c.arrived("w", h("waiter"), now=0.0)
    r = scattered.share
    assert c._charged_price(5.0) == pytest.approx(1e-3 * (1 - r) / r)  # young head: the share not coming back
    assert c._charged_price(10.5) == pytest.approx(1e-3 / r)  # overdue head: all of it, per expected return


def test_oracle_orders_strictly_only_while_its_programs_come_back():
    """Behind round-robin the oracle's pinned programs return to other replicas: it then falls back from
    strict program FCFS to the age bound and lets young waiting requests take pins; so does ttl in strict
    order; Continuum stays strict."""
    from ctk.policy.core import RETURNS_TO_DEFER

    def scattered() -> object:
        from ctk.policy.core import ReturnShare

        r = ReturnShare(alpha=0.2)
        for _ in range(50):
            r.pin_ended(Pin("r", "p", 4, 64, 10.0, 0.0, 10.0, 1.0, 1.0, "k", None), ReleaseReason.EXPIRED)
        assert r.share < RETURNS_TO_DEFER
        return r

    for policy, settings, relaxes in (
        ("oracle", {}, True),
        ("ttl", {}, True),  # ctk's pins in strict order (the default) fall back too
        ("continuum", {}, False),
    ):
        c = make_core(policy, priced_tables() if policy == "ttl" else None, **settings)
        assert c.order.age_bound_s == math.inf
        c.returns = scattered()
        c.arrived("a", h("a"), now=0.0)
        c.arrived("b", h("b"), now=0.1)
        c.arrived("w", h("warm-up"), now=0.0)
        c.admitted("w", 0, now=0.0)  # one wait measured (the test cores need one)
        c.order_waiting(["a", "b"], now=0.2)
        assert (c.order.age_bound_s < math.inf) is relaxes, policy


def test_the_queue_head_is_the_oldest_request_still_waiting_when_a_bound_comes_later():
    """A strict order keeps no queue of waiting arrivals (nothing is ever overdue); a bound that comes later
    (relaxed behind a router, or set) reads the head from the requests still waiting, admitted ones not."""
    c = make_core("ttl", priced_tables())
    c.price.value = 1e-3
    for rid, t in (("a", 0.0), ("b", 1.0), ("c", 2.0)):
        c.arrived(rid, h(rid), now=t)
    c.admitted("a", 0, now=3.0)
    c.order.age_bound_s = 10.0
    r = c.returns.share
    assert c._charged_price(10.5) == pytest.approx(1e-3 * (1 - r) / r)  # b, not the admitted a, is the head
    assert c._charged_price(11.5) == pytest.approx(1e-3 / r)  # b overdue
    c.admitted("b", 0, now=11.6)
    c.arrived("d", h("d"), now=11.7)
    assert c._charged_price(11.8) == pytest.approx(1e-3 * (1 - r) / r)  # then c (arrived at 2 s) ...
    assert c._charged_price(12.5) == pytest.approx(1e-3 / r)  # ... kept as arrivals and admissions go on


def test_a_request_ending_while_it_waits_leaves_the_queue():
    """A request that ends before its admission (not aborted: e.g. refused by the engine) must not stay the
    queue's head, or every later pin would be charged as if an overdue request waited behind it."""
    c = make_core("ttl", priced_tables())
    c.price.value = 1e-3
    c.order.age_bound_s = 10.0
    c.arrived("gone", h("gone"), now=0.0)
    c.finished(Finished("gone", h("gone"), None, 10, 10, 0, 0, natural=False), state(1.0))
    c.arrived("w", h("waiter"), now=20.0)
    assert c._charged_price(21.0) == 0.0  # the young waiter is the head, not the request that ended at 1 s
    assert len(c.order.fcfs._arrivals) == 1  # only the waiter's arrival is left to pair


def test_age_bound_switch_for_any_policy():
    """``age_bound`` overrides the rule's own: the oracle held to ttl's tail bound, ttl in strict order."""
    for policy, setting, strict in [("oracle", None, True), ("oracle", True, False), ("ttl", None, True),
                                    ("ttl", True, False)]:
        c = make_core(policy, priced_tables(), age_bound=setting, age_min_s=1.0)
        c.arrived("w", h("warm-up"), now=0.0)
        c.admitted("w", 0, now=0.0)  # one wait measured: the bound is its 1 s floor
        c.arrived("a", h("A"), now=0.0)
        c.arrived("b", h("B"), now=1.0)
        c.arrived("a2", h("A"), now=2.0)
        # at 5 s "b" has waited 4 s, over the 1 s floor: bounded order admits it first, strict keeps A first
        ids = ["b", "a2"]
        order = c.order_waiting(ids, now=5.0) or range(len(ids))
        assert [ids[i] for i in order][0] == ("a2" if strict else "b"), (policy, setting)
