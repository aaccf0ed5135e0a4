"""Features of a tool call for the learned predictor.

Command parsing and the table keys live in the one shell parser, :mod:`ctk.datasets.shell`;
:func:`command_keys` is re-exported here: the serve path and training key calls identically.
:class:`FeatureSpec` names the learned predictor's features; they are computed, vectorized, by
:mod:`ctk.predict.dataset` (pandas), which the serve path never imports.
"""

from __future__ import annotations

from dataclasses import dataclass

from ctk.datasets.shell import PARSE_CHARS, command_keys

__all__ = ["PARSE_CHARS", "FeatureSpec", "command_keys", "continuum_tool_name"]


def continuum_tool_name(command: str | None, name: str | None, shell: bool) -> str:
    """The public Continuum's tool name: the first word of a shell command, else the tool's name (the
    function name of an API tool call); ``"?"`` when there is neither. Used by the engine's Continuum rule and
    by the training data's running-mean baseline alike."""
    if shell and command:
        words = command.split(None, 1)
        return words[0] if words else "?"
    return name or "?"


# -- features for the learned predictor ---------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureSpec:
    """Feature columns of the learned predictor (computed by :mod:`ctk.predict.dataset`)."""

    categorical: tuple[str, ...] = ("key0", "key1", "kind", "source")
    numeric: tuple[str, ...] = (
        "n_chars",
        "n_lines",
        "n_args",
        "n_segments",
        "n_pipes",
        "n_redirects",
        "has_heredoc",
        "has_timeout",
        "timeout_s",
        "n_paths",
        "ext_py",
        "ext_sh",
        "ext_data",
        "has_heavy",
        "has_network",
        "is_write",
        "is_background",
        "turn_index",
        "context_est",
        "llm_output_chars",
        "prev_duration_log",
        "prev_mean_log",
        "prev_max_log",
        "prev_same_key_log",
        "n_prev",
    )

    @property
    def names(self) -> tuple[str, ...]:
        return self.categorical + self.numeric

    def to_dict(self) -> dict:
        return {"categorical": list(self.categorical), "numeric": list(self.numeric)}

    @classmethod
    def from_dict(cls, d: dict) -> FeatureSpec:
        return cls(categorical=tuple(d["categorical"]), numeric=tuple(d["numeric"]))
