"""The shipped default model: trained on the bundled sample, loadable, and what `ctk serve` starts from."""

from __future__ import annotations

from typer.testing import CliRunner

from ctk.cli import app
from ctk.predict.modelfile import default_model_path, load_model, load_ttl_tables
from ctk.predict.online import OnlineDurations


def test_default_model_ships_small_and_holds_sample_tables():
    path = default_model_path()
    assert path.is_file() and path.stat().st_size < 200_000
    m = load_model(path)
    assert m["predictor"] == "histogram" and m["training_data"]["store"] == "bundled sample"
    t = load_ttl_tables(path)
    assert {"*", "ls", "python:script", "pip:install"} <= set(t.quantiles_s) and not t.fixed_pins
    # a listing is short, a package install long: the tables say so before any `ctk train`
    assert t.quantiles_s["ls"][t.quantile_levels.index(0.5)] < 0.1 < t.quantiles_s["pip:install"][2]


def test_online_adaptation_starts_from_the_default_model():
    t = load_ttl_tables(default_model_path())
    before = t.quantiles_s["ls"][t.quantile_levels.index(0.9)]
    on = OnlineDurations(t, min_samples=5, prior_weight=20, min_interval_s=0.0)
    for i in range(100):
        on.observe(["ls", "*"], before * 10 + 0.2, now=float(i))
    assert t.quantiles_s["ls"][t.quantile_levels.index(0.9)] > before * 5


def test_serve_without_ttl_model_uses_the_default_and_says_so():
    """No model to serve given: `ctk serve` stops before starting vLLM, after accepting the default model."""
    r = CliRunner().invoke(app, ["serve"])
    assert r.exit_code == 2
    out = r.output
    assert "no --ttl-model, starting from the shipped default" in out and "default_model.pkl" in out
    assert "give the model to serve" in out  # the default model passed check_model_file
    r2 = CliRunner().invoke(app, ["serve", "--policy", "vllm"])
    assert "shipped default" not in r2.output
