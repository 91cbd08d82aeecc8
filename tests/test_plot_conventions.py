"""The figure conventions of plot.py, checked on the figures themselves: integer ticks on bit and epoch axes, axis
labels in words, legends outside the data, distinct colour and line style past 8 groups, no bars on a truncated
value axis."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.colors as mcolors  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from qatlab import plot  # noqa: E402


def _sweep() -> pd.DataFrame:
    rows = [
        {"w_bits": b, "observer": o, "granularity": g, "acc": 0.9 - 0.1 * (8 - b) / 4 - 0.01 * k}
        for b in (4, 6, 8)
        for k, o in enumerate(("minmax", "ema", "percentile", "mse"))
        for g in ("per-tensor", "per-channel")
    ]
    return pd.DataFrame(rows)


def _steps(n_layers: int, kinds=("input_quant",)) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"layer": f"features.{i}.{kind}", "step": s, "clipped": 0.01 * i + 0.001 * s}
            for i in range(n_layers)
            for kind in kinds
            for s in range(1, 31)
        ]
    )


def _figures():
    sweep = _sweep()
    yield "metric_lines", plot.metric_lines(sweep, x="w_bits", y="acc", hue="observer", style="granularity")
    epochs = pd.DataFrame(
        {"epoch": [1, 2, 3] * 2, "val_acc": [0.8, 0.85, 0.86, 0.7, 0.8, 0.82], "run": ["a"] * 3 + ["b"] * 3}
    )
    yield "metric_lines epochs", plot.metric_lines(epochs, x="epoch", y="val_acc", hue="run", reference=0.9)
    yield "step_lines", plot.step_lines(_steps(16), "clipped")
    bars = pd.DataFrame({"layer": ["a", "a", "b"], "kind": ["w", "x", "w"], "sqnr_db": [30.0, 20.0, 25.0]})
    yield "grouped_bars", plot.grouped_bars(bars, x="layer", y="sqnr_db", hue="kind")
    stages = pd.DataFrame({"stage": ["dense", "2:4"], "acc": [0.91, 0.90], "precision": ["FP32", "FP32"]})
    yield "stage_dots", plot.stage_dots(stages, color="precision", reference=0.91)
    hyp = pd.DataFrame({"hypothesis": ["h"] * 4, "arm": ["a", "a", "b", "b"], "acc": [0.9, 0.91, 0.88, 0.87]})
    yield "hypothesis_dots", plot.hypothesis_dots(hyp)


@pytest.fixture(scope="module")
def figures():
    figs = dict(_figures())
    yield figs
    for fig in figs.values():
        matplotlib.pyplot.close(fig)


def test_bit_and_epoch_axes_have_integer_ticks(figures):
    assert [t.get_text() for t in figures["metric_lines"].axes[0].get_xticklabels()] == ["4", "6", "8"]
    assert [t.get_text() for t in figures["metric_lines epochs"].axes[0].get_xticklabels()] == ["1", "2", "3"]
    ax = figures["step_lines"].axes[0]
    ax.figure.canvas.draw()
    assert all(float(t).is_integer() for t in ax.get_xticks())


def test_axis_labels_are_words(figures):
    for name, fig in figures.items():
        for ax in fig.axes:
            for label in (ax.get_xlabel(), ax.get_ylabel()):
                assert "_" not in label, f"{name}: axis label {label!r} is a column name"
    assert figures["metric_lines"].axes[0].get_xlabel() == "weight bits"


def test_legends_sit_outside_the_data(figures):
    for name, fig in figures.items():
        fig.canvas.draw()
        for ax in fig.axes:
            legend = ax.get_legend()
            if legend is not None:
                box, frame = legend.get_window_extent(), ax.get_window_extent()
                assert box.x0 >= frame.x1 - 1, f"{name}: the legend overlaps the axes"


def _styles(ax):
    return [
        (mcolors.to_hex(line.get_color()), line.get_linestyle())
        for line in ax.lines
        if line.get_label()[0] != "_"
    ]


def test_more_than_eight_groups_get_distinct_colour_and_style(figures):
    styles = _styles(figures["step_lines"].axes[0])
    assert len(styles) == 16 and len(set(styles)) == 16
    assert plot.group_styles(8) == [(f"C{k}", "-") for k in range(8)]  # up to 8: colour alone
    with pytest.raises(ValueError, match="n=33"):
        plot.group_styles(33)
    # colour = observer, line style = granularity: 8 lines, each pair distinct, 4 colours x 2 styles
    styles = [(mcolors.to_hex(c.get_children()[0].get_color()), c.get_children()[0].get_linestyle())
              for c in figures["metric_lines"].axes[0].containers]  # fmt: skip
    assert len(set(styles)) == 8 and len({c for c, _ in styles}) == 4 and len({s for _, s in styles}) == 2


def test_weight_and_activation_quantizers_share_the_layer_colour():
    df = _steps(8, kinds=("input_quant", "weight_quant"))  # notebook 08: 8 layers, 16 quantizers
    kinds = pd.Series({name: name.endswith("weight_quant") for name in df["layer"].unique()})
    fig = plot.step_lines(df, "clipped", dashed=kinds)
    styles = dict(zip([line.get_label() for line in fig.axes[0].lines], _styles(fig.axes[0]), strict=True))
    assert len(set(styles.values())) == 16  # 8 layers x 2 kinds: every line its own look
    assert styles["features.3.input_quant"][0] == styles["features.3.weight_quant"][0]
    assert styles["features.3.weight_quant"][1] == "--" and styles["features.3.input_quant"][1] == "-"
    matplotlib.pyplot.close(fig)


def test_no_bars_on_a_truncated_value_axis(figures):
    for name, fig in figures.items():
        for ax in fig.axes:
            if any(isinstance(p, Rectangle) and p.get_height() != 0 for p in ax.patches):
                assert ax.get_ylim()[0] <= 0, f"{name}: bars on an axis that does not start at 0"


def test_integer_ticks_leave_other_axes_alone():
    fig, ax = matplotlib.pyplot.subplots()
    ax.plot([0.5, 1.5], [0, 1])
    before = list(ax.get_xticks())
    plot.integer_ticks(ax, [0.5, 1.5])
    assert list(ax.get_xticks()) == before
    ax.plot(np.arange(1, 40), np.arange(1, 40))
    plot.integer_ticks(ax, np.arange(1, 40))  # many integers: a locator, not 39 labels
    fig.canvas.draw()
    assert len(ax.get_xticks()) < 15 and all(float(t).is_integer() for t in ax.get_xticks())
    matplotlib.pyplot.close(fig)
