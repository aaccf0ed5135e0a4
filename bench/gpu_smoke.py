"""The smoke test of ctk on one GPU (about 7 minutes) (issue 23; README "On a GPU"). No internet needed.

    .venv-gpu/bin/python bench/gpu_smoke.py [--model PATH] [--out DIR]   (or: VLLM_EXTRA=gpu make gpu-smoke)

Serves a local model (default: a tiny random-weight model built by ``ctk tiny-model``'s code, ~20 s) with
``ctk serve``'s own launch code and prints one PASS or FAIL line per check:

1. platform: the CUDA platform was picked (``ctk.engine_patch.device.pick_device``);
2. scheduler: the class matches vLLM's async scheduling (the engine's "ctk scheduler: ..." log line), and
   request hints are parsed in vLLM's input thread (its log line);
3. pin: a pinned turn survives a flood of other prompts bigger than the KV cache and its next turn hits;
4. leaks: after 200 random requests (some with stop strings, some aborted by their client) and the end of
   every pin (``ctk:pins_active`` 0; at most 2 minutes), no KV block is in use (``vllm:kv_cache_usage_perc``
   is 0);
5. overhead: ctk with a TTL table that never pins serves the same requests within 3% of stock vLLM's
   throughput (same server settings; the median ratio of :data:`OVERHEAD_PAIRS` pairs of servers started
   one after the other, the order alternating: a fixed order and a best-of-n let a drifting host decide).

Exit codes: 0 all passed, 1 a check failed, 2 no GPU here (one line, "no GPU"). ``--allow-cpu`` runs checks
2-5 on the CPU build (how this script itself was exercised on a machine without a GPU; check 1 then fails).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

BLOCKS = 256  # --num-gpu-blocks-override: a small cache, so the flood evicts what is not pinned
#: overhead: pairs of servers (stock, ctk), in alternating order (the median ratio is the verdict)
OVERHEAD_PAIRS = 3
PIN_TOOL, SHORT_TOOL = "ls", "sleep"  # pinned 30 s / 1 s by the smoke test's TTL table


def ttl_table(path: Path, pins: bool) -> Path:
    from ctk.predict.modelfile import save_model
    from ctk.predict.tables import FixedPin, TTLTables

    ttls = {PIN_TOOL: 30.0, SHORT_TOOL: 1.0, "*": 0.0} if pins else {"*": 0.0}
    tables = TTLTables(
        quantile_levels=[0.5, 0.9],
        fixed_pins={k: FixedPin(v, 0.9 if v > 0 else 0.0) for k, v in ttls.items()},
        quantiles_s={k: [v / 2 or 1.0, v or 10.0] for k, v in ttls.items()},
        n_samples={k: 10 for k in ttls},
    )
    return save_model({"ttl_tables": tables.to_dict()}, path)


class Server:
    def __init__(self, model: str, out: Path, name: str, policy: str, ttl_model: Path | None, cpu: bool):
        from ctk.engine_patch.serve.server import free_port, launch_server, wait_ready

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [
            "--num-gpu-blocks-override",
            str(BLOCKS),
            "--max-model-len",
            "4096",
            "--enable-prefix-caching",
        ]
        if cpu:
            args += ["--kv-cache-memory-bytes", "64M"]
        self.proc = launch_server(
            model,
            self.port,
            policy=policy,
            ttl_model=ttl_model,
            extra_args=args,
            log_path=out / f"{name}.log",
        )
        wait_ready(self.url, timeout=240, proc=self.proc)

    def log(self) -> str:
        return Path(self.proc.log_path).read_text(errors="replace")

    def stop(self) -> None:
        from ctk.engine_patch.serve.server import stop_server

        stop_server(self.proc)


def complete(url: str, prompt: list[int], max_tokens: int, timeout: float = 60.0, **body) -> dict:
    import httpx

    payload = {"model": _model(url), "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, **body}
    r = httpx.post(url + "/v1/completions", json=payload, timeout=timeout)
    r.raise_for_status()
    return r.json()


_MODELS: dict[str, str] = {}


def _model(url: str) -> str:
    import httpx

    if url not in _MODELS:
        _MODELS[url] = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
    return _MODELS[url]


def metric(url: str, name: str) -> float:
    import httpx

    text = httpx.get(url + "/metrics", timeout=10).text
    values = [
        float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    ]
    return sum(values)


def toks(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(10, 1000) for _ in range(n)]


def hints(program: str, tool: str, **more) -> dict:
    return {"vllm_xargs": {"program_id": program, "tool": tool, **more}}


def check_pin(url: str, rng: random.Random) -> tuple[bool, str]:
    first = toks(rng, 1500)
    out = complete(url, first, 8, ignore_eos=True, return_token_ids=True, **hints("smoke-pin", PIN_TOOL))
    context = first + list(out["choices"][0].get("token_ids") or [])
    flood = [toks(rng, 1500) for _ in range(8)]  # 12,000 tokens > the cache
    with cf.ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda p: complete(url, p, 4, ignore_eos=True), flood))
    second = context + toks(rng, 100)
    # the program's last turn: it leaves no pin behind for the leak check
    res = complete(url, second, 4, ignore_eos=True, **hints("smoke-pin", PIN_TOOL, last_turn=1))
    cached = (res.get("usage", {}).get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    need = 1500 - 2 * 128  # every full block but the last one or two, at any block size up to 128
    return cached >= need, f"next turn cached {cached} of {len(second)} prompt tokens (>= {need} needed)"


def check_leaks(url: str, rng: random.Random, n: int = 200, max_wait_s: float = 120.0) -> tuple[bool, str]:
    """``n`` random requests (half from 20 programs whose tool calls pin; some stopped by a stop string,
    which the engine sees as an abort; some aborted by their client), then every pin's end: no KV block may
    stay in use. Pins end at their TTL, and the ``ttl`` rule learns the programs' return times online (a tool
    the table does not pin gets a TTL of several seconds once observed), so the check waits for
    ``ctk:pins_active`` to reach 0 rather than for a fixed time; a pin still held after ``max_wait_s`` fails
    it. ``vllm:kv_cache_usage_perc`` counts cached free blocks as free, and it is refreshed only by an engine
    step: one tiny request runs before it is read."""
    import httpx

    def one(i: int) -> str:
        prompt = toks(rng, rng.randrange(50, 1200))
        body: dict = {"ignore_eos": True}
        if rng.random() < 0.5:
            body.update(hints(f"leak-{i % 20}", rng.choice([SHORT_TOOL, "other"])))
        if rng.random() < 0.3:
            body["stop"] = [" a", " e", "\n"]
        try:
            complete(url, prompt, rng.randrange(1, 64), timeout=0.05 if rng.random() < 0.2 else 60, **body)
        except httpx.HTTPError:  # the client gives up: vLLM aborts the request
            return "aborted by their client"
        return "with stop strings" if "stop" in body else "plain"

    with cf.ThreadPoolExecutor(8) as pool:
        counts = collections.Counter(pool.map(one, range(n)))
    t0 = time.monotonic()
    while (held := metric(url, "ctk:pins_active")) > 0 and time.monotonic() - t0 < max_wait_s:
        time.sleep(0.5)  # the idle engine releases each pin at its TTL (woken for it)
    waited = time.monotonic() - t0
    complete(url, toks(rng, 10), 1)  # one engine step: the usage gauge is refreshed
    usage = metric(url, "vllm:kv_cache_usage_perc")
    done = ", ".join(f"{counts[k]} {k}" for k in ("aborted by their client", "with stop strings"))
    if held > 0:
        return False, f"{held:.0f} pins still held {max_wait_s:.0f} s after {n} requests ({done})"
    why = f"KV usage {usage:.4f} after {n} requests ({done}) and the last pin's end ({waited:.1f} s later)"
    return usage == 0.0, why


def guarded(check, *args) -> tuple[bool, str]:
    """A check's (ok, why); a request that fails or times out fails the check in one line, and the next
    checks still run."""
    import httpx

    try:
        return check(*args)
    except httpx.HTTPError as exc:
        return False, f"a request failed: {type(exc).__name__}: {exc}"


def throughput(url: str, prompts: list[list[int]]) -> float:
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(16) as pool:
        outs = list(pool.map(lambda p: complete(url, p, 64, ignore_eos=True), prompts))
    tokens = sum(o["usage"]["completion_tokens"] for o in outs)
    return tokens / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a local model folder (default: a tiny random-weight model)")
    ap.add_argument("--out", help="folder for the server logs (default: a temporary one)")
    ap.add_argument("--allow-cpu", action="store_true", help="run checks 2-5 on the CPU build")
    args = ap.parse_args()
    from ctk.engine_patch.device import pick_device
    from ctk.engine_patch.scheduler import AHEAD_LINE, class_in_log, scheduler_class
    from ctk.policy.config import ConfigError

    try:
        dev = pick_device()
    except ConfigError:
        dev = None
    if (dev is None or dev.is_cpu) and not args.allow_cpu:
        print("no GPU")
        return 2
    out = Path(args.out or tempfile.mkdtemp(prefix="ctk-gpu-smoke-"))
    out.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model is None:
        from ctk.engine_patch.serve.tiny_model import build_tiny_model

        model = str(build_tiny_model(out / "tiny-model"))
    results: list[tuple[str, bool, str]] = []

    def report(name: str, ok: bool, why: str) -> None:
        results.append((name, ok, why))
        print(f"{'PASS' if ok else 'FAIL'} {name}: {why}", flush=True)

    report("platform", dev is not None and dev.name == "cuda", dev.line() if dev else "no platform")
    cpu = dev is not None and dev.is_cpu
    rng = random.Random(0)
    srv = Server(model, out, "ctk", "ttl", ttl_table(out / "pins.pkl", True), cpu)
    try:
        found = class_in_log(srv.log())
        if found is None:
            report("scheduler", False, "no 'ctk scheduler: <class> (...)' line in the engine's log")
        else:
            name, is_async = found
            ok = name == scheduler_class(is_async).__name__ and (cpu or is_async)  # CUDA's default: async
            ahead = AHEAD_LINE in srv.log()  # hints parsed in vLLM's input thread, off the step
            detail = f"{name}, vLLM's async scheduling {'on' if is_async else 'off'}"
            detail += "" if ahead else "; hints not parsed in the input thread"
            report("scheduler", ok and ahead, detail)
        report("pin", *guarded(check_pin, srv.url, rng))
        report("leaks", *guarded(check_leaks, srv.url, rng))
    finally:
        srv.stop()
    prompts = [toks(random.Random(i), 500) for i in range(64)]
    arms = (("vllm", "vllm", None), ("ctk", "ttl", ttl_table(out / "never.pkl", False)))
    ratios = []
    for pair in range(OVERHEAD_PAIRS):  # the order alternates: a host that drifts favours neither arm
        rates: dict[str, float] = {}
        for name, policy, table in arms if pair % 2 == 0 else arms[::-1]:
            srv = Server(model, out, f"rate-{name}-{pair}", policy, table, cpu)
            try:
                throughput(srv.url, prompts[:16])  # warm-up
                rates[name] = max(throughput(srv.url, prompts) for _ in range(2))
            finally:
                srv.stop()
        ratios.append(rates["ctk"] / rates["vllm"])
    ratio = statistics.median(ratios)
    spread = f"{min(ratios):.3f}..{max(ratios):.3f}"
    report(
        "overhead",
        ratio >= 0.97,
        f"ctk/stock throughput {ratio:.3f} (median of {OVERHEAD_PAIRS} pairs in alternating order, {spread}; "
        ">= 0.97 needed)",
    )
    print(f"logs: {out}")
    return 0 if all(ok for _, ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
