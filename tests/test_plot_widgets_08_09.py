"""Plots of notebooks 08 and 09: the figures show the numbers they are given."""

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from qatlab import plot  # noqa: E402


def test_step_lines_one_line_per_layer_smoothed_and_dashed():
    df = pd.DataFrame({"layer": ["a"] * 5 + ["b"] * 5, "step": list(range(1, 6)) * 2,
                       "clipped": [0, 1, 0, 1, 0] + [0.5] * 5})  # fmt: skip
    fig = plot.step_lines(df, "clipped", smooth=3, dashed=pd.Series({"a": True, "b": False}))
    a, b = fig.axes[0].lines
    assert list(a.get_xdata()) == [1, 2, 3, 4, 5]
    # centred rolling mean over 3 steps (2 at the ends)
    assert a.get_ydata() == pytest.approx([0.5, 1 / 3, 2 / 3, 1 / 3, 0.5])
    assert b.get_ydata() == pytest.approx([0.5] * 5)
    assert a.get_linestyle() == "--" and b.get_linestyle() == "-"
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["a", "b"]


def test_finding_panels_bar_heights_seed_dots_and_reference():
    df = pd.DataFrame({
        "finding": ["f1"] * 4 + ["f2"] * 2,
        "arm": ["x", "x", "y", "y", "z", "z"],
        "seed": [0, 1, 0, 1, 0, 1],
        "acc": [0.8, 0.9, 0.5, 0.7, 0.2, 0.2],
    })  # fmt: skip
    fig = plot.finding_panels(df, reference={"f1": 0.95})
    ax1, ax2 = fig.axes[0], fig.axes[1]
    assert [p.get_height() for p in ax1.patches] == pytest.approx([0.85, 0.6])
    assert [p.get_height() for p in ax2.patches] == pytest.approx([0.2])
    dots = [ln for ln in ax1.lines if ln.get_marker() == "."]
    assert sorted(np.concatenate([d.get_ydata() for d in dots])) == pytest.approx([0.5, 0.7, 0.8, 0.9])
    assert any(list(ln.get_ydata()) == [0.95, 0.95] for ln in ax1.lines)  # the float reference line
    assert ax1.get_title() == "f1" and [t.get_text() for t in ax1.get_xticklabels()] == ["x", "y"]
    lo, hi = ax1.get_ylim()
    assert lo < 0.5 and hi > 0.95  # own axis per panel, covering the bars and the reference
    assert len(fig.axes) == 2
