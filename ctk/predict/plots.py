"""The calibration plot, drawn by ``ctk train/evaluate --plots`` and by ``ctk report`` (matplotlib, Agg)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

CALIBRATION_PNG = "calibration.png"


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (imported on first use: ``ctk --help`` stays fast)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_calibration(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    out_dir: str | Path,
    title: str | None = None,
    ylabel: str = "share of true durations at or below it",
) -> Path:
    """``calibration.png`` in ``out_dir``: per label, the coverage at each stated quantile level (the share
    of true durations at or below the predicted quantile) against the diagonal of a calibrated predictor."""
    plt = pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5.2, 5))
    ax.plot([0, 1], [0, 1], color="#999", ls="--", lw=1, label="calibrated")
    for label, (levels, coverage) in curves.items():
        ax.plot(list(levels), list(coverage), "o-", label=label)
    ax.set_xlabel("predicted quantile level")
    ax.set_ylabel(ylabel)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = out_dir / CALIBRATION_PNG
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
