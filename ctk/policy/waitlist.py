"""The waiting queue in scheduling order, kept incrementally (:class:`WaitingList`).

:meth:`ProgramOrder.order <ctk.policy.ordering.ProgramOrder.order>` sorts the whole queue: at GPU scale
(1,024 waiting requests) that is most of a millisecond per step, and a busy engine changes the order every
step (an arrival, a pin). ``WaitingList`` mirrors the engine's waiting queue as the sorted list of the same
keys (the order class's :meth:`~ctk.policy.ordering.ProgramOrder.key`, or
:func:`~ctk.policy.ordering.overdue_key`), and turns what changed since the last step into moves of single
requests (from index, to index):

- an arrival (the engine appended it) goes where its key sorts (a bisection);
- a request whose program gained or lost a pin (:meth:`touch`) is re-keyed and moved;
- requests that became overdue (the oldest arrivals past the age bound), or stopped being overdue (the
  bound grew), move to or from the overdue head;
- a request leaving the queue (admitted, aborted) leaves the mirror (the engine removed it itself).

The result is ``order()``'s order of the same queue: the same keys, and ties of equal keys kept in queue order
(the last element of each key is a sequence number that follows the queue order: a request moving to a larger
key goes before the requests already there, one moving to a smaller key or arriving after them).

The engine may change its queue behind the policy's back (a preempted request put back, a resumed one taken,
an unknown request): :meth:`sync` then answers None, and the caller orders the whole queue once and
:meth:`rebuild`\\ s the mirror from it.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Callable, Iterable

from ctk.policy.ordering import overdue_key

_INF = float("inf")

#: What the order needs of a waiting request: (arrival, program first arrival or None, program pinned,
#: program rank), or None for a request the policy does not know.
Inputs = Callable[[str], "tuple[float, float | None, bool, int] | None"]
KeyFn = Callable[[float, "float | None", bool, int, int], tuple]


class WaitingList:
    """The engine's waiting queue as sorted scheduling keys; see the module doc."""

    def __init__(self, key: KeyFn, inputs: Inputs):
        self.key = key
        self.inputs = inputs
        self.valid = False  # the mirror matches the engine's queue (else: sync answers None)
        self._keys: list[tuple] = []  # scheduling keys in queue order (sorted); the last item: a unique seq
        self._key_of: dict[str, tuple] = {}  # request id -> its key in _keys
        self._rid_of: dict[int, str] = {}  # seq -> request id
        self._overdue = 0  # _keys[:_overdue] are overdue keys (overdue_key: arrival at [1])
        # (arrival, seq) of the entries not overdue, sorted: what becomes overdue first. None: not kept while
        # no bound applies (nothing becomes overdue; built from the keys at the first sync with a bound)
        self._by_arrival: list[tuple[float, int]] | None = None
        # arrivals since the last sync, in arrival order (engine appended) -> their inputs when given at add()
        # (None: asked of ``inputs`` at the sync)
        self._tail: dict[str, tuple | None] = {}
        self._stale: set[str] = set()  # entries whose inputs changed since the last sync
        self._up = 0  # sequence numbers: increasing (after equal keys) ...
        self._down = 0  # ... and decreasing (before equal keys)

    def __len__(self) -> int:
        return len(self._keys) + len(self._tail)

    # -- events between steps ----------------------------------------------------------------------------

    def add(self, request_id: str, inputs: tuple | None = None) -> None:
        """The engine appended this request to its queue; it gets its place at the next :meth:`sync`.
        ``inputs``: what ``inputs(request_id)`` answers now, when the caller has it at hand (it is asked
        again at the sync only if the request is touched before)."""
        tail = self._tail
        if request_id in self._key_of or request_id in tail:
            self.valid = False
            return
        tail[request_id] = inputs

    def discard(self, request_id: str) -> None:
        """The request left the engine's queue (admitted, aborted, finished); nothing if not in it."""
        key = self._key_of.pop(request_id, None)
        if key is None:
            self._tail.pop(request_id, None)
            return
        if self._stale:
            self._stale.discard(request_id)
        keys = self._keys
        # vLLM admits from the head: look there before bisecting (a bisection over cold tuples of boxed
        # floats costs several microseconds in the engine's step)
        del keys[0 if keys[0] is key else bisect_left(keys, key)]
        seq = key[-1]
        del self._rid_of[seq]
        if key[0] == 0:  # overdue
            self._overdue -= 1
        elif self._by_arrival is not None:
            by_arrival = self._by_arrival
            entry = by_arrival[0]
            if entry[1] == seq:
                del by_arrival[0]
            else:
                del by_arrival[bisect_left(by_arrival, (key[3], seq))]

    def touch(self, request_ids: Iterable[str]) -> None:
        """These requests' inputs changed (their program gained or lost a pin)."""
        key_of, tail = self._key_of, self._tail
        for rid in request_ids:
            if rid in key_of:
                self._stale.add(rid)
            elif rid in tail:
                tail[rid] = None  # placed at the sync with its inputs then

    # -- at a step ---------------------------------------------------------------------------------------

    def sync(self, n_waiting: int, now: float, bound: float) -> list[tuple[int, int]] | None:
        """Moves (from index, to index; each on the queue as the previous one left it) that put the engine's
        queue of ``n_waiting`` requests in scheduling order at ``now`` with age bound ``bound``; None when the
        mirror does not match the queue."""
        if not self.valid or n_waiting != len(self._keys) + len(self._tail):
            self.valid = False
            return None
        moves: list[tuple[int, int]] = []
        if self._by_arrival is None and (bound != _INF or self._overdue):
            # (the entries not overdue are _keys[_overdue:]; arrival at [3], seq last, as each was keyed)
            self._by_arrival = sorted([(k[3], k[-1]) for k in self._keys[self._overdue :]])
        if self._overdue:
            self._not_overdue_anymore(now, bound, moves)
        by_arrival = self._by_arrival
        if by_arrival and now >= by_arrival[0][0] + bound:
            self._now_overdue(now, bound, moves)
        if self._stale:
            self._rekey(moves)
        if self._tail:
            self._place_arrivals(now, bound, moves)
        return moves

    def rebuild(self, request_ids: Iterable[str], now: float, bound: float) -> None:
        """The engine's queue is ``request_ids`` in scheduling order (as ``order()`` left it at ``now``)."""
        self._clear()
        key, inputs = self.key, self.inputs
        by_arrival = self._by_arrival = [] if bound != _INF else None
        keys, key_of, rid_of = self._keys, self._key_of, self._rid_of
        for rid in request_ids:
            item = inputs(rid)
            if item is None:  # ordered by the time of each order (see order_waiting): not mirrored
                self._clear()
                return
            arrival, first, pinned, rank = item
            seq = self._next_up()
            if now >= arrival + bound:
                k = overdue_key(arrival, seq)
                self._overdue += 1
            else:
                k = key(arrival, first, pinned, rank, seq)
                if by_arrival is not None:
                    by_arrival.append((arrival, seq))
            keys.append(k)
            key_of[rid] = k
            rid_of[seq] = rid
        if by_arrival is not None:
            by_arrival.sort()
        self.valid = True

    # -- internals ---------------------------------------------------------------------------------------

    def _clear(self) -> None:
        self.valid = False
        self._keys.clear()
        self._key_of.clear()
        self._rid_of.clear()
        self._by_arrival = None
        self._tail.clear()
        self._stale.clear()
        self._overdue = 0

    def _next_up(self) -> int:
        self._up += 1
        return self._up

    def _next_down(self) -> int:
        self._down -= 1
        return self._down

    def _move(self, rid: str, new: tuple, moves: list[tuple[int, int]]) -> None:
        keys = self._keys
        old = self._key_of[rid]
        i = bisect_left(keys, old)
        del keys[i]
        del self._rid_of[old[-1]]
        j = bisect_left(keys, new)
        keys.insert(j, new)
        self._key_of[rid] = new
        self._rid_of[new[-1]] = rid
        if i != j:
            moves.append((i, j))

    def _now_overdue(self, now: float, bound: float, moves: list[tuple[int, int]]) -> None:
        """The oldest entries waited the bound: to the overdue head, after the overdue ones of their arrival,
        in queue order among themselves."""
        by_arrival, rid_of, key_of = self._by_arrival, self._rid_of, self._key_of
        n = 0
        while n < len(by_arrival) and now >= by_arrival[n][0] + bound:
            n += 1
        due = sorted(key_of[rid_of[seq]] for _, seq in by_arrival[:n])
        del by_arrival[:n]
        for old in due:
            rid = rid_of[old[-1]]
            self._stale.discard(rid)
            self._move(rid, overdue_key(old[3], self._next_up()), moves)
            self._overdue += 1

    def _not_overdue_anymore(self, now: float, bound: float, moves: list[tuple[int, int]]) -> None:
        """The bound grew: the youngest overdue entries are no longer overdue (they go before the entries of
        their new key: they were ahead of them)."""
        keys, rid_of, inputs, key = self._keys, self._rid_of, self.inputs, self.key
        while self._overdue and not now >= keys[self._overdue - 1][1] + bound:
            old = keys[self._overdue - 1]
            rid = rid_of[old[-1]]
            arrival, first, pinned, rank = inputs(rid)
            self._overdue -= 1
            new = key(arrival, first, pinned, rank, self._next_down())
            self._move(rid, new, moves)
            insort(self._by_arrival, (arrival, new[-1]))

    def _rekey(self, moves: list[tuple[int, int]]) -> None:
        """Entries whose program gained or lost a pin: a key that grew goes before the entries already at it,
        one that shrank after them (as a stable sort of the queue would place them)."""
        key_of, inputs, key = self._key_of, self.inputs, self.key
        stale = sorted(key_of[rid] for rid in self._stale)
        self._stale.clear()
        rid_of = self._rid_of
        ups = []
        for old in stale:
            if old[0] == 0:
                continue  # overdue: the key does not depend on the pin
            rid = rid_of[old[-1]]
            arrival, first, pinned, rank = inputs(rid)
            new = key(arrival, first, pinned, rank, 0)
            if new[:-1] == old[:-1]:
                continue
            if new < old:
                self._rekey_one(rid, old, key(arrival, first, pinned, rank, self._next_up()), moves)
            else:
                ups.append((rid, old, (arrival, first, pinned, rank)))
        for rid, old, (arrival, first, pinned, rank) in reversed(ups):
            self._rekey_one(rid, old, key(arrival, first, pinned, rank, self._next_down()), moves)

    def _rekey_one(self, rid: str, old: tuple, new: tuple, moves: list[tuple[int, int]]) -> None:
        by_arrival = self._by_arrival
        if by_arrival is not None:
            del by_arrival[bisect_left(by_arrival, (old[3], old[-1]))]
        self._move(rid, new, moves)
        if by_arrival is not None:
            insort(by_arrival, (new[3], new[-1]))

    def _place_arrivals(self, now: float, bound: float, moves: list[tuple[int, int]]) -> None:
        """Arrivals since the last step, in arrival order: each from the queue's end to where it sorts."""
        keys, key_of, rid_of, inputs, key = self._keys, self._key_of, self._rid_of, self.inputs, self.key
        tail = self._tail
        for rid, item in tail.items():
            if item is None:
                item = inputs(rid)
            if item is None:
                self._clear()
                return
            arrival, first, pinned, rank = item
            self._up += 1  # (_next_up, inline)
            seq = self._up
            end = len(keys)
            if now >= arrival + bound:
                k = overdue_key(arrival, seq)
                j = bisect_left(keys, k, 0, self._overdue)
                self._overdue += 1
            else:
                k = key(arrival, first, pinned, rank, seq)
                j = end if not keys or k > keys[-1] else bisect_left(keys, k, self._overdue)
                by_arrival = self._by_arrival
                if by_arrival is None:
                    pass
                elif by_arrival and arrival < by_arrival[-1][0]:
                    insort(by_arrival, (arrival, seq))
                else:
                    by_arrival.append((arrival, seq))  # (seq is the largest yet)
            keys.insert(j, k)
            key_of[rid] = k
            rid_of[seq] = rid
            if j != end:
                moves.append((end, j))
        tail.clear()
