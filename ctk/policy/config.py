"""Configuration of the serve policy, shared by ``ctk serve``, the plugin and the scheduler adapter.

The scheduler runs in vLLM's engine-core process (started with spawn), so the configuration travels as
environment variables (``CTK_POLICY``, ``CTK_TTL_MODEL``, ...; see :data:`ENV`), optionally overridden by
``--additional-config '{"ctk": {...}}'`` (vLLM's ``additional_config``), which the adapter reads from the
``VllmConfig`` it is constructed with.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Annotated, Any, Literal

from annotated_types import Ge, Gt, Le

from ctk.errors import CtkError
from ctk.policy.detect import DETECTORS
from ctk.policy.rules import RULES, Policy
from ctk.predict.cost import CONTINUUM_PIN_S

#: ``agent_prefix_tokens``' default (3 blocks of 16): past the chat templates' fixed headers (Llama 3.1's,
#: with its date: 25 tokens) into the system prompt, and short of the agents' own task text (the earliest
#: measured: BFCL's function calls on a ChatML template, 57 tokens in; ``bench/agent_prefix_len.py``, README,
#: "An agent class from the prompt's prefix").
AGENT_PREFIX_TOKENS = 48

# Value ranges, checked by pydantic in :meth:`ServeConfig.validate` (no nan, no infinity).
Share = Annotated[float, Gt(0), Le(1)]
Positive = Annotated[float, Gt(0)]
NonNegative = Annotated[float, Ge(0)]
AtLeastOne = Annotated[int, Ge(1)]
Count = Annotated[int, Ge(0)]


class ConfigError(CtkError, ValueError):
    """A serve setting is invalid; the message names it."""


@dataclass
class ServeConfig:
    """Knobs of the pin / ordering policy (defaults are the recommended settings).

    The field types and ranges are the validation rules: :meth:`validate` checks them with pydantic (and the
    two rules that join fields); :meth:`from_mapping` converts text (environment variables) by them.
    """

    __pydantic_config__ = {"allow_inf_nan": False}  # read by pydantic; not a field (no annotation)

    policy: Policy = Policy.TTL
    ttl_model: str | None = None  # model.pkl with TTL tables (required by ``ttl``; optional elsewhere)
    record: str | None = None  # DuckDB trace store to record observed tool durations into
    max_pin_share: Share = 0.5  # pinned blocks never exceed this share of the KV cache
    admit_fill: NonNegative = 0.0  # ttl / oracle: new programs wait while the working set passes this x cache
    admit_horizon_s: NonNegative = 30.0  # ... a program in a tool call counts this long (0 fill: no gate)
    # ttl / oracle: new programs by arrival, by true size (``program_size``: a probe) or by the mean size of
    # their agent's finished programs (``agent``: learned online)
    admit_order: Literal["arrival", "size", "agent"] = "agent"
    resume_order: Literal["arrival", "attained"] = "arrival"  # ttl / oracle: resumed turns FCFS, or least
    # attained service first (the program's turn contexts so far: a probe)
    admit_round: bool = True  # ... by agent: the estimate rounded to a power of 2 (one agent stays FCFS)
    # ... by agent, for a request that names none: its class is its prompt's first this-many tokens (rounded
    # down to whole prefix-cache blocks, at least one; 0: off), ``prefix:<hash>`` (README, "agent order")
    agent_prefix_tokens: Count = AGENT_PREFIX_TOKENS
    # ... by size: key = size + this x first arrival, so a program is overtaken only by programs arriving
    # within (its size - theirs) / this s of it (0: smallest first, which starves the largest agent)
    admit_aging: NonNegative = 0.1
    age_factor: Positive = 1.0  # a waiting request is overdue after age_factor x (FCFS's tail wait) ...
    age_quantile: Share = 0.99  # ... that tail: this quantile of the waits FCFS would give ...
    age_min_s: NonNegative = 0.0  # ... but never before this many seconds (0: no floor above stock FCFS)
    age_min_waits: AtLeastOne = 100  # waits measured before the age bound applies (before: no one is overdue)
    valve_horizon_s: NonNegative = 2.0  # ttl: the valve values a pin over this much of its hold (0: all)
    resume_valve: bool | None = None  # a resumed turn that waited FCFS's tail wait may take pins (None: ...
    resume_valve_contention: Share = 0.1  # ... while this share of recent pins meets the pin budget)
    program_fcfs: bool | None = None  # program-first waiting order (None: the policy's own)
    age_bound: bool | None = None  # program order bounded by the age bound (None: the policy's own)
    detectors: tuple[Literal["bash", "tool_call", "openai"], ...] = DETECTORS  # tool-call detectors (output)
    online: bool = True  # adapt the tables online from observed tool durations
    online_min_samples: AtLeastOne = 5  # observations before a key's online distribution is used
    online_prior_weight: Count = 20  # the table's prior counts as at most this many observations
    online_window: AtLeastOne = 256  # most recent observations kept per key
    max_observed_gap_s: Positive = 3600.0  # finish -> next arrival gaps above this are not tool durations
    continuum_ttl_s: NonNegative = CONTINUUM_PIN_S  # Continuum: fixed pin length and running-mean threshold
    oracle_slack_s: NonNegative = 0.25  # oracle: pin for the true duration + measured round trip + this slack
    progress_window: Annotated[int, Ge(2)] = 100  # progress-ttl: finish -> next-arrival gaps in the fit
    price_decay_s: Positive = 1.0  # the memory price decays with this time constant once the shortage clears
    price_tolerance: NonNegative = 0.1  # held pins are re-judged when the price moves by more than this
    max_programs: AtLeastOne = 100_000  # program records kept (oldest idle ones are forgotten first)

    def validate(self) -> ServeConfig:
        """Check every field's type and range (converting, e.g. the policy name to :class:`Policy`) and the
        rules joining fields; raises :class:`ConfigError` naming the first bad setting. Returns ``self``."""
        self._set(_checked(asdict(self)))
        if RULES[self.policy].needs_model_file and not self.ttl_model:
            raise ConfigError(
                f"policy {self.policy.value!r} needs a TTL model file (ctk serve --ttl-model model.pkl)"
            )
        if self.online_window < self.online_min_samples:
            raise ConfigError("online_min_samples must be >= 1 and <= online_window")
        return self

    def _set(self, other: ServeConfig) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(other, f.name))

    # -- transport ---------------------------------------------------------------------------------------

    def to_env(self) -> dict[str, str]:
        env = {}
        for f in fields(self):
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
        """``base`` (default: the defaults) with the settings of a mapping of field name -> value, converted
        and range-checked (text too: ``"0.3"``, ``"true"``, ``"bash,openai"``); unknown names fail."""
        cfg = base or cls()
        known = {f.name for f in fields(cls)}
        for name in data:
            if name not in known:
                raise ConfigError(f"unknown ctk setting {name!r}")
        text = {name: _from_text(name, raw) for name, raw in data.items()}
        cfg._set(_checked({**asdict(cfg), **text}))
        return cfg

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServeConfig:
        environ = os.environ if environ is None else environ
        data = {k[len(ENV_PREFIX) :].lower(): v for k, v in environ.items() if k.startswith(ENV_PREFIX)}
        data = {k: v for k, v in data.items() if k in {f.name for f in fields(cls)}}
        return cls.from_mapping(data)


ENV_PREFIX = "CTK_"
_OPTIONAL = frozenset(f.name for f in fields(ServeConfig) if f.default is None)  # "" means None
# bool or None: "none" / "default" mean None too
_OPTIONAL_BOOLS = frozenset({"program_fcfs", "age_bound", "resume_valve"})
_FLAGS = frozenset(f.name for f in fields(ServeConfig) if isinstance(f.default, bool))
#: Environment variables the engine reads (``CTK_POLICY``, ``CTK_TTL_MODEL``, ``CTK_RECORD``, ...).
ENV = tuple(ENV_PREFIX + f.name.upper() for f in fields(ServeConfig))


def _from_text(name: str, raw: Any) -> Any:
    """What text means beyond pydantic's own conversions: a comma list, an empty flag, an unset option."""
    if not isinstance(raw, str):
        return raw
    if name == "detectors":
        return tuple(s.strip() for s in raw.split(",") if s.strip())
    if name in _OPTIONAL and not raw.strip():
        return None
    if name in _OPTIONAL_BOOLS and raw.strip().lower() in ("none", "default"):
        return None
    if name in _FLAGS and not raw.strip():
        return False
    return raw


def _checked(values: dict[str, Any]) -> ServeConfig:
    """A ServeConfig from ``values``, checked by the field types and ranges; ConfigError names the first bad
    setting."""
    from pydantic import TypeAdapter, ValidationError

    global _ADAPTER
    if _ADAPTER is None:
        _ADAPTER = TypeAdapter(ServeConfig)
    values = {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in values.items()}
    try:
        return _ADAPTER.validate_python(values)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc)) from None


_ADAPTER = None


def _one_line(exc: Any) -> str:
    """The first error of a pydantic ValidationError as one line naming the setting."""
    err = exc.errors()[0]
    name = ".".join(str(part) for part in err["loc"][:1])
    if err["type"] in ("enum", "literal_error"):
        return f"{name} must be one of {err['ctx']['expected']}, not {err['input']!r}"
    return f"ctk setting {name}={err['input']!r}: {err['msg']}"
