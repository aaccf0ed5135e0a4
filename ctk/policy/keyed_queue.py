"""A waiting queue that holds its requests in the policy's scheduling order by itself (:class:`KeyedQueue`).

While the order's keys never change with time (no age bound: ttl's strict order), a waiting request's key
is fixed from its arrival until its program gains or loses a pin. An engine's queue can then keep the order
itself: a request is placed when it enters, the engine takes the head, and nothing is done per step (the
alternative, :class:`~ctk.policy.waitlist.WaitingList`, mirrors a FIFO queue and turns each step's changes
into moves). The keys are the core's (``PolicyCore.waiting_keys``, the order class's
:meth:`~ctk.policy.ordering.ProgramOrder.key`): a tuple whose first item is its class (0-4), whose last is
a tie-break.

One sorted segment of (key, request, uncomputed tokens) per key class; an arrival that sorts last in its
class is an append (every arrival under :class:`~ctk.policy.ordering.ResumeFirstOrder`: its classes grow with
arrival), others are bisected in. A request the policy does not know (``key_of`` answers None) goes last, in
arrival order; put back, to the front of that class (as a FIFO queue puts it back). A skipped or preempted
request put back goes to its key's place (for one taken from the head: the head again). :meth:`rekey` moves
the requests whose program gained or lost a pin; never while the engine walks the queue (the driver re-keys
before a step). Each class keeps the sum of its requests' uncomputed tokens (each counted as it entered), so
the demand of the head (:meth:`head_demand`) is whole classes plus a walk of one from its nearer end.

Engine-free: the method names are vLLM's ``RequestQueue``'s; an engine adapter subclasses it with
``add_request`` / ``prepend_request`` that pass each request's uncomputed tokens (the vLLM adapter:
``ctk.engine_patch.vllm_door.KeyedRequestQueue``; the simulator: ``ctk.simulate.engine``).
"""

from __future__ import annotations

import itertools
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

#: The class of a request the policy does not know: after every keyed class (the order's keys: 0-4).
UNKNOWN_CLASS = 5

KeyOf = Callable[[str], "tuple | None"]


class KeyedQueue:
    """The waiting requests in scheduling order, by keys fixed while they wait (see the module doc). Items
    are any objects with a ``request_id``."""

    def __init__(self, key_of: KeyOf):
        self.key_of = key_of
        self._segments: tuple[deque, ...] = tuple(deque() for _ in range(UNKNOWN_CLASS + 1))
        self._tokens = [0] * (UNKNOWN_CLASS + 1)  # per class: its requests' uncomputed tokens
        self._key: dict[str, tuple] = {}  # request id -> key, for the requests in the queue
        self._seq = 0  # the unknown class's keys: (UNKNOWN_CLASS, seq), appended ...
        self._front = 0  # ... or put back at its front (a decreasing seq)

    # -- entering (the engine adapter's add_request / prepend_request pass the tokens) -------------------

    def _add(self, request: Any, tokens: int) -> None:
        """An arrival: at its key's place (an unknown request last)."""
        key = self.key_of(request.request_id)
        if key is None:
            self._seq += 1
            key = (UNKNOWN_CLASS, self._seq)
        self._place(request, key, tokens)

    def _put_back(self, request: Any, tokens: int) -> None:
        """A request taken and put back (skipped or preempted): at its key's place, the head again for one
        taken from there (an unknown request: the front of its class)."""
        key = self.key_of(request.request_id)
        if key is None:
            self._front -= 1
            key = (UNKNOWN_CLASS, self._front)
        self._place(request, key, tokens)

    def _place(self, request: Any, key: tuple, tokens: int) -> None:
        c = key[0]
        seg = self._segments[c]
        if not seg or key > seg[-1][0]:
            seg.append((key, request, tokens))
        else:
            seg.insert(bisect_left(seg, (key,)), (key, request, tokens))
        self._key[request.request_id] = key
        self._tokens[c] += tokens

    # -- vLLM's RequestQueue API ---------------------------------------------------------------------------

    def pop_request(self) -> Any:
        for c, seg in enumerate(self._segments):
            if seg:
                _, request, tokens = seg.popleft()
                del self._key[request.request_id]
                self._tokens[c] -= tokens
                return request
        raise IndexError("pop from an empty queue")

    def peek_request(self) -> Any:
        for seg in self._segments:
            if seg:
                return seg[0][1]
        raise IndexError("peek from an empty queue")

    def prepend_requests(self, requests: Iterable[Any]) -> None:
        for request in requests:
            self.prepend_request(request)

    def prepend_request(self, request: Any) -> None:  # the adapter's: _put_back with its tokens
        raise NotImplementedError

    def remove_request(self, request: Any) -> None:
        """(ValueError when not in the queue, as ``deque.remove``.)"""
        self._take(request.request_id)

    def remove_requests(self, requests: Iterable[Any]) -> None:
        """Those of ``requests`` in the queue (vLLM passes every waiting request it stops or aborts, some
        held in its other queue or in none, as its FCFS queue's filter allows)."""
        for request in list(requests):
            if request.request_id in self._key:
                self._take(request.request_id)

    def __len__(self) -> int:
        return len(self._key)

    def __bool__(self) -> bool:
        return bool(self._key)

    def __iter__(self) -> Iterator[Any]:
        for seg in self._segments:
            for _, request, _ in seg:
                yield request

    # -- the policy's ----------------------------------------------------------------------------------

    def rekey(self, request_ids: Iterable[str]) -> None:
        """These requests' keys changed (their program gained or lost a pin): each to its new place. Ids
        not in the queue (running, finished) are skipped."""
        for rid in request_ids:
            if rid in self._key:
                request, tokens = self._take(rid)
                self._put_back(request, tokens)

    def head_demand(self, slots: int) -> tuple[int, int]:
        """(requests, uncomputed tokens) of the first ``slots`` requests
        (:func:`~ctk.policy.driver.head_demand`'s rule): the classes that fit whole by their sums, the one
        cut by a walk from its nearer end."""
        n = min(slots, len(self._key))
        if n <= 0:
            return 0, 0
        left, tokens = n, 0
        for c, seg in enumerate(self._segments):
            size = len(seg)
            if size <= left:
                tokens += self._tokens[c]
                left -= size
                if not left:
                    break
                continue
            if left <= size - left:
                tokens += sum([t for _, _, t in itertools.islice(seg, left)])
            else:
                tail = itertools.islice(reversed(seg), size - left)
                tokens += self._tokens[c] - sum([t for _, _, t in tail])
            break
        return n, tokens

    def _take(self, request_id: str) -> tuple[Any, int]:
        """Remove a request: (it, its tokens)."""
        key = self._key.pop(request_id, None)
        if key is None:
            raise ValueError(f"{request_id} is not in the waiting queue")
        seg = self._segments[key[0]]
        i = bisect_left(seg, (key,))
        _, request, tokens = seg[i]
        del seg[i]
        self._tokens[key[0]] -= tokens
        return request, tokens
