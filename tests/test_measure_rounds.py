"""Comparisons in rounds without an engine: rotation, medians, ratio spreads, targets, arms, the factorial."""

from __future__ import annotations

import json

import pytest

from ctk.measure.compare import FACTORIAL_ARMS, CompareConfig, CompareError, Comparison, server_args
from ctk.measure.presets import demo_config, preset
from ctk.measure.rounds import check_targets, median_figures, rotated_orders, round_figures
from ctk.measure.table import format_table
from ctk.policy.arms import Arm, ArmError
from ctk.policy.rules import POLICY_NAMES, Policy
from tests.test_measure_results import _result


def test_round_r_starts_at_policy_r_mod_p_and_runs_each_once():
    names = ["vllm", "continuum", "progress-ttl", "ttl", "oracle"]
    orders = rotated_orders(names, 7)
    assert [o[0] for o in orders] == [
        "vllm",
        "continuum",
        "progress-ttl",
        "ttl",
        "oracle",
        "vllm",
        "continuum",
    ]
    assert all(sorted(o) == sorted(names) for o in orders)
    assert orders[1] == ["continuum", "progress-ttl", "ttl", "oracle", "vllm"]
    # over P rounds every policy holds every position once
    assert all(sorted(o[i] for o in orders[:5]) == sorted(names) for i in range(5))
    with pytest.raises(ValueError):
        rotated_orders(names, 0)


def _two_rounds() -> Comparison:
    r0 = {
        "vllm": _result("vllm", [20.0, 20.0], 0.2),
        "continuum": _result("continuum", [16.0, 16.0], 0.4),
        "ttl": _result("ttl", [14.0, 14.0], 0.1),
        "oracle": _result("oracle", [12.0, 12.0], 0.1),
    }
    r1 = {
        "vllm": _result("vllm", [30.0, 30.0], 0.2),
        "continuum": _result("continuum", [20.0, 20.0], 0.1),
        "ttl": _result("ttl", [21.0, 21.0], 0.3),
        "oracle": _result("oracle", [20.0, 20.0], 0.1),
    }
    return Comparison([r0, r1], config={"order": rotated_orders(list(r0), 2)})


def test_medians_per_round_values_and_ratio_spreads():
    comp = _two_rounds()
    f = comp.figures()
    assert f["vllm"]["mean_jct_s"] == pytest.approx(25.0)  # median of 20 and 30
    assert f["vllm"]["spread"]["mean_jct_s"] == [20.0, 30.0]
    assert [r["mean_jct_s"] for r in f["ttl"]["rounds"]] == [14.0, 21.0]
    # a ratio is the median of the per-round ratios (paired within a round), with their min-max
    assert f["ttl"]["spread"]["mean_jct_x_vs_vllm"] == pytest.approx([20 / 14, 30 / 21])
    assert f["ttl"]["mean_jct_x_vs_vllm"] == pytest.approx((20 / 14 + 30 / 21) / 2)
    assert f["ttl"]["spread"]["mean_jct_x_vs_continuum"] == pytest.approx([20 / 21, 16 / 14])
    assert f["ttl"]["n_rounds"] == 2
    # the oracle against the best other policy of the same round: 14/12 and 20/20
    assert f["oracle"]["spread"]["mean_jct_x_vs_best_other"] == pytest.approx([1.0, 14 / 12])
    # the representative result per policy for plots: the round nearest the median
    assert set(comp.results) == {"vllm", "continuum", "ttl", "oracle"}


def test_a_round_without_a_policy_counts_only_the_rounds_that_ran():
    r0 = round_figures({"vllm": {"mean_jct_s": 10.0}, "ttl": {"mean_jct_s": 8.0}})
    r1 = round_figures({"vllm": {"mean_jct_s": 12.0}})
    f = median_figures([r0, r1])
    assert f["ttl"]["n_rounds"] == 1 and f["ttl"]["rounds"][1] is None
    assert f["ttl"]["mean_jct_x_vs_vllm"] == pytest.approx(10 / 8)
    assert f["vllm"]["mean_jct_s"] == pytest.approx(11.0)


def test_targets_met_missed_and_unsettled_when_the_threshold_is_inside_the_spread():
    comp = _two_rounds()
    t = comp.targets()
    vs_vllm = t["ttl_mean_jct_x_vs_vllm >= 1.15"]
    assert vs_vllm["met"] is True and vs_vllm["unsettled"] is False  # 1.43 and 1.43: both rounds meet it
    vs_cont = t["ttl_mean_jct_x_vs_continuum >= 1.10"]
    assert vs_cont["min"] < 1.1 <= vs_cont["max"] and vs_cont["unsettled"] is True
    assert t["ttl_mean_jct_x_vs_progress-ttl >= 1.05"]["met"] is None  # not run: not measured
    oracle = t["oracle_mean_jct_x_vs_best_other >= 0.97"]
    assert oracle["met"] is True and oracle["value"] == pytest.approx((1.0 + 14 / 12) / 2)
    ttft = comp.figures()["ttl"]["spread"]["p99_ttft_x_vs_vllm"]  # shown with its spread, not judged
    assert ttft == [pytest.approx(0.4 / 0.6), pytest.approx(2.0)]
    assert "ttl_p99_ttft_x_vs_vllm >= 1.00" not in t
    # a policy slower than the oracle by more than 3% makes the oracle miss
    slow_oracle = check_targets(
        median_figures([round_figures({"vllm": {"mean_jct_s": 10.0}, "oracle": {"mean_jct_s": 10.4}})])
    )
    assert slow_oracle["oracle_mean_jct_x_vs_best_other >= 0.97"]["met"] is False


def test_table_and_json_show_medians_spreads_and_the_noise():
    comp = _two_rounds()
    table = format_table(comp)
    assert table.splitlines()[0] == "medians over 2 rounds"
    assert (
        "ttl vs continuum mean JCT: 1.05 (0.95-1.14)  (1.00 inside the spread: no difference shown)" in table
    )
    assert (
        "target ttl_mean_jct_x_vs_continuum >= 1.10: 1.05 (0.95-1.14) MISSED (threshold 1.10 inside" in table
    )
    assert "vllm vs continuum" not in table  # a pair of baselines is listed once
    d = json.loads(json.dumps(comp.to_json(), default=str))
    assert d["rounds"] == 2 and d["order"][1][0] == "continuum"
    for key in ("mean_jct_s", "p50_jct_s", "p99_jct_s", "p99_ttft_s", "max_ttft_s", "hit_rate", "pins"):
        assert key in d["policies"]["ttl"], key
    assert len(d["policies"]["ttl"]["rounds"]) == 2


def test_arms_name_a_policy_and_optionally_its_program_ordering():
    assert Arm.parse("ttl") == Arm("ttl", Policy.TTL, None)
    assert Arm.parse("vllm/program-fcfs").settings() == {"program_fcfs": True}
    assert (
        Arm.parse("oracle/fcfs").settings() == {"program_fcfs": False} and Arm.parse("ttl").settings() == {}
    )
    assert Arm.parse("oracle/fcfs").tag == "oracle-fcfs"
    # the oracle is served with ttl's model file (cost profile); the other baselines need none
    assert [p for p in Policy if Arm.parse(p.value).uses_model_file] == [Policy.TTL, Policy.ORACLE]
    # stock eviction with program ordering needs ctk's scheduler class; plain stock vLLM does not
    assert "--scheduler-cls" in server_args(Arm.parse("vllm/program-fcfs"))
    assert server_args(Arm.parse("vllm")) == [] and server_args(Arm.parse("vllm/fcfs")) == []
    assert server_args(Arm.parse("ttl/program-fcfs")) == []  # ctk serve adds it for every pin policy
    for bad in ("lru", "ttl/lifo"):
        with pytest.raises(ArmError, match="choose from"):
            Arm.parse(bad)
    # any serve setting, checked when the arm is named, not when its server starts
    arm = Arm.parse("ttl@age_factor=0.75,max_pin_share=1")
    assert arm.policy == Policy.TTL and arm.settings() == {"age_factor": "0.75", "max_pin_share": "1"}
    assert arm.tag == "ttl-age_factor0.75-max_pin_share1"
    assert Arm.parse("ttl/fcfs@age_factor=2").settings() == {"age_factor": "2", "program_fcfs": False}
    bad_arms = (("ttl@age_factor=-1", "age_factor"), ("ttl@no_such=1", "unknown"), ("ttl@x", "key=value"))
    for bad, why in bad_arms:
        with pytest.raises(ArmError, match=why):
            Arm.parse(bad)
    with pytest.raises(CompareError, match="choose from"):  # the comparison names it as its own error
        CompareConfig(policies=["vllm", "lru"]).validate()
    with pytest.raises(CompareError, match="twice"):
        CompareConfig(policies=["ttl", "ttl"]).validate()
    with pytest.raises(CompareError, match="rounds"):
        CompareConfig(rounds=0).validate()


def test_factorial_table_separates_caching_from_ordering():
    cells = {"vllm/fcfs": 20.0, "vllm/program-fcfs": 16.0, "oracle/fcfs": 10.0, "oracle/program-fcfs": 8.0}
    comp = Comparison.single({a: _result(a, [j], 0.1) for a, j in cells.items()}, config={})
    assert list(comp.results) == list(FACTORIAL_ARMS)
    f = comp.figures()
    assert f["vllm/program-fcfs"]["mean_jct_x_vs_vllm/fcfs"] == pytest.approx(20 / 16)  # ordering, stock
    assert f["oracle/fcfs"]["mean_jct_x_vs_vllm/fcfs"] == pytest.approx(2.0)  # caching under FCFS
    assert f["oracle/program-fcfs"]["mean_jct_x_vs_vllm/program-fcfs"] == pytest.approx(2.0)
    assert f["oracle/program-fcfs"]["mean_jct_x_vs_oracle/fcfs"] == pytest.approx(1.25)
    table = format_table(comp)
    rows = {line.split("  ")[0].strip(): line.split() for line in table.splitlines()}
    assert rows["stock eviction"][-3:] == ["20.00", "16.00", "1.25"]
    assert rows["caching gain"][-2:] == ["2.00", "2.00"]


def test_presets():
    default, lt, demo = preset("default"), preset("long-tail", seed=3), demo_config()
    # long-tail: the recorded pauses unscaled, programs ranked by their time in pauses over 2 s
    assert lt.replay.time_scale == 1.0 and lt.workload.long_pause_s == 2.0 and lt.workload.seed == 3
    assert default.replay.time_scale < 1.0 and default.workload.long_pause_s is None
    assert default.policies == list(POLICY_NAMES) and preset("full").workload.n_programs > 16
    # the demo: every arm valid, no progress-ttl (its 100-gap window never fills in the demo's few turns)
    demo.validate()
    assert "progress-ttl" not in demo.policies and set(demo.policies) < set(POLICY_NAMES)
    # all programs in flight on a cache that holds a fraction of them (the pressure pins need), a few minutes
    assert demo.replay.concurrency == demo.workload.n_programs
    assert demo.workload.n_programs * demo.workload.max_turns <= 120
    assert demo.server.kv_cache_bytes < default.server.kv_cache_bytes
    with pytest.raises(CompareError, match="long-tail"):
        preset("huge")
    # mixed-agents: two agents' programs arrive open loop, so new programs queue in the engine
    mixed = preset("mixed-agents")
    mixed.validate()
    mixed.replay.validate()
    assert mixed.replay.concurrency is None and mixed.replay.rate > 0
    assert len(set(mixed.workload.sources)) == 2 and mixed.workload.n_programs > default.workload.n_programs


def test_mixed_agents_preset_replays_both_agents_from_the_shared_traces(shared_traces, tmp_path):
    from ctk.datasets.importer import import_paths
    from ctk.measure.workload import load_programs
    from ctk.store import TraceStore

    cfg = preset("mixed-agents")
    with TraceStore(tmp_path / "t.duckdb") as store:
        import_paths(store, [shared_traces])
        programs = load_programs(store, cfg.workload)
    by_source = {p.source for p in programs}
    assert by_source == set(cfg.workload.sources), by_source
    assert len(programs) == cfg.workload.n_programs


def test_both_orders_arms_are_valid_and_pair_each_pin_rule_with_both_orders():
    from ctk.measure.compare import BOTH_ORDERS_ARMS
    from ctk.policy import rules

    CompareConfig(policies=list(BOTH_ORDERS_ARMS)).validate()
    own = {Policy.TTL: rules.TTLRule.age_bound, Policy.ORACLE: rules.OracleRule.age_bound}
    orders: dict[Policy, set[bool]] = {}
    for arm in map(Arm.parse, BOTH_ORDERS_ARMS):
        if arm.policy in own:
            setting = arm.settings().get("age_bound")
            bound = own[arm.policy] if setting is None else setting == "true"
            orders.setdefault(arm.policy, set()).add(bound)
    assert orders == {Policy.TTL: {True, False}, Policy.ORACLE: {True, False}}
