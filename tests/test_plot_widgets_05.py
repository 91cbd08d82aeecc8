"""Plots of notebook 05: the figures show the numbers they are given (bar heights, line data, image cells)."""

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from qatlab import plot  # noqa: E402
from qatlab.sparsity import masks_2to4  # noqa: E402


def test_mask_pattern_lays_out_input_channels_along_rows_and_blanks_pruned_entries():
    torch.manual_seed(0)
    w = torch.randn(3, 8, 2, 2)  # rows: (out, kh, kw) = 12 positions; columns: 8 input channels
    mask = masks_2to4(w)
    fig = plot.mask_pattern(w, mask, rows=5, cols=8)
    dense = fig.axes[0].images[0].get_array()
    pruned = fig.axes[1].images[0].get_array()
    expected = w.permute(0, 2, 3, 1).reshape(12, 8)[:5].abs().numpy()
    assert np.asarray(dense) == pytest.approx(expected)
    assert np.array_equal(np.ma.getmaskarray(pruned), ~mask.permute(0, 2, 3, 1).reshape(12, 8)[:5].numpy())
    assert (np.ma.getmaskarray(pruned).reshape(-1, 4).sum(1) == 2).all()  # 2 blank cells in each group of 4
    assert [line.get_xdata()[0] for line in fig.axes[0].lines] == [3.5]  # one group boundary in 8 columns


def test_stage_dots_values_labels_and_colours():
    df = pd.DataFrame(
        {
            "stage": ["dense", "2:4", "dense QAT", "2:4 QAT"],
            "acc": [0.91, 0.905, 0.90, 0.895],
            "precision": ["FP32", "FP32", "W4A4", "W4A4"],
        }
    )
    fig = plot.stage_dots(df, color="precision", reference=0.91)
    ax = fig.axes[0]
    fp32, w4a4, ref = ax.lines
    assert list(fp32.get_ydata()) + list(w4a4.get_ydata()) == pytest.approx(df["acc"].tolist())
    assert fp32.get_color() != w4a4.get_color() and not ax.patches
    assert [t.get_text() for t in ax.get_xticklabels()] == df["stage"].tolist()
    assert [t.get_text() for t in ax.texts] == ["91.00", "90.50", "90.00", "89.50"]
    assert ref.get_ydata()[0] == pytest.approx(0.91)
    assert ax.get_ylim()[0] <= 0.895 and ax.get_ylim()[1] >= 0.91


def test_layer_sparsity_bars_per_column_and_dense_layers_marked():
    df = pd.DataFrame(
        {
            "layer": ["features.0", "features.3", "classifier"],
            "eligible": [False, True, True],
            "zeros": [0.0, 0.5, 0.5],
            "zero_codes": [0.1, 0.55, 0.52],
        }
    )
    fig = plot.layer_sparsity(df, columns=("zeros", "zero_codes"))
    ax = fig.axes[0]
    assert [p.get_height() for p in ax.patches] == pytest.approx([0.0, 0.5, 0.5, 0.1, 0.55, 0.52])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["features.0\n(dense)", "features.3", "classifier"]
    assert ax.lines[0].get_ydata()[0] == 0.5


def test_pruning_curves_one_line_per_run():
    df = pd.DataFrame(
        {
            "run": ["one-shot"] * 3 + ["gradual"] * 3,
            "epoch": [0, 1, 2] * 2,
            "fraction": [1.0, 1.0, 1.0, 0.0, 0.875, 1.0],
            "val_acc": [0.6, 0.88, 0.9, 0.91, 0.89, 0.9],
        }
    )
    fig = plot.pruning_curves(df, reference=0.91)
    ax_f, ax_a = fig.axes
    assert [list(line.get_ydata()) for line in ax_f.lines] == [[1.0, 1.0, 1.0], [0.0, 0.875, 1.0]]
    assert [list(line.get_ydata()) for line in ax_a.lines[:2]] == [[0.6, 0.88, 0.9], [0.91, 0.89, 0.9]]
    assert list(ax_a.lines[0].get_xdata()) == [0, 1, 2]
    assert ax_a.lines[2].get_ydata()[0] == pytest.approx(0.91)
