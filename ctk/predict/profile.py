"""``ctk profile``: time prefill at several prompt lengths against a running OpenAI-compatible server.

Each prompt starts with a random nonce so it never hits the prefix cache. A request asks for one output
token; its latency is prefill + one decode step + HTTP overhead. The profile is the median latency at each
length minus the median latency of the shortest prompt (the overhead), against the server-reported prompt
token count. The result feeds :class:`ctk.predict.cost.CostModel` (``ctk train --profile profile.json``).
"""

from __future__ import annotations

import json
import statistics
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from ctk.errors import CtkError
from ctk.predict.cost import CostModel

DEFAULT_LENGTHS = (16, 256, 1024, 2048, 4096)
_WORDS = (
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
    "mike",
    "november",
    "oscar",
    "papa",
    "quebec",
    "romeo",
    "sierra",
    "tango",
)


class ProfileError(CtkError, ValueError):
    """A server could not be profiled, or a profile (prefill or simulator) is unreadable or inconsistent;
    the message says why."""


def _prompt(n_tokens: int) -> str:
    nonce = uuid.uuid4().hex
    words = [_WORDS[(i * 7 + len(nonce)) % len(_WORDS)] for i in range(max(1, n_tokens - 8))]
    return f"{nonce} " + " ".join(words)


def first_model(client, base: str) -> str:
    """The first model an OpenAI-compatible server at ``base`` (…/v1) lists."""
    r = client.get(f"{base}/models")
    r.raise_for_status()
    data = r.json().get("data") or []
    if not data:
        raise ProfileError(f"{base}/models lists no model; pass --model")
    return str(data[0]["id"])


def measure_prefill(
    url: str,
    model: str | None = None,
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    repeats: int = 3,
    timeout_s: float = 120.0,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    """Measure and return a profile dict ``{"prefill_tokens": [...], "prefill_s": [...], ...}``."""
    import httpx

    base = url.rstrip("/")
    if not base.endswith("/v1"):
        base += "/v1"
    lengths = sorted({int(n) for n in lengths if int(n) > 0})
    if len(lengths) < 2:
        raise ProfileError("give at least two distinct positive prompt lengths")
    samples: dict[int, list[tuple[int, float]]] = {}
    try:
        with httpx.Client(timeout=timeout_s) as client:
            model = model or first_model(client, base)
            # warm-up (first request compiles / allocates)
            _one(client, base, model, lengths[0])
            total = len(lengths) * repeats
            for i, n in enumerate(lengths):
                for r in range(repeats):
                    samples.setdefault(n, []).append(_one(client, base, model, n))
                    if progress:
                        progress("prefill", i * repeats + r + 1, total)
    except httpx.HTTPError as exc:
        raise ProfileError(f"{base}: request failed ({type(exc).__name__}: {exc})") from None
    points = []
    for n in lengths:
        toks = statistics.median(t for t, _ in samples[n])
        lat = statistics.median(s for _, s in samples[n])
        points.append((int(toks), lat))
    overhead = points[0][1]
    tokens, secs = [0], [0.0]
    for toks, lat in points[1:]:
        if toks > tokens[-1]:
            tokens.append(toks)
            secs.append(max(secs[-1], lat - overhead))  # prefill time never falls with length
    check_prefill(secs, base)
    return {
        "prefill_tokens": tokens,
        "prefill_s": secs,
        "overhead_s": overhead,
        "url": base,
        "model": model,
        "repeats": repeats,
        "measured_unix_s": time.time(),
        "raw": [
            {"requested": n, "tokens": [t for t, _ in samples[n]], "latency_s": [s for _, s in samples[n]]}
            for n in lengths
        ],
    }


def _one(client, base: str, model: str, n: int) -> tuple[int, float]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": _prompt(n)}],
        "max_tokens": 1,
        "temperature": 0.0,
    }
    t0 = time.perf_counter()
    r = client.post(f"{base}/chat/completions", json=body)
    elapsed = time.perf_counter() - t0
    if r.status_code != 200:
        raise ProfileError(f"{base}/chat/completions answered {r.status_code}: {r.text[:200]}")
    usage = (r.json() or {}).get("usage") or {}
    return int(usage.get("prompt_tokens") or n), elapsed


def check_prefill(prefill_s: Sequence[float], where: str) -> None:
    """Refuse a profile whose prefill time never grows with the prompt: the server did no prefill work
    (a scripted or mock server), and a cost model built on it would price every re-prefill at zero."""
    try:
        longest = max(float(x) for x in prefill_s)
    except (TypeError, ValueError):
        raise ProfileError(f"{where}: prefill_s must be a list of numbers") from None
    if not longest > 0:
        raise ProfileError(
            f"{where}: prefill time is zero at every prompt length: the server does no prefill work "
            "(a scripted or mock server?); profile a real engine"
        )


def save_profile(profile: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(profile, indent=1))


def load_prefill_profile(path: str | Path) -> dict:
    """A ``ctk profile`` file (prefill_tokens, prefill_s); ProfileError names what is wrong."""
    try:
        d = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ProfileError(f"{path}: no such profile file") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{path}: not a JSON profile ({exc})") from None
    if not isinstance(d, dict) or "prefill_tokens" not in d or "prefill_s" not in d:
        raise ProfileError(f"{path}: a profile needs prefill_tokens and prefill_s lists")
    check_prefill(d["prefill_s"], str(path))
    return d


def cost_model_from(profile_path: str | Path | None = None, **overrides) -> CostModel:
    """The cost model: defaults, the measured prefill profile if given, then explicit overrides."""
    kw: dict = {}
    if profile_path is not None:
        prof = load_prefill_profile(profile_path)
        kw.update(
            prefill_tokens=tuple(prof["prefill_tokens"]),
            prefill_s=tuple(prof["prefill_s"]),
            profile_source=str(profile_path),
        )
    kw.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return CostModel(**kw)
    except (TypeError, ValueError) as exc:
        raise ProfileError(f"bad cost model ({exc})") from None


def profile_prefill(base_url: str, out: Path, max_model_len: int = 8192) -> Path:
    """What ``ctk profile`` does against a running server, in this process; raises ProfileError.

    ``ctk profile`` lengths are words; the tiny tokenizer splits its words into about 2.9 tokens, so the
    longest prompt is ``max_model_len / 3.1`` words.
    """
    longest = int(max_model_len / 3.1)
    lengths = sorted({min(n, longest) for n in (128, 512, longest // 2, longest)})
    try:
        save_profile(measure_prefill(base_url, None, lengths, repeats=2), out)
    except (CtkError, OSError) as exc:
        raise ProfileError(f"profiling prefill at {base_url} failed: {exc}") from exc
    return out
