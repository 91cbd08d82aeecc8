"""The integer walk-through of a QDQ conv: hand-computed steps, the fixed-point multiplier, and code-for-code
agreement with ONNX Runtime, both inside the exported file and as a one-node QLinearConv (and, under qemu's
Haswell CPU, with ORT's saturating AVX2 kernels)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import qatlab
from qatlab import QATConfig, export, integer, saturation
from qatlab.data import digits_loaders
from qatlab.models import build_model

CONVS = ("features.0", "features.3", "features.6")  # the digits CNN's convs, each followed by ReLU and Q


def _tiny(**overrides) -> integer.IntegerConv:
    """One output channel, a 2x2 kernel on a 2x2 input with one input channel: one output value."""
    fields = dict(
        name="tiny",
        x_scale=np.float32(0.5),
        x_zero=10,
        w=np.array([[[[1, -2], [3, 4]]]], np.int8),
        w_scale=np.array([0.25], np.float32),
        w_zero=np.array([0]),
        bias=np.array([1.0], np.float32),
        y_scale=np.float32(1.0),
        y_zero=0,
        y_dtype=np.uint8,
        relu=True,
        pads=(0, 0, 0, 0),
        strides=(1, 1),
        dilations=(1, 1),
        group=1,
    )
    return integer.IntegerConv(**{**fields, **overrides})


def test_steps_by_hand():
    layer = _tiny()
    x = np.array([[[[12, 10], [20, 9]]]], np.uint8)  # minus z_x = 10: [[2, 0], [10, -1]]
    acc, clipped = integer.accumulate(layer, x)
    # 2*1 + 0*(-2) + 10*3 + (-1)*4 = 28; bias 1.0 on the grid s_x*s_w = 0.125 is 8 codes
    assert layer.bias_codes.tolist() == [8] and acc.reshape(-1).tolist() == [36] and clipped == 0
    assert layer.multiplier.tolist() == [0.125]
    assert integer.requantize(layer, acc).reshape(-1).tolist() == [4]  # 36 * 0.125 = 4.5 -> 4 (half to even)
    assert integer.requantize_fixed_point(layer, acc).reshape(-1).tolist() == [5]  # the shift rounds half up
    negative = _tiny(bias=np.array([-10.0], np.float32))  # 28 - 80 = -52 -> -6.5: the clamp at 0 is the ReLU
    assert integer.requantize(negative, integer.accumulate(negative, x)[0]).reshape(-1).tolist() == [0]


def test_fixed_point_multiplier():
    m0, shift = integer.fixed_point(np.array([0.5, 0.75, 0.003, 1 - 2**-40]))
    assert m0.tolist()[:2] == [2**30, 3 * 2**29] and shift.tolist()[:2] == [0, 0]
    assert ((m0 >= 2**30) & (m0 < 2**31)).all()  # 1 - 2**-40 rounds up to 2**31: carried into the shift
    m = m0 * 2.0 ** -(31 + shift)
    assert np.allclose(m, [0.5, 0.75, 0.003, 1.0], rtol=2**-30, atol=0)
    for bad in (0.0, 1.0, -0.1, np.nan):
        with pytest.raises(ValueError, match="multiplier"):
            integer.fixed_point(np.array([bad]))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The digits CNN, briefly trained, PTQ W8A8 (per-channel weights), exported."""
    train, test = digits_loaders(batch_size=64, seed=0)
    torch.manual_seed(0)
    model = build_model("cnn")
    qatlab.fit(model, train, epochs=2, lr=0.05, progress=False)
    q = qatlab.ptq(model.eval(), QATConfig(), train, num_batches=4)
    x = torch.cat([x for x, _ in test])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a saturating CPU warns at export: not the subject here
        path = export.export_onnx(q, tmp_path_factory.mktemp("int") / "cnn_w8a8.onnx", x[:1])
    return path, x


@pytest.mark.parametrize("name", CONVS)
def test_walkthrough_matches_onnx_runtime_code_for_code(exported, name):
    path, x = exported
    layer = integer.conv_layer(path, name, x)
    assert layer.relu and layer.y_dtype is np.uint8 and layer.y_zero == 0 and (layer.w_zero == 0).all()
    x_codes, ort_y = integer.ort_layer_codes(path, name, x)
    steps = integer.walkthrough(layer, x_codes)  # saturating where this CPU saturates
    assert steps["saturate"] == saturation.cpu_int8().saturates
    assert np.array_equal(steps["y"], ort_y)  # ORT's fused kernel inside the file
    assert np.array_equal(steps["y"], integer.run_qlinearconv(layer, x_codes))  # the one-node QLinearConv
    assert (ort_y > 0).mean() > 0.1  # not a trivially all-zero layer
    # integer-only requantization: at most one code away, rarely (measured 0 to 1 in 1.6M codes on Fashion)
    diff = np.abs(steps["y_fixed_point"].astype(int) - steps["y"].astype(int))
    assert diff.max() <= 1 and diff.mean() < 1e-3


def test_clear_errors(exported):
    path, x = exported
    with pytest.raises(ValueError, match="name='head'.*features.0"):
        integer.conv_layer(path, "head", x)


_QEMU_CODES = """
import sys, numpy as np
from qatlab import integer, saturation
path, x = sys.argv[1], np.load(sys.argv[2])
for name in sys.argv[3:]:
    x_codes, y_codes = integer.ort_layer_codes(path, name, x)
    np.save(f"{sys.argv[2]}.{name}.x.npy", x_codes); np.save(f"{sys.argv[2]}.{name}.y.npy", y_codes)
print(saturation.cpu_int8().kind)
"""


def test_saturating_walkthrough_matches_onnx_runtime_on_an_avx2_cpu_without_vnni(
    exported, tmp_path, on_haswell
):
    path, x = exported
    np.save(tmp_path / "x.npy", x.numpy())
    assert on_haswell(_QEMU_CODES, path, tmp_path / "x.npy", *CONVS).split()[-1] == "avx2-no-vnni"
    clipped_total = 0
    for name in CONVS:
        layer = integer.conv_layer(path, name, x)
        x_codes, haswell_y = (np.load(tmp_path / f"x.npy.{name}.{k}.npy") for k in ("x", "y"))
        steps = integer.walkthrough(layer, x_codes, saturate=True)
        assert np.array_equal(steps["y"], haswell_y), name
        clipped_total += steps["clipped_pairs"]
    assert clipped_total > 0  # the file does saturate there: the test is not vacuous


def test_trace_and_channel_table_agree_with_the_whole_layer(exported):
    path, x = exported
    layer = integer.conv_layer(path, "features.3", x)
    x_codes, _ = integer.ort_layer_codes(path, "features.3", x[:8])
    acc, _ = integer.accumulate(layer, x_codes)  # exact sums, as the trace
    y = integer.requantize(layer, acc)
    for at in (
        np.unravel_index(int(y.argmax()), y.shape),
        (0, 1, 0, 0),
        (3, 2, 1, 2),
    ):  # the top code, a corner
        steps = integer.trace(layer, x_codes, tuple(int(i) for i in at))["value"]
        assert steps["= int32 accumulator"] == acc[at]
        assert steps["clamp to [0, 255] (the ReLU) = output code"] == y[at]
        assert steps["terms (C/group x kh x kw)"] == layer.w[0].size
    table = integer.channel_table(layer, channels=3)
    assert list(table.index) == [0, 1, 2]
    assert np.allclose(table["m0"] * 2.0 ** -table["shift"], table["M"], rtol=2**-30)
    assert (table["bias_codes"] == layer.bias_codes[:3]).all()
