"""Plots and the explorer of notebook 10 (number formats): figure data equal the numbers given; the callback
follows its controls."""

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from qatlab import QuantSpec, formats, plot, widgets  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    """Every figure a test opens is closed after it, those drawn inside widget callbacks included."""
    yield
    matplotlib.pyplot.close("all")


def test_format_lattices_draw_every_non_negative_value():
    """Each row holds the format's non-negative values over its maximum: 8 for int4 (0..7) and E2M1."""
    fig = plot.format_lattices(("int4", "e2m1", "e4m3"))
    linear = fig.axes[0]
    xs = [np.asarray(line.get_xdata()) for line in linear.lines]
    assert [len(x) for x in xs] == [8, 8, 127]  # E4M3: 0 and 126 positive finite values
    assert np.allclose(xs[0], np.arange(8) / 7)
    assert np.allclose(xs[1], np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6]) / 6)
    assert [t.get_text() for t in linear.get_yticklabels()][1] == "e2m1 (15 values)"
    matplotlib.pyplot.close(fig)


def test_block_scale_row_plots_values_and_errors():
    torch.manual_seed(0)
    row = torch.randn(64)
    row[5] = 8.0  # an outlier in the first block
    q = {"mxfp4": formats.fake_quant(row[None], QuantSpec(format="mxfp4"))[0]}
    fig = plot.block_scale_row(row, q, block=32)
    top, bottom = fig.axes[:2]
    assert np.allclose(top.lines[0].get_ydata(), row.numpy())
    assert np.allclose(top.lines[1].get_ydata(), q["mxfp4"].numpy())
    assert np.allclose(bottom.lines[0].get_ydata(), (q["mxfp4"] - row).numpy())
    # the second block (no outlier) keeps a finer scale: its largest error is smaller than the first block's
    err = (q["mxfp4"] - row).abs()
    assert err[32:].max() < err[:32].max()
    matplotlib.pyplot.close(fig)


def test_format_error_histograms_count_every_element():
    torch.manual_seed(1)
    x = torch.randn(50, 64)
    q = {n: formats.fake_quant(x, QuantSpec(format=n)) for n in ("mxfp4", "nvfp4")}
    fig = plot.format_error_histograms(x, q)
    assert len(fig.axes[0].patches) == 2
    # each step outline spans the errors: its bins reach the largest |error| (in standard deviations)
    span = max(float((v - x).abs().max()) for v in q.values()) / float(x.std())
    for patch in fig.axes[0].patches:
        xs = patch.get_path().vertices[:, 0]
        assert xs.min() == pytest.approx(-span, rel=1e-5) and xs.max() == pytest.approx(span, rel=1e-5)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["mxfp4", "nvfp4"]
    matplotlib.pyplot.close(fig)


def test_format_error_callback_follows_the_controls():
    """The title carries the SQNR: NVFP4 (finer block scales) beats MXFP4 on a Gaussian weight, FP8 beats both;
    the activation view works on a 4-D tensor (blocked along its channels)."""
    torch.manual_seed(2)
    tensors = {"weight": {"l": torch.randn(32, 64, 3, 3)}, "activation": {"l": torch.rand(8, 64, 5, 5)}}
    specs = {n: QuantSpec(format=n) for n in ("mxfp4", "nvfp4", "fp8_e4m3")}

    def sqnr(fig):
        return float(fig.axes[0].get_title().split("SQNR ")[1].split(" dB")[0])

    values = {n: sqnr(widgets.update_format_error(tensors, specs, "l", "weight", n)) for n in specs}
    assert values["fp8_e4m3"] > values["nvfp4"] > values["mxfp4"]
    fa = widgets.update_format_error(tensors, specs, "l", "activation", "nvfp4")
    assert "activation" in fa.axes[0].get_title() and "4.50 bits/element" in fa.axes[0].get_title()
    # a QATConfig per format: the weight view uses its weight spec, the activation view its activation spec
    arms = formats.comparison_arms(32)
    fw = widgets.update_format_error(tensors, arms, "l", "weight", "8da4w")
    fx = widgets.update_format_error(tensors, arms, "l", "activation", "8da4w")
    assert (
        "5.00 bits/element" in fw.axes[0].get_title() and "8.50 bits/element" in fx.axes[0].get_title()
    )  # + a float32 scale per 64
    box = widgets.format_explorer(tensors, specs)
    assert "qatlab-fmt-explorer" in box._dom_classes
    for f in matplotlib.pyplot.get_fignums():
        matplotlib.pyplot.close(f)


def test_describe_lists_bits_per_element():
    table = formats.describe(
        {"int4 g32": QuantSpec(bits=4, symmetric=True, group_size=32), "mxfp4": QuantSpec(format="mxfp4")}
    )
    assert list(table["scale per"]) == ["32 elements", "32 elements"]
    assert table["bits per element"].tolist() == pytest.approx([5.0, 4.25])
