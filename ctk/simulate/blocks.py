"""The KV block pool of one simulated engine: vLLM 0.32's prefix cache, counted in runs of blocks.

vLLM (``vllm/v1/core/block_pool.py``) keeps one object per block: a hash for every full computed block
(chained: a block's hash covers its whole prefix), a reference count, and a free queue. A block whose count
drops to 0 goes to the free queue *still cached*: hashed blocks are appended (evicted last, in the order
freed: a request frees its blocks tail first, so its tail is evicted first), unhashed ones are prepended
(reused first). A new block is taken from the head of the queue, and a cached block taken that way is
evicted from the cache. A prefix hit "touches" cached blocks: out of the free queue, count + 1.

At GPU scale a program's context is thousands of blocks, so a per-block Python model is too slow. This
pool keeps the same semantics with two observations: (1) every hash chain here is one program's
(``ProgramSpec`` turns extend each other; no two programs share a block beyond the system prompt), so a
block is ``(chain, index)`` and a chain's state is two numpy arrays (reference counts, cached flags) for
its hashed blocks, while blocks being computed are private to their request (a count);
(2) blocks enter the free queue in contiguous runs (one request's freed full blocks), so the queue is a
deque of runs ``[chain, lo, hi)`` evicted from ``hi`` down. Unhashed free blocks are a plain count (they
sit at the head of vLLM's queue and are reused first). The system prompt shared by every program is
modelled as permanently resident (in vLLM some running request nearly always references it).
"""

from __future__ import annotations

from collections import deque

import numpy as np


class Run:
    """Blocks ``[lo, hi)`` of ``chain`` in the free queue, evicted from ``hi - 1`` down."""

    __slots__ = ("chain", "lo", "hi")

    def __init__(self, chain: Chain, lo: int, hi: int):
        self.chain, self.lo, self.hi = chain, lo, hi

    def __len__(self) -> int:
        return max(0, self.hi - self.lo)


class Chain:
    """One program's hash chain: per block a reference count and whether it holds a cached hash."""

    __slots__ = ("key", "ref", "cached", "runs")

    def __init__(self, key: str, capacity: int):
        self.key = key
        self.ref = np.zeros(max(16, capacity), dtype=np.int32)
        self.cached = np.zeros(max(16, capacity), dtype=bool)
        self.runs: list[Run] = []  # this chain's runs in the free queue (possibly empty ones)

    def ensure(self, n: int) -> None:
        if n > len(self.ref):
            size = max(n, 2 * len(self.ref))
            self.ref = np.concatenate([self.ref, np.zeros(size - len(self.ref), dtype=np.int32)])
            self.cached = np.concatenate([self.cached, np.zeros(size - len(self.cached), dtype=bool)])


class BlockPool:
    """Free queue + prefix cache of ``num_blocks`` blocks (``reserved`` of them permanently held)."""

    def __init__(self, num_blocks: int, block_size: int, reserved: int = 0):
        if num_blocks <= reserved:
            raise ValueError(f"KV cache of {num_blocks} blocks cannot hold the {reserved} shared blocks")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.reserved = reserved
        self.anon_free = num_blocks - reserved  # free blocks without a hash (reused first)
        self.queued = 0  # cached blocks with ref 0, in the free queue
        self.private = 0  # blocks requests hold that have no hash yet (being computed, partial tails)
        self.queue: deque[Run] = deque()
        self.chains: dict[str, Chain] = {}
        self.evicted = 0

    # -- queries ---------------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """vLLM's ``get_num_free_blocks``: unhashed free blocks plus cached blocks nobody references."""
        return self.anon_free + self.queued

    def chain(self, key: str, capacity: int = 64) -> Chain:
        c = self.chains.get(key)
        if c is None:
            c = self.chains[key] = Chain(key, capacity)
        return c

    def cached_prefix(self, chain: Chain, max_blocks: int) -> int:
        """Leading cached blocks of ``chain`` (at most ``max_blocks``): the prefix-cache hit."""
        if max_blocks <= 0:
            return 0
        chain.ensure(max_blocks)
        c = chain.cached[:max_blocks]
        return max_blocks if c.all() else int(np.argmin(c))

    def evictable_in(self, chain: Chain, lo: int, hi: int) -> int:
        """Blocks of ``[lo, hi)`` sitting in the free queue (touching them takes them out of it)."""
        if hi <= lo:
            return 0
        return int(np.count_nonzero((chain.ref[lo:hi] == 0) & chain.cached[lo:hi]))

    # -- operations ------------------------------------------------------------------------------

    def touch(self, chain: Chain, k: int) -> None:
        """A prefix hit on blocks ``[0, k)``: out of the free queue, reference + 1."""
        if k <= 0:
            return
        taken = self.evictable_in(chain, 0, k)
        if taken:
            self.queued -= taken
            for run in chain.runs:
                if run.lo < k:
                    run.lo = min(k, run.hi)
            chain.runs = [r for r in chain.runs if len(r)]
        chain.ref[:k] += 1

    def allocate(self, n: int) -> None:
        """``n`` fresh private blocks (the caller checked ``num_free``): unhashed free blocks first, then
        cached ones from the head of the free queue, which are evicted."""
        if n <= 0:
            return
        self.private += n
        take = min(n, self.anon_free)
        self.anon_free -= take
        n -= take
        while n > 0:
            run = self.queue[0]
            size = len(run)
            if size == 0:
                self.queue.popleft()
                continue
            k = min(n, size)
            run.chain.cached[run.hi - k : run.hi] = False
            run.hi -= k
            self.queued -= k
            self.evicted += k
            n -= k
            if not len(run):
                self.queue.popleft()

    def promote(self, chain: Chain, lo: int, hi: int) -> None:
        """Private full blocks ``[lo, hi)`` get their hash (the caller keeps referencing them). Where the
        position already has a cached copy, one copy goes: a stale one in the free queue is dropped, a
        referenced one is shared and ours is freed."""
        if hi <= lo:
            return
        chain.ensure(hi)
        cached, ref = chain.cached[lo:hi], chain.ref[lo:hi]
        stale = int(np.count_nonzero(cached & (ref == 0)))
        shared = int(np.count_nonzero(cached & (ref > 0)))
        if stale:
            self._cut(chain, lo, hi)
            self.queued -= stale
        self.private -= hi - lo
        self.anon_free += stale + shared
        chain.cached[lo:hi] = True
        chain.ref[lo:hi] += 1

    def _cut(self, chain: Chain, lo: int, hi: int) -> None:
        """Take ``[lo, hi)`` out of ``chain``'s runs (a run split in two keeps its upper part in place)."""
        keep = []
        for run in chain.runs:
            if run.hi <= lo or run.lo >= hi:
                keep.append(run)
                continue
            below = Run(chain, run.lo, lo) if run.lo < lo else None
            run.lo = max(run.lo, hi)
            if len(run):
                keep.append(run)
            else:
                run.hi = run.lo
            if below is not None:
                self.queue.append(below)
                keep.append(below)
        chain.runs = keep

    def release(self, chain: Chain, n_shared: int, n_blocks: int, full_blocks: int) -> None:
        """A request lets go of its blocks: ``[0, n_shared)`` hashed (shared), ``[n_shared, n_blocks)``
        private, of which those below ``full_blocks`` are full of computed tokens and get their hash.
        Hashed blocks nobody references join the free queue tail first; the rest are unhashed free blocks."""
        full_blocks = max(n_shared, min(full_blocks, n_blocks))
        self.promote(chain, n_shared, full_blocks)
        self.private -= n_blocks - full_blocks
        self.anon_free += n_blocks - full_blocks
        if full_blocks <= 0:
            return
        ref = chain.ref[:full_blocks]
        ref -= 1
        zero = ref == 0
        n_zero = int(np.count_nonzero(zero))
        if not n_zero:
            return
        self.queued += n_zero
        idx = np.flatnonzero(zero)
        if idx[-1] - idx[0] + 1 == len(idx):  # the usual case: one contiguous run
            spans = [(int(idx[0]), int(idx[-1]) + 1)]
        else:
            cuts = np.flatnonzero(np.diff(idx) > 1)
            starts = np.concatenate([[idx[0]], idx[cuts + 1]])
            ends = np.concatenate([idx[cuts], [idx[-1]]]) + 1
            spans = list(zip(starts.tolist(), ends.tolist(), strict=True))[::-1]  # tail first
        for lo, hi in spans:
            run = Run(chain, lo, hi)
            self.queue.append(run)
            chain.runs.append(run)
        if len(chain.runs) > 8:
            chain.runs = [r for r in chain.runs if len(r)]

    def check(self) -> None:
        """Invariants (tests): counts add up, no block both referenced and queued, no leak."""
        referenced = sum(int(np.count_nonzero(c.ref > 0)) for c in self.chains.values()) + self.private
        queued = sum(len(r) for r in self.queue)
        assert queued == self.queued, (queued, self.queued)
        assert self.anon_free >= 0 and self.queued >= 0 and self.private >= 0
        assert referenced + self.queued + self.anon_free + self.reserved == self.num_blocks, (
            referenced,
            self.queued,
            self.anon_free,
            self.reserved,
            self.num_blocks,
        )
        for c in self.chains.values():
            assert (c.ref >= 0).all()
            in_runs = np.zeros(len(c.ref), dtype=bool)
            for r in c.runs:
                in_runs[r.lo : r.hi] = True
            assert not (in_runs & (c.ref > 0)).any()
            assert (in_runs == ((c.ref == 0) & c.cached)).all()
            assert not ((c.ref > 0) & ~c.cached).any()
