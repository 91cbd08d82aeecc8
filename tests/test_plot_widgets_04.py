"""Plots of notebook 04: the hypothesis dots show the means, the error bars the spread, the dots the seeds."""

import matplotlib

matplotlib.use("Agg")

import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from qatlab import plot  # noqa: E402


def test_hypothesis_dots():
    df = pd.DataFrame(
        {
            "hypothesis": ["init"] * 4 + ["lr"] * 4,
            "arm": ["cal", "cal", "raw", "raw", "cos", "cos", "const", "const"],
            "seed": [0, 1] * 4,
            "acc": [0.90, 0.92, 0.80, 0.84, 0.91, 0.91, 0.89, 0.87],
        }
    )
    fig = plot.hypothesis_dots(df, reference=0.93)
    init_ax, lr_ax = fig.axes
    assert not init_ax.patches  # dots on a zoomed axis, no bars
    means = [line.get_ydata()[0] for line in init_ax.lines if line.get_marker() == "D"]
    assert means == pytest.approx([0.91, 0.82])
    assert [line.get_ydata()[0] for line in lr_ax.lines if line.get_marker() == "D"] == pytest.approx(
        [0.91, 0.88]
    )
    caps = sorted(y for c in init_ax.collections for seg in c.get_segments() for y in (seg[0][1], seg[1][1]))
    # +-1 standard deviation with ddof=1: two seeds 0.02 apart -> 0.01414
    assert caps[:2] == pytest.approx([0.82 - 0.02828, 0.82 + 0.02828], abs=1e-4)
    dots = [line for line in init_ax.lines if line.get_marker() == "."]
    assert sorted(y for line in dots for y in line.get_ydata()) == pytest.approx([0.80, 0.84, 0.90, 0.92])
    assert [t.get_text() for t in init_ax.get_xticklabels()] == ["cal", "raw"]
