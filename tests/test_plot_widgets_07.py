"""Plots of notebook 07: the sensitivity bars show the values given, in order, most harmful on top."""

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd

from qatlab import plot


def test_sensitivity_bars_heights_and_order():
    df = pd.DataFrame({"layer": ["a", "b", "c"], "output_sqnr_db": [5.0, 12.5, 30.0]})
    fig = plot.sensitivity_bars(df, top=2, title="t")
    ax = fig.axes[0]
    widths = [p.get_width() for p in ax.patches]
    assert widths == [5.0, 12.5]  # top=2 keeps the first two rows, values unchanged
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["a", "b"]
    ys = [p.get_y() for p in ax.patches]
    assert np.argsort(ys).tolist() == [0, 1] and ax.yaxis_inverted()  # row 0 drawn on top
