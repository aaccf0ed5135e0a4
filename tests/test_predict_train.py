"""A benchmark's TTL model and prefill profile, made in-process (no `ctk train` / `ctk profile` child)."""

from __future__ import annotations

import json

import pytest

from ctk.engine_patch.serve.server import free_port
from ctk.predict.modelfile import ModelFile
from ctk.predict.profile import ProfileError, profile_prefill
from ctk.predict.train import TrainConfig, TrainError, train_ttl_model
from tests.predict_fixtures import store_from_rows, synthetic_rows


def test_train_ttl_model_uses_the_profile_and_block_size(tmp_path):
    db = store_from_rows(tmp_path / "train.duckdb", synthetic_rows(40, 6, seed=3))
    prof = tmp_path / "prefill.json"
    prof.write_text(json.dumps({"prefill_tokens": [0, 1000, 4000], "prefill_s": [0.0, 0.2, 0.9]}))
    config = TrainConfig(predictor="histogram", eval_folds=2, baselines=())
    out = train_ttl_model(db, tmp_path / "model.pkl", prof, 32, config)
    m = ModelFile.load(out)
    assert m.predictor == "histogram" and m.ttl_tables().quantiles_s
    assert m.cost.block_size_tokens == 32 and m.cost.profile_source == str(prof)
    assert m.cost.prefill_s == (0.0, 0.2, 0.9) and m.training_data["store"] == str(db)


def test_a_failed_training_keeps_the_whole_reason(tmp_path):
    db = store_from_rows(tmp_path / "one.duckdb", synthetic_rows(1, 6, seed=3))
    with pytest.raises(TrainError, match="failed: need at least 2 programs") as info:
        train_ttl_model(db, tmp_path / "model.pkl")
    assert isinstance(info.value.__cause__, Exception) and not (tmp_path / "model.pkl").exists()
    with pytest.raises(TrainError, match="no such profile file"):
        train_ttl_model(db, tmp_path / "model.pkl", tmp_path / "missing.json")


def test_profile_prefill_without_a_server_says_where(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ProfileError, match=f"profiling prefill at {url} failed: .*request failed"):
        profile_prefill(url, tmp_path / "p.json")
    assert not (tmp_path / "p.json").exists()
