"""ServeConfig: field types and ranges are its validation (pydantic); text converts; a bad value: one line."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from ctk.policy.config import ENV, ConfigError, ServeConfig
from ctk.policy.rules import Policy


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_pin_share": 0.0}, "max_pin_share=0.0: Input should be greater than 0"),
        ({"max_pin_share": 1.5}, "max_pin_share=1.5: Input should be less than or equal to 1"),
        ({"age_factor": math.nan}, "age_factor=nan: Input should be a finite number"),
        ({"age_min_s": -1.0}, "age_min_s=-1.0"),
        ({"price_decay_s": math.inf}, "price_decay_s=inf"),
        ({"progress_window": 1}, "progress_window=1"),
        ({"online_window": 2.5}, "online_window=2.5"),
        (
            {"detectors": ("bash", "regex")},
            "detectors must be one of 'bash', 'tool_call' or 'openai', not 'regex'",
        ),
        (
            {"policy": "lru"},
            "policy must be one of 'vllm', 'continuum', 'progress-ttl', 'ttl', 'oracle' or 'thunderagent'",
        ),
        (
            {"online_min_samples": 9, "online_window": 8},
            "online_min_samples must be >= 1 and <= online_window",
        ),
        ({"policy": "ttl"}, "policy 'ttl' needs a TTL model file"),
    ],
)
def test_a_bad_setting_is_one_clear_line(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        ServeConfig(**{"policy": "vllm", **settings}).validate()
    assert message in str(info.value) and "\n" not in str(info.value)


def test_defaults_and_paths_pass_and_the_policy_becomes_the_enum() -> None:
    cfg = ServeConfig(policy="continuum", ttl_model=Path("m.pkl")).validate()
    assert cfg.policy is Policy.CONTINUUM and cfg.ttl_model == "m.pkl"
    assert ServeConfig(ttl_model="m.pkl").validate() == ServeConfig(ttl_model="m.pkl")


def test_text_settings_convert_and_round_trip_through_the_environment() -> None:
    cfg = ServeConfig.from_env(
        {
            "CTK_POLICY": "oracle",
            "CTK_MAX_PIN_SHARE": "0.3",
            "CTK_DETECTORS": "bash, openai",
            "CTK_PROGRAM_FCFS": "default",
            "CTK_AGE_BOUND": "0",
            "CTK_ONLINE": "off",
            "CTK_RECORD": "",
            "CTK_ONLINE_WINDOW": "64",
        }
    )
    assert (cfg.policy, cfg.max_pin_share, cfg.detectors) == (Policy.ORACLE, 0.3, ("bash", "openai"))
    assert (cfg.program_fcfs, cfg.online, cfg.record, cfg.online_window) == (None, False, None, 64)
    assert cfg.age_bound is False
    cfg.program_fcfs = True
    assert ServeConfig.from_env(cfg.to_env()) == cfg
    assert set(cfg.to_env()) <= set(ENV)
    with pytest.raises(ConfigError, match="unknown ctk setting 'extra'"):
        ServeConfig.from_mapping({"extra": {}})
    with pytest.raises(ConfigError, match="max_pin_share='half'"):
        ServeConfig.from_mapping({"max_pin_share": "half"})


def test_from_mapping_updates_the_base_it_is_given() -> None:
    base = ServeConfig(policy="vllm")
    assert (
        ServeConfig.from_mapping({"max_pin_share": "0.25"}, base=base) is base and base.max_pin_share == 0.25
    )
