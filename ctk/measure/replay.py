"""``ctk replay``: drive recorded programs against a live OpenAI-compatible server (vLLM, ``ctk serve``).

Each program runs as an asyncio task: send turn k as a streamed ``/v1/completions`` request whose prompt is
token ids (prompt of turn k-1 + the ids the server generated + synthetic observation ids), force the output
length (``max_tokens`` + ``ignore_eos``), then sleep for the recorded tool duration times ``time_scale``.
Programs start at a fixed concurrency or as a Poisson process. Each request carries the program identity
(``session_id`` and ``vllm_xargs.program_id``), ``turn_index``, ``last_turn``, the ``tool`` it will run
and (for the ``oracle`` policy) the pause it will really take, as docs/CONTRACTS.md describes.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import asdict, dataclass

import httpx
import numpy as np

from ctk.errors import CtkError
from ctk.measure import server_metrics
from ctk.measure.results import ProgramResult, ReplayResult, TurnResult
from ctk.measure.workload import ProgramSpec, WorkloadConfig, first_prompt_ids, replay_xargs, synthetic_ids
from ctk.progress import progress_bar
from ctk.wire import session_body, session_headers


class ReplayError(CtkError, RuntimeError):
    """The server cannot be used for a replay (unreachable, no model); the message says why."""


@dataclass
class ReplayConfig:
    """How to drive the server."""

    base_url: str = "http://127.0.0.1:8000"
    model: str | None = None  # None: the first model the server lists
    concurrency: int | None = 8  # programs in flight at most (None: unbounded, with ``rate``)
    rate: float | None = (
        None  # Poisson arrivals, programs per second (None: all at once, gated by concurrency)
    )
    time_scale: float = 1.0  # tool pause = recorded duration x time_scale
    seed: int = 0
    label: str = "replay"
    send_oracle_duration: bool = True  # tool_duration_s in vllm_xargs (read only by the oracle policy)
    send_agent: bool = True  # the program's source as vllm_xargs.agent (off: the engine derives the class
    # from the prompt's prefix, its agent's own system prompt)
    request_timeout_s: float = 600.0
    temperature: float = 1.0
    progress: bool = True
    sample_interval_s: float = 1.0  # /metrics gauges (KV usage, queue, pins) over time; 0: off

    def validate(self) -> None:
        if self.concurrency is not None and self.concurrency < 1:
            raise ReplayError("concurrency must be at least 1")
        if self.rate is not None and self.rate <= 0:
            raise ReplayError("rate must be positive")
        if self.concurrency is None and self.rate is None:
            raise ReplayError("give a concurrency, a Poisson rate, or both")
        if self.time_scale < 0:
            raise ReplayError("time_scale must be >= 0")


def api_root(base_url: str) -> str:
    """``http://host:port`` from ``http://host:port`` or ``http://host:port/v1``."""
    return base_url.rstrip("/").removesuffix("/v1")


def served_model(base_url: str, timeout: float = 10.0) -> str:
    try:
        r = httpx.get(api_root(base_url) + "/v1/models", timeout=timeout)
        r.raise_for_status()
        models = [m["id"] for m in r.json().get("data", [])]
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        raise ReplayError(f"{base_url}: cannot list models ({exc})") from None
    if not models:
        raise ReplayError(f"{base_url}: the server lists no model")
    return models[0]


class Replayer:
    """Replays ``programs`` once; :attr:`result` fills as programs finish (kept on Ctrl-C)."""

    def __init__(self, programs: list[ProgramSpec], workload: WorkloadConfig, cfg: ReplayConfig):
        cfg.validate()
        self.programs, self.workload, self.cfg = programs, workload, cfg
        self.result = ReplayResult(
            label=cfg.label,
            config={"replay": asdict(cfg), "workload": asdict(workload), "n_programs": len(programs)},
        )
        self._progress = None
        self._task_id = None

    # -- one request -------------------------------------------------------------------------------

    async def _turn(
        self,
        client: httpx.AsyncClient,
        model: str,
        replay_id: str,
        prompt: list[int],
        spec: ProgramSpec,
        k: int,
    ) -> tuple[TurnResult, list[int]]:
        turn = spec.turns[k]
        cfg = self.cfg
        agent = spec.source if cfg.send_agent else None  # the program's agent: its trace source
        xargs = replay_xargs(
            replay_id, turn, cfg.time_scale, cfg.send_oracle_duration, first_turn=k == 0, agent=agent
        )
        body = {
            "model": model,
            "prompt": prompt,
            "max_tokens": turn.output_tokens,
            "min_tokens": turn.output_tokens,
            "ignore_eos": True,
            "temperature": self.cfg.temperature,
            # no per-request "seed": vLLM 0.32 CPU crashes on a seeded request that is prefilled in chunks
            "stream": True,
            "stream_options": {"include_usage": True},
            "return_token_ids": True,
            **session_body(replay_id, xargs),
        }
        res = TurnResult(turn_index=turn.turn_index, sent_unix_s=time.time())
        t0 = time.perf_counter()
        out_ids: list[int] = []
        n_chunks_text = 0
        try:
            # X-Session-ID too: what vllm-router (consistent hashing, program binding) routes on
            headers = session_headers(replay_id)
            async with client.stream("POST", "/v1/completions", json=body, headers=headers) as r:
                if r.status_code >= 400:
                    text = (await r.aread()).decode(errors="replace")[:300]
                    res.error = f"HTTP {r.status_code}: {text}"
                    return res, out_ids
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    for choice in chunk.get("choices") or []:
                        ids = choice.get("token_ids") or []
                        if (ids or choice.get("text")) and res.ttft_s is None:
                            res.ttft_s = time.perf_counter() - t0
                        out_ids.extend(ids)
                        n_chunks_text += bool(choice.get("text"))
                    usage = chunk.get("usage")
                    if usage:
                        res.prompt_tokens = usage.get("prompt_tokens")
                        res.completion_tokens = usage.get("completion_tokens")
                        details = usage.get("prompt_tokens_details") or {}
                        res.cached_tokens = details.get("cached_tokens")
                    metrics = chunk.get("metrics") or {}
                    if metrics.get("queue_time_ms") is not None:
                        res.queue_s = metrics["queue_time_ms"] / 1000.0
                    if metrics.get("time_to_first_token_ms") is not None:
                        res.server_prefill_s = metrics["time_to_first_token_ms"] / 1000.0
                    if metrics.get("generation_time_ms") is not None:
                        res.server_decode_s = metrics["generation_time_ms"] / 1000.0
        except (httpx.HTTPError, json.JSONDecodeError) as exc:
            res.error = f"{type(exc).__name__}: {exc}"[:300]
            return res, out_ids
        res.latency_s = time.perf_counter() - t0
        if (
            not out_ids
        ):  # a server that does not return token ids: keep the prefix synthetic but exact in length
            n = res.completion_tokens or turn.output_tokens
            out_ids = synthetic_ids(self.workload, n, spec.program_id, turn.turn_index, "out")
        return res, out_ids

    # -- one program -------------------------------------------------------------------------------

    async def _program(
        self,
        client: httpx.AsyncClient,
        model: str,
        index: int,
        spec: ProgramSpec,
        arrival: float,
        gate: asyncio.Semaphore | None,
    ) -> None:
        delay = arrival - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        replay_id = f"{self.cfg.label}-{index:04d}-{uuid.uuid4().hex[:6]}"
        if gate is not None:
            await gate.acquire()
        try:
            start = arrival if self.cfg.rate is not None else time.time()
            prog = ProgramResult(program_id=spec.program_id, replay_id=replay_id, arrival_unix_s=start)
            w = self.workload
            prompt = first_prompt_ids(w, spec)
            for k, turn in enumerate(spec.turns):
                res, out_ids = await self._turn(client, model, replay_id, prompt, spec, k)
                prog.turns.append(res)
                if self._progress is not None:
                    self._progress.advance(self._task_id)
                if res.error:
                    prog.error = res.error
                    break
                if turn.last_turn:
                    prog.finish_unix_s = time.time()
                    break
                prompt = (
                    prompt
                    + out_ids
                    + synthetic_ids(w, turn.observation_tokens, spec.program_id, turn.turn_index, "obs")
                )
                res.pause_s = turn.tool_duration_s * self.cfg.time_scale
                await asyncio.sleep(res.pause_s)
            self.result.programs.append(prog)
        finally:
            if gate is not None:
                gate.release()

    async def _sample(self, client: httpx.AsyncClient) -> None:
        """Poll ``/metrics`` gauges into :attr:`ReplayResult.timeline` until cancelled."""
        t0 = self.result.started_unix_s
        while True:
            try:
                r = await client.get("/metrics", timeout=5.0)
                if r.status_code == 200:
                    row = server_metrics.gauges(server_metrics.parse_metrics(r.text))
                    if row:  # a fresh server exports its gauges only after the first engine step
                        row["t_s"] = round(time.time() - t0, 3)
                        self.result.timeline.append(row)
            except httpx.HTTPError:
                pass
            await asyncio.sleep(self.cfg.sample_interval_s)

    # -- the run -----------------------------------------------------------------------------------

    async def run(self) -> ReplayResult:
        cfg = self.cfg
        model = cfg.model or await asyncio.to_thread(served_model, cfg.base_url)
        before = await asyncio.to_thread(server_metrics.scrape, cfg.base_url)
        gate = asyncio.Semaphore(cfg.concurrency) if cfg.concurrency else None
        now = time.time()
        if cfg.rate is not None:
            rng = np.random.default_rng(cfg.seed)
            gaps = rng.exponential(1.0 / cfg.rate, size=len(self.programs))
            arrivals = now + np.cumsum(gaps) - gaps[0]  # the first program arrives at once
        else:
            arrivals = np.full(len(self.programs), now)
        limits = httpx.Limits(max_connections=(cfg.concurrency or len(self.programs)) + 4)
        timeout = httpx.Timeout(cfg.request_timeout_s, connect=30.0)
        self.result.started_unix_s = now
        progress = _make_progress(cfg.progress)
        try:
            async with httpx.AsyncClient(
                base_url=api_root(cfg.base_url), timeout=timeout, limits=limits
            ) as client:
                if progress is not None:
                    progress.start()
                    self._progress = progress
                    self._task_id = progress.add_task(
                        f"replay {cfg.label}", total=sum(len(p.turns) for p in self.programs)
                    )
                tasks = [
                    asyncio.create_task(self._program(client, model, i, p, float(arrivals[i]), gate))
                    for i, p in enumerate(self.programs)
                ]
                sampler = asyncio.create_task(self._sample(client)) if cfg.sample_interval_s > 0 else None
                try:
                    await asyncio.gather(*tasks)
                except asyncio.CancelledError:
                    self.result.interrupted = True
                    for t in tasks:
                        t.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
                finally:
                    if sampler is not None:
                        sampler.cancel()
                        await asyncio.gather(sampler, return_exceptions=True)
        finally:
            if progress is not None:
                progress.stop()
            self.result.finished_unix_s = time.time()
        await asyncio.sleep(server_metrics.SETTLE_S)  # the last step's pin events reach /metrics
        after = await asyncio.to_thread(server_metrics.scrape, cfg.base_url)
        self.result.server_metrics = server_metrics.delta(before, after)
        return self.result


def _make_progress(enabled: bool):
    return progress_bar(unit="turns") if enabled else None


def run_replay(programs: list[ProgramSpec], workload: WorkloadConfig, cfg: ReplayConfig) -> ReplayResult:
    """Replay synchronously; Ctrl-C stops cleanly and returns what finished (``interrupted = True``)."""
    rep = Replayer(programs, workload, cfg)
    try:
        asyncio.run(rep.run())
    except KeyboardInterrupt:
        rep.result.interrupted = True
        if rep.result.finished_unix_s is None:
            rep.result.finished_unix_s = time.time()
    return rep.result
