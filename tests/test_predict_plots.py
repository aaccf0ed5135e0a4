"""The one calibration plot (``ctk train/evaluate --plots`` and ``ctk report`` both draw it)."""

from __future__ import annotations

from ctk.predict.plots import CALIBRATION_PNG, plot_calibration, pyplot


def test_calibration_plot_writes_a_png_and_closes_its_figure(tmp_path):
    curves = {"a": ([0.1, 0.5, 0.9], [0.2, 0.55, 0.8]), "b": ([0.5, 0.9], [float("nan"), 0.95])}
    path = plot_calibration(curves, tmp_path / "new-dir", "title")
    assert path == tmp_path / "new-dir" / CALIBRATION_PNG
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
    assert pyplot().get_fignums() == []  # a report draws many plots: none left open
