"""The model file as a type: ModelFile round trips, old files load, predict_rows outside the CLI."""

from __future__ import annotations

import pandas as pd
import pytest

from ctk.datasets.samples import sample_traces_dir
from ctk.predict.cost import CostModel
from ctk.predict.dataset import prepare_frame
from ctk.predict.modelfile import ModelFile, ModelFileError, default_model_path, load_model, save_model
from ctk.predict.prediction import predict_rows
from ctk.predict.train import TrainConfig, train_model


@pytest.fixture(scope="module")
def sample_rows() -> pd.DataFrame:
    return pd.read_csv(sample_traces_dir() / "tool_calls.csv.gz")


@pytest.fixture(scope="module")
def histogram_model(sample_rows) -> ModelFile:
    frame, skipped = prepare_frame(sample_rows)
    cost = CostModel(block_size_tokens=32, profile_source="test")
    config = TrainConfig(predictor="histogram", eval_folds=2, baselines=("running-mean",))
    model, evaluation = train_model(frame, config, cost, skipped_rows=skipped, store_info={"store": "x"})
    assert model.evaluation is evaluation
    return model


def test_shipped_model_loads_and_writes_back_the_same_plain_data():
    """The default model was written by the dict-building train.py: every key survives a load/save."""
    path = default_model_path()
    m = ModelFile.load(path)
    assert m.predictor == "histogram" and set(m.predictors) == {"histogram", "running-mean"}
    assert m.extra == {} and m.ttl_tables().quantiles_s and m.name == str(path)
    assert load_model(path)["ttl_tables"]["version"] == 2 and "ttl_s" not in load_model(path)["ttl_tables"]
    assert m.to_dict() == load_model(path)


def test_trained_model_round_trips_through_the_file(histogram_model, tmp_path):
    path = histogram_model.save(tmp_path / "m.pkl")
    back = ModelFile.load(path)
    assert back == histogram_model  # every field, tables and cost model included
    assert back.cost.block_size_tokens == 32 and back.cost.profile_source == "test"
    assert back.training_data["store"] == "x" and back.train_config["eval_folds"] == 2
    raw = load_model(path)  # on disk: the keys train.py always wrote, plain data
    assert raw["kind"] == "ctk-model" and raw["cost_model"]["block_size_tokens"] == 32
    assert raw["ttl_tables"] == histogram_model.ttl_tables().to_dict() and "tables" not in raw
    assert set(back.fitted()) == {"histogram", "running-mean"}


def test_unknown_keys_are_kept_and_missing_parts_are_named(tmp_path):
    save_model({"future_field": [1, 2], "predictor": "histogram"}, tmp_path / "m.pkl")
    m = ModelFile.load(tmp_path / "m.pkl")
    assert m.extra == {"future_field": [1, 2]} and m.tables is None
    assert m.to_dict()["future_field"] == [1, 2]
    with pytest.raises(ModelFileError, match="no TTL tables"):
        m.ttl_tables()
    with pytest.raises(ModelFileError, match="holds no predictor 'histogram'"):
        m.fitted_predictor()
    save_model({"cost_model": {"block_size_tokens": 0}}, tmp_path / "c.pkl")
    with pytest.raises(ModelFileError, match="bad cost model"):
        ModelFile.load(tmp_path / "c.pkl")
    save_model({"predictors": {"histogram": {"name": "nope"}}}, tmp_path / "p.pkl")
    with pytest.raises(ModelFileError, match="cannot rebuild the predictors"):
        ModelFile.load(tmp_path / "p.pkl").fitted()


def test_predict_rows_uses_the_model_predictor_cost_and_tables(histogram_model, sample_rows):
    rows = sample_rows.head(300)
    pred = predict_rows(histogram_model, rows, pressure=0.9)
    assert pred.predictor == "histogram" and len(pred.rows) + pred.skipped_rows == len(rows)
    out = pred.rows
    assert {"q0.5", "q0.9", "ttl_s", "p_hit", "table_ttl_s", "table_key"} <= set(out.columns)
    tables = histogram_model.ttl_tables()
    frame, _ = prepare_frame(rows)
    first = frame.iloc[0]
    want = tables.engine_decision(first["keys"], int(first["context_est"] or 0), 0.9)
    assert out["table_ttl_s"].iloc[0] == want.ttl_s and out["table_key"].iloc[0] == want.key
    # the baseline of the same file gives other quantiles; an absent predictor is a clear error
    base = predict_rows(histogram_model, rows, pressure=0.9, predictor="running-mean")
    assert base.predictor == "running-mean" and not base.rows["q0.9"].equals(out["q0.9"])
    with pytest.raises(ModelFileError, match="holds no predictor 'lightgbm'"):
        predict_rows(histogram_model, rows, predictor="lightgbm")
    # unlabelled rows (no duration) are predicted too
    unlabelled = predict_rows(histogram_model, rows.drop(columns=["duration_s"]), pressure=0.9)
    assert len(unlabelled.rows) >= len(out)


def test_predict_rows_online_names_the_replay(histogram_model, sample_rows):
    pred = predict_rows(histogram_model, sample_rows.head(300), pressure=0.9, online=True)
    assert pred.predictor == "histogram+online" and len(pred.rows) > 0
