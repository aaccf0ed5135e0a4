"""The simulator drives ctk's own policy code (the objects the vLLM adapter drives), and the policies
differ in the simulated engine as they should."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

import ctk.simulate
from ctk.measure.workload import ProgramSpec, TurnSpec
from ctk.policy import driver as driver_mod
from ctk.policy.config import ServeConfig
from ctk.policy.core import PolicyCore
from ctk.policy.rules import POLICY_NAMES, make_rule
from ctk.simulate.engine import EngineConfig, SimEngine
from ctk.simulate.profiles import load_profile
from ctk.simulate.run import SimConfig, attach_policy, simulate
from ctk.simulate.workload import Arrivals

SIM_DIR = Path(ctk.simulate.__file__).parent
ADAPTER = SIM_DIR.parent / "engine_patch" / "scheduler.py"


def programs(n: int = 16, turns: int = 6) -> list[ProgramSpec]:
    """Half the programs pause 0.3 s between turns, half 1.5 s; contexts of 1-2k tokens."""
    out = []
    for i in range(n):
        pause = 0.3 if i % 2 else 1.5
        ts = [TurnSpec(k, 32, 128, pause, "pytest -q" if i % 2 else "make build") for k in range(turns)]
        ts[-1].last_turn, ts[-1].tool_duration_s, ts[-1].observation_tokens = True, 0.0, 0
        out.append(ProgramSpec(f"p{i}", "test", 1024, ts))
    return out


def driver_hooks(source: str, holders: tuple[str, ...]) -> set[str]:
    """Names of the driver methods used in ``source`` (``<holder>.<method>``, ``x.<holder>.<method>``)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute):
            v = node.value
            holder = v.id if isinstance(v, ast.Name) else v.attr if isinstance(v, ast.Attribute) else None
            if holder in holders:
                names.add(node.attr)
    return names


def test_simulator_and_adapter_drive_the_same_objects():
    from ctk.engine_patch import scheduler

    # the adapter builds the driver class the simulator builds
    assert scheduler.PolicyDriver is driver_mod.PolicyDriver
    prof = load_profile("cpu", "tiny")
    for policy in POLICY_NAMES:
        e = SimEngine(EngineConfig(num_blocks=prof.kv_blocks, block_size=prof.block_size), prof)
        serve = {"ttl_model": "unused.pkl"} if policy == "ttl" else {}
        attach_policy(e, policy, serve, None, prof.cost_model())
        cfg = ServeConfig.from_mapping({**serve, "policy": policy})
        assert type(e.driver) is driver_mod.PolicyDriver
        assert type(e.driver.core) is PolicyCore
        assert type(e.driver.core.rule) is type(make_rule(policy, cfg, None, prof.cost_model()))
        assert e.driver.view is e
    # the simulator's engine is an EngineView: every method of the protocol, no more is asked of it
    view_methods = {
        n for n, v in vars(driver_mod.EngineView).items() if callable(v) and not n.startswith("_")
    }
    assert view_methods <= set(dir(SimEngine))
    # the hooks: the simulator uses exactly the driver methods the vLLM adapter uses
    sim_src = "\n".join(p.read_text() for p in sorted(SIM_DIR.glob("*.py")))
    public = {n for n in vars(driver_mod.PolicyDriver) if not n.startswith("_")}
    sim_hooks = driver_hooks(sim_src, ("driver",)) & public
    adapter_hooks = driver_hooks(ADAPTER.read_text(), ("driver", "ctk_driver")) & public
    lifecycle = {"request_added", "step_begin", "step_end", "allocation_failed", "request_finished", "idle"}
    assert lifecycle <= sim_hooks
    assert lifecycle <= adapter_hooks
    # and the simulator has no policy of its own: it never imports a rule or the core's internals, only
    # the registry's names
    for module in ("ctk.policy.price", "ctk.policy.ordering", "ctk.predict.online"):
        assert module not in sim_src
    from_rules = {
        alias.name
        for node in ast.walk(ast.parse(sim_src))
        if isinstance(node, ast.ImportFrom) and node.module == "ctk.policy.rules"
        for alias in node.names
    }
    assert from_rules and from_rules <= {"Policy", "POLICY_NAMES", "RULES", "make_rule"}


def test_every_hook_is_called_during_a_simulation(monkeypatch):
    calls: dict[str, int] = {}
    for name in ("request_added", "step_begin", "step_end", "allocation_failed", "request_finished"):
        orig = getattr(driver_mod.PolicyDriver, name)

        def spy(self, *a, _orig=orig, _name=name, **kw):
            calls[_name] = calls.get(_name, 0) + 1
            return _orig(self, *a, **kw)

        monkeypatch.setattr(driver_mod.PolicyDriver, name, spy)
    prof = load_profile("cpu", "tiny")
    cfg = SimConfig(arrivals=Arrivals(concurrency=8), shared_prefix_tokens=512)
    res = simulate(programs(), prof, "continuum", cfg)
    assert res.summary()["failed_programs"] == 0
    n_turns = sum(len(p.turns) for p in programs())
    assert calls["request_added"] == n_turns
    assert calls["request_finished"] == n_turns
    assert calls["step_begin"] >= calls["step_end"] > 0
    assert calls.get("allocation_failed", 0) > 0  # the cache is too small: the valve is asked


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_small_simulation_leaves_no_blocks_behind(policy):
    prof = load_profile("cpu", "tiny")
    cfg = SimConfig(arrivals=Arrivals(concurrency=8), shared_prefix_tokens=512)
    serve = {}
    tables = None
    if policy == "ttl":
        serve = {"ttl_model": "unused.pkl"}
        tables = _tables(prof)
    cfg.serve = serve
    res = simulate(programs(), prof, policy, cfg, tables=tables)
    s = res.summary()
    assert s["failed_programs"] == 0 and s["programs"] == 16
    e = res.engines[0]
    e.pool.check()
    assert not e.held and not e.running and not e.waiting
    assert e.pool.num_free == e.total_blocks - e.shared_blocks  # every block is back


def _tables(prof):
    """A TTL table from the simulated hardware's cost model: both tools return within ~1.5 s."""
    from ctk.predict.tables import TTLTables

    return TTLTables.build({"*": [0.3, 1.5, 1.6]}, {"*": 50}, [0.5, 0.9, 0.99], cost=prof.cost_model())


def test_policies_differ_in_hits_as_expected():
    prof = load_profile("cpu", "tiny")
    cfg = SimConfig(arrivals=Arrivals(concurrency=8), shared_prefix_tokens=512)
    s = {p: simulate(programs(), prof, p, cfg).summary() for p in ("vllm", "continuum", "oracle")}
    assert s["vllm"]["pins"] == 0
    assert s["continuum"]["pins"] > 0 and s["oracle"]["pins"] > 0
    # the cache holds about half the working set: LRU loses the slow programs' prefixes, pins keep some
    assert s["vllm"]["hit_rate"] < s["continuum"]["hit_rate"]
    assert s["vllm"]["hit_rate"] < s["oracle"]["hit_rate"]
    assert all(x["failed_programs"] == 0 for x in s.values())


def test_cli_sweep_writes_the_issue_schema(tmp_path, monkeypatch):
    from ctk.simulate.sweep import format_tables, plot_jct_vs_rate, run_sweep

    prof = load_profile("cpu", "tiny")
    cfg = SimConfig(arrivals=Arrivals(concurrency=None), shared_prefix_tokens=512)
    sweep = run_sweep(programs(8, 4), prof, ["vllm", "oracle"], [0.5, 2.0], cfg)
    data = sweep.to_json()
    assert set(data["rates"]) == {"0.5", "2"}
    for per in data["rates"].values():
        for fig in per.values():
            for key in (
                "mean_jct_s",
                "p50_jct_s",
                "p99_jct_s",
                "p99_ttft_s",
                "hit_rate",
                "preemptions",
                "pins",
                "kv_usage_mean",
            ):
                assert key in fig
    assert "rate 0.5 programs/s" in format_tables(sweep)
    path = plot_jct_vs_rate(sweep, tmp_path)
    assert path is not None and path.stat().st_size > 1000
    # ctk report shows it
    from ctk.measure.report import build_report, is_valid_png, load_inputs, referenced_images

    sweep.save(tmp_path / "sim.json")
    page = build_report(load_inputs(None, [tmp_path / "sim.json"]), tmp_path / "report")
    text = page.read_text()
    assert "Simulated: cpu--tiny" in text and "0.5 programs/s" in text
    images = referenced_images(page)
    assert any("simulate" in p.name for p in images) and all(is_valid_png(p) for p in images)


def test_every_policy_sees_the_same_fleet_placement():
    """Consistent hashing places a program by its id: the ids must not depend on the policy, or each policy
    is compared on a different split of the load over the replicas (a 4-replica sweep once showed ttl 1%
    worse than stock vLLM with 3.7x its p99 TTFT only because its ids put 30% more turns on one replica)."""
    prof = load_profile("cpu", "tiny")
    cfg = SimConfig(replicas=3, routing="consistent-hash", arrivals=Arrivals(concurrency=8))
    placement = {
        policy: [c.replica for c in simulate(programs(), prof, policy, cfg).clients]
        for policy in ("vllm", "continuum", "oracle")
    }
    assert len(set(placement["vllm"])) == 3  # the programs spread over the replicas
    assert placement["vllm"] == placement["continuum"] == placement["oracle"]


def test_a_sweep_runs_arms_with_serve_settings():
    """``ctk simulate --policies`` takes the comparison's arms: the setting reaches the simulated policy."""
    from ctk.simulate.sweep import run_sweep

    prof = load_profile("cpu", "tiny")
    cfg = SimConfig(arrivals=Arrivals(concurrency=8), shared_prefix_tokens=512)
    arms = ["oracle", "oracle@age_bound=true,age_min_waits=1", "oracle/fcfs"]
    figs = run_sweep(programs(), prof, arms, [None], cfg).to_json()["rates"]["closed"]
    assert list(figs) == arms
    # strict program order, the age bound and plain FCFS order the same programs differently
    assert len({round(f["mean_jct_s"], 6) for f in figs.values()}) == 3


def test_policy_lists_keep_each_arms_settings_together():
    from ctk.policy.arms import split_arms

    assert split_arms("vllm, ttl@age_factor=0.75,max_pin_share=1,oracle/fcfs,") == [
        "vllm",
        "ttl@age_factor=0.75,max_pin_share=1",
        "oracle/fcfs",
    ]
    assert split_arms(None) == [] and split_arms("ttl") == ["ttl"]


def test_an_arm_does_not_start_from_another_arms_online_adaptation():
    """Online adaptation rewrites the tables the ttl rule runs on; ``simulate_arm`` gives each arm (and rate)
    its own copy, so a sweep's figures do not depend on the order of its arms (a shared copy made ttl's
    1 /s run start from the 0.75 /s run's adapted tables)."""
    import copy

    from ctk.simulate.run import simulate_arm

    prof = load_profile("cpu", "tiny")
    tables = _tables(prof)
    before = copy.deepcopy(tables.quantiles_s)
    cfg = SimConfig(arrivals=Arrivals(concurrency=8), shared_prefix_tokens=512)
    runs = [simulate_arm(programs(), prof, "ttl", cfg, tables=tables, ttl_model="unused.pkl") for _ in "ab"]
    assert tables.quantiles_s == before
    assert runs[0].summary()["mean_jct_s"] == runs[1].summary()["mean_jct_s"]
    # the rule itself adapts (keys learned online): what the copy keeps from the next arm
    simulate(programs(), prof, "ttl", dataclasses.replace(cfg, serve={"ttl_model": "x"}), tables=tables)
    assert tables.quantiles_s != before


KV_BLOCKS = 20  # (128-token blocks) about a tenth of 12 programs' contexts: the valve and preemptions


@pytest.mark.parametrize("policy", ["continuum", "oracle"])
def test_the_queue_that_keeps_the_order_simulates_as_the_mirror_does(policy, monkeypatch):
    """Under a strict order the simulated engine's waiting queue keeps the order itself (``KeyedSimQueue``,
    as vLLM's ``KeyedRequestQueue``); the same simulation with the core's mirror of a FIFO queue instead
    (``WaitingList`` and per-step moves, what an age bound uses) gives the same result, program by program,
    through pins, the valve and preemptions. (Tool pauses jittered: requests arriving at the same instant
    are tie-broken by arrival in the keyed queue, by queue position at the last full sort in the mirror.
    ttl is left out: its memory price reads the head of the queue, which the mirror orders only after.)"""
    import random

    from ctk.simulate.engine import KeyedSimQueue

    rng = random.Random(4)
    specs = programs(24, 8)
    for spec in specs:
        for turn in spec.turns[:-1]:
            turn.tool_duration_s *= rng.uniform(0.8, 1.2)
    prof = load_profile("cpu", "tiny")
    used = []
    keep = SimEngine.keep_waiting_order

    def run():
        cfg = SimConfig(arrivals=Arrivals(concurrency=12), kv_blocks=KV_BLOCKS, shared_prefix_tokens=512)
        res = simulate(specs, prof, policy, cfg)
        used.append(isinstance(res.engines[0].waiting, KeyedSimQueue))
        summary = res.summary()
        summary.pop("wall_s")
        return summary, [c.jct_s for c in res.clients]

    keyed = run()
    monkeypatch.setattr(SimEngine, "keep_waiting_order", lambda self, key_of: keep(self, None))
    mirrored = run()
    assert used == [True, False]
    assert keyed[0]["failed_programs"] == 0 and keyed[0]["preemptions"] > 0 and keyed[0]["pins"] > 0
    assert keyed == mirrored
