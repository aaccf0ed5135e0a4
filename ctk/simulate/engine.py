"""One simulated vLLM 0.32 engine: the scheduler's batching and preemption, and an ``EngineView``.

The scheduling step follows ``vllm/v1/core/sched/scheduler.py`` (0.32.0) where it matters for pins:

- a token budget of ``max_num_batched_tokens`` per step, at most ``max_num_seqs`` running requests;
- RUNNING requests first, in list order: each gets ``num_tokens - num_computed`` new tokens (a prefill chunk
  or one decode token) capped by the remaining budget (chunked prefill); when its blocks cannot be
  allocated the LAST running request is preempted (recompute: its blocks are freed, still cached, and it
  goes back to the waiting queue: to its FRONT in a FIFO queue, to its key's place in the queue that keeps
  the policy's order, as in vLLM with ctk's queues), repeatedly, until the allocation fits or the request
  itself was the victim;
- WAITING requests only when nothing was preempted this step, in queue order, skipping those the policy
  holds back (``driver.may_admit``; vLLM's waiting loop skips them the same way); a request's prefix-cache hit
  (full blocks, at most ``num_tokens - 1`` tokens) is looked up, its whole prompt must fit the free blocks
  (``scheduler_reserve_full_isl``, the 0.32 default), and the loop stops at the first request it cannot place;
- a request whose prompt is fully computed samples one token in the same step; it finishes at ``max_tokens``.

Step time comes from a :class:`StepCost` (the hardware profile). The policy is driven only through a
``PolicyDriver`` at the adapter's hook points: ``request_added`` on arrival, ``step_begin`` before
scheduling, ``allocation_failed`` before a preemption or a refused admission, ``step_end`` with the requests
admitted this step, ``request_finished`` when a request finishes.

Consecutive pure-decode steps with nothing else due (no waiting request, no arrival, no pin deadline, no
finish, blocks available) are fused into one event of ``k`` steps: the event loop does no per-token work.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

from ctk.policy.driver import head_demand
from ctk.policy.keyed_queue import KeyedQueue
from ctk.simulate.blocks import BlockPool, Chain


class StepCost(Protocol):
    """Duration of one engine step (the hardware profile)."""

    def step_s(self, prefill_tokens: int, prefill_attn: float, n_decode: int, decode_ctx: int) -> float:
        """``prefill_attn`` = Σ chunk × (context before it + chunk / 2) over prefill chunks."""
        ...


@dataclass
class EngineConfig:
    num_blocks: int
    block_size: int = 16
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    shared_prefix_tokens: int = 0  # the system prompt every program starts with (always resident)
    shared_prefixes: int = 1  # distinct such prompts resident (one per agent: ``workload.system_prompts``)
    max_fused_steps: int = 64  # decode steps fused into one event at most (1: no fusion)


class SimRequest:
    """One request (one turn of a program) inside a simulated engine."""

    __slots__ = (
        "request_id",
        "program_id",
        "chain",
        "prompt_tokens",
        "max_tokens",
        "hints",
        "arrival",
        "num_computed",
        "num_output",
        "n_blocks",
        "n_shared",
        "cached_tokens",
        "first_token_s",
        "finish_s",
        "preemptions",
        "client",
    )

    def __init__(self, request_id: str, program_id: str, prompt_tokens: int, max_tokens: int, hints: Any):
        self.request_id = request_id
        self.program_id = program_id
        self.chain: Chain | None = None
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.hints = hints
        self.arrival = 0.0
        self.num_computed = 0
        self.num_output = 0
        self.n_blocks = 0  # chain blocks held (after the shared prefix)
        self.n_shared = 0  # of which hashed (prefix hits, or promoted when held); the rest are private
        self.cached_tokens: int | None = None  # prefix-cache hit at the first admission
        self.first_token_s: float | None = None
        self.finish_s: float | None = None
        self.preemptions = 0
        self.client: Any = None  # the program driving it (set by the caller)

    @property
    def num_tokens(self) -> int:
        return self.prompt_tokens + self.num_output


class NullDriver:
    """No policy at all (tests of the bare engine): every hook is a no-op."""

    def request_added(self, request_id, hints, now, prompt_tokens=0):
        pass

    def step_begin(self, now):
        pass

    def step_end(self, admitted, now):
        pass

    def may_admit(self, request_id):
        return True

    def allocation_failed(self, request_id, running, now):
        return False

    def request_finished(self, request_id, end, now):
        return False

    def idle(self, now):
        pass

    def next_deadline(self):
        return None


class FifoQueue(deque):
    """The simulator's FIFO waiting queue with vLLM's ``RequestQueue`` names (as its ``FCFSRequestQueue``);
    the driver re-orders it through the core's mirror."""

    add_request = deque.append
    pop_request = deque.popleft
    prepend_request = deque.appendleft

    def peek_request(self) -> SimRequest:
        return self[0]

    def head_demand(self, slots: int) -> tuple[int, int]:
        """``EngineView.waiting_demand``'s head (:func:`~ctk.policy.driver.head_demand`)."""
        return head_demand((r.num_tokens - r.num_computed for r in self), slots)


class KeyedSimQueue(KeyedQueue):
    """The waiting queue holding itself in the policy's order (:class:`~ctk.policy.keyed_queue.KeyedQueue`,
    as vLLM's ``KeyedRequestQueue``), while the order's keys are fixed."""

    def add_request(self, r: SimRequest) -> None:
        self._add(r, r.num_tokens - r.num_computed)

    def prepend_request(self, r: SimRequest) -> None:
        self._put_back(r, r.num_tokens - r.num_computed)


class SimEngine:
    """A vLLM 0.32 engine in virtual time; implements ctk's ``EngineView`` protocol."""

    def __init__(self, cfg: EngineConfig, cost: StepCost, name: str = "engine-0"):
        self.cfg = cfg
        self.cost = cost
        self.name = name
        self.block_size = cfg.block_size
        self.total_blocks = cfg.num_blocks
        self.shared_blocks = cfg.shared_prefix_tokens // cfg.block_size
        self.pool = BlockPool(
            cfg.num_blocks, cfg.block_size, reserved=self.shared_blocks * cfg.shared_prefixes
        )
        self.waiting: FifoQueue | KeyedSimQueue = FifoQueue()  # (keep_waiting_order picks which)
        self.running: list[SimRequest] = []
        self.held: dict[str, SimRequest] = {}
        self.requests: dict[str, SimRequest] = {}
        self.driver: Any = NullDriver()
        self.busy_until: float | None = None  # end of the step in flight
        self.wake_deadline: float | None = None  # when the driver wants ``idle`` called (pin expiry)
        self._scheduled: list[tuple[SimRequest, int]] = []
        self._steps_in_flight = 1
        self._waiting_changed = False  # a preempted request went back to / came back from the waiting queue
        # counters
        self.steps = 0
        self.preemptions = 0
        self.kv_used_time = 0.0  # ∫ used-block share dt (for kv_usage_mean)
        self.busy_time = 0.0

    # -- EngineView ------------------------------------------------------------------------------

    def free_blocks(self) -> int:
        return self.pool.num_free

    def num_waiting(self) -> int:
        return len(self.waiting)

    def num_running(self) -> int:
        return len(self.running)

    def wake_at(self, deadline: float | None) -> None:
        self.wake_deadline = deadline

    def waiting_ids(self) -> list[str]:
        return [r.request_id for r in self.waiting]

    def reorder_waiting(self, order: list[int]) -> None:
        reqs = list(self.waiting)
        self.waiting = FifoQueue(reqs[i] for i in order)

    def keep_waiting_order(self, key_of):
        """``EngineView.keep_waiting_order``: the waiting queue holds itself in the order of ``key_of``
        (:class:`KeyedSimQueue`, as the vLLM adapter's); None: back to FIFO, re-ordered by the driver."""
        queue: FifoQueue | KeyedSimQueue = KeyedSimQueue(key_of) if key_of is not None else FifoQueue()
        for r in self.waiting:
            queue.add_request(r)
        self.waiting = queue
        if key_of is None:
            self._waiting_changed = True
            return None
        return queue.rekey

    def move_waiting(self, src: int, dst: int) -> None:
        waiting = self.waiting
        r = waiting[src]
        del waiting[src]
        waiting.insert(dst, r)

    def waiting_changed(self) -> bool:
        changed, self._waiting_changed = self._waiting_changed, False
        return changed

    def running_ids(self) -> list[str]:
        return [r.request_id for r in self.running]

    def reorder_running(self, order: list[int]) -> None:
        self.running = [self.running[i] for i in order]

    def waiting_demand(self) -> tuple[int, int]:
        """(requests, uncomputed tokens) of the waiting requests the engine would admit next if memory
        allowed: the head of the queue, one per free run slot (as ``VllmDoor.waiting_demand``)."""
        return self.waiting.head_demand(self.cfg.max_num_seqs - len(self.running))

    def blocks_of(self, request_id: str) -> int:
        r = self.requests.get(request_id) or self.held.get(request_id)
        if r is None or (r.n_blocks == 0 and r.num_computed == 0):
            return 0
        return r.n_blocks  # the shared system prompt is everyone's (as VllmDoor.blocks_of counts)

    def hold(self, request_id: str) -> None:
        r = self.requests.pop(request_id, None)
        if r is not None:
            self.held[request_id] = r
            full = self._full_blocks(r)  # its full blocks get their hash: the next turn hits them
            self.pool.promote(r.chain, r.n_shared, full)
            r.n_shared = max(r.n_shared, full)

    def free_held(self, request_id: str) -> None:
        r = self.held.pop(request_id, None)
        if r is not None:
            self._release(r)

    def output_text(self, request_id: str) -> str | None:
        return None  # the replayed programs send the tool as a hint

    def reusable_tokens(self, request_id: str, num_tokens: int) -> int | None:
        return None  # full attention without speculative decoding: a next turn reuses every full block

    def frees_now(self, request_id: str) -> bool:
        return True  # no KV connector: a release frees at once

    # -- requests --------------------------------------------------------------------------------

    @property
    def load(self) -> int:
        return len(self.waiting) + len(self.running)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def fits(self, req: SimRequest) -> bool:
        """Whether the request fits an empty cache at all (else vLLM would reject it)."""
        return -(-req.num_tokens // self.block_size) + 1 <= self.total_blocks

    def add(self, req: SimRequest, now: float) -> None:
        req.arrival = now
        if req.chain is None:
            cap = -(-(req.prompt_tokens + req.max_tokens) // self.block_size) + 2
            req.chain = self.pool.chain(req.program_id, cap)
        self.requests[req.request_id] = req
        # (the driver first, as the vLLM adapter: a queue that keeps the order reads the request's key)
        self.driver.request_added(req.request_id, req.hints, now, req.prompt_tokens)
        self.waiting.add_request(req)

    def _blocks_for(self, tokens: int) -> int:
        """Chain blocks (after the shared prefix) that ``tokens`` tokens occupy."""
        return max(0, -(-tokens // self.block_size) - self.shared_blocks)

    def _full_blocks(self, r: SimRequest) -> int:
        """Chain blocks full of computed tokens (hashed: a later request can hit them)."""
        full = min(r.num_computed, r.num_tokens) // self.block_size - self.shared_blocks
        return min(r.n_blocks, max(0, full))

    def _release(self, r: SimRequest) -> None:
        self.pool.release(r.chain, r.n_shared, r.n_blocks, self._full_blocks(r))
        r.n_blocks = r.n_shared = 0

    def _preempt(self, r: SimRequest) -> None:
        self._release(r)
        r.num_computed = 0
        r.preemptions += 1
        self.preemptions += 1
        self.waiting.prepend_request(r)
        self._waiting_changed = True

    def _grow(self, r: SimRequest, num_new: int) -> bool:
        """vLLM's ``allocate_slots`` for a running request: blocks for ``num_new`` more tokens."""
        need = self._blocks_for(r.num_computed + num_new) - r.n_blocks
        if need <= 0:
            return True
        if need > self.pool.num_free:
            return False
        self.pool.allocate(need)
        r.n_blocks += need
        return True

    # -- one step --------------------------------------------------------------------------------

    def begin_step(self, now: float, horizon: float = math.inf) -> float | None:
        """Schedule a step at ``now``; its duration, or None when nothing can run (the engine waits).

        ``horizon`` is the next time anything outside this engine can happen (an arrival); decode steps
        are fused up to it.
        """
        driver = self.driver
        driver.step_begin(now)
        budget = self.cfg.max_num_batched_tokens
        scheduled: list[tuple[SimRequest, int]] = []
        preempted = False
        running = self.running
        i = 0
        while i < len(running) and budget > 0:
            r = running[i]
            num_new = min(r.num_tokens - r.num_computed, budget)
            if num_new <= 0:
                i += 1
                continue
            ok = self._grow(r, num_new)
            while not ok:
                if driver.allocation_failed(r.request_id, True, now):
                    ok = self._grow(r, num_new)
                    continue
                victim = running.pop()
                self._preempt(victim)
                preempted = True
                if victim is r:
                    break
                ok = self._grow(r, num_new)
            if not ok:
                break
            scheduled.append((r, num_new))
            budget -= num_new
            i += 1
        admitted: list[tuple[str, int]] = []
        skipped: list[SimRequest] = []  # held back by the policy: back at the queue's front (as vLLM does)
        if not preempted:
            pool, bs, shared = self.pool, self.block_size, self.shared_blocks
            waiting = self.waiting
            while waiting and budget > 0 and len(running) < self.cfg.max_num_seqs:
                r = waiting.peek_request()
                if not driver.may_admit(r.request_id):
                    skipped.append(waiting.pop_request())
                    continue
                # prefix-cache lookup: full blocks, at most num_tokens - 1 tokens
                max_hit = (r.num_tokens - 1) // bs
                hit = shared + pool.cached_prefix(r.chain, max_hit - shared) if max_hit > shared else max_hit
                hit_chain = max(0, hit - shared)
                computed = hit * bs
                num_new = min(r.num_tokens - computed, budget)
                touched = pool.evictable_in(r.chain, 0, hit_chain)
                full_need = self._blocks_for(r.num_tokens) - hit_chain + touched
                if full_need > pool.num_free:
                    if driver.allocation_failed(r.request_id, False, now):
                        continue  # a pin was freed: look up and try again
                    break
                pool.touch(r.chain, hit_chain)
                r.n_blocks = r.n_shared = hit_chain
                r.num_computed = computed
                step_blocks = self._blocks_for(computed + num_new) - hit_chain
                if step_blocks > 0:
                    pool.allocate(step_blocks)
                    r.n_blocks += step_blocks
                waiting.pop_request()
                running.append(r)
                scheduled.append((r, num_new))
                budget -= num_new
                if r.cached_tokens is None:  # the first admission (not a preempted request coming back)
                    r.cached_tokens = computed
                    admitted.append((r.request_id, computed))
                else:
                    self._waiting_changed = True
            for r in reversed(skipped):  # back at the front, in their order
                waiting.prepend_request(r)
        driver.step_end(admitted, now)
        if not scheduled:
            self._scheduled = []
            return None
        prefill_tokens, prefill_attn, n_decode, decode_ctx = 0, 0.0, 0, 0
        for r, n in scheduled:
            if r.num_computed + n >= r.num_tokens and n == 1 and r.num_output > 0:
                n_decode += 1
                decode_ctx += r.num_computed
            else:
                prefill_tokens += n
                prefill_attn += n * (r.num_computed + n / 2)
        k = 1
        if prefill_tokens == 0 and len(self.waiting) == len(skipped) and self.cfg.max_fused_steps > 1:
            k = self._fusable(scheduled, now, horizon)
        dt = self.cost.step_s(prefill_tokens, prefill_attn, n_decode, decode_ctx + n_decode * (k - 1) // 2)
        if k > 1:
            dt *= k
            for r, _ in scheduled:
                self._grow(r, k)  # checked by _fusable
        self._scheduled = scheduled
        self._steps_in_flight = k
        self.steps += k
        self.busy_until = now + dt
        used = 1.0 - self.pool.num_free / self.total_blocks
        self.kv_used_time += used * dt
        self.busy_time += dt
        return dt

    def _fusable(self, scheduled: list[tuple[SimRequest, int]], now: float, horizon: float) -> int:
        """How many identical decode steps can run before anything else could change the schedule."""
        k = min(self.cfg.max_fused_steps, min(r.max_tokens - r.num_output for r, _ in scheduled))
        deadline = self.driver.next_deadline()
        if deadline is not None:
            horizon = min(horizon, deadline)
        if k <= 1:
            return 1
        dt1 = self.cost.step_s(0, 0.0, len(scheduled), sum(r.num_computed for r, _ in scheduled))
        if math.isfinite(horizon):
            k = min(k, max(1, int((horizon - now) / max(dt1, 1e-9))))
        if k <= 1:
            return 1
        need = sum(max(0, self._blocks_for(r.num_computed + k) - r.n_blocks) for r, _ in scheduled)
        if need > self.pool.num_free:
            return 1
        return k

    def end_step(self, now: float) -> list[SimRequest]:
        """Apply the step in flight at its end ``now``; returns the requests that finished."""
        k = self._steps_in_flight
        finished = []
        for r, n in self._scheduled:
            if k > 1:
                r.num_computed += k
                r.num_output += k
                continue
            r.num_computed += n
            if r.num_computed >= r.num_tokens:
                r.num_output += 1
                if r.first_token_s is None:
                    r.first_token_s = now
            if r.num_output >= r.max_tokens:
                finished.append(r)
        if k > 1:
            finished = [r for r, _ in self._scheduled if r.num_output >= r.max_tokens]
        self._scheduled = []
        self._steps_in_flight = 1
        self.busy_until = None
        if finished:
            done = set(map(id, finished))
            self.running = [r for r in self.running if id(r) not in done]
            for r in finished:
                r.finish_s = now
                self._finish(r, now)
        return finished

    def _finish(self, r: SimRequest, now: float) -> None:
        from ctk.policy.driver import RequestEnd

        end = RequestEnd(True, r.prompt_tokens, r.num_tokens, r.num_output)
        if not self.driver.request_finished(r.request_id, end, now):  # True: the driver holds its blocks
            self.requests.pop(r.request_id, None)
            self._release(r)
