"""The arm grammar of policy comparisons (``ctk simulate --policies``, ``bench/policies.py``).

An *arm* is a policy, optionally with its program ordering forced (``vllm/program-fcfs``, ``oracle/fcfs``:
the factorial that separates caching from ordering) and further serve settings
(``ttl@age_factor=0.75,max_pin_share=1``), checked by :class:`~ctk.policy.config.ServeConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ctk.errors import CtkError
from ctk.policy.config import ConfigError, ServeConfig
from ctk.policy.rules import POLICY_NAMES, RULES, Policy

#: Program ordering of an arm: ``<policy>/<ordering>`` forces ``ServeConfig.program_fcfs``.
ORDERINGS = {"fcfs": False, "program-fcfs": True}


class ArmError(CtkError, ValueError):
    """An arm name does not parse (unknown policy or ordering, a bad setting); the message says which."""


def split_arms(text: str | None) -> list[str]:
    """Arm names of a comma-separated list; a ``key=value`` piece belongs to the arm before it, so
    ``vllm,ttl@age_factor=0.75,max_pin_share=1`` is two arms."""
    arms: list[str] = []
    for piece in (p.strip() for p in (text or "").split(",")):
        if not piece:
            continue
        if arms and "=" in piece and "@" not in piece and "@" in arms[-1]:
            arms[-1] += "," + piece
        else:
            arms.append(piece)
    return arms


@dataclass(frozen=True)
class Arm:
    """One column of the comparison: a policy, and its program ordering unless the policy's default."""

    name: str
    policy: Policy
    program_fcfs: bool | None = None  # None: the policy's default
    serve: tuple[tuple[str, str], ...] = ()  # further ServeConfig settings (``ttl@age_factor=0.75``)

    @classmethod
    def parse(cls, name: str) -> Arm:
        """``ttl``, ``oracle/fcfs`` (policy / ordering) or ``ttl@age_factor=0.75,max_pin_share=1`` (serve
        settings, checked by ``ServeConfig``); raises ArmError naming the choices."""
        head, _, extra = name.partition("@")
        policy, _, ordering = head.partition("/")
        if policy not in POLICY_NAMES:
            raise ArmError(f"unknown policy {policy!r}; choose from {', '.join(POLICY_NAMES)}")
        if ordering and ordering not in ORDERINGS:
            raise ArmError(
                f"unknown ordering {ordering!r} in {name!r}; choose from {', '.join(ORDERINGS)}"
            )
        serve = tuple(tuple(kv.split("=", 1)) for kv in extra.split(",") if kv)
        if any(len(kv) != 2 for kv in serve):
            raise ArmError(f"serve settings in {name!r} are key=value pairs, comma-separated")
        try:
            ServeConfig.from_mapping({**dict(serve), "policy": policy})
        except ConfigError as exc:
            raise ArmError(f"{name!r}: {exc}") from None
        return cls(name, Policy(policy), ORDERINGS[ordering] if ordering else None, serve)

    @property
    def needs_model_file(self) -> bool:
        """The arm's rule cannot run without the TTL model file (``ttl``)."""
        return RULES[self.policy].needs_model_file

    @property
    def uses_model_file(self) -> bool:
        """The arm is served with the TTL model file: its tables and profiled cost model (``ttl``; the oracle
        needs the cost model as much, to know whether a pin pays)."""
        return RULES[self.policy].uses_model_file

    @property
    def tag(self) -> str:
        """The name in file names."""
        return self.name.replace("/", "-").replace("@", "-").replace(",", "-").replace("=", "")

    def settings(self) -> dict[str, Any]:
        """``ServeConfig`` fields this arm sets (``launch_server``'s ``settings``)."""
        out: dict[str, Any] = dict(self.serve)
        if self.program_fcfs is not None:
            out["program_fcfs"] = self.program_fcfs
        return out
