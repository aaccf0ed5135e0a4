"""Several replicas behind a router: which engine a program's request goes to.

Routers (``--routing``): ``round-robin`` (per request: no session affinity, a program's turns scatter),
``consistent-hash`` (the program id on a hash ring with 160 virtual nodes per replica, as vllm-router's
``consistent_hash`` policy hashes ``x-session-id``: every turn of a program lands on the same replica), and
``least-loaded`` (the replica with the fewest waiting + running requests, per request).
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Sequence
from typing import Protocol

from ctk.simulate.engine import SimEngine

ROUTINGS = ("round-robin", "consistent-hash", "least-loaded")


class Router(Protocol):
    def route(self, program_id: str, engines: Sequence[SimEngine]) -> int: ...


class RoundRobin:
    def __init__(self) -> None:
        self._next = 0

    def route(self, program_id: str, engines: Sequence[SimEngine]) -> int:
        i = self._next % len(engines)
        self._next += 1
        return i


def _h(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


class ConsistentHash:
    def __init__(self, n_replicas: int, vnodes: int = 160) -> None:
        ring = sorted((_h(f"replica-{r}#{v}"), r) for r in range(n_replicas) for v in range(vnodes))
        self._keys = [k for k, _ in ring]
        self._owners = [r for _, r in ring]
        self._memo: dict[str, int] = {}

    def route(self, program_id: str, engines: Sequence[SimEngine]) -> int:
        r = self._memo.get(program_id)
        if r is None:
            i = bisect.bisect(self._keys, _h(program_id)) % len(self._keys)
            r = self._memo[program_id] = self._owners[i]
        return r


class LeastLoaded:
    def route(self, program_id: str, engines: Sequence[SimEngine]) -> int:
        return min(range(len(engines)), key=lambda i: engines[i].load)


def make_router(name: str, n_replicas: int) -> Router:
    if name == "round-robin":
        return RoundRobin()
    if name == "consistent-hash":
        return ConsistentHash(n_replicas)
    if name == "least-loaded":
        return LeastLoaded()
    raise ValueError(f"routing must be one of {', '.join(ROUTINGS)}, not {name!r}")
