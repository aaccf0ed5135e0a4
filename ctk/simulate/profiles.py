"""Hardware profiles: the step time of a simulated engine and its KV capacity, with every number's source.

A profile file (``ctk/simulate/profiles/<name>.json``) gives, for one hardware × model pair::

    step_s = step_overhead_s
           + linear(prefill_tokens + n_decode)          # all non-attention work, interpolated in a table
           + attn_prefill_s * Σ chunk·(context before + chunk/2)   # causal attention FLOPs of prefill chunks
           + attn_decode_s * Σ context of decoding requests        # KV bytes read by decode attention
           + decode_seq_s * n_decode                     # per-sequence work (sampling, lm_head rows, ...)

plus ``kv_blocks`` and ``block_size`` (the cache), the scheduler's ``max_num_batched_tokens`` /
``max_num_seqs`` defaults, a client round-trip ``rtt_s``, and ``sources``: where each number comes from.
"""

from __future__ import annotations

import bisect
import json
import statistics
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from ctk.predict.cost import CostModel
from ctk.predict.profile import ProfileError

#: ``--hardware`` / ``--model`` pairs with a bundled profile.
PROFILE_DIR = "profiles"


#: The step-time coefficients of a profile; those a prefill-only measurement (``ctk profile``) observes.
STEP_TERMS = ("step_overhead_s", "linear_s", "attn_prefill_s", "attn_decode_s", "decode_seq_s")
PREFILL_TERMS = ("linear_s", "attn_prefill_s")


@dataclass
class HardwareProfile:
    name: str
    hardware: str
    model: str
    kv_blocks: int
    block_size: int
    max_num_batched_tokens: int
    max_num_seqs: int
    max_model_len: int
    step_overhead_s: float
    linear_tokens: list[int]
    linear_s: list[float]
    attn_prefill_s: float
    attn_decode_s: float
    decode_seq_s: float
    rtt_s: float
    sources: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.linear_tokens) != len(self.linear_s) or len(self.linear_tokens) < 2:
            raise ProfileError(f"profile {self.name}: linear_tokens and linear_s need 2+ equal-length points")
        if list(self.linear_tokens) != sorted(set(self.linear_tokens)):
            raise ProfileError(f"profile {self.name}: linear_tokens must be strictly ascending")
        if self.kv_blocks < 2 or self.block_size < 1:
            raise ProfileError(f"profile {self.name}: kv_blocks and block_size must be positive")
        self._xs = [float(x) for x in self.linear_tokens]
        self._ys = [float(y) for y in self.linear_s]

    @property
    def kv_tokens(self) -> int:
        return self.kv_blocks * self.block_size

    def linear(self, tokens: int) -> float:
        """Non-attention time of a batch of ``tokens`` tokens (linear extrapolation past the table)."""
        if tokens <= 0:
            return 0.0
        xs, ys = self._xs, self._ys
        i = bisect.bisect_right(xs, tokens)
        if i <= 0:
            return ys[0]
        i = min(i, len(xs) - 1)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return y0 + (y1 - y0) * (tokens - x0) / (x1 - x0)

    def step_s(self, prefill_tokens: int, prefill_attn: float, n_decode: int, decode_ctx: int) -> float:
        return (
            self.step_overhead_s
            + self.linear(prefill_tokens + n_decode)
            + self.attn_prefill_s * prefill_attn
            + self.attn_decode_s * decode_ctx
            + self.decode_seq_s * n_decode
        )

    def program_work_s(self, first_prompt_tokens: int, turns) -> float:
        """A program's own engine work in a busy batch (its marginal share of the steps): every prompt
        token it prefills (the first prompt, then each turn's new output and observation: a cached prefix)
        and every token it decodes, at the linear term's per-token cost at a full token budget, plus each
        decoded token's attention over its context and its per-sequence term. Tool pauses are not work.
        The size the admission probe (``admit_order="size"``) orders new programs by."""
        per_token = self.linear(self.max_num_batched_tokens) / self.max_num_batched_tokens
        work, context, new = 0.0, first_prompt_tokens, first_prompt_tokens
        for t in turns:
            out = t.output_tokens
            attn = self.attn_decode_s * (context + out / 2)
            work += per_token * (new + out) + out * (self.decode_seq_s + attn)
            context += out + t.observation_tokens
            new = out + t.observation_tokens
        return work

    def prefill_time_s(self, tokens: int) -> float:
        """One request's prefill alone on the engine, in chunks of ``max_num_batched_tokens``."""
        t, done, chunk = 0.0, 0, self.max_num_batched_tokens
        while done < tokens:
            n = min(chunk, tokens - done)
            t += self.step_s(n, n * (done + n / 2), 0, 0)
            done += n
        return t

    def prefill_profile(self, max_tokens: int | None = None) -> dict:
        """A ``ctk profile`` file's content (``prefill_tokens`` / ``prefill_s``) computed from this profile:
        the cost model ``ctk train`` and the policies use for this hardware."""
        top = max_tokens or self.max_model_len
        lengths = sorted({n for n in (256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072) if n < top})
        lengths.append(top)
        return {
            "prefill_tokens": [0, *lengths],
            "prefill_s": [0.0, *(round(self.prefill_time_s(n), 6) for n in lengths)],
            "overhead_s": self.rtt_s,
            "source": f"ctk simulate profile {self.name}",
        }

    def cost_model(self, **overrides) -> CostModel:
        prof = self.prefill_profile()
        kw = dict(
            prefill_tokens=tuple(prof["prefill_tokens"]),
            prefill_s=tuple(prof["prefill_s"]),
            block_size_tokens=self.block_size,
            profile_source=f"simulate:{self.name}",
        )
        kw.update(overrides)
        return CostModel(**kw)

    def scaled(self, factor: float, why: str = "", terms: tuple[str, ...] = STEP_TERMS) -> HardwareProfile:
        """The same engine ``factor`` times slower in ``terms`` (by default every step-time coefficient; the
        round trip unchanged): a measured profile recalibrated to the speed the machine runs at now.
        ``PREFILL_TERMS``: only the per-token and prefill-attention work, what a ``ctk profile`` measures."""
        d = self.to_dict()
        for k in terms:
            d[k] = [x * factor for x in d[k]] if k == "linear_s" else d[k] * factor
        d["name"] = f"{self.name}x{factor:.2f}"
        which = "every step time" if set(terms) == set(STEP_TERMS) else " and ".join(terms)
        note = f"{which} x {factor:.3f}" + (f" ({why})" if why else "")
        d["sources"] = {**self.sources, "scaled": note}
        return HardwareProfile.from_dict(d)

    def speed_factor(self, measured: dict) -> float:
        """How much slower (> 1) the work a ``ctk profile`` measurement observes, prefill's per-token and
        attention work (``PREFILL_TERMS``), runs now than in this profile: the median over its lengths of
        the factor that makes this profile reproduce the measured time; ``scaled(factor,
        terms=PREFILL_TERMS)`` is the recalibrated profile.

        ``ctk profile`` reports each length's latency minus the shortest prompt's (its ``raw[0]``), so that
        prompt's own prefill is subtracted from this profile's too; else a profile that predicts prefill
        exactly would read as ~5% too slow. The per-step overhead is not what it measures: a step of a few
        decoding requests is mostly overhead, and prefill's speed on a given night says little about it."""
        raw = measured.get("raw") or []
        base_tokens = int(statistics.median(raw[0]["tokens"])) if raw and raw[0].get("tokens") else 0
        rest = tuple(t for t in STEP_TERMS if t not in PREFILL_TERMS)
        fixed = self.scaled(0.0, terms=PREFILL_TERMS)  # the step overheads of a prefill alone
        work = self.scaled(0.0, terms=rest)  # its per-token and attention work

        def delta(prof: HardwareProfile, n: int) -> float:
            return prof.prefill_time_s(n) - prof.prefill_time_s(base_tokens)

        ratios = [
            (s - delta(fixed, n)) / delta(work, n)
            for n, s in zip(measured["prefill_tokens"], measured["prefill_s"], strict=True)
            if n > base_tokens and s > 0 and delta(work, n) > 0
        ]
        if not ratios:
            raise ProfileError("the measured prefill profile has no positive point")
        ratios.sort()
        return ratios[len(ratios) // 2]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> HardwareProfile:
        known = set(cls.__dataclass_fields__)
        missing = [k for k in known if k not in d and k != "sources"]
        if missing:
            raise ProfileError(f"profile {d.get('name', '?')}: missing {', '.join(sorted(missing))}")
        return cls(**{k: v for k, v in d.items() if k in known})


def bundled() -> dict[str, Path]:
    """Bundled profile files by name."""
    root = resources.files("ctk.simulate") / PROFILE_DIR
    return {p.name.removesuffix(".json"): Path(str(p)) for p in root.iterdir() if p.name.endswith(".json")}


def profile_name(hardware: str, model: str) -> str:
    return f"{hardware.lower()}--{model.lower()}"


def load_profile(hardware: str = "h100", model: str = "llama-3.1-8b", path: str | Path | None = None):
    """A bundled profile by hardware and model (``h100`` / ``llama-3.1-8b``), or a profile file."""
    if path is None:
        files = bundled()
        name = profile_name(hardware, model)
        if name not in files:
            pairs = ", ".join(
                f"--hardware {n.split('--')[0]} --model {n.split('--')[1]}" for n in sorted(files)
            )
            raise ProfileError(f"no simulator profile for {hardware} x {model}; bundled: {pairs}")
        path = files[name]
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ProfileError(f"{path}: cannot read the profile ({exc})") from None
    try:
        return HardwareProfile.from_dict(d)
    except TypeError as exc:
        raise ProfileError(f"{path}: bad profile ({exc})") from None
