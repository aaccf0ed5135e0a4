"""WaitingList (the waiting order kept between steps) against the full sort of ``ProgramOrder.order``."""

from __future__ import annotations

import math
import random

import pytest

from ctk.policy.ordering import ProgramOrder, ResumeFirstOrder, SizeFirstOrder
from ctk.policy.waitlist import WaitingList


class Model:
    """Requests and programs as the core sees them, plus the engine's waiting queue (a list of ids)."""

    def __init__(self, order_cls, rng: random.Random):
        self.rng = rng
        self.order = order_cls(age_factor=math.inf)
        self.arrival: dict[str, float] = {}
        self.program_of: dict[str, str | None] = {}
        self.first: dict[str, float] = {}
        self.rank: dict[str, int] = {}
        self.pinned: dict[str, bool] = {}
        self.queue: list[str] = []
        self.n = 0
        self.wl = WaitingList(self.order.key, self.inputs)
        self.wl.rebuild([], 0.0, math.inf)

    def inputs(self, rid: str):
        if rid not in self.arrival:
            return None
        pid = self.program_of[rid]
        if pid is None:
            return (self.arrival[rid], None, False, 0)
        return (self.arrival[rid], self.first[pid], self.pinned[pid], self.rank[pid])

    def arrive(self, now: float) -> None:
        self.n += 1
        rid = f"r{self.n}"
        roll = self.rng.random()
        if roll < 0.1:
            pid = None
        elif roll < 0.5 or not self.first:
            pid = f"p{len(self.first)}"
            self.first[pid] = now
            self.rank[pid] = len(self.rank) + 1
            self.pinned[pid] = False
            if isinstance(self.order, SizeFirstOrder) and self.rng.random() < 0.8:  # some without a size
                self.order.sizes[self.rank[pid]] = self.rng.choice([0.5, 1.0, self.rng.random() * 10])
        else:
            pid = self.rng.choice(sorted(self.first))
        self.arrival[rid] = now
        self.program_of[rid] = pid
        self.queue.append(rid)
        # the inputs at hand (as the core gives them), or asked at the sync; a pin flip before the sync must
        # make the list ask again
        self.wl.add(rid, self.inputs(rid) if self.rng.random() < 0.5 else None)

    def leave(self) -> None:
        if not self.queue:
            return
        i = 0 if self.rng.random() < 0.7 else self.rng.randrange(len(self.queue))  # mostly the head
        rid = self.queue.pop(i)
        self.wl.discard(rid)

    def flip_pin(self) -> None:
        if not self.pinned:
            return
        pid = self.rng.choice(sorted(self.pinned))
        self.pinned[pid] = not self.pinned[pid]
        self.wl.touch([r for r in self.queue if self.program_of[r] == pid])

    def full_order(self, now: float) -> list[str]:
        items = [self.inputs(r) for r in self.queue]
        order, _ = self.order.order(items, now)
        return [self.queue[i] for i in order]

    def step(self, now: float, bound: float) -> None:
        self.order.age_bound_s = bound
        expected = self.full_order(now)
        moves = self.wl.sync(len(self.queue), now, bound)
        assert moves is not None
        for src, dst in moves:
            self.queue.insert(dst, self.queue.pop(src))
        assert self.queue == expected


@pytest.mark.parametrize("order_cls", [ProgramOrder, ResumeFirstOrder, SizeFirstOrder])
@pytest.mark.parametrize("bounded", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_incremental_order_is_the_full_sort(order_cls, bounded, seed):
    rng = random.Random(seed)
    m = Model(order_cls, rng)
    now, bound = 0.0, math.inf
    for _ in range(400):
        if rng.random() < 0.3:
            now += rng.choice([0.0, 0.01, rng.random()])  # batches of arrivals at the same time too
        for _ in range(rng.choice([0, 0, 1, 1, 2, 5])):
            m.arrive(now)
        for _ in range(rng.choice([0, 0, 1, 2])):
            m.leave()
        for _ in range(rng.choice([0, 0, 0, 1, 2])):
            m.flip_pin()
        if bounded and rng.random() < 0.2:
            bound = rng.choice([math.inf, 0.0, rng.uniform(0.0, 3.0), rng.uniform(0.0, 3.0)])
        m.step(now, bound)


def test_a_queue_changed_behind_its_back_is_not_synced():
    m = Model(ProgramOrder, random.Random(0))
    for t in range(5):
        m.arrive(float(t))
    m.step(5.0, math.inf)
    m.queue.append("foreign")  # the engine put something back the list was not told of
    assert m.wl.sync(len(m.queue), 5.0, math.inf) is None
    assert m.wl.sync(len(m.queue) - 1, 5.0, math.inf) is None  # stays out of sync until rebuilt
    m.queue.remove("foreign")
    m.wl.rebuild(m.full_order(5.0), 5.0, math.inf)
    m.arrive(6.0)
    m.step(6.0, math.inf)


def test_an_unknown_request_leaves_the_list_unsynced():
    m = Model(ProgramOrder, random.Random(0))
    m.arrive(0.0)
    m.wl.rebuild(["unknown", *m.queue], 1.0, math.inf)
    assert not m.wl.valid
