"""Notebook 01's figures and explorer: the drawn data are the quantizer's numbers, and the controls change them."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch

from qatlab import QuantSpec, analysis, fake_quant, plot, widgets

S, Z = 0.25, 2
SPEC = QuantSpec(bits=3, symmetric=False)  # codes 0..7: grid [-0.5, 1.25]
X = torch.linspace(-1.5, 2.0, 281)  # step 0.0125: no value sits exactly on a rounding tie


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _fq(x, spec=SPEC, s=S, z=Z):
    return fake_quant(torch.as_tensor(x, dtype=torch.float32), torch.tensor([s]), torch.tensor([z]), spec)


def _code(x, s=S, z=Z):
    return np.round(np.asarray(x, dtype=np.float32) / np.float32(s)) + z


def _ydata(fig, ax, line=0):
    return np.asarray(fig.axes[ax].lines[line].get_ydata(), dtype=np.float64)


def _xdata(fig, ax, line=0):
    return np.asarray(fig.axes[ax].lines[line].get_xdata(), dtype=np.float64)


# ---- ste_curves -------------------------------------------------------------------------------------------


def test_ste_curves_forward_is_fake_quant_and_round_has_zero_gradient():
    df = analysis.ste_curves(X, S, Z, SPEC)
    assert isinstance(df, pd.DataFrame) and len(df) == X.numel()
    assert np.array_equal(df.fake_quant.values, _fq(X).numpy())
    assert np.allclose(df.error.values, X.numpy() - df.fake_quant.values)
    assert (df.grad_round_x == 0).all()
    # autograd's d/dS of S * (code - Z) with round' = 0 is just code - Z
    code = np.clip(_code(X), SPEC.qmin, SPEC.qmax)
    assert np.allclose(df.grad_round_scale.values, code - Z)


@pytest.mark.parametrize("ste", ["clipped", "identity", "lsq", "pact"])
def test_ste_curves_gradients_are_the_estimators(ste):
    df = analysis.ste_curves(X, S, Z, SPEC.with_(ste=ste))
    x, code = X.numpy(), _code(X)
    in_code = (code >= SPEC.qmin) & (code <= SPEC.qmax)
    alpha = S * (SPEC.qmax - Z)
    if ste == "identity":
        assert (df.grad_x == 1).all()
    elif ste == "pact":
        assert np.array_equal(df.grad_x.values, ((x >= S * (SPEC.qmin - Z)) & (x < alpha)).astype(np.float32))
    else:
        assert np.array_equal(df.grad_x.values, in_code.astype(np.float32))
    if ste in ("clipped", "identity"):
        assert df.grad_scale.isna().all() and df.grad_alpha.isna().all()
    elif ste == "lsq":
        residual = np.round(x / S) - x / S
        assert np.allclose(df.grad_scale.values[in_code], residual[in_code], atol=1e-5)
        assert (df.grad_scale.values[code < SPEC.qmin] == SPEC.qmin - Z).all()
        assert (df.grad_scale.values[code > SPEC.qmax] == SPEC.qmax - Z).all()
        assert df.grad_alpha.isna().all()
    else:
        assert (df.grad_alpha.values[x >= alpha] == 1).all()
        assert (df.grad_alpha.values[(x >= S * (SPEC.qmin - Z)) & (x < alpha)] == 0).all()
        assert np.allclose(df.grad_alpha.values, df.grad_scale.values / (SPEC.qmax - Z))


def test_ste_curves_per_value_scale_gradients_sum_to_the_per_tensor_gradient():
    spec = SPEC.with_(ste="lsq")
    df = analysis.ste_curves(X, S, Z, spec)
    s = torch.tensor([S], requires_grad=True)
    fake_quant(X, s, torch.tensor([Z]), spec, grad_factor=1.0).sum().backward()
    assert s.grad.item() == pytest.approx(df.grad_scale.sum(), rel=1e-5)


# ---- figures ----------------------------------------------------------------------------------------------


def test_plot_fake_quant_lines_are_staircase_error_and_gradients():
    spec = SPEC.with_(ste="lsq")
    fig = plot.plot_fake_quant(X, S, Z, spec)
    assert isinstance(fig, plt.Figure) and len(fig.axes) == 4
    xs = _xdata(fig, 0)
    assert np.allclose(xs, X.numpy())
    assert np.array_equal(_ydata(fig, 0, 0), _fq(xs).numpy().astype(np.float64))
    assert np.allclose(_ydata(fig, 0, 1), xs)  # identity reference
    assert np.allclose(_ydata(fig, 1), xs - _fq(xs).numpy(), atol=1e-6)
    df = analysis.ste_curves(X, S, Z, spec)
    assert np.array_equal(_ydata(fig, 2), df.grad_x.values)
    assert np.allclose(_ydata(fig, 3), df.grad_scale.values)


def test_plot_fake_quant_pact_clipped_and_no_gradients():
    fig = plot.plot_fake_quant(X, S, Z, SPEC.with_(ste="pact"))
    assert np.allclose(_ydata(fig, 3), analysis.ste_curves(X, S, Z, SPEC.with_(ste="pact")).grad_alpha.values)
    fig = plot.plot_fake_quant(X, S, Z, SPEC)  # clipped: S is fixed, nothing drawn for d/dS
    assert len(fig.axes[3].lines) == 0
    fig = plot.plot_fake_quant(X, S, Z, SPEC, gradients=False)
    assert len(fig.axes) == 2


def test_plot_ste_rows_show_each_estimators_gradient():
    fig = plot.plot_ste(X, S, Z, SPEC)
    rows = plot.STE_ROWS
    assert len(fig.axes) == 1 + 2 * len(rows)
    assert np.array_equal(_ydata(fig, 0), _fq(X).numpy().astype(np.float64))
    x, code = X.numpy(), _code(X)
    in_code = ((code >= SPEC.qmin) & (code <= SPEC.qmax)).astype(float)
    alpha = S * (SPEC.qmax - Z)
    expected_dx = {
        "round": np.zeros_like(x),
        "clipped": in_code,
        "identity": np.ones_like(x),
        "lsq": in_code,
        "pact": ((x >= S * (SPEC.qmin - Z)) & (x < alpha)).astype(float),
    }
    for i, r in enumerate(rows):
        ax_x, ax_p = 1 + 2 * i, 2 + 2 * i
        assert np.array_equal(_ydata(fig, ax_x), expected_dx[r]), r
        if r in ("clipped", "identity"):
            assert len(fig.axes[ax_p].lines) == 0, r
    lsq = analysis.ste_curves(X, S, Z, SPEC.with_(ste="lsq"))
    assert np.allclose(_ydata(fig, 2 + 2 * rows.index("lsq")), lsq.grad_scale.values)
    pact = _ydata(fig, 2 + 2 * rows.index("pact"))
    assert (pact[x >= alpha] == 1).all() and (pact[(x >= S * (SPEC.qmin - Z)) & (x < alpha)] == 0).all()


def test_plot_oscillation_and_sweep_draw_the_history():
    hist = pd.DataFrame(
        {"step": [1, 2, 3, 4], "latent": [0.24, 0.26, 0.24, 0.26], "quantized": [0.2, 0.3, 0.2, 0.3]}
    )
    fig = plot.plot_oscillation(hist, 0.23, 0.25, zoom=2)
    assert np.array_equal(_ydata(fig, 0, 0), hist.latent.values)
    assert np.array_equal(_ydata(fig, 0, 1), hist.quantized.values)
    assert np.allclose(_ydata(fig, 0, 2), 0.25) and np.allclose(_ydata(fig, 0, 3), 0.23)
    assert np.array_equal(_ydata(fig, 1, 0), hist.latent.values[-2:])  # zoom on the last steps
    assert np.allclose(_ydata(fig, 2), [0.2, 0.25, 0.7 / 3, 0.25])  # running mean of q(w)
    sweep = pd.DataFrame(
        {
            "w_star": [0.22, 0.25],
            "frac_upper": [0.2, 0.5],
            "predicted_frac_upper": [0.2, 0.5],
            "flips_per_step": [0.4, 0.8],
            "predicted_flips_per_step": [0.4, 1.0],
        }
    )
    fig = plot.plot_oscillation_sweep(sweep, 0.1)
    assert np.array_equal(_ydata(fig, 0, 0), sweep.frac_upper.values)
    assert np.array_equal(_ydata(fig, 1, 0), sweep.flips_per_step.values)
    assert np.array_equal(_ydata(fig, 1, 1), sweep.predicted_flips_per_step.values)


# ---- widget ------------------------------------------------------------------------------------------------


def _levels(fig):
    return np.unique(_ydata(fig, 0))


def test_update_fake_quant_more_bits_more_levels():
    counts = [
        len(_levels(widgets.update_fake_quant(bits=b, scale=0.25, zero_point=2 ** (b - 1))))
        for b in (2, 3, 4)
    ]
    assert counts == [4, 8, 16]
    many = len(_levels(widgets.update_fake_quant(bits=8, scale=0.25, zero_point=128)))
    assert many == 17  # 8 bits: the grid is wider than the plotted [-2, 2]; 17 levels of step 0.25 fit


def test_update_fake_quant_scale_zero_point_symmetric_and_ste():
    step = np.diff(_levels(widgets.update_fake_quant(bits=4, scale=0.1, zero_point=8)))
    assert np.allclose(step, 0.1, atol=1e-6)
    a = _levels(widgets.update_fake_quant(bits=3, scale=0.25, zero_point=0))
    b = _levels(widgets.update_fake_quant(bits=3, scale=0.25, zero_point=4))
    assert a.min() == 0.0 and b.min() == pytest.approx(-1.0)  # Z slides the grid by S per code
    clamped = _levels(widgets.update_fake_quant(bits=3, scale=0.25, zero_point=99))  # Z clamped to qmax = 7
    assert clamped.max() == 0.0 and len(clamped) == 8
    sym = _levels(widgets.update_fake_quant(bits=3, scale=0.25, zero_point=5, symmetric=True))
    assert sym.min() == pytest.approx(-1.0) and sym.max() == pytest.approx(0.75)  # Z forced to 0, codes -4..3
    clipped = _ydata(widgets.update_fake_quant(bits=2, scale=0.25, zero_point=2, ste="clipped"), 2)
    identity = _ydata(widgets.update_fake_quant(bits=2, scale=0.25, zero_point=2, ste="identity"), 2)
    assert (identity == 1).all() and 0 < clipped.mean() < 1
    lsq = widgets.update_fake_quant(bits=2, scale=0.25, zero_point=2, ste="lsq")
    assert len(lsq.axes[3].lines) == 1


def test_fake_quant_caption_states_the_grid_the_figure_draws():
    # hand-computed: 3-bit asymmetric codes 0..7, Z = 99 clamped to 7, so S * (q - Z) runs from -1.75 to 0
    assert widgets.fake_quant_caption(3, 0.25, 99, False, "clipped") == (
        "3-bit asymmetric grid: S = 0.25, Z = 7, codes 0..7 cover [-1.75, 0]; STE: clipped"
    )
    # symmetric: Z forced to 0, codes -4..3 (the figure's levels, as in the test above)
    caption = widgets.fake_quant_caption(3, 0.25, 5, True, "lsq")
    assert caption == "3-bit symmetric grid: S = 0.25, Z = 0, codes -4..3 cover [-1, 0.75]; STE: lsq"
    levels = _levels(widgets.update_fake_quant(bits=3, scale=0.25, zero_point=5, symmetric=True))
    assert (levels.min(), levels.max()) == (-1.0, 0.75)


def test_figure_png_is_the_tight_png_and_off_main_thread_redraws_warn():
    import struct
    import threading

    import matplotlib.pyplot as plt

    fig = widgets.update_fake_quant(bits=3, scale=0.25, zero_point=4)
    png = widgets.figure_png(fig)
    width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk
    full_w, full_h = (fig.get_size_inches() * fig.dpi).round()
    assert (
        png[:8] == b"\x89PNG\r\n\x1a\n" and 0.8 * full_w < width <= full_w and 0.8 * full_h < height <= full_h
    )
    out = widgets.W.Output()
    widgets.show_figure(out, fig, "main thread")  # no warning here (pytest's filter would not hide it)
    caught = []

    def off_main():
        with pytest.warns(RuntimeWarning, match="Kernel Comms over subshells") as rec:
            widgets.show_figure(out, widgets.update_fake_quant(bits=2, scale=0.5, zero_point=1), "thread")
        caught.extend(rec)

    t = threading.Thread(target=off_main)
    t.start()
    t.join()
    assert len(caught) == 1
    plt.close("all")


def test_explorer_controls_redraw_through_the_callback(monkeypatch):
    calls = []
    real = widgets.update_fake_quant

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(widgets, "update_fake_quant", spy)
    box = widgets.fake_quant_explorer()
    assert "qatlab-fq-explorer" in box._dom_classes

    def find(cls, w=box):
        if cls in getattr(w, "_dom_classes", ()):
            return w
        for child in getattr(w, "children", ()):
            found = find(cls, child)
            if found is not None:
                return found
        return None

    bits, zp, sym, ste = (find(f"qatlab-fq-{n}") for n in ("bits", "zero-point", "symmetric", "ste"))
    assert None not in (bits, zp, sym, ste, find("qatlab-fq-scale"), find("qatlab-fq-output"))
    assert len(calls) == 1
    bits.value = 6
    assert calls[-1][0] == 6 and zp.max == 63
    zp.value = 40
    bits.value = 3  # the zero point no longer fits: clamped to the 3-bit qmax, one redraw
    assert zp.value == 7 and calls[-1][:3] == (3, pytest.approx(widgets.FAKE_QUANT_SCALE), 7)
    n = len(calls)
    sym.value = True
    assert zp.disabled and calls[-1][3] is True and len(calls) == n + 1
    ste.value = "pact"
    assert calls[-1][4] == "pact"
