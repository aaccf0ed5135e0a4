"""Program pause/resume by KV usage: NVIDIA Dynamo's ThunderAgent router scheduler, as an admission gate.

ThunderAgent (``components/src/dynamo/thunderagent_router``: ``router.py``, ``program_state.py``, ``args.py``)
keeps a table of programs keyed by session id. A program is REASONING (a turn in flight) or ACTING (in a tool
call), and ACTIVE or PAUSED. Its usage is its own accounting, not the engine's: the sum over ACTIVE programs
of their last context (prompt + output tokens; the prompt at a turn's arrival) plus 100 tokens each, over the
engine's KV cache in tokens. A paused program's next turn waits (here: the engine holds it back although it
fits) until a tick resumes the program, or for at most ``resume_timeout_s`` (a forced resume).

- **Arrival** of a new program: it queues (paused) behind any paused program; else it is placed if its prompt
  fits the unused capacity; else it pauses. A known active program's turn always goes through.
- **Finish**: the program is ACTING with the finished context; a program marked for pause pauses now; the
  last turn (``hints.last_turn``: Dynamo's session-final header) releases it. An ACTING program idle for
  ``idle_ttl_s`` is released at a tick.
- **Tick** (every ``interval_s``): resume first, then pause. Resume: paused programs ordered (turn waiting,
  new program, idle in a tool call) then by size, smallest first; each resumed while the usage stays under
  ``pause_threshold - resume_hysteresis``. Pause: when the usage passes ``pause_threshold``, the smallest
  ACTING programs pause until it is at most ``pause_target``; if still above, every REASONING program is
  marked to pause when its turn ends.

Not reproduced: the soft demotion between ``soft_demote_threshold`` and the pause threshold and the resume
priority boost (they shift a request's priority in the engine's queue by -2 s / +1 s; ctk's engines serve
ThunderAgent's requests FCFS), the replica choice (one engine per gate), and SGLang's request-count ceiling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ctk.policy.events import EngineState

#: Dynamo's defaults (``args.py`` / ``ThunderAgentConfig``).
PAUSE_THRESHOLD = 0.95
PAUSE_TARGET = 0.80
SOFT_DEMOTE_THRESHOLD = 0.80
RESUME_HYSTERESIS = 0.10
TICK_S = 5.0
RESUME_TIMEOUT_S = 1800.0
IDLE_TTL_S = 600.0
BUFFER_TOKENS = 100  # ``buffer_per_program``


@dataclass
class PausedProgram:
    """One program in ThunderAgent's table."""

    tokens: int = 0  # its context: prompt + output of the last turn (the prompt while a turn is in flight)
    steps: int = 0  # turns begun
    reasoning: bool = True  # a turn is in flight (False: ACTING, in a tool call)
    paused: bool = False
    marked: bool = False  # pause when the turn in flight ends
    acting_since: float = 0.0
    waiting_since: float | None = None  # a turn waits while the program is paused (forced-resume clock)


class ThunderAgentGate:
    """ThunderAgent's pause/resume loop for one engine (see module doc); implements ``AdmissionGate``."""

    def __init__(
        self,
        pause_threshold: float = PAUSE_THRESHOLD,
        pause_target: float = PAUSE_TARGET,
        resume_hysteresis: float = RESUME_HYSTERESIS,
        interval_s: float = TICK_S,
        resume_timeout_s: float = RESUME_TIMEOUT_S,
        idle_ttl_s: float = IDLE_TTL_S,
        buffer_tokens: int = BUFFER_TOKENS,
    ):
        if not 0.0 <= pause_target <= pause_threshold <= 1.0:
            raise ValueError("ThunderAgent needs 0 <= pause target <= pause threshold <= 1")
        self.pause_threshold = pause_threshold
        self.pause_target = pause_target
        self.resume_hysteresis = resume_hysteresis
        self.interval_s = interval_s
        self.resume_timeout_s = resume_timeout_s
        self.idle_ttl_s = idle_ttl_s
        self.buffer = buffer_tokens
        self.capacity_tokens = 0  # 0: not known yet (cold start: every program goes through)
        self.next_tick = -math.inf
        self.programs: dict[str, PausedProgram] = {}
        self.paused: dict[str, None] = {}  # insertion order: ties resume oldest-paused first
        self.used = 0  # tokens + buffer of the active programs
        self.pauses = self.resumes = self.forced_resumes = 0

    # -- accounting ------------------------------------------------------------------------------------

    def _weight(self, prog: PausedProgram) -> int:
        return prog.tokens + self.buffer

    def usage(self) -> float:
        """ThunderAgent's utilisation: the active programs' tokens over the KV cache."""
        return self.used / self.capacity_tokens if self.capacity_tokens > 0 else 0.0

    def _set_tokens(self, prog: PausedProgram, tokens: int) -> None:
        if not prog.paused:
            self.used += tokens - prog.tokens
        prog.tokens = tokens

    def _pause(self, pid: str, prog: PausedProgram) -> None:
        prog.paused = True
        prog.marked = False
        self.paused[pid] = None
        self.used -= self._weight(prog)
        self.pauses += 1

    def _resume(self, pid: str, prog: PausedProgram) -> None:
        prog.paused = False
        prog.waiting_since = None
        self.paused.pop(pid, None)
        self.used += self._weight(prog)
        self.resumes += 1

    def _release(self, pid: str) -> None:
        prog = self.programs.pop(pid, None)
        if prog is None:
            return
        if prog.paused:
            self.paused.pop(pid, None)
        else:
            self.used -= self._weight(prog)

    # -- AdmissionGate ---------------------------------------------------------------------------------

    @property
    def holding(self) -> bool:
        return bool(self.paused)

    def may_admit(self, program_id: str) -> bool:
        prog = self.programs.get(program_id)
        return prog is None or not prog.paused

    def arrived(self, program_id: str, prompt_tokens: int, now: float) -> None:
        prog = self.programs.get(program_id)
        new = prog is None
        if new:
            prog = self.programs[program_id] = PausedProgram()
            self.used += self._weight(prog)
        prog.steps += 1
        if prompt_tokens > 0:
            self._set_tokens(prog, prompt_tokens)
        prog.reasoning = True
        prog.acting_since = 0.0
        if prog.paused:
            prog.waiting_since = now
            return
        if not new or self.capacity_tokens <= 0:
            return
        # a new program: behind any paused one, and only if its prompt fits the unused capacity
        self.used -= self._weight(prog)
        fits = self.capacity_tokens - self.used >= self._weight(prog)
        self.used += self._weight(prog)
        if self.paused or not fits:
            self._pause(program_id, prog)
            prog.waiting_since = now

    def finished(self, program_id: str, context_tokens: int, last_turn: bool, now: float) -> None:
        prog = self.programs.get(program_id)
        if prog is None:
            return
        if last_turn:
            self._release(program_id)
            return
        self._set_tokens(prog, context_tokens)
        prog.reasoning = False
        prog.acting_since = now
        if prog.marked and not prog.paused:
            self._pause(program_id, prog)

    def aborted(self, program_id: str, now: float) -> None:
        prog = self.programs.get(program_id)
        if prog is not None:
            prog.reasoning = False
            prog.acting_since = now
            prog.waiting_since = None

    def tick(self, state: EngineState) -> None:
        """One scheduler tick: idle programs released, forced resumes, resume, then pause."""
        now = state.now
        self.next_tick = now + self.interval_s
        self.capacity_tokens = state.total_blocks * state.block_size
        if self.idle_ttl_s > 0:
            idle = [
                pid
                for pid, p in self.programs.items()
                if not p.reasoning and p.acting_since > 0 and now - p.acting_since >= self.idle_ttl_s
            ]
            for pid in idle:
                self._release(pid)
        for pid in list(self.paused):
            prog = self.programs[pid]
            if prog.waiting_since is not None and now - prog.waiting_since >= self.resume_timeout_s:
                self._resume(pid, prog)
                self.forced_resumes += 1
        self._resume_some()
        self._pause_until_safe()

    def _resume_some(self) -> None:
        """Paused programs back while the usage stays under ``pause_threshold - resume_hysteresis``: turns
        waiting first, then new programs, then idle ones; smallest first within each."""
        if not self.paused:
            return
        ceiling = max(0.0, self.pause_threshold - self.resume_hysteresis)
        room = int(self.capacity_tokens * ceiling) - self.used
        if room <= self.buffer:
            return

        def group(p: PausedProgram) -> int:
            if p.steps <= 1:
                return 1
            return 0 if p.reasoning else 2

        order = sorted(self.paused, key=lambda pid: (group(self.programs[pid]), self.programs[pid].tokens))
        for pid in order:
            prog = self.programs[pid]
            need = self._weight(prog)
            if need <= room:
                self._resume(pid, prog)
                room -= need

    def _pause_until_safe(self) -> None:
        cap = self.capacity_tokens
        if cap <= 0 or self.used <= cap * self.pause_threshold:
            return
        target = cap * min(self.pause_target, self.pause_threshold)
        active = [(pid, p) for pid, p in self.programs.items() if not p.paused]
        for pid, prog in sorted(((i, p) for i, p in active if not p.reasoning), key=lambda ip: ip[1].tokens):
            if self.used <= target:
                break
            if not prog.marked:
                self._pause(pid, prog)
        if self.used > target:
            for _, prog in active:
                if prog.reasoning and not prog.paused:
                    prog.marked = True
