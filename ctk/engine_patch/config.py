"""Configuration of the serve policy, shared by ``ctk serve``, the plugin and the scheduler adapter.

The scheduler runs in vLLM's engine-core process (started with spawn), so the configuration travels as
environment variables (``CTK_POLICY``, ``CTK_TTL_MODEL``, ...; see :data:`ENV`), optionally overridden by
``--additional-config '{"ctk": {...}}'`` (vLLM's ``additional_config``), which the adapter reads from the
``VllmConfig`` it is constructed with.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from ctk.engine_patch.policies import POLICY_NAMES, Policy
from ctk.errors import CtkError

POLICIES = POLICY_NAMES  # the registry lives in ctk.engine_patch.policies
DETECTORS = ("bash", "tool_call", "openai")


class ConfigError(CtkError, ValueError):
    """A serve setting is invalid; the message names it."""


@dataclass
class ServeConfig:
    """Knobs of the pin / ordering policy (defaults are the recommended settings)."""

    policy: str = Policy.TTL.value  # one of Policy (validated into the enum)
    ttl_model: str | None = None  # model.pkl with TTL tables (required by ``ttl``; optional elsewhere)
    record: str | None = None  # DuckDB trace store to record observed tool durations into
    max_pin_share: float = 0.5  # pinned blocks never exceed this share of the KV cache
    age_factor: float = 1.0  # a waiting request is overdue after age_factor x (FCFS's tail wait) ...
    age_quantile: float = 0.99  # ... that tail: this quantile of the waits FCFS would give ...
    age_min_s: float = 0.0  # ... but never before this many seconds (0: no floor above stock FCFS)
    program_fcfs: bool | None = None  # program-first waiting order (None: the policy's own)
    detectors: tuple[str, ...] = DETECTORS  # tool-call detectors applied to the output text
    online: bool = True  # adapt the tables online from observed tool durations
    online_min_samples: int = 5  # observations before a key's online distribution is used
    online_prior_weight: int = 20  # the table's prior counts as at most this many observations
    online_window: int = 256  # most recent observations kept per key
    max_observed_gap_s: float = 3600.0  # finish -> next arrival gaps above this are not tool durations
    continuum_ttl_s: float = 2.0  # Continuum: fixed pin length and running-mean threshold
    oracle_slack_s: float = 0.25  # oracle: pin for the true duration + measured round trip + this slack
    progress_window: int = 100  # progress-ttl: finish -> next-arrival gaps in the log-normal fit
    price_decay_s: float = 1.0  # the memory price decays with this time constant once the shortage clears
    price_tolerance: float = 0.1  # held pins are re-judged when the price moves by more than this (relative)
    max_programs: int = 100_000  # program records kept (oldest idle ones are forgotten first)
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> ServeConfig:
        if self.policy not in POLICY_NAMES:
            raise ConfigError(f"policy must be one of {', '.join(POLICY_NAMES)}, not {self.policy!r}")
        self.policy = Policy(self.policy)
        if not 0.0 < self.max_pin_share <= 1.0:
            raise ConfigError(f"max_pin_share must be in (0, 1], not {self.max_pin_share}")
        if self.age_factor <= 0 or self.age_min_s < 0:
            raise ConfigError("age_factor must be > 0 and age_min_s >= 0")
        if not 0.0 < self.age_quantile <= 1.0:
            raise ConfigError("age_quantile must be in (0, 1]")
        bad = [d for d in self.detectors if d not in DETECTORS]
        if bad:
            raise ConfigError(f"unknown tool-call detector(s) {bad}; choose from {', '.join(DETECTORS)}")
        if self.progress_window < 2 or self.price_decay_s <= 0 or self.price_tolerance < 0:
            raise ConfigError("progress_window must be >= 2, price_decay_s > 0 and price_tolerance >= 0")
        if self.policy is Policy.TTL and not self.ttl_model:
            raise ConfigError("policy 'ttl' needs a TTL model file (ctk serve --ttl-model model.pkl)")
        if self.online_min_samples < 1 or self.online_window < self.online_min_samples:
            raise ConfigError("online_min_samples must be >= 1 and <= online_window")
        return self

    # -- transport ---------------------------------------------------------------------------------------

    def to_env(self) -> dict[str, str]:
        env = {}
        for f in fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, tuple):
                value = ",".join(value)
            elif isinstance(value, bool):
                value = "1" if value else "0"
            env[ENV_PREFIX + f.name.upper()] = str(value)
        return env

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], base: ServeConfig | None = None) -> ServeConfig:
        """Settings from a mapping of field name -> value (strings are converted); unknown names fail."""
        cfg = base or cls()
        known = {f.name: f for f in fields(cls)}
        for name, raw in data.items():
            if name not in known or name == "extra":
                raise ConfigError(f"unknown ctk setting {name!r}")
            optional_bool = name in _OPTIONAL_BOOLS
            current = False if optional_bool else getattr(cls(), name)
            try:
                unset = optional_bool and (raw is None or str(raw).lower() in ("", "none", "default"))
                value = None if unset else _convert(raw, current, name)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"ctk setting {name}={raw!r}: {exc}") from None
            setattr(cfg, name, value)
        return cfg

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServeConfig:
        environ = os.environ if environ is None else environ
        data = {k[len(ENV_PREFIX) :].lower(): v for k, v in environ.items() if k.startswith(ENV_PREFIX)}
        data = {k: v for k, v in data.items() if k in {f.name for f in fields(cls)} and k != "extra"}
        return cls.from_mapping(data)


ENV_PREFIX = "CTK_"
_OPTIONAL_BOOLS = frozenset({"program_fcfs"})  # bool or None (None: the policy's default)
#: Environment variables the engine reads (``CTK_POLICY``, ``CTK_TTL_MODEL``, ``CTK_RECORD``, ...).
ENV = tuple(ENV_PREFIX + f.name.upper() for f in fields(ServeConfig) if f.name != "extra")


def _convert(raw: Any, current: Any, name: str) -> Any:
    if isinstance(current, bool):
        if isinstance(raw, str):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError("expected a boolean")
        return bool(raw)
    if isinstance(current, tuple):
        if isinstance(raw, str):
            return tuple(s.strip() for s in raw.split(",") if s.strip())
        return tuple(str(s) for s in raw)
    if isinstance(current, int):
        return int(raw)
    if isinstance(current, float):
        return float(raw)
    if raw is None or raw == "":
        return None
    return str(raw)
