"""Plots of notebook 12 (the QAT doctor): the case-file figure shows the numbers it is given, colours each case by
the doctor's status, and follows the figure conventions (axis labels in words, the legend outside the data)."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.colors as mcolors  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from qatlab import plot  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    matplotlib.pyplot.close("all")


def _cases() -> pd.DataFrame:
    return pd.DataFrame({
        "case": ["BN in train mode", "stale file", "one layer at 2 bits"],
        "check": ["mode", "deployment", "responsible_layers"],
        "status": ["fail", "fail", "warn"],
        "metric": ["accuracy", "agreement", "accuracy"],
        "faulty": [0.41, 0.19, 0.16], "fixed": [0.65, 1.0, 0.70], "healthy": [0.65, 1.0, 0.71],
    })  # fmt: skip


def _points(ax, marker: str) -> np.ndarray:
    lines = [ln for ln in ax.get_lines() if ln.get_marker() == marker and len(ln.get_xdata())]
    return np.concatenate([np.column_stack([ln.get_xdata(), ln.get_ydata()]) for ln in lines])


def test_doctor_cases_plots_each_case_in_order():
    df = _cases()
    fig = plot.doctor_cases(df, title="cases")
    ax = fig.axes[0]
    fig.canvas.draw()
    faulty, fixed, healthy = _points(ax, "x"), _points(ax, "o"), _points(ax, "|")
    # the first case on top: y positions 2, 1, 0
    assert faulty.tolist() == [[0.41, 2], [0.19, 1], [0.16, 0]]
    assert fixed.tolist() == [[0.65, 2], [1.0, 1], [0.70, 0]]
    assert sorted(healthy.tolist()) == sorted([[0.65, 2], [1.0, 1], [0.71, 0]])
    assert len(ax.texts) == 3  # one arrow (an annotation) from each faulty value to its fixed one
    labels = ax.get_yticklabels()
    assert [t.get_text().split("  ")[0] for t in labels] == [
        "BN in train mode",
        "stale file",
        "one layer at 2 bits",
    ]
    assert "[responsible_layers: warn]" in labels[2].get_text()
    colours = [mcolors.to_hex(t.get_color()) for t in labels]
    assert colours[0] == colours[1] == mcolors.to_hex("C3") and colours[2] == mcolors.to_hex("C1")
    assert ax.get_xlim() == (0.0, 1.02) and "_" not in ax.get_xlabel()
    legend = ax.get_legend()
    assert legend.get_window_extent().x0 >= ax.get_window_extent().x1 - 1


def test_doctor_cases_names_a_missing_column():
    with pytest.raises(ValueError, match="healthy"):
        plot.doctor_cases(_cases().drop(columns="healthy"))
