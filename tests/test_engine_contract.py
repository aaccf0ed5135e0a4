"""The vLLM version contract, the plugin entry point and ``ctk serve`` argument checking (no engine start)."""

from __future__ import annotations

import types
from importlib.metadata import entry_points

import pytest
from engine_fixtures import write_test_model
from typer.testing import CliRunner

from ctk.cli import app


def test_installed_vllm_has_every_hook_the_adapter_uses():
    from ctk.engine_patch.scheduler import check_vllm_contract

    missing = check_vllm_contract()
    assert missing == [], f"vLLM does not match the ctk adapter: {missing}"


def test_contract_check_names_a_missing_hook(monkeypatch):
    from vllm.v1.core.sched.scheduler import Scheduler

    from ctk.engine_patch.scheduler import CTKSchedulerMixin, VllmContractError, check_vllm_contract

    monkeypatch.delattr(Scheduler, "_free_blocks")
    assert "Scheduler._free_blocks" in check_vllm_contract()
    fake = types.SimpleNamespace(vllm_config=None)
    with pytest.raises(VllmContractError, match=r"Scheduler\._free_blocks"):
        CTKSchedulerMixin._ctk_setup(fake)


def test_concrete_classes_wrap_both_vllm_schedulers():
    from vllm.utils.import_utils import resolve_obj_by_qualname
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler

    from ctk.engine_patch.scheduler import CTKSchedulerMixin

    sync = resolve_obj_by_qualname("ctk.engine_patch.scheduler.CTKScheduler")
    asyn = resolve_obj_by_qualname("ctk.engine_patch.scheduler.CTKAsyncScheduler")
    assert issubclass(sync, CTKSchedulerMixin) and issubclass(sync, Scheduler)
    assert issubclass(asyn, CTKSchedulerMixin) and issubclass(asyn, AsyncScheduler)
    # the mixin's hooks come first in the MRO
    for hook in ("add_request", "schedule", "_free_blocks", "has_requests"):
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
        ([], "needs a TTL model"),
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
    from ctk.engine_patch.config import ServeConfig
    from ctk.engine_patch.server import SCHEDULER_CLS, server_env, vllm_args

    args = vllm_args("m", 8123, ServeConfig(policy="ttl"), ["--kv-cache-memory-bytes", "1G"])
    assert args[:4] == ["--model", "m", "--port", "8123"]
    assert "--enforce-eager" in args and args[args.index("--scheduler-cls") + 1] == SCHEDULER_CLS
    assert "--scheduler-cls" not in vllm_args("m", 1, ServeConfig(policy="vllm"))
    env = server_env(ServeConfig(policy="oracle", max_pin_share=0.3), base={"CTK_RECORD": "stale.duckdb"})
    assert env["CTK_POLICY"] == "oracle" and env["CTK_MAX_PIN_SHARE"] == "0.3"
    assert "CTK_RECORD" not in env  # settings from an outer environment do not leak in
