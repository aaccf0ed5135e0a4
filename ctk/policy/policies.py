"""The one registry of serve policies: config, ``ctk serve``, measure, simulate and bench import it.

``make_rule(policy, config, tables, cost)`` builds the policy's :class:`~ctk.policy.rules.PinRule`;
``ttl`` and ``oracle`` get the same tables / cost profile, so they differ only in what they know.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ctk.policy.config import ServeConfig
    from ctk.policy.rules import PinRule
    from ctk.predict.cost import CostModel
    from ctk.predict.tables import TTLTables


class Policy(StrEnum):
    VLLM = "vllm"  # stock vLLM: no pins, FCFS
    CONTINUUM = "continuum"  # the public Continuum code: 2 s pin if the tool's running mean <= 2 s
    PROGRESS_TTL = "progress-ttl"  # vllm-router 0.1.16+ Program Scheduling's Progress-TTL
    TTL = "ttl"  # ctk: TTL from the learned duration distribution under the live memory price
    ORACLE = "oracle"  # the true tool duration, clairvoyant eviction: an upper bound


POLICY_NAMES: tuple[str, ...] = tuple(p.value for p in Policy)


def make_rule(
    policy: Policy | str,
    config: ServeConfig,
    tables: TTLTables | None = None,
    cost: CostModel | None = None,
) -> PinRule:
    """The pin rule of ``policy``; ``cost`` defaults to the tables' profile (else the default profile)."""
    from ctk.policy import rules
    from ctk.predict.cost import CostModel

    policy = Policy(policy)
    if cost is None:
        cost = tables.cost_model if tables is not None else CostModel()
    if policy is Policy.VLLM:
        rule: PinRule = rules.NoPins()
    elif policy is Policy.CONTINUUM:
        rule = rules.ContinuumRule(config.continuum_ttl_s)
    elif policy is Policy.PROGRESS_TTL:
        rule = rules.ProgressTTLRule(config.progress_window, config.max_pin_share)
    elif policy is Policy.TTL:
        rule = rules.TTLRule(tables, cost, config.max_pin_share, rules.online_for(config, tables))
    else:
        rule = rules.OracleRule(cost, config.oracle_slack_s)
    if config.program_fcfs is not None:
        rule.program_fcfs = config.program_fcfs
    if config.age_bound is not None:  # e.g. the oracle held to ttl's tail bound, or ttl in strict order
        rule.age_bound = config.age_bound
    return rule
