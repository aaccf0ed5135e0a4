"""The waiting order on its own (no core, no engine): FCFS's measured waits, the age bound, the order keys."""

from __future__ import annotations

import math

import pytest

from ctk.policy.ordering import FCFSWaits, ProgramOrder, ResumeFirstOrder, SizeFirstOrder, WaitingItem


def test_fcfs_waits_pair_the_kth_admission_with_the_kth_arrival():
    w = FCFSWaits()
    assert w.quantile(0.99) == 0.0 and len(w) == 0  # nothing admitted yet
    for t in (0.0, 1.0, 2.0):
        w.arrived(t)
    w.admitted(5.0)  # whichever request was admitted, FCFS would have admitted the one of t=0
    w.admitted(5.5)  # ... and then the one of t=1
    assert w.quantile(0.0) == 4.5 and w.quantile(0.99) == 5.0
    w.dropped()  # the request of t=2 was aborted before admission: FCFS would not have admitted it
    w.admitted(9.0)  # no arrival left to pair: not a wait
    assert len(w) == 2


def test_fcfs_waits_keep_only_the_last_window():
    w = FCFSWaits(window=3)
    for i, wait in enumerate((10.0, 1.0, 2.0, 3.0)):
        w.arrived(float(i))
        w.admitted(i + wait)
    assert len(w) == 3 and w.quantile(0.99) == 3.0  # the 10 s wait has left the window


def test_a_waiting_request_may_be_overtaken_until_it_has_waited_fcfs_tail_wait():
    order = ProgramOrder(age_factor=1.0, age_quantile=0.99, min_waits=1)
    order.arrived(0.0)
    order.admitted(4.0)  # FCFS's waits: 4 s
    assert order.age_bound_s == 4.0
    items = [
        WaitingItem(arrival=10.0, program_first_arrival=10.0),  # a new program
        WaitingItem(arrival=11.0, program_first_arrival=1.0),  # an old program's next turn
        WaitingItem(arrival=12.0, program_first_arrival=5.0, has_pin=True),  # its prefix is held
    ]
    ids, next_change = order.order(items, now=12.0)
    assert ids == [2, 1, 0]  # pinned program first, then the oldest program
    assert next_change == 14.0  # the request of t=10 becomes overdue at 10 + 4 s
    ids, _ = order.order(items, now=14.0)
    assert ids == [0, 2, 1]  # overdue: it goes first, before the pin


def test_no_request_is_overdue_before_min_waits_waits_are_measured():
    order = ProgramOrder(age_factor=1.0, min_waits=3)  # a cold start: one measured wait says nothing yet
    order.arrived(0.0)
    order.admitted(4.0)
    items = [WaitingItem(arrival=1.0, program_first_arrival=1.0), WaitingItem(2.0, 0.0, has_pin=True)]
    ids, _ = order.order(items, now=100.0)
    assert ids == [1, 0]  # 99 s waited and still not overdue: the pinned program keeps its place
    for t in (1.0, 2.0):
        order.arrived(t)
        order.admitted(t + 4.0)
    ids, _ = order.order(items, now=100.0)
    assert ids == [0, 1]  # three waits measured: 4 s bound, the new program is overdue


def test_overdue_requests_go_oldest_first_and_ties_of_first_arrival_by_rank():
    order = ProgramOrder(age_factor=1.0, age_min_s=1.0, min_waits=1)
    order.arrived(0.0)
    order.admitted(0.1)  # a 0.1 s wait: the floor is the bound
    assert order.age_bound_s == 1.0
    items = [
        WaitingItem(5.0, 0.0),
        WaitingItem(3.0, 4.0),  # overdue, older
        WaitingItem(9.5, 2.0, False, 1),
        WaitingItem(9.6, 2.0, False, 0),  # same first arrival, seen first by the engine
        WaitingItem(9.7, None),  # no program: its own arrival
        WaitingItem(9.8, 20.0),  # a first arrival after its own: its own arrival counts
    ]
    ids, next_change = order.order(items, now=9.9)
    assert ids == [1, 0, 3, 2, 4, 5]
    assert next_change == pytest.approx(10.5)


def test_strict_program_fcfs_has_no_bound_until_relaxed():
    order = ProgramOrder(age_factor=math.inf, min_waits=1)
    order.arrived(0.0)
    order.admitted(30.0)
    items = [WaitingItem(500.0, 1.0), WaitingItem(2.0, 2.0)]  # an old program's turn, a long wait
    ids, next_change = order.order(items, now=1e6)
    assert ids == [0, 1] and next_change == math.inf  # the older program goes first, however long
    order.relax(2.0)  # the waits measured while strict count
    assert order.age_bound_s == 60.0
    ids, _ = order.order(items, now=1e6)
    assert ids == [1, 0]  # both overdue: plain arrival order


def test_resume_first_order_serves_resumed_turns_by_arrival_then_new_programs_by_program():
    items = [
        WaitingItem(9.0, 9.0, False, 5),  # a new program's first turn
        WaitingItem(8.0, 1.0),  # a resumed turn of the oldest program, arrived last of the resumes
        WaitingItem(7.0, 3.0),  # a resumed turn of a younger program, arrived earlier
        WaitingItem(8.5, 4.0, True),  # a resumed turn whose program holds a pin
        WaitingItem(6.0, 6.0, False, 4),  # an older new program
        WaitingItem(7.5, None),  # no program: a first turn by its own arrival
    ]
    strict = ResumeFirstOrder(age_factor=math.inf)
    ids, next_change = strict.order(items, now=10.0)
    assert ids == [3, 2, 1, 4, 5, 0] and next_change == math.inf
    assert ProgramOrder(age_factor=math.inf).order(items, now=10.0)[0] == [3, 1, 2, 4, 5, 0]  # the old order
    bounded = ResumeFirstOrder(age_factor=1.0, age_min_s=3.5, min_waits=1)
    bounded.arrived(0.0)
    bounded.admitted(0.1)
    ids, next_change = bounded.order(items, now=10.0)
    assert ids[0] == 4 and next_change == pytest.approx(10.5)  # overdue first; the next at 7.0 + 3.5


def test_size_first_order_admits_new_programs_smallest_first_after_resumed_turns():
    items = [
        WaitingItem(9.0, 9.0, False, 5),  # a new program, size 1
        WaitingItem(8.0, 1.0),  # a resumed turn
        WaitingItem(6.0, 6.0, False, 4),  # an older new program, size 50
        WaitingItem(7.5, None),  # no program: a one-turn program, ahead of every new program
        WaitingItem(7.0, 7.0, False, 6),  # a new program without a size: after the sized ones
        WaitingItem(8.5, 4.0, True),  # a pinned resumed turn
        WaitingItem(7.2, None),  # no program, arrived earlier: plain requests keep arrival order
    ]
    sjf = SizeFirstOrder(age_factor=math.inf)
    sjf.sizes.update({5: 1.0, 4: 50.0})
    assert sjf.order(items, now=10.0)[0] == [5, 1, 6, 3, 0, 2, 4]  # then the unsized program
    # aging: key = size + aging x first arrival; at 20 s of work per s the older program's 3 s head start
    # outweighs its 49 s of extra work; a plain request's key is its own arrival x aging (size 0)
    aged = SizeFirstOrder(age_factor=math.inf, aging=20.0)
    aged.sizes.update({5: 1.0, 4: 50.0})
    assert aged.order(items, now=10.0)[0] == [5, 1, 6, 3, 2, 0, 4]
    # a resumed turn keys as in ResumeFirstOrder, whatever its program's size
    assert sjf.key(8.0, 1.0, False, 4, 0) == ResumeFirstOrder.key(8.0, 1.0, False, 4, 0)


def test_default_admit_aging_bounds_how_long_a_stream_of_smaller_agents_programs_overtakes_a_large_one():
    """Smallest agent first starves the largest agent while smaller programs keep arriving faster than the
    engine admits them: with ``admit_aging`` 0 a large program waits as long as the stream lasts. ttl's
    default order (built from ``ServeConfig()``'s settings; the agents' means as the traces' terminal-bench
    and usaco programs teach them: 104 and 7 thousand context tokens, rounded to 128 and 8) admits it once
    the smaller programs still arriving are more than ``(128 - 8) / admit_aging`` seconds younger."""
    from ctk.policy.config import ServeConfig
    from ctk.policy.ordering import build_order

    cfg = ServeConfig()

    def admitted_at(aging: float, horizon: int = 20_000) -> int | None:
        order = build_order(
            ResumeFirstOrder,
            math.inf,  # ttl's strict order (no age bound)
            admit_order=cfg.admit_order,
            admit_aging=aging,
            admit_round=cfg.admit_round,
        )
        assert isinstance(order, SizeFirstOrder)
        order.sizing.finished("large", 104.4)
        order.sizing.finished("small", 7.0)
        order.sizes[0] = order.sizing.estimate("large")  # the large program, rank 0, arrives at 0
        waiting = {0: WaitingItem(0.0, 0.0, False, 0)}
        for t in range(1, horizon):  # a small program arrives each second; the engine admits one a second
            order.sizes[t] = order.sizing.estimate("small")
            waiting[t] = WaitingItem(float(t), float(t), False, t)
            items = list(waiting.values())
            head = items[order.order(items, now=float(t))[0][0]].program_rank
            del waiting[head]
            if head == 0:
                return t
        return None

    assert (admitted_at(0.0), admitted_at(0.0, horizon=40_000)) == (None, None)  # shortest first: never
    assert cfg.admit_aging > 0
    bound = (128 - 8) / cfg.admit_aging
    assert admitted_at(cfg.admit_aging) == pytest.approx(bound, abs=1.5)  # overtaken for (S - S') / aging
