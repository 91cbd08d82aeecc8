"""Plots of notebook 04: the hypothesis bars show the means, the error bars the spread, the dots the seeds."""

import matplotlib

matplotlib.use("Agg")

import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from qatlab import plot  # noqa: E402


def test_hypothesis_bars():
    df = pd.DataFrame(
        {
            "hypothesis": ["init"] * 4 + ["lr"] * 4,
            "arm": ["cal", "cal", "raw", "raw", "cos", "cos", "const", "const"],
            "seed": [0, 1] * 4,
            "acc": [0.90, 0.92, 0.80, 0.84, 0.91, 0.91, 0.89, 0.87],
        }
    )
    fig = plot.hypothesis_bars(df, reference=0.93)
    init_ax, lr_ax = fig.axes
    assert [p.get_height() for p in init_ax.patches] == pytest.approx([0.91, 0.82])
    assert [p.get_height() for p in lr_ax.patches] == pytest.approx([0.91, 0.88])
    dots = [line for line in init_ax.lines if line.get_marker() == "."]
    assert sorted(y for line in dots for y in line.get_ydata()) == pytest.approx([0.80, 0.84, 0.90, 0.92])
    assert [t.get_text() for t in init_ax.get_xticklabels()] == ["cal", "raw"]
