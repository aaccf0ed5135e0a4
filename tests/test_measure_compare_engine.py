"""The policy comparison end to end on real engines: profile, train on held-out programs, serve, replay."""

from __future__ import annotations

import json

import pytest

from ctk.measure.compare import CompareConfig, ServerConfig, run_comparison
from ctk.measure.replay import ReplayConfig
from ctk.measure.table import format_table
from ctk.measure.workload import WorkloadConfig
from ctk.predict.modelfile import load_ttl_tables
from ctk.store import TraceStore
from tests.measure_fixtures import MSWEA_SOURCE

pytestmark = pytest.mark.engine


def test_oracle_then_ttl_share_a_model_trained_on_other_programs(sample_store, measure_model_dir, tmp_path):
    cfg = CompareConfig(
        policies=["oracle", "ttl"],
        workload=WorkloadConfig(
            n_programs=2,
            seed=2,
            sources=[MSWEA_SOURCE],
            max_turns=3,
            max_output_tokens=8,
            max_observation_tokens=64,
            system_prompt_tokens=128,
            task_prompt_tokens=128,
            max_context_tokens=4096,
            max_pause_s=10.0,
        ),
        replay=ReplayConfig(concurrency=2, time_scale=0.05, progress=False, sample_interval_s=0.5),
        server=ServerConfig(kv_cache_bytes=16 * 2**20, max_num_seqs=4),
    )
    logs: list[str] = []
    comp = run_comparison(sample_store, measure_model_dir, tmp_path, cfg, log=logs.append)
    assert list(comp.results) == ["oracle", "ttl"]
    for policy, r in comp.results.items():
        s = r.summary()
        assert s["programs"] == 2 and s["failed_programs"] == 0, policy
        # every policy replayed exactly the same prompts
        assert s["prompt_tokens"] == comp.results["oracle"].summary()["prompt_tokens"]
        assert "pins_created" in r.server_metrics, policy  # the ctk scheduler served it
        assert (tmp_path / f"replay-{policy}.json").exists() and (tmp_path / f"server-{policy}.log").exists()
        # the oracle is served with ttl's model file (tables + profiled cost), trained once
        assert r.config["arm"] == {"policy": policy, "ttl_model": str(tmp_path / "model.pkl")}, policy
    # the first policy needs the model: the prefill was profiled on a stock server started for that
    assert (tmp_path / "server-vllm-profile.log").exists() and sum("trained" in m for m in logs) == 1
    # the TTL model: trained without the replayed programs, on the replay's clock, with the served cost
    replayed = {p.program_id for p in comp.results["ttl"].programs}
    with (
        TraceStore(tmp_path / "train.duckdb", read_only=True) as train,
        TraceStore(sample_store, read_only=True) as full,
    ):
        assert not replayed & train.program_ids()
        t, f = train.tool_calls(), full.tool_calls()
        f = f[~f["program_id"].isin(replayed)]
        assert t["duration_s"].sum() == pytest.approx(f["duration_s"].sum() * cfg.replay.time_scale, rel=1e-6)
    assert (tmp_path / "prefill_profile.json").exists(), logs
    assert load_ttl_tables(tmp_path / "model.pkl").quantiles_s
    d = json.loads((tmp_path / "compare-results.json").read_text())
    assert set(d["policies"]) == {"oracle", "ttl"}
    figs = d["policies"]  # one round: the medians are that round's figures; ttl is the only other arm
    assert figs["oracle"]["mean_jct_x_vs_best_other"] == pytest.approx(
        figs["ttl"]["mean_jct_s"] / figs["oracle"]["mean_jct_s"]
    )
    assert "ttl" in format_table(comp)
