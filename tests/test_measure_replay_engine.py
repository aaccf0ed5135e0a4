"""``ctk replay`` against a real vLLM CPU engine serving the tiny model (one server for the module)."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from ctk.measure.replay import ReplayConfig, ReplayError, run_replay
from ctk.measure.workload import WorkloadConfig, load_programs
from ctk.store import TraceStore
from tests.engine_fixtures import served_block_size
from tests.measure_fixtures import MSWEA_SOURCE

pytestmark = pytest.mark.engine

SMALL = dict(sources=[MSWEA_SOURCE], max_turns=4, max_output_tokens=16, max_observation_tokens=64,
             system_prompt_tokens=128, task_prompt_tokens=128, max_context_tokens=2048, max_pause_s=20.0)


def test_replay_is_token_exact_hits_the_prefix_cache_and_records_everything(live_server, sample_store):
    wcfg = WorkloadConfig(n_programs=3, seed=1, **SMALL)
    with TraceStore(sample_store, read_only=True) as store:
        programs = load_programs(store, wcfg)
    cfg = ReplayConfig(base_url=live_server, concurrency=3, time_scale=0.05, label="t", progress=False,
                       sample_interval_s=0.2)
    block = served_block_size(live_server)
    t0 = time.time()
    result = run_replay(programs, wcfg, cfg)
    assert not result.interrupted
    specs = {p.program_id: p for p in programs}
    assert sorted(p.program_id for p in result.programs) == sorted(specs)
    for prog in result.programs:
        spec = specs[prog.program_id]
        assert prog.ok, prog.error
        assert len(prog.turns) == len(spec.turns)
        # JCT covers every turn and every (scaled) tool pause
        pauses = sum(t.tool_duration_s for t in spec.turns) * cfg.time_scale
        assert pauses <= prog.jct_s <= time.time() - t0
        assert prog.turns[0].prompt_tokens == spec.first_prompt_tokens
        for k, (turn, ts) in enumerate(zip(prog.turns, spec.turns, strict=True)):
            assert turn.completion_tokens == ts.output_tokens  # forced length
            assert 0 < turn.ttft_s <= turn.latency_s
            assert turn.queue_s is not None and turn.queue_s >= 0
            # the engine's own times (vLLM's per-request metrics): inside what the client measured
            assert turn.server_prefill_s is not None and 0 <= turn.server_prefill_s <= turn.ttft_s
            assert turn.server_decode_s is not None and 0 <= turn.server_decode_s <= turn.latency_s
            assert turn.pause_s == pytest.approx(ts.tool_duration_s * cfg.time_scale)
            if k:  # turn k's prompt = turn k-1's prompt + its output + the observation, token for token
                prev, pts = prog.turns[k - 1], spec.turns[k - 1]
                assert turn.prompt_tokens == prev.prompt_tokens + pts.output_tokens + pts.observation_tokens
                # ...so the prefix cache serves at least the previous prompt's full blocks
                assert turn.cached_tokens >= prev.prompt_tokens // block * block
    s = result.summary()
    assert s["hit_rate"] > 0.3
    assert result.server_metrics["prefix_cache_queries"] == s["prompt_tokens"]
    assert result.server_metrics["prefix_cache_hits"] == s["cached_tokens"]
    assert result.timeline and all("kv_usage" in row for row in result.timeline)


def test_replay_cli_records_json_and_store_and_stops_cleanly_on_ctrl_c(
    live_server, sample_store, tmp_path, ctk_bin
):
    out, rec = tmp_path / "r.json", tmp_path / "rec.duckdb"
    args = [*ctk_bin, "replay", "--db", str(sample_store), "--base-url", live_server,
            "--source", MSWEA_SOURCE, "--max-turns", "3", "--max-output", "8", "--max-observation", "32",
            "--max-context", "2048", "--concurrency", "1", "--time-scale", "0.02", "--no-progress",
            "-o", str(out), "--record-db", str(rec)]
    proc = subprocess.Popen([*args, "-n", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(12)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr and "interrupted" in stdout
    d = json.loads(out.read_text())
    assert d["interrupted"] is True
    done = [p for p in d["programs"] if p["finish_unix_s"] is not None]
    assert 1 <= len(done) < 60  # what finished is kept; the rest was stopped
    with TraceStore(rec, read_only=True) as store:
        progs = store.table("programs")
        assert len(progs) == len(d["programs"]) and set(progs["source"]) == {"replay:replay"}
        assert store.table("llm_calls")["ttft_s"].notna().sum() >= len(done)


def test_unreachable_server_is_a_clear_error(sample_store):
    wcfg = WorkloadConfig(n_programs=1, **SMALL)
    with TraceStore(sample_store, read_only=True) as store:
        programs = load_programs(store, wcfg)
    with pytest.raises(ReplayError, match="cannot list models"):
        run_replay(programs, wcfg, ReplayConfig(base_url="http://127.0.0.1:9", progress=False))


def test_poisson_arrivals_are_seeded_and_spread(live_server, sample_store):
    wcfg = WorkloadConfig(n_programs=4, seed=5, **{**SMALL, "max_turns": 2})
    with TraceStore(sample_store, read_only=True) as store:
        programs = load_programs(store, wcfg)
    cfg = ReplayConfig(base_url=live_server, concurrency=None, rate=2.0, time_scale=0.0, seed=7,
                       progress=False, sample_interval_s=0)
    a = run_replay(programs, wcfg, cfg)
    b = run_replay(programs, wcfg, cfg)
    assert all(p.ok for p in a.programs + b.programs)

    def gaps(r):
        t = sorted(p.arrival_unix_s for p in r.programs)
        return [round(y - x, 6) for x, y in zip(t, t[1:], strict=False)]

    assert gaps(a) == pytest.approx(gaps(b), abs=1e-3)  # same seed, same arrival process
    assert min(p.arrival_unix_s for p in a.programs) == pytest.approx(a.started_unix_s, abs=0.05)
    assert sum(gaps(a)) > 0.2  # spread out, not all at once
    assert not a.timeline  # sampling off
