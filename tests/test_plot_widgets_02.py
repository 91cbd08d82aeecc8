"""Plots and the explorer of notebook 02: figure data equal the numbers given; callbacks change them."""

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from qatlab import QuantSpec, plot, widgets  # noqa: E402
from qatlab.analysis import quantize_tensor  # noqa: E402


def test_quant_histogram_draws_data_and_clipping_range():
    x = torch.randn(1000)
    spec = QuantSpec(bits=3)
    x_hat, s, z = quantize_tensor(x, spec)
    fig = plot.quant_histogram(x, x_hat, s, z, spec)
    ax, ax_err = fig.axes
    assert sum(p.get_height() for p in ax.patches) == 1000  # every value counted
    assert sum(p.get_height() for p in ax_err.patches) == 1000
    vlines = sorted({round(line.get_xdata()[0], 6) for line in ax.lines})
    assert len(vlines) == 8  # 3 bits: 8 grid levels, the outer two are the clipping range
    assert vlines[0] == pytest.approx(float(s * (0 - z)), abs=1e-6)
    assert vlines[-1] == pytest.approx(float(s * (7 - z)), abs=1e-6)


def test_grouped_bars_and_metric_lines_show_the_values():
    df = pd.DataFrame({"layer": ["a", "a", "b", "b"], "cfg": ["x", "y", "x", "y"], "v": [1.0, 2.0, 3.0, 4.0]})
    fig = plot.grouped_bars(df, x="layer", y="v", hue="cfg")
    assert [p.get_height() for p in fig.axes[0].patches] == [1.0, 3.0, 2.0, 4.0]
    lines = pd.DataFrame({"bits": [8, 4, 8, 4], "acc": [0.9, 0.5, 0.91, 0.8], "m": ["p", "p", "q", "q"]})
    fig = plot.metric_lines(lines, x="bits", y="acc", hue="m", reference=0.92)
    ys = [
        list(line.get_ydata())
        for line in fig.axes[0].lines
        if len(line.get_xdata()) == 2 and line.get_xdata()[0] == 4
    ]
    assert [0.5, 0.9] in ys and [0.8, 0.91] in ys
    assert any(np.allclose(line.get_ydata(), 0.92) for line in fig.axes[0].lines)  # the FP32 reference


def test_quant_error_callback_follows_the_controls():
    torch.manual_seed(0)
    tensors = {"weight": {"l": torch.randn(8, 4, 3, 3)}, "activation": {"l": torch.rand(16, 4, 5, 5)}}
    f4 = widgets.update_quant_error(tensors, "l", "weight", 4, "minmax", False)
    f2 = widgets.update_quant_error(tensors, "l", "weight", 2, "minmax", False)
    f4pc = widgets.update_quant_error(tensors, "l", "weight", 4, "minmax", True)
    fa = widgets.update_quant_error(tensors, "l", "activation", 4, "mse", False)
    n_lines = [len(f.axes[0].lines) for f in (f4, f2)]
    assert n_lines == [16 + 2, 4 + 2]  # one line per grid level at 4 and 2 bits, plus the two range ends
    titles = [f.axes[0].get_title() for f in (f4, f4pc, fa)]
    assert "4 bits, minmax, per-tensor" in titles[0] and "per-channel" in titles[1]
    assert "activation" in titles[2] and "mse" in titles[2]
    sqnr = [float(t.split("SQNR ")[1].split(" dB")[0]) for t in titles[:2]]
    assert sqnr[1] > sqnr[0]  # per-channel scales: less error
    box = widgets.quant_error_explorer(tensors)
    assert "qatlab-qe-explorer" in box._dom_classes


def test_pair_sums_histogram_counts_the_pairs_over_the_int16_limit():
    tables = {
        "full": pd.DataFrame({"layer": ["a"] * 3 + ["b"] * 2, "reach": [0.5, 1.2, 1.9, 0.1, 0.99]}),
        "reduced": pd.DataFrame({"layer": ["a", "b"], "reach": [0.9, 0.4]}),
    }
    fig = plot.pair_sums(tables, title="t")
    assert len(fig.axes) == 2
    labels = [[t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes]
    assert labels == [["a (2 over)", "b (0 over)"], ["a (0 over)", "b (0 over)"]]
    assert all(ax.lines[0].get_xdata()[0] == 1.0 for ax in fig.axes)  # the int16 limit
    matplotlib.pyplot.close(fig)


def test_requantization_histogram_reports_the_clamped_shares():
    acc = np.array([-400, -100, 0, 100, 2000, 9000, 60000, 5]).reshape(1, 2, 2, 2)  # 2 channels
    m = np.array([0.01, 0.004])  # channel 0: -4, -1, 0, 1 -> 1 of 8 below; channel 1: 8, 36, 240, 0.02
    fig = plot.requantization(acc, m, (0, 255), title="t")
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["clamped to 0 (ReLU): 25%"]  # -4 and -1; nothing above 255.5
    fig2 = plot.requantization(acc, np.array([0.01, 0.01]), (0, 255))  # 9000 -> 90, 60000 -> 600: above
    labels = [t.get_text() for t in fig2.axes[0].get_legend().get_texts()]
    assert labels == ["clamped to 0 (ReLU): 25%", "above 255: 1 (12.50%)"]
    assert fig.axes[0].get_xlabel().startswith("accumulator x M")
    matplotlib.pyplot.close(fig)
    matplotlib.pyplot.close(fig2)
