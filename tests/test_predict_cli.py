"""ctk train / evaluate / predict / inspect / profile on real DuckDB stores and model files."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import time

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from ctk.cli import app
from ctk.datasets.samples import sample_traces_dir
from ctk.predict.dataset import prepare_frame, rows_fingerprint
from ctk.predict.modelfile import load_model, load_ttl_tables
from ctk.predict.profile import cost_model_from
from ctk.store import TraceStore

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_model_file_contents(trained_model, predict_sample_store):
    m = load_model(trained_model)
    for key in (
        "format_version",
        "ctk_version",
        "created_unix_s",
        "training_data",
        "feature_spec",
        "quantile_levels",
        "ttl_tables",
        "calibration",
        "cost_model",
        "evaluation",
    ):
        assert key in m, key
    with TraceStore(predict_sample_store, read_only=True) as s:
        frame, _ = prepare_frame(s.tool_calls())
    assert m["training_data"]["rows"] == len(frame)
    assert m["training_data"]["fingerprint"] == rows_fingerprint(frame)
    lgb = m["predictors"]["lightgbm"]
    assert len(lgb["models"]) == len(m["quantile_levels"]) and all(isinstance(s, str) for s in lgb["models"])
    assert {0.5, 0.9} <= set(m["quantile_levels"])
    tables = load_ttl_tables(trained_model)
    assert "*" in tables.quantiles_s and tables.quantile_levels == m["quantile_levels"]
    # the tables are what the engine's rule reads: per-key quantiles, no key × context × pressure rows
    assert set(m["ttl_tables"]) == {"version", "quantile_levels", "quantiles_s", "n_samples", "cost"}
    assert m["ttl_tables"]["version"] == 2 and not tables.fixed_pins
    ev = m["evaluation"]["program_split"]["predictors"]
    assert set(ev) == {"lightgbm", "running-mean", "histogram"}


def test_inspect(trained_model):
    r = _run("inspect", trained_model)
    assert r.exit_code == 0, r.output
    assert "table keys" in r.output and "fingerprint" in r.output and "Decision regret" in r.output
    assert "Harness caps" in r.output or "harness caps: none" in r.output
    r = _run("inspect", trained_model, "--json")
    meta = json.loads(r.output)
    assert meta["predictor"] == "lightgbm" and meta["table_keys"] > 5


@pytest.mark.parametrize("kind", ["trained", "hand-set"])
def test_inspect_ttl_is_the_engine_rules_decision(trained_model, tmp_path, kind):
    """The TTL ``ctk inspect`` prints for a key at a live price and context is the TTL the engine's ttl rule
    decides for a call of that key, price and context (a trained file's quantiles, a hand-set file's fixed
    pins)."""
    from ctk.policy.config import ServeConfig
    from ctk.policy.detect import ToolCall
    from ctk.policy.events import EngineState, PinCall
    from ctk.policy.hints import parse_hints
    from ctk.policy.rules import make_rule
    from tests.engine_fixtures import TEST_TTLS, write_test_model

    if kind == "hand-set":
        trained_model = write_test_model(tmp_path / "fixed.pkl")
    meta = json.loads(_run("inspect", trained_model, "--json", "--keys", "12").output)
    shown = meta["engine_ttl"]
    ctx = shown["context_tokens"]
    tables = load_ttl_tables(trained_model)
    rule = make_rule("ttl", ServeConfig(policy="ttl", ttl_model="x", online=False), tables)
    cm = tables.cost_model
    pinned = 0
    for key, by_price in shown["ttl_s"].items():
        for price, ttl in by_price.items():
            call = PinCall(
                "p",
                "r",
                ToolCall("hint", None, key),
                (key,),
                ctx,
                cm.blocks(ctx),
                cm.block_size_tokens,
                parse_hints(None, {"program_id": "p"}),
            )
            decided = rule.decide(call, EngineState(0.0, 900, 1000, block_size=16), float(price)).ttl_s
            assert decided == pytest.approx(ttl, rel=1e-12, abs=1e-12), (key, price)
            pinned += ttl > 0
    if kind == "hand-set":
        assert meta["fixed_pins"]["ls"] == {"ttl_s": 30.0, "p_hit": 0.9}
        assert set(shown["ttl_s"]) == set(TEST_TTLS)
        assert shown["ttl_s"]["ls"]["0"] == 30.0 and shown["ttl_s"]["*"]["0"] == 0.0
        return
    assert "fixed_pins" not in meta
    assert len(shown["ttl_s"]) == 12 and 0 < pinned < 12 * len(next(iter(shown["ttl_s"].values())))


def test_predict_csv_and_store(trained_model, predict_sample_store, tmp_path):
    src = sample_traces_dir() / "tool_calls.csv.gz"
    out = tmp_path / "pred.csv"
    r = _run("predict", "--model", trained_model, src, "-o", out)
    assert r.exit_code == 0, r.output
    pred = pd.read_csv(out)
    inp = pd.read_csv(src)
    assert len(pred) == len(inp)  # one row per call, also for calls without a usable duration
    assert set(zip(pred["program_id"], pred["turn_index"], strict=True)) == set(
        zip(inp["program_id"], inp["turn_index"], strict=True)
    )
    qcols = [c for c in pred.columns if c.startswith("q")]
    assert {"q0.5", "q0.9"} <= set(qcols)
    assert (np.diff(pred[qcols].to_numpy(), axis=1) >= 0).all()
    assert {"ttl_s", "p_hit"} <= set(pred.columns)
    assert ((pred["p_hit"] >= 0) & (pred["p_hit"] <= 1)).all() and (pred["ttl_s"] >= 0).all()
    assert ((pred["ttl_s"] == 0) == (pred["p_hit"] == 0)).all()
    out2 = tmp_path / "pred2.parquet"
    r = _run("predict", "--model", trained_model, predict_sample_store, "-o", out2, "--pressure", "0.99")
    assert r.exit_code == 0, r.output
    tight = pd.read_parquet(out2)
    assert tight["ttl_s"].mean() < pred["ttl_s"].mean()  # under memory pressure pins get shorter


def test_evaluate_model_on_another_store_json(trained_model, synthetic_store):
    r = _run("evaluate", "--db", synthetic_store, "--model", trained_model, "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    rep = res["program_split"]
    with TraceStore(synthetic_store, read_only=True) as s:
        assert rep["rows"] == len(s.tool_calls())
    assert set(rep["predictors"]) == {"lightgbm", "running-mean", "histogram"}
    cov = rep["predictors"]["lightgbm"]["coverage"]
    assert all(0 <= v <= 1 for v in cov.values())
    assert res["model"]["predictor"] == "lightgbm"


def test_evaluate_without_model(predict_sample_store, tmp_path):
    r = _run(
        "evaluate",
        "--db",
        predict_sample_store,
        "--json",
        "--folds",
        "3",
        "--predictors",
        "running-mean,histogram",
        "--plots",
        tmp_path / "plots",
    )
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)  # steps go to stderr, JSON alone to stdout
    assert res["split"] == "3-fold by task group"
    assert len(res["leave_one_source_out"]) == 3
    assert (tmp_path / "plots" / "calibration.png").exists()


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_inspect_refuses_code_and_bad_files(tmp_path, trained_model, ctk_bin):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"kind": "ctk-model", "format_version": 1, "x": _Evil(marker)}, protocol=4))
    r = subprocess.run([*ctk_bin, "inspect", str(evil)], capture_output=True, text=True)
    assert r.returncode == 2
    assert "refusing to load" in r.stderr and "system" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(
        [*ctk_bin, "predict", "--model", str(evil), str(trained_model)], capture_output=True, text=True
    )
    assert r.returncode == 2 and "refusing to load" in r.stderr
    assert not marker.exists()
    truncated = tmp_path / "trunc.pkl"
    truncated.write_bytes(trained_model.read_bytes()[:5000])
    r = _run("inspect", truncated)
    assert r.exit_code == 2 and "truncated or corrupt" in r.output
    r = _run("inspect", tmp_path / "none.pkl")
    assert r.exit_code == 2 and "no such model file" in r.output


def test_clear_errors(tmp_path, predict_sample_store):
    r = _run("train", "--db", tmp_path / "missing.duckdb", "-o", tmp_path / "m.pkl")
    assert r.exit_code == 2 and "no such trace store" in r.output
    r = _run("train", "--db", predict_sample_store, "--levels", "0.1,0.2", "-o", tmp_path / "m.pkl")
    assert r.exit_code == 2 and "0.5 and 0.9" in r.output
    r = _run("train", "--db", predict_sample_store, "--predictor", "magic", "-o", tmp_path / "m.pkl")
    assert r.exit_code == 2 and "unknown predictor" in r.output
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("a,b\n1,2\n")
    r = _run("evaluate", "--db", bad_csv)
    assert r.exit_code == 2 and "lack column" in r.output
    not_db = tmp_path / "x.duckdb"
    not_db.write_text("not a database")
    r = _run("evaluate", "--db", not_db)
    assert r.exit_code == 2 and "error" in r.output
    assert not (tmp_path / "m.pkl").exists()


def test_train_histogram_and_running_mean(predict_sample_store, tmp_path):
    for kind in ("histogram", "running-mean"):
        out = tmp_path / f"{kind}.pkl"
        r = _run("train", "--db", predict_sample_store, "--predictor", kind, "-o", out)
        assert r.exit_code == 0, r.output
        # piped output (no progress bar) still says what it is doing, step by step
        assert "held-out evaluation ..." in r.output and "fit on all rows ..." in r.output
        t = load_ttl_tables(out)
        assert t.quantiles_s and not t.fixed_pins and "ttl_s" not in load_model(out)["ttl_tables"]
        if kind == "running-mean":  # each key's mean as its every quantile, priced live like any key
            assert all(len(set(q)) == 1 for q in t.quantiles_s.values())


def _slow_prefill_app(seconds_per_token: float):
    """An OpenAI-compatible endpoint whose latency grows with the prompt (a real HTTP server, fake model)."""
    import asyncio

    fastapi = pytest.importorskip("fastapi")
    api = fastapi.FastAPI()

    @api.get("/v1/models")
    async def models():
        return {"data": [{"id": "slow"}]}

    @api.post("/v1/chat/completions")
    async def chat(body: dict):
        n = len(body["messages"][0]["content"].split())
        await asyncio.sleep(0.005 + n * seconds_per_token)
        return {
            "choices": [{"message": {"role": "assistant", "content": "x"}, "finish_reason": "length"}],
            "usage": {"prompt_tokens": n, "completion_tokens": 1},
        }

    return api


def test_profile_against_a_live_server(tmp_path, predict_sample_store):
    from ctk.datasets.scripted_server import BackgroundServer

    per_token = 20e-6
    with BackgroundServer(_slow_prefill_app(per_token)) as url:
        out = tmp_path / "profile.json"
        t0 = time.time()
        r = _run("profile", "--url", url, "--lengths", "16,1000,3000", "--repeats", "2", "-o", out)
        assert r.exit_code == 0, r.output
        assert time.time() - t0 < 30
    prof = json.loads(out.read_text())
    toks, secs = prof["prefill_tokens"], prof["prefill_s"]
    assert toks[0] == 0 and toks == sorted(toks) and secs == sorted(secs)
    assert secs[-1] == pytest.approx((toks[-1] - 8) * per_token, rel=0.5, abs=0.01)
    cm = cost_model_from(out)
    assert cm.prefill_time_s(toks[-1]) == pytest.approx(secs[-1])
    r = _run(
        "train",
        "--db",
        predict_sample_store,
        "--predictor",
        "histogram",
        "--profile",
        out,
        "-o",
        tmp_path / "m.pkl",
    )
    assert r.exit_code == 0, r.output
    assert load_model(tmp_path / "m.pkl")["cost_model"]["profile_source"] == str(out)
    r = _run("profile", "--url", "http://127.0.0.1:9/v1", "-o", tmp_path / "p.json")
    assert r.exit_code == 2 and "request failed" in r.output


def test_numeric_options_are_checked_against_their_range(trained_model, tmp_path):
    src = sample_traces_dir() / "tool_calls.csv.gz"
    for bad in ("-1", "nan", "1.5", "inf", "abc"):
        r = _run("predict", "--model", trained_model, src, "-o", tmp_path / "p.csv", "--pressure", bad)
        assert r.exit_code == 2 and "--pressure" in r.output, (bad, r.output)
    assert not (tmp_path / "p.csv").exists()
    r = _run("train", "--db", tmp_path / "x.duckdb", "--block-size", "0")
    assert r.exit_code == 2 and "--block-size" in r.output
    r = _run("train", "--db", tmp_path / "x.duckdb", "--requeue-delay", "nan")
    assert r.exit_code == 2 and "--requeue-delay" in r.output


def test_model_file_respects_the_umask(trained_model, tmp_path):
    from ctk.predict.modelfile import save_model

    old = os.umask(0o022)
    try:
        path = save_model(load_model(trained_model), tmp_path / "shared.pkl")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644  # another account can load it


def test_evaluation_never_claims_more_folds_than_task_groups(tmp_path):
    rows = ["source,program_id,turn_index,tool_name,main_program,command_or_args,duration_s"]
    rows += [f"s,p{p},{t},bash,ls,ls {t},{0.1 * (t + 1) + p}" for p in range(3) for t in range(8)]
    csv = tmp_path / "tool_calls.csv"
    csv.write_text("\n".join(rows) + "\n")
    r = _run("evaluate", "--db", csv, "--predictors", "running-mean", "--folds", "5", "--json", "--no-loso")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["split"] == "3-fold by task group"  # 3 programs, no task ids


def test_the_regret_grades_the_engine_rules_decisions(trained_model, predict_sample_store):
    """``ctk evaluate``'s table regret and ``ctk predict``'s table columns are the ttl rule's decisions at the
    live price equivalent to each pressure, call by call."""
    from ctk.policy.config import ServeConfig
    from ctk.policy.detect import ToolCall
    from ctk.policy.events import EngineState, PinCall
    from ctk.policy.hints import parse_hints
    from ctk.policy.rules import make_rule
    from ctk.predict.evaluate import predict_all
    from ctk.predict.modelfile import ModelFile
    from ctk.predict.predictors import build_tables

    m = ModelFile.load(trained_model)
    with TraceStore(predict_sample_store, read_only=True) as s:
        frame, _ = prepare_frame(s.tool_calls())
    frame = frame.head(200)
    pr = m.fitted_predictor()[1]
    tables = build_tables(pr, frame, m.cost)  # the tables predict_all grades (built from its train rows)
    rule = make_rule("ttl", ServeConfig(policy="ttl", ttl_model="x", online=False), tables)
    cm = tables.cost_model
    pred = predict_all(pr, frame, frame, m.cost, pressures=(0.5, 0.95))
    for p in (0.5, 0.95):
        decided = []
        for keys, ctx in zip(frame["keys"], frame["context_est"].fillna(0).astype(int), strict=True):
            call = PinCall(
                "p",
                "r",
                ToolCall("hint", None, keys[0]),
                tuple(keys),
                ctx,
                cm.blocks(ctx),
                cm.block_size_tokens,
                parse_hints(None, {"program_id": "p"}),
            )
            decided.append(rule.decide(call, EngineState(0.0, 900, 1000, block_size=16), cm.live_price_at(p)))
        np.testing.assert_allclose(pred.ttl_table[p], [d.ttl_s for d in decided], rtol=1e-12)
        assert any(d.ttl_s > 0 for d in decided)
