"""Tool-call rows -> the frame every predictor and the evaluation work on.

Input: a frame with the ``tool_calls`` columns of the trace store (or the shared agent-traces CSV names).
Output adds: ``keys`` (the :func:`~ctk.predict.features.command_keys` chain), ``key0`` / ``key1`` / ``kind``,
``tool``, the text features, the program-history features (previous durations in the same program),
``context_est`` (context tokens, estimated when not recorded), ``y`` (duration, floored at 1 ms),
``killed`` (the harness killed the call at its cap), ``serve_cap_s`` and ``censored``.

The target is the **pause** the engine sees (see :mod:`ctk.predict.caps`): a call the harness killed is an
exact pause at its source's cap, censored only when predicting for a deployment with a longer cap
(``serve_cap_s``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import pandas as pd

from ctk.datasets.shell import PROGRAM_KEY, QUICK_KEY
from ctk.errors import CtkError
from ctk.predict.features import PARSE_CHARS, command_keys, continuum_tool_name
from ctk.store import usable_duration

KIND_KEYS = (QUICK_KEY, PROGRAM_KEY)

#: Durations below this are floored (log-scale targets; sub-millisecond calls are all "instant").
MIN_DURATION_S = 0.001
#: Context estimate when the store has no token counts: a typical agent system prompt + task ...
BASE_CONTEXT_TOKENS = 1500
#: ... plus the chars of earlier turns' outputs and observations at ~4 chars per token.
CHARS_PER_TOKEN = 4.0
CENSORED_FLAGS = ("timeout_censored",)
EXCLUDED_FLAGS = ("implausible_lt_2ms",)


class DataError(CtkError, ValueError):
    """The rows cannot be used (missing columns, nothing usable); the message says why."""


def _col(df: pd.DataFrame, name: str, default) -> pd.Series:
    if name in df.columns:
        return df[name]
    return pd.Series([default] * len(df), index=df.index, dtype=object if default is None else None)


def normalize_rows(rows: pd.DataFrame, keep_unlabelled: bool = False) -> tuple[pd.DataFrame, int]:
    """Accept store rows or shared-CSV rows; drop unusable rows. Returns ``(frame, n_skipped)``.

    ``keep_unlabelled`` keeps rows without a duration (calls to predict for, not to train on).
    """
    df = rows.copy()
    if "output_chars" not in df.columns and "observation_chars" in df.columns:
        df["output_chars"] = df["observation_chars"]
    missing = [c for c in ("program_id", "duration_s") if c not in df.columns]
    if missing:
        raise DataError(f"tool-call rows lack column(s) {', '.join(missing)}")
    if "command_or_args" not in df.columns and "tool_name" not in df.columns:
        raise DataError("tool-call rows need command_or_args or tool_name")
    flags = _col(df, "quality_flag", "ok").fillna("ok").astype(str)
    if "censored" in df.columns:
        cens = df["censored"].fillna(False).astype(str).str.lower().isin(["true", "1", "1.0"])
    else:
        cens = pd.Series(False, index=df.index)
    df["killed"] = cens | flags.isin(CENSORED_FLAGS)
    df["duration_s"] = pd.to_numeric(df["duration_s"], errors="coerce")
    labelled = usable_duration(df["duration_s"])  # finite, >= 0, at most 30 days (the store's rule)
    if keep_unlabelled:
        df.loc[~labelled, "duration_s"] = np.nan
        usable = df["program_id"].notna()
    else:
        usable = labelled & ~flags.isin(EXCLUDED_FLAGS) & df["program_id"].notna()
    skipped = int((~usable).sum())
    df = df[usable].copy()
    df["program_id"] = df["program_id"].astype(str)
    df["source"] = _col(df, "source", "unknown").fillna("unknown").astype(str)
    df["turn_index"] = pd.to_numeric(_col(df, "turn_index", 0), errors="coerce").fillna(0).astype(int)
    df["call_index"] = pd.to_numeric(_col(df, "call_index", 0), errors="coerce").fillna(0).astype(int)
    for c in ("context_tokens", "llm_output_chars", "output_chars", "harness_cap_s"):
        df[c] = pd.to_numeric(_col(df, c, None), errors="coerce").astype(float)
    df["command_or_args"] = _col(df, "command_or_args", None)
    df["tool_name"] = _col(df, "tool_name", None)
    df = df.sort_values(["program_id", "turn_index", "call_index"], kind="stable").reset_index(drop=True)
    return df, skipped


def _keys_for(commands: pd.Series, tools: pd.Series) -> list[list[str]]:
    cache: dict[tuple, list[str]] = {}
    out = []
    for c, t in zip(commands.tolist(), tools.tolist(), strict=True):
        c = c if isinstance(c, str) else None
        t = t if isinstance(t, str) else None
        k = (c[:1600] if c else None, t)
        v = cache.get(k)
        if v is None:
            v = cache[k] = command_keys(c, t)
        out.append(v)
    return out


_HEAVY = (
    r"\b(?:pip3? install|conda install|apt(?:-get)? install|npm (?:install|ci)|yarn install|"
    r"cargo (?:build|test)|"
    r"make\b|cmake\b|pytest|unittest|tox\b|go (?:build|test)|mvn\b|gradle\b|train|fit\b|epoch|docker build|"
    r"git clone|wget|curl|download|compile|gcc|g\+\+)"
)
_NETWORK = r"(?:https?://|\bpip3? install|\bgit clone|\bwget\b|\bcurl\b|\bapt(?:-get)? )"
_TIMEOUT = r"\btimeout\s+(?:-\S+\s+)*([0-9.]+)([smhd]?)"
_UNIT_S = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _text_feature_frame(commands: pd.Series) -> pd.DataFrame:
    """Numeric features of the command text, vectorized over each command's head (C-speed string ops)."""
    full = commands.where(commands.notna(), "").astype(str)
    head = full.str.slice(0, PARSE_CHARS)
    f = pd.DataFrame(index=commands.index)
    f["n_chars"] = full.str.len().astype(float)
    f["n_lines"] = (full.str.count("\n") + (full.str.len() > 0)).astype(float)
    first = head.str.extract(r"^([^;&|\n]*)", expand=False).fillna("")
    f["n_args"] = first.str.strip().str.count(r"\s+").astype(float)
    pipes2 = head.str.count(r"\|\|")
    f["n_segments"] = (head.str.count(r"&&|;|\n|\|") - pipes2 + 1).astype(float)
    f["n_pipes"] = (head.str.count(r"\|") - 2 * pipes2).astype(float)
    f["n_redirects"] = head.str.count(r"[<>]+").astype(float)
    f["has_heredoc"] = head.str.contains("<<", regex=False).astype(float)
    tm = head.str.extract(_TIMEOUT)
    f["has_timeout"] = tm[0].notna().astype(float)
    secs = pd.to_numeric(tm[0], errors="coerce") * tm[1].fillna("").map(_UNIT_S).astype(float)
    f["timeout_s"] = secs.fillna(0.0).astype(float)
    f["n_paths"] = head.str.count("/").astype(float)
    f["ext_py"] = head.str.contains(r"\.py\b").astype(float)
    f["ext_sh"] = head.str.contains(r"\.sh\b").astype(float)
    f["ext_data"] = head.str.contains(r"\.(?:csv|json|txt|parquet|pkl|npy|bin|gz)\b").astype(float)
    f["has_heavy"] = head.str.contains(_HEAVY).astype(float)
    f["has_network"] = head.str.contains(_NETWORK).astype(float)
    f["is_background"] = head.str.contains(r"[^&]&\s*$").astype(float)
    return f.reset_index(drop=True)


def continuum_tool(commands: pd.Series, tools: pd.Series) -> pd.Series:
    """Continuum's tool name per row (:func:`~ctk.predict.features.continuum_tool_name`): a recorded tool name
    is the name (an API tool call's, or a shell command's first word as the recorders store it); a row
    without one is named by its command."""
    names = []
    for command, tool in zip(commands, tools, strict=True):
        name = tool if isinstance(tool, str) and tool else None
        names.append(continuum_tool_name(command if isinstance(command, str) else None, name, name is None))
    return pd.Series(names, index=commands.index, dtype=object)


def prepare_frame(
    rows: pd.DataFrame, keep_unlabelled: bool = False, serve_cap_s: float | None = None
) -> tuple[pd.DataFrame, int]:
    """Normalize and featurize tool-call rows. Returns ``(frame, n_skipped)``; raises :class:`DataError`.

    ``serve_cap_s``: predict for a deployment whose harness kills calls at this cap (None: each source's own
    cap, as recorded). Killed calls of sources with a shorter cap are then censored run times.
    """
    from ctk.predict.caps import learn_caps, pause_censoring

    if serve_cap_s is not None and not (serve_cap_s > 0 and np.isfinite(serve_cap_s)):
        raise DataError(f"serve cap must be a positive number of seconds, not {serve_cap_s!r}")
    df, skipped = normalize_rows(rows, keep_unlabelled)
    if df.empty:
        raise DataError("no usable tool-call rows (all missing a duration or flagged as clock errors)")
    df["serve_cap_s"] = float(serve_cap_s) if serve_cap_s is not None else np.nan
    df["censored"] = pause_censoring(df, learn_caps(df), serve_cap_s)
    df["keys"] = _keys_for(df["command_or_args"], df["tool_name"])
    df["key0"] = [k[0] for k in df["keys"]]
    named = [[x for x in k if x not in KIND_KEYS] for k in df["keys"]]
    df["key1"] = [k[1] if len(k) > 1 else "*" for k in named]  # the next named level (kinds apart)
    df["kind"] = [next((x for x in k if x in KIND_KEYS), "*") for k in df["keys"]]
    df["tool"] = continuum_tool(df["command_or_args"], df["tool_name"])
    df["y"] = df["duration_s"].clip(lower=MIN_DURATION_S)
    feats = _text_feature_frame(df["command_or_args"])
    for c in feats.columns:
        df[c] = feats[c].to_numpy()
    df["is_write"] = df["key0"].str.endswith(":write").astype(float)
    _history_features(df)
    return df, skipped


def _history_features(df: pd.DataFrame) -> None:
    """Per program, in turn order: what came before this call (no leakage of the call's own duration)."""
    g = df.groupby("program_id", sort=False)
    logy = np.log(df["y"])
    df["n_prev"] = g.cumcount().astype(float)
    prev = g["y"].shift(1)
    df["prev_duration_log"] = np.log(prev)
    csum = logy.groupby(df["program_id"], sort=False).cumsum() - logy
    df["prev_mean_log"] = np.where(df["n_prev"] > 0, csum / df["n_prev"].where(df["n_prev"] > 0, 1), np.nan)
    df["prev_max_log"] = np.log(g["y"].cummax().groupby(df["program_id"], sort=False).shift(1))
    same = df.groupby(["program_id", "key0"], sort=False)["y"].shift(1)
    df["prev_same_key_log"] = np.log(same)
    # context: recorded prompt tokens, else an estimate from the chars of everything before this call
    chars = df["llm_output_chars"].fillna(0) + df["output_chars"].fillna(0)
    before = chars.groupby(df["program_id"], sort=False).cumsum() - df["output_chars"].fillna(0)
    est = BASE_CONTEXT_TOKENS + before / CHARS_PER_TOKEN
    df["context_est"] = df["context_tokens"].where(df["context_tokens"].notna(), est).astype(float)


def program_fold(program_ids: Sequence[str] | pd.Series, fraction: float, seed: int = 0) -> np.ndarray:
    """Deterministic program split: True for programs in the held-out ``fraction`` (by hash, not order)."""
    ids = pd.Series(program_ids).astype(str)
    uniq = ids.unique()
    h = np.array(
        [
            int.from_bytes(hashlib.blake2b(f"{seed}:{p}".encode(), digest_size=8).digest(), "big")
            for p in uniq
        ],
        dtype=np.uint64,
    )
    held = dict(zip(uniq, (h % np.uint64(1_000_000)) < np.uint64(int(fraction * 1_000_000)), strict=True))
    return ids.map(held).to_numpy(dtype=bool)


def rows_fingerprint(df: pd.DataFrame) -> str:
    """Row count + a hash of (program, turn, call, duration, killed, command) of the training rows."""
    cols = df[["program_id", "turn_index", "call_index", "duration_s", "killed"]].copy()
    cols["cmd"] = df["command_or_args"].fillna("").astype(str)
    h = pd.util.hash_pandas_object(cols, index=False).to_numpy()
    digest = hashlib.sha256(np.sort(h).tobytes()).hexdigest()[:16]
    return f"{len(df)}:{digest}"
