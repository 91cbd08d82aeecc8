"""Plots of notebook 11 (accuracy-aware mixed precision): the figures show the numbers they are given and follow
the figure conventions (axis labels in words, legends outside the data, no bars on a truncated value axis)."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.colors as mcolors  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from qatlab import plot  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    matplotlib.pyplot.close("all")


def _conventions(fig) -> None:
    """What tests/test_plot_conventions.py checks, on one figure."""
    fig.canvas.draw()
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        for label in (ax.get_xlabel(), ax.get_ylabel()):
            assert "_" not in label, f"axis label {label!r} is a column name"
        legend = ax.get_legend()
        if legend is not None:
            assert legend.get_window_extent().x0 >= ax.get_window_extent().x1 - 1, (
                "the legend overlaps the axes"
            )
        if any(isinstance(p, Rectangle) and p.get_height() != 0 for p in ax.patches):
            assert ax.get_ylim()[0] <= 0


# ---- estimator_scatter --------------------------------------------------------------------------------------


def _scores() -> pd.DataFrame:
    """2 models x 2 seeds x 3 layers x 3 estimators: hessian positive over decades, fisher with a zero and
    decades, sqnr (as -SQNR dB) negative."""
    rng = np.random.default_rng(0)
    rows = []
    for model in ("cnn", "mlp"):
        for seed in (0, 1):
            for k in range(3):
                drop = float(rng.uniform(-0.01, 0.2))
                for est, score in (
                    ("hessian", 10.0 ** (k - 2) * (1 + seed)),
                    ("fisher", 0.0 if k == 0 else 10.0 ** (-7 + 3 * k)),
                    ("sqnr", -30.0 + 5 * k + seed),
                ):
                    rows.append({"model": model, "seed": seed, "layer": f"l{k}", "estimator": est,
                                 "score": score, "acc_drop": drop})  # fmt: skip
    return pd.DataFrame(rows)


def test_estimator_scatter_points_equal_the_scores():
    """One panel per estimator in order; line k of a panel is model k's (score, 100 x acc_drop); x axis log when
    every score is positive, symlog with a zero and decades, linear for negative scores within two decades."""
    df = _scores()
    fig = plot.estimator_scatter(df)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["hessian", "fisher", "sqnr"]
    for ax, est in zip(axes, ("hessian", "fisher", "sqnr"), strict=True):
        assert len(ax.lines) == 2
        for line, model in zip(ax.lines, ("cnn", "mlp"), strict=True):
            part = df[(df["estimator"] == est) & (df["model"] == model)]
            assert np.array_equal(line.get_xdata(), part["score"].to_numpy())
            assert np.allclose(line.get_ydata(), 100 * part["acc_drop"].to_numpy())
        assert mcolors.to_hex(ax.lines[0].get_color()) != mcolors.to_hex(ax.lines[1].get_color())
    assert [ax.get_xscale() for ax in axes] == ["log", "symlog", "linear"]
    assert axes[0].get_ylabel() == "accuracy drop (points)"
    assert axes[0].get_xlabel() == "hessian score (log)"
    legend = fig.axes[2].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["cnn", "mlp"]
    _conventions(fig)


def test_estimator_scatter_titles_carry_spearman():
    """With a rank_correlation table, each title names the estimator and rho +- its 95% half-width per model (no
    +- where the half-width is NaN); with one model, on the estimator's line."""
    df = _scores()
    corr = pd.DataFrame({
        "estimator": ["hessian", "hessian", "fisher", "fisher", "sqnr", "sqnr"],
        "model": ["cnn", "mlp"] * 3,
        "spearman": [0.82, 0.71, 0.5, np.nan, -0.1, 0.9],
        "spearman_ci95": [0.05, np.nan, 0.1, np.nan, 0.2, 0.01],
    })  # fmt: skip
    fig = plot.estimator_scatter(df, corr=corr)
    titles = [ax.get_title() for ax in fig.axes[:3]]
    assert titles[0] == "hessian\ncnn: ρ = 0.82 ± 0.05\nmlp: ρ = 0.71"
    assert titles[1] == "fisher\ncnn: ρ = 0.50 ± 0.10\nmlp: ρ n/a"
    assert titles[2] == "sqnr\ncnn: ρ = -0.10 ± 0.20\nmlp: ρ = 0.90 ± 0.01"
    one = df[df["model"] == "cnn"].drop(columns="model")
    fig = plot.estimator_scatter(one, corr=corr[corr["model"] == "cnn"].drop(columns="model"))
    assert fig.axes[0].get_title() == "hessian: ρ = 0.82 ± 0.05"
    assert len(fig.axes[0].lines) == 1 and fig.axes[0].get_legend() is None  # no model column: no legend
    _conventions(fig)


def test_estimator_scatter_leaves_out_non_finite_points_and_says_so():
    df = _scores()
    df.loc[(df["estimator"] == "sqnr") & (df["layer"] == "l0") & (df["model"] == "cnn"), "score"] = -np.inf
    fig = plot.estimator_scatter(df, truth="acc_drop")
    sqnr = fig.axes[2]
    assert sqnr.get_title() == "sqnr\n(2 not finite, left out)"
    assert len(sqnr.lines[0].get_xdata()) == 4 and np.isfinite(sqnr.lines[0].get_xdata()).all()
    assert len(sqnr.lines[1].get_xdata()) == 6
    # a truth that is not an accuracy is drawn as is, labelled in words
    fig = plot.estimator_scatter(df.assign(loss_increase=df["acc_drop"] * 3), truth="loss_increase")
    part = df[(df["estimator"] == "hessian") & (df["model"] == "cnn")]
    assert np.allclose(fig.axes[0].lines[0].get_ydata(), 3 * part["acc_drop"].to_numpy())
    assert fig.axes[0].get_ylabel() == "loss increase"


def test_estimator_scatter_names_a_missing_column():
    with pytest.raises(ValueError, match="'score'"):
        plot.estimator_scatter(_scores().drop(columns="score"))
    with pytest.raises(ValueError, match="corr lacks"):
        plot.estimator_scatter(_scores(), corr=pd.DataFrame({"estimator": ["hessian"]}))


# ---- precision_map ------------------------------------------------------------------------------------------


def _maps(n_layers: int = 4) -> pd.DataFrame:
    layers = [f"features.{i}" for i in range(n_layers)]
    params = {name: 100 * (i + 1) ** 2 for i, name in enumerate(layers)}  # sqrt: 10, 20, 30, ...
    rows = [
        {"map": m, "layer": name, "precision": precisions[i % len(precisions)], "params": params[name]}
        for m, precisions in (("fallback 1%", ("float", "int4")), ("budget 4.5 bits", ("int8", "mxfp4", "int4 g32")))
        for i, name in enumerate(layers)
    ]  # fmt: skip
    return pd.DataFrame(rows)


def _boxes(ax):
    return [p for p in ax.patches if isinstance(p, Rectangle)]


def test_precision_map_boxes_follow_layers_params_and_precisions():
    """One box per (map, layer), map rows top to bottom in order, widths ~ sqrt(params) with a mean of 1, aligned
    across rows, coloured by the fixed colour of the precision; legend entries in the fixed order."""
    df = _maps(4)
    fig = plot.precision_map(df, title="maps")
    ax = fig.axes[0]
    boxes = _boxes(ax)
    assert len(boxes) == 8
    want_w = np.array([10.0, 20.0, 30.0, 40.0]) / 25.0
    for row, (_, part) in enumerate(df.groupby("map", sort=False)):
        mine = boxes[4 * row : 4 * row + 4]
        assert np.allclose([b.get_width() for b in mine], want_w)
        assert np.allclose([b.get_x() for b in mine], np.concatenate([[0.0], np.cumsum(want_w)[:-1]]))
        assert {b.get_y() + b.get_height() / 2 for b in mine} == {1 - row}  # the first map on top
        assert [mcolors.to_hex(b.get_facecolor()) for b in mine] == [
            plot.PRECISION_COLORS[p] for p in part["precision"]
        ]
    ticks = sorted(zip(ax.get_yticks(), [t.get_text() for t in ax.get_yticklabels()], strict=True))
    assert [label for _, label in ticks] == ["budget 4.5 bits", "fallback 1%"]
    assert [t.get_text() for t in ax.get_xticklabels()] == list(df["layer"].unique())
    assert np.allclose(ax.get_xticks(), np.concatenate([[0.0], np.cumsum(want_w)[:-1]]) + want_w / 2)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["float", "int8", "int4", "int4 g32", "mxfp4"]  # PRECISION_COLORS order, not appearance
    assert ax.get_title() == "maps" and "square root" in ax.get_xlabel()
    _conventions(fig)


def test_precision_map_without_params_many_layers_and_gaps():
    """No params: every box width 1. Past 20 layers every k-th name; a layer a map lacks stays blank; an unknown
    precision label gets a colour of its own."""
    df = _maps(45).drop(columns="params")
    df.loc[(df["map"] == "fallback 1%") & (df["layer"] == "features.3"), "precision"] = "int7 special"
    df = df[~((df["map"] == "budget 4.5 bits") & (df["layer"] == "features.5"))]
    fig = plot.precision_map(df)
    ax = fig.axes[0]
    boxes = _boxes(ax)
    assert len(boxes) == 45 + 44 and all(b.get_width() == 1.0 for b in boxes)
    second = boxes[45:]
    assert 5.0 not in {b.get_x() for b in second} and 6.0 in {b.get_x() for b in second}
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == [f"features.{i}" for i in range(0, 45, 3)]  # ceil(45 / 20) = 3
    assert np.allclose(ax.get_xticks(), np.arange(0, 45, 3) + 0.5)
    colours = {mcolors.to_hex(b.get_facecolor()) for b in boxes}
    assert len(colours) == 6  # float, int4, int8, mxfp4, int4 g32, int7 special
    assert [t.get_text() for t in ax.get_legend().get_texts()][-1] == "int7 special"
    _conventions(fig)


def test_precision_map_names_bad_input():
    df = _maps(3)
    with pytest.raises(ValueError, match="more than once"):
        plot.precision_map(pd.concat([df, df.iloc[:1]]))
    with pytest.raises(ValueError, match="'precision'"):
        plot.precision_map(df.drop(columns="precision"))
    bad = df.copy()
    bad.loc[0, "params"] = 0
    with pytest.raises(ValueError, match="params"):
        plot.precision_map(bad)


# ---- frontier -----------------------------------------------------------------------------------------------


def _points() -> pd.DataFrame:
    rows = []
    for method, base in (("uniform", 0.80), ("QAT mixed", 0.85)):
        for point, size in (("b3", 300.0), ("b1", 100.0), ("b2", 200.0)):  # not in size order
            for seed in (0, 1, 2):
                rows.append({"method": method, "point": point, "seed": seed, "size_kb": size,
                             "latency_ms": size / 100 + 0.01 * seed,
                             "acc": base + size / 10_000 + 0.01 * seed})  # fmt: skip
    return pd.DataFrame(rows)


def test_frontier_means_stds_and_reference():
    """Per method a line through the mean accuracy (%) per point, sorted by size, error bars = std over seeds
    (ddof=1); the FP32 reference a dashed, labelled line."""
    df = _points()
    fig = plot.frontier(df, reference=0.9, title="frontier")
    ax = fig.axes[0]
    assert len(ax.containers) == 2
    for container, (method, base) in zip(
        ax.containers, (("uniform", 0.80), ("QAT mixed", 0.85)), strict=True
    ):
        line = container.lines[0]
        assert container.get_label() == method
        assert list(line.get_xdata()) == [100.0, 200.0, 300.0]
        want = 100 * (base + np.array([100.0, 200.0, 300.0]) / 10_000 + 0.01)  # seeds 0, 1, 2: mean +0.01
        assert np.allclose(line.get_ydata(), want)
        assert container.has_yerr and not container.has_xerr  # size does not vary over seeds
        segments = container.lines[2][0].get_segments()
        assert np.allclose(
            [s[1][1] - s[0][1] for s in segments], 2 * 100 * 0.01
        )  # +-1 std (ddof=1) = 1 point
    ref = [ln for ln in ax.lines if ln.get_linestyle() == "--"]
    assert (
        len(ref) == 1 and list(ref[0].get_ydata()) == [90.0, 90.0] and ref[0].get_label() == "FP32 (90.00%)"
    )
    assert ax.get_xlabel() == "model size (KB)" and ax.get_ylabel() == "accuracy (%)"
    assert ax.get_title() == "frontier"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["FP32 (90.00%)", "uniform", "QAT mixed"]
    _conventions(fig)


def test_frontier_latency_axis_and_single_seed():
    """x = latency: the mean latency per point, horizontal bars where it varies over seeds; one seed: no bars."""
    df = _points()
    fig = plot.frontier(df, x="latency_ms")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "ONNX Runtime latency (ms)"
    assert np.allclose(ax.containers[0].lines[0].get_xdata(), [1.01, 2.01, 3.01])
    assert ax.containers[0].has_xerr
    one = df[df["seed"] == 0]
    fig = plot.frontier(one)
    for container in fig.axes[0].containers:
        assert not container.has_yerr and not container.has_xerr
    assert np.allclose(
        fig.axes[0].containers[1].lines[0].get_ydata(), 100 * (0.85 + np.array([1, 2, 3]) / 100)
    )
    _conventions(fig)
    with pytest.raises(ValueError, match="'acc'"):
        plot.frontier(df.drop(columns="acc"))
