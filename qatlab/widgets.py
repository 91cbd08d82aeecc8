"""ipywidgets explorers for the notebooks (the only module that imports ipywidgets).

Each explorer is built from a plain ``update(...)`` function that redraws a figure from control values,
so tests call the callback without a browser and check that the figure data changed. Widgets carry CSS
classes (``add_class``) so browser tests can find them.
"""

from __future__ import annotations

import io
import threading
import warnings

import ipywidgets as W
import torch
from IPython.display import display

from qatlab import analysis, plot
from qatlab.config import QATConfig, QuantSpec
from qatlab.quant import sqnr


def tag(prefix: str, **controls: W.DOMWidget) -> None:
    """Give each control the CSS class ``{prefix}-{name}`` (underscores as dashes): how the browser tests
    (tests/test_jupyterlab.py) find an explorer's controls."""
    for name, widget in controls.items():
        widget.add_class(f"{prefix}-{name.replace('_', '-')}")


def figure_png(fig) -> bytes:
    """``fig`` as PNG bytes, cropped as the inline backend crops (``bbox_inches="tight"``)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


SUBSHELL_ADVICE = (
    "a qatlab explorer redraws on a thread other than the kernel's main one: JupyterLab sends widget "
    "messages to a kernel subshell (ipykernel >= 7), and matplotlib, not thread-safe, can then garble this "
    "figure or one a running cell draws. Fix: Settings > Settings Editor > Kernel > 'Kernel Comms over "
    "subshells' = Disabled (the labs `make lab` starts have it)"
)


def show_figure(out: W.Output, fig, caption: str = "") -> None:
    """Replace what ``out`` shows with ``caption`` (a line of text: the numbers the figure shows, readable
    without looking at the image) and ``fig`` as a PNG image (rendered first, then sent).

    Called off the main thread (JupyterLab's comms over kernel subshells), it warns with the fix: the figure
    may come out garbled there (tests/test_jupyterlab.py saw blank figures with only their titles).
    """

    import matplotlib.pyplot as plt
    from IPython.display import Image

    if threading.current_thread() is not threading.main_thread():
        warnings.warn(SUBSHELL_ADVICE, RuntimeWarning, stacklevel=2)
    png = figure_png(fig)
    plt.close(fig)
    with out:
        out.clear_output(wait=True)
        if caption:
            print(caption)
        display(Image(data=png))


# ---- 01 fake quantization and the STE ---------------------------------------------------------------------

FAKE_QUANT_X = (-2.0, 2.0, 1601)  # the explorer's fixed x axis: changing S visibly stretches the grid
# the explorer's first S, about 0.2512: a point of its log slider's grid (log10 steps of 0.01). 0.25 is not,
# and the browser would snap it and send it back, redrawing once for nothing.
FAKE_QUANT_SCALE = 10**-0.6


def update_fake_quant(
    bits: int = 4,
    scale: float = 0.25,
    zero_point: int = 8,
    symmetric: bool = False,
    ste: str = "clipped",
    x=None,
):
    """Redraw the quantization grid for these control values; returns the Figure (the explorer's callback).

    The zero point is forced to 0 on a symmetric grid and clamped into ``[qmin, qmax]`` otherwise, as a
    real quantizer would do. Figure layout: :func:`qatlab.plot.plot_fake_quant`.
    """

    spec, zp = _fake_quant_grid(bits, zero_point, symmetric, ste)
    if x is None:
        x = torch.linspace(*FAKE_QUANT_X)
    return plot.plot_fake_quant(x, float(scale), zp, spec, gradients=True)


def _fake_quant_grid(bits, zero_point, symmetric, ste):
    """The spec and the zero point the explorer uses: Z = 0 on a symmetric grid, else clamped into the codes."""

    spec = QuantSpec(bits=int(bits), symmetric=bool(symmetric), ste=ste)
    return spec, 0 if spec.symmetric else min(max(int(zero_point), spec.qmin), spec.qmax)


def fake_quant_caption(bits: int, scale: float, zero_point: int, symmetric: bool, ste: str) -> str:
    """The explorer's text line: the grid's codes and the real range they cover, ``S * (q - Z)``."""
    spec, zp = _fake_quant_grid(bits, zero_point, symmetric, ste)
    lo, hi = (scale * (q - zp) for q in (spec.qmin, spec.qmax))
    kind = "symmetric" if spec.symmetric else "asymmetric"
    return (
        f"{spec.bits}-bit {kind} grid: S = {scale:.4g}, Z = {zp}, codes {spec.qmin}..{spec.qmax} "
        f"cover [{lo:.4g}, {hi:.4g}]; STE: {spec.ste}"
    )


def fake_quant_explorer(x=None) -> W.VBox:
    """Sliders for bits, scale and zero point, a symmetric toggle and the STE; the figure redraws in place.

    Returns the widget box (display it in the notebook). CSS classes: ``qatlab-fq-explorer`` (the box),
    ``qatlab-fq-bits``, ``qatlab-fq-scale``, ``qatlab-fq-zero-point``, ``qatlab-fq-symmetric``,
    ``qatlab-fq-ste``, ``qatlab-fq-output``.
    """
    style = {"description_width": "90px"}
    bits = W.IntSlider(value=4, min=2, max=8, description="bits", style=style)
    scale = W.FloatLogSlider(
        value=FAKE_QUANT_SCALE,
        base=10,
        min=-2.5,
        max=0,
        step=0.01,
        description="scale S",
        readout_format=".3g",
        style=style,
    )
    zero_point = W.IntSlider(value=8, min=0, max=15, description="zero point Z", style=style)
    symmetric = W.ToggleButton(value=False, description="symmetric", tooltip="signed grid, Z = 0")
    ste = W.ToggleButtons(
        options=["clipped", "identity", "lsq", "pact"],
        value="clipped",
        description="STE",
        style={"description_width": "40px", "button_width": "70px"},
    )
    out = W.Output()
    tag("qatlab-fq", bits=bits, scale=scale, zero_point=zero_point, symmetric=symmetric, ste=ste, output=out)

    busy = []  # re-entry guard: shrinking the zero-point slider's max may move its value and call us again

    def redraw(_=None) -> None:
        if busy:
            return
        busy.append(True)
        try:
            zero_point.max = 2**bits.value - 1  # the asymmetric grid's qmax; clamps the value if needed
            zero_point.disabled = symmetric.value  # symmetric grids have Z = 0
            values = (bits.value, scale.value, zero_point.value, symmetric.value, ste.value)
            show_figure(out, update_fake_quant(*values, x=x), fake_quant_caption(*values))
        finally:
            busy.clear()

    for w in (bits, scale, zero_point, symmetric, ste):
        w.observe(redraw, names="value")
    redraw()
    box = W.VBox([W.HBox([W.VBox([bits, scale, zero_point]), W.VBox([symmetric, ste])]), out])
    box.add_class("qatlab-fq-explorer")
    return box


# ---- end 01 ------------------------------------------------------------------------------------------------


# ---- 02 quantization error ---------------------------------------------------------------------------------


def update_quant_error(tensors, layer: str, kind: str, bits: int, observer: str, per_channel: bool):
    """The histogram figure of one layer's weight or input activation under a spec (no widgets involved).

    ``tensors`` maps ``"weight"`` and ``"activation"`` to ``{layer: tensor}``; activations are always per
    tensor (as the lab quantizes them).
    """

    x = tensors[kind][layer]
    weight = kind == "weight"
    spec = QuantSpec(bits=bits, symmetric=weight, per_channel=per_channel and weight, observer=observer)
    x_hat, scale, zp = analysis.quantize_tensor(x, spec)
    granularity = "per-channel" if spec.per_channel else "per-tensor"
    title = f"{layer} {kind}: {bits} bits, {observer}, {granularity}, SQNR {sqnr(x, x_hat):.1f} dB"
    return plot.quant_histogram(x, x_hat, scale, zp, spec, title=title)


def quant_error_explorer(tensors) -> W.VBox:
    """Pick a layer, weight or activation, bit width, observer and granularity; the histograms update.

    CSS classes: ``qatlab-qe-explorer`` (the box), ``qatlab-qe-layer``, ``qatlab-qe-kind``, ``qatlab-qe-bits``,
    ``qatlab-qe-observer``, ``qatlab-qe-per-channel``, ``qatlab-qe-output``. The text line above the figure is
    its title (layer, spec, SQNR).
    """
    layers = list(tensors["weight"])
    layer = W.Dropdown(options=layers, value=layers[0], description="layer")
    kind = W.ToggleButtons(options=["weight", "activation"], value="weight")
    bits = W.IntSlider(value=4, min=2, max=8, description="bits", continuous_update=False)
    observer = W.Dropdown(
        options=["minmax", "ema", "percentile", "mse"], value="minmax", description="observer"
    )
    per_channel = W.Checkbox(value=False, description="per-channel weights")
    out = W.Output()
    tag(
        "qatlab-qe", layer=layer, kind=kind, bits=bits, observer=observer, per_channel=per_channel, output=out
    )

    def redraw(_=None):
        fig = update_quant_error(
            tensors, layer.value, kind.value, bits.value, observer.value, per_channel.value
        )
        show_figure(out, fig, fig.axes[0].get_title())

    for control in (layer, kind, bits, observer, per_channel):
        control.observe(redraw, names="value")
    redraw()
    return W.VBox([W.HBox([layer, kind]), W.HBox([bits, observer, per_channel]), out]).add_class(
        "qatlab-qe-explorer"
    )


# ---- end 02 ------------------------------------------------------------------------------------------------


# ---- 03 BatchNorm folding ----------------------------------------------------------------------------------


def update_bn_fold(layers, layer: str, bits: int = 8):
    """The per-channel figure of one layer (the explorer's callback; no widgets involved).

    ``layers`` maps a layer name to ``(conv weight, BN-folded weight)``. Layout: :func:`qatlab.plot.bn_channel_ranges`.
    """
    weight, folded = layers[layer]
    st = analysis.bn_fold_channel_stats(weight, folded, bits)
    zeroed = int((st["sqnr_per_tensor"] == 0).sum())  # all codes 0: the channel is gone after quantization
    title = (
        f"{layer} {tuple(weight.shape)} at {bits} bits: median channel SQNR "
        f"{st['sqnr_per_tensor'].median():.1f} dB per tensor, {st['sqnr_per_channel'].median():.1f} dB per "
        f"channel; {zeroed} channel(s) all zero with a per-tensor scale"
    )
    return plot.bn_channel_ranges(
        st["max_before"], st["max_after"], st["sqnr_per_tensor"], st["sqnr_per_channel"], bits, title=title
    )


def bn_fold_explorer(layers, layer: str | None = None, bits: int = 8) -> W.VBox:
    """Pick a conv layer and a bit width; see its per-channel ranges before/after folding and the SQNR of
    each folded channel per tensor vs per channel. CSS classes: ``qatlab-bn-explorer`` (the box),
    ``qatlab-bn-layer``, ``qatlab-bn-bits``, ``qatlab-bn-output``."""
    names = list(layers)
    pick = W.Dropdown(options=names, value=layer or names[0], description="layer")
    nbits = W.IntSlider(value=bits, min=2, max=8, description="bits", continuous_update=False)
    out = W.Output()
    tag("qatlab-bn", layer=pick, bits=nbits, output=out)

    def redraw(_=None) -> None:
        fig = update_bn_fold(layers, pick.value, nbits.value)
        show_figure(out, fig, fig.get_suptitle())

    pick.observe(redraw, names="value")
    nbits.observe(redraw, names="value")
    redraw()
    return W.VBox([W.HBox([pick, nbits]), out]).add_class("qatlab-bn-explorer")


# ---- end 03 ------------------------------------------------------------------------------------------------


# ---- 10 number formats -------------------------------------------------------------------------------------


def update_format_error(tensors, specs, layer: str, kind: str, fmt: str):
    """The error histogram of one layer's weight or input activation in one format (no widgets involved), with
    the SQNR, the bits per element and the saturated fraction in the title.

    ``tensors`` maps ``"weight"`` and ``"activation"`` to ``{layer: tensor}``; ``specs`` maps a format name to
    its :class:`~qatlab.config.QuantSpec`, or to a :class:`~qatlab.config.QATConfig` whose weight or activation
    spec is used according to ``kind``.
    """
    x = tensors[kind][layer]
    spec = specs[fmt]
    if isinstance(spec, QATConfig):
        spec = spec.weight if kind == "weight" else spec.activation
    table = analysis.sqnr_table({layer: x}, {fmt: spec}, kind=kind)
    row = table.iloc[0]
    x_hat, _, _ = analysis.quantize_tensor(x, spec, is_weight=kind == "weight")
    title = (
        f"{layer} {kind}, {fmt}: SQNR {row['sqnr_db']:.1f} dB, {row['bits_per_element']:.2f} bits/element, "
        f"{100 * row['clipped_frac']:.2f}% saturated"
    )
    return plot.format_error_histograms(x, {fmt: x_hat}, title=title)


def format_explorer(tensors, specs) -> W.VBox:
    """Pick a number format, a layer and weight or activation; the error histogram and its numbers update.

    CSS classes: ``qatlab-fmt-explorer`` (the box), ``qatlab-fmt-format``, ``qatlab-fmt-layer``,
    ``qatlab-fmt-kind``, ``qatlab-fmt-output``.
    """
    layers = list(tensors["weight"])
    fmt = W.Dropdown(options=list(specs), value=next(iter(specs)), description="format")
    layer = W.Dropdown(options=layers, value=layers[0], description="layer")
    kind = W.ToggleButtons(options=["weight", "activation"], value="weight")
    out = W.Output()
    tag("qatlab-fmt", format=fmt, layer=layer, kind=kind, output=out)

    def redraw(_=None):
        fig = update_format_error(tensors, specs, layer.value, kind.value, fmt.value)
        show_figure(out, fig, fig.axes[0].get_title())

    for control in (fmt, layer, kind):
        control.observe(redraw, names="value")
    redraw()
    return W.VBox([W.HBox([fmt, layer, kind]), out]).add_class("qatlab-fmt-explorer")
