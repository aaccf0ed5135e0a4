"""The live memory price (no engine): zero when nothing waits, grows with blocked demand, decays after."""

from __future__ import annotations

import pytest

from ctk.policy.events import EngineState
from ctk.policy.price import MemoryPrice


def st(now=0.0, free_blocks=10, waiting=0, demand=0, block_size=16, total=100) -> EngineState:
    return EngineState(now, free_blocks, total, waiting, block_size=block_size, waiting_demand_tokens=demand)


def test_zero_when_nothing_waits_or_memory_covers_the_queue():
    p = MemoryPrice()
    assert not p.update(st(waiting=0, demand=0)) and p.value == 0.0
    # requests wait but the free memory (160 tokens) covers their demand: compute, not memory, holds them
    assert not p.update(st(waiting=3, demand=150)) and p.value == 0.0


def test_grows_with_blocked_demand():
    prices = []
    for demand in (200, 400, 800, 1600):  # 2 waiting requests, 160 tokens free
        p = MemoryPrice()
        assert p.update(st(waiting=2, demand=demand))
        prices.append(p.value)
    assert all(a < b for a, b in zip(prices, prices[1:], strict=False))
    # more blocked requests of the same size: higher still
    by_queue = []
    for n in (1, 2, 4, 8):
        p = MemoryPrice()
        p.update(st(free_blocks=0, waiting=n, demand=500 * n))
        by_queue.append(p.value)
    assert all(a < b for a, b in zip(by_queue, by_queue[1:], strict=False))
    # the formula: b = n·min(1, S/D) blocked requests, price = b/K (JCT-s per token-s), K = 1600 tokens
    p = MemoryPrice()
    p.update(st(free_blocks=10, waiting=2, demand=400))  # S = 400 - 160 = 240
    assert p.value == pytest.approx(2 * (240 / 400) / 1600)


def test_block_size_does_not_change_the_price():
    a, b = MemoryPrice(), MemoryPrice()
    a.update(st(free_blocks=8, block_size=16, waiting=3, demand=1000, total=128))  # 128 of 2048 tokens free
    b.update(st(free_blocks=1, block_size=128, waiting=3, demand=1000, total=16))  # the same in 128s
    assert a.value == b.value > 0


def test_decays_when_the_shortage_clears_and_is_zero_when_the_queue_empties():
    p = MemoryPrice(decay_s=1.0, tolerance=0.1)
    p.update(st(now=0.0, free_blocks=0, waiting=4, demand=2000))
    high = p.value
    assert p.update(st(now=1.0, free_blocks=200, waiting=4, demand=2000))  # memory free again, queue remains
    assert p.value == pytest.approx(high * 0.36788, rel=1e-3)  # e^-1 after one time constant
    assert not p.update(st(now=1.01, free_blocks=200, waiting=4, demand=2000))  # < 10 %: no re-judgement
    assert p.update(st(now=2.0, waiting=0, demand=0)) and p.value == 0.0
