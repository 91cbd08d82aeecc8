"""Notebook 03 (BatchNorm folding): the plot functions draw the numbers they are given; the explorer's
callback redraws when its controls change."""

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from qatlab import analysis, plot, widgets
from qatlab.modules import fold_bn


def _ydata(ax):
    return [np.asarray(line.get_ydata(), dtype=float) for line in ax.lines]


def _close(fig):
    matplotlib.pyplot.close(fig)


def test_bn_channel_ranges_draws_the_given_numbers():
    before, after = np.array([1.0, 0.5, 0.25]), np.array([2.0, 0.1, 0.4])
    pt, pc = np.array([10.0, 0.0, 5.0]), np.array([30.0, 31.0, 29.0])
    fig = plot.bn_channel_ranges(before, after, pt, pc, bits=4, title="layer")
    left, right = fig.axes[:2]
    np.testing.assert_allclose(_ydata(left)[0], before)
    np.testing.assert_allclose(_ydata(left)[1], after)
    np.testing.assert_allclose(_ydata(right)[0], pt)
    np.testing.assert_allclose(_ydata(right)[1], pc)
    assert left.get_yscale() == "log"
    _close(fig)


def test_bn_layer_stats_draws_the_given_numbers():
    df = pd.DataFrame(
        {
            "kind": ["full", "depthwise", "pointwise"],
            "spread_before": [3.0, 20.0, 2.0],
            "spread_after": [4.0, 90.0, 2.5],
            "sqnr_per_tensor": [38.0, 30.0, 39.0],
            "sqnr_per_channel": [44.0, 47.0, 43.0],
        }
    )
    fig = plot.bn_layer_stats(df)
    top, bottom = fig.axes[:2]
    np.testing.assert_allclose(_ydata(top)[0], df["spread_before"])
    np.testing.assert_allclose(_ydata(top)[1], df["spread_after"])
    np.testing.assert_allclose(_ydata(bottom)[0], df["sqnr_per_tensor"])
    np.testing.assert_allclose(_ydata(bottom)[1], df["sqnr_per_channel"])
    assert len(bottom.lines) == 2
    _close(fig)
    fig = plot.bn_layer_stats(
        df.assign(sqnr_per_tensor_unfolded=[40.0, 38.6, 41.0])
    )  # the unfolded reference
    np.testing.assert_allclose(_ydata(fig.axes[1])[2], [40.0, 38.6, 41.0])
    assert fig.axes[1].lines[2].get_linestyle() == "--"
    _close(fig)


def test_bn_batch_curves_one_line_per_run():
    df = pd.DataFrame(
        {
            "run": ["a", "a", "b", "b"],
            "images": [10, 20, 10, 20],
            "train_loss": [1.0, 0.8, 2.0, 2.5],
            "val_acc": [0.5, 0.6, 0.2, 0.1],
        }
    )
    fig = plot.bn_batch_curves(df)
    loss, acc = fig.axes[:2]
    np.testing.assert_allclose(_ydata(loss)[0], [1.0, 0.8])
    np.testing.assert_allclose(_ydata(loss)[1], [2.0, 2.5])
    np.testing.assert_allclose(_ydata(acc)[1], [0.2, 0.1])
    np.testing.assert_allclose(acc.lines[0].get_xdata(), [10, 20])
    _close(fig)


@pytest.fixture
def layers():
    torch.manual_seed(0)
    out = {}
    for name, groups in (("dw", 8), ("pw", 1)):
        conv = nn.Conv2d(8, 8, 3 if groups > 1 else 1, groups=groups, bias=False)
        bn = nn.BatchNorm2d(8).eval()
        with torch.no_grad():
            bn.weight.copy_(torch.logspace(-2, 1, 8))  # gammas over 3 decades: folding spreads the ranges
            bn.running_var.uniform_(0.5, 2.0)
        out[name] = (conv.weight.detach(), fold_bn(conv.weight, None, bn)[0].detach())
    return out


def test_bn_fold_channel_stats(layers):
    weight, folded = layers["dw"]
    st = analysis.bn_fold_channel_stats(weight, folded, bits=8)
    assert list(st.columns) == ["channel", "max_before", "max_after", "sqnr_per_tensor", "sqnr_per_channel"]
    np.testing.assert_allclose(st["max_after"], folded.abs().flatten(1).amax(1).numpy(), rtol=1e-6)
    # per-channel scales never lose to one shared scale, and the smallest folded channel suffers most
    assert (st["sqnr_per_channel"] >= st["sqnr_per_tensor"] - 1e-6).all()
    assert st["sqnr_per_tensor"].iloc[0] < st["sqnr_per_tensor"].iloc[-1]


def test_update_bn_fold_changes_with_layer_and_bits(layers):
    fig = widgets.update_bn_fold(layers, "dw", bits=8)
    fig_bits = widgets.update_bn_fold(layers, "dw", bits=3)
    fig_layer = widgets.update_bn_fold(layers, "pw", bits=8)
    pt8, pt3 = _ydata(fig.axes[1])[0], _ydata(fig_bits.axes[1])[0]
    assert not np.allclose(pt8, pt3)
    assert not np.allclose(_ydata(fig.axes[0])[0], _ydata(fig_layer.axes[0])[0])
    # the title (the explorer's text line) carries the bit width and the medians of the per-channel SQNRs
    st = analysis.bn_fold_channel_stats(*layers["dw"], bits=3)
    title = fig_bits.get_suptitle()
    assert title.startswith("dw ") and " at 3 bits: " in title
    assert f"{st['sqnr_per_tensor'].median():.1f} dB per tensor" in title
    assert f"{st['sqnr_per_channel'].median():.1f} dB per channel" in title
    for f in (fig, fig_bits, fig_layer):
        _close(f)


def test_bn_fold_explorer_builds(layers):
    box = widgets.bn_fold_explorer(layers, bits=6)
    assert "qatlab-bn-explorer" in box._dom_classes
    pick, nbits = box.children[0].children
    assert "qatlab-bn-layer" in pick._dom_classes and nbits.value == 6
    pick.value = "pw"  # the observer redraws without error
