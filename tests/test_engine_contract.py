"""The vLLM version contract, the plugin entry point and ``ctk serve`` argument checking (no engine start)."""

from __future__ import annotations

import ast
import re
import types
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from engine_fixtures import write_test_model
from typer.testing import CliRunner

from ctk.cli import app


def test_installed_vllm_has_everything_the_door_declares():
    from ctk.engine_patch.vllm_door import VLLM_INTERNALS, check_vllm_contract

    assert len(VLLM_INTERNALS) > 30
    missing = check_vllm_contract()
    assert missing == [], f"vLLM does not match the ctk door: {missing}"


def _attribute_uses(path: Path) -> tuple[set[str], set[str], set[str]]:
    """Attribute names in a module: (all used, used on objects other than ``self``, used on ``self``)."""
    every, foreign, on_self = set(), set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute):
            every.add(node.attr)
            is_self = isinstance(node.value, ast.Name) and node.value.id == "self"
            (on_self if is_self else foreign).add(node.attr)
        elif isinstance(node, ast.keyword) and node.arg:
            every.add(node.arg)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "attrgetter":
            # operator.attrgetter("name", ...): attributes read without an attribute node (on other objects)
            names = {a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)}
            every |= names
            foreign |= names
        elif isinstance(node, ast.FunctionDef):  # an override of a vLLM method
            every.add(node.name)
    return every, foreign, on_self


def test_the_door_declares_exactly_what_it_uses():
    """No stale declaration, no private vLLM name used undeclared, nothing of vLLM's used by the mixin."""
    from vllm.v1.core.sched.scheduler import Scheduler

    import ctk.engine_patch.plugin as plugin_module
    import ctk.engine_patch.scheduler as mixin_module
    import ctk.engine_patch.vllm_door as door_module
    from ctk.engine_patch.vllm_door import VLLM_INTERNALS

    door_every, door_foreign, door_self = _attribute_uses(Path(door_module.__file__))
    mixin_every, mixin_foreign, mixin_self = _attribute_uses(Path(mixin_module.__file__))
    declared = {i.name for i in VLLM_INTERNALS}
    hooks = {i.name for i in VLLM_INTERNALS if i.kind == "hook"}
    # every declared name is used (base classes and source premises name what the door relies on)
    for internal in VLLM_INTERNALS:
        if internal.kind not in ("base", "source"):
            assert internal.name in door_every | mixin_every, f"declared but unused: {internal.label}"
    # every private name the door reads on another object than itself is declared (sys._getframe aside)
    private = {n for n in door_foreign if n.startswith("_") and not n.startswith("__")}
    assert private - door_self - declared == {"_getframe"}
    # the mixin reaches vLLM only through its hooks (super().<hook>) and the door; the plugin via the door
    assert {n for n in mixin_self if not n.startswith(("ctk", "_ctk"))} <= hooks
    assert {n for n in mixin_foreign if hasattr(Scheduler, n) and not n.startswith("__")} <= hooks
    mixin_names = vars(mixin_module.CTKSchedulerMixin)
    overridden = {n for n in mixin_names if hasattr(Scheduler, n) and not n.startswith("__")}
    assert overridden == hooks
    plugin_every, _, _ = _attribute_uses(Path(plugin_module.__file__))
    assert not plugin_every & declared


@pytest.mark.parametrize(
    "owner, name, label",
    [
        ("vllm.v1.core.sched.scheduler:Scheduler", "_free_request_blocks", "Scheduler._free_request_blocks"),
        ("vllm.v1.core.sched.scheduler:Scheduler", "_free_blocks", "Scheduler._free_blocks"),
        ("vllm.v1.core.kv_cache_manager:KVCacheManager", "allocate_slots", "KVCacheManager.allocate_slots"),
        ("vllm.v1.core.block_pool:BlockPool", "get_num_free_blocks", "BlockPool.get_num_free_blocks"),
    ],
)
def test_another_vllm_fails_loudly_naming_what_is_missing(monkeypatch, owner, name, label):
    from ctk.engine_patch.scheduler import CTKSchedulerMixin, VllmContractError
    from ctk.engine_patch.vllm_door import _resolve, check_vllm_contract

    monkeypatch.delattr(_resolve(owner), name)
    assert any(m.startswith(label + " ") for m in check_vllm_contract()), check_vllm_contract()
    with pytest.raises(VllmContractError, match=re.escape(label)):
        CTKSchedulerMixin()  # the scheduler refuses to start before touching vLLM


def test_the_wake_up_premise_is_checked(monkeypatch):
    """The door finds the engine core on the stack: it must create its input queue before the scheduler."""
    from vllm.v1.engine.core import EngineCoreProc

    from ctk.engine_patch.vllm_door import check_vllm_contract

    def reordered_init(self, *args, **kwargs):
        super(EngineCoreProc, self).__init__(*args, **kwargs)
        self.input_queue = None

    monkeypatch.setattr(EngineCoreProc, "__init__", reordered_init)
    assert any(m.startswith("EngineCoreProc.input_queue ") for m in check_vllm_contract())


def test_concrete_classes_wrap_both_vllm_schedulers():
    from vllm.utils.import_utils import resolve_obj_by_qualname
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler

    from ctk.engine_patch.scheduler import CTKSchedulerMixin
    from ctk.engine_patch.vllm_door import VLLM_INTERNALS

    sync = resolve_obj_by_qualname("ctk.engine_patch.scheduler.CTKScheduler")
    asyn = resolve_obj_by_qualname("ctk.engine_patch.scheduler.CTKAsyncScheduler")
    assert issubclass(sync, CTKSchedulerMixin) and issubclass(sync, Scheduler)
    assert issubclass(asyn, CTKSchedulerMixin) and issubclass(asyn, AsyncScheduler)
    # the mixin's hooks come first in the MRO
    for hook in (i.name for i in VLLM_INTERNALS if i.kind == "hook"):
        assert getattr(sync, hook) is getattr(CTKSchedulerMixin, hook)
        assert getattr(asyn, hook) is getattr(CTKSchedulerMixin, hook)


def test_plugin_entry_point_is_inert_unless_ctk_policy_is_set(monkeypatch):
    from vllm.config.scheduler import SchedulerConfig

    from ctk.engine_patch import plugin

    eps = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "ctk_scheduler"]
    assert eps and eps[0].value == "ctk.engine_patch.plugin:register"
    original = SchedulerConfig.get_scheduler_cls
    monkeypatch.setattr(plugin, "_PATCHED", False)
    monkeypatch.delenv("CTK_POLICY", raising=False)
    eps[0].load()()
    assert SchedulerConfig.get_scheduler_cls is original
    monkeypatch.setenv("CTK_POLICY", "vllm")  # stock vLLM's rule needs no ctk scheduler
    eps[0].load()()
    assert SchedulerConfig.get_scheduler_cls is original
    monkeypatch.setenv("CTK_POLICY", "ttl")
    monkeypatch.setattr(SchedulerConfig, "get_scheduler_cls", original)  # restored after the test
    eps[0].load()()
    patched = SchedulerConfig.get_scheduler_cls
    assert patched is not original
    assert (
        patched(types.SimpleNamespace(scheduler_cls=None, async_scheduling=False)).__name__ == "CTKScheduler"
    )
    assert (
        patched(types.SimpleNamespace(scheduler_cls=None, async_scheduling=True)).__name__
        == "CTKAsyncScheduler"
    )


def test_serve_rejects_bad_model_files_before_starting_anything(tmp_path):
    runner = CliRunner()
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(b"not a pickle")
    for args, message in [
        (["--ttl-model", str(bad)], "not a pickle"),
        (["--ttl-model", str(tmp_path / "missing.pkl")], "no such model file"),
        ([], "starting from the shipped default"),  # no --ttl-model: the default model, said once
        (["--policy", "fast"], "policy must be one of"),
        (
            ["--ttl-model", str(write_test_model(tmp_path / "ok.pkl")), "--max-pin-share", "2"],
            "max_pin_share",
        ),
    ]:
        res = runner.invoke(app, ["serve", "some-model", *args])
        assert res.exit_code == 2, (args, res.output)
        assert message in res.output, (args, res.output)


def test_serve_needs_a_model(tmp_path):
    res = CliRunner().invoke(app, ["serve", "--ttl-model", str(write_test_model(tmp_path / "m.pkl"))])
    assert res.exit_code == 2 and "give the model" in res.output


def test_server_arguments(tmp_path):
    from ctk.engine_patch.serve.server import SCHEDULER_CLS, server_env, vllm_args
    from ctk.policy.config import ServeConfig

    args = vllm_args("m", 8123, ServeConfig(policy="ttl"), ["--kv-cache-memory-bytes", "1G"])
    assert args[:4] == ["--model", "m", "--port", "8123"]
    assert "--enforce-eager" in args and args[args.index("--scheduler-cls") + 1] == SCHEDULER_CLS
    assert "--scheduler-cls" not in vllm_args("m", 1, ServeConfig(policy="vllm"))
    env = server_env(ServeConfig(policy="oracle", max_pin_share=0.3), base={"CTK_RECORD": "stale.duckdb"})
    assert env["CTK_POLICY"] == "oracle" and env["CTK_MAX_PIN_SHARE"] == "0.3"
    assert "CTK_RECORD" not in env  # settings from an outer environment do not leak in


def test_serve_usage_names_the_model_and_its_defaults_are_the_engines():
    import inspect

    from ctk.engine_patch.serve.commands import serve
    from ctk.policy.config import ServeConfig

    res = CliRunner().invoke(app, ["serve", "--help"], terminal_width=200)
    assert res.exit_code == 0 and "ctk serve MODEL [OPTIONS]" in res.output
    params = inspect.signature(serve).parameters
    defaults = ServeConfig()  # what launch_server, the benchmarks and the simulator run with
    assert params["age_factor"].default == defaults.age_factor
    assert params["max_pin_share"].default == defaults.max_pin_share
    # --age-bound is off by default (the policy's own order: ttl strict); --no-age-bound is gone (issue 22)
    assert params["age_bound"].default is False and defaults.age_bound is None
    assert "--age-bound" in res.output and "--no-age-bound" not in res.output


def test_the_contract_states_what_it_assumes_vllm_does_and_each_assumption_holds():
    from ctk.engine_patch.vllm_door import VLLM_PREMISES, Premise, check_vllm_contract

    statements = " ".join(p.statement for p in VLLM_PREMISES)
    for assumption in ("single free point", "allocate_slots before it preempts", "stop string", "async"):
        assert assumption in statements
    assert [p.statement for p in VLLM_PREMISES if not p.holds()] == []
    # a vLLM where the free moved elsewhere is named, not silently trusted
    moved = Premise(
        "the free point moved", "vllm.v1.core.sched.scheduler:", counts=(("self._free_blocks(", 1),)
    )
    assert check_vllm_contract((), (moved,)) == ["premise: the free point moved"]
