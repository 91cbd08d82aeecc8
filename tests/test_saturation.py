"""ONNX Runtime's int8 kernels by CPU class: the classifier, the pairwise int16 model against hand-computed
sums and a brute-force loop, the emulator against the reference evaluator and (under qemu's Haswell CPU, AVX2
without VNNI) against the real saturating kernels, the layers at risk, and verify_onnx's diagnosis."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import qatlab
from qatlab import QATConfig, QuantSpec, export, saturation
from qatlab.data import digits_loaders
from qatlab.models import build_model

W8_PER_CHANNEL = QATConfig()  # int8 symmetric per-channel weights (full range), uint8 activations
W8_REDUCED = QATConfig(weight=QuantSpec(bits=8, symmetric=True, per_channel=True, reduce_range=True))
A8_REDUCED = QATConfig(activation=QuantSpec(bits=8, observer="ema", reduce_range=True))


@pytest.fixture(scope="module")
def digits():
    train, test = digits_loaders(batch_size=64, seed=0)
    return train, torch.cat([x for x, _ in test])  # (450, 1, 8, 8)


@pytest.fixture(scope="module")
def files(digits, tmp_path_factory):
    """Digits CNN and depthwise CNN, briefly trained, exported with full-range and reduced-range grids."""
    train, x_test = digits
    folder = tmp_path_factory.mktemp("sat")
    out = {}
    for name in ("cnn", "dwcnn"):
        torch.manual_seed(0)
        model = build_model(name)
        qatlab.fit(model, train, epochs=2, lr=0.05, progress=False)
        for tag, cfg in (("w8", W8_PER_CHANNEL), ("w8rr", W8_REDUCED), ("a8rr", A8_REDUCED)):
            q = qatlab.ptq(model.eval(), cfg, train, num_batches=4)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a saturating CPU warns here; tested below
                out[(name, tag)] = (q, export.export_onnx(q, folder / f"{name}_{tag}.onnx", x_test[:1]))
    return out


def _lsb(ref: np.ndarray) -> float:
    return float(ref.max() - ref.min()) / 255


# ---- the CPU classes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "machine, features, kind",
    [
        ("x86_64", {"SSE42", "AVX", "AVX2"}, "avx2-no-vnni"),  # Haswell .. Skylake client, AMD Zen 1-3
        ("x86_64", {"AVX2", "AVX512F", "AVX512BW"}, "avx2-no-vnni"),  # Skylake-SP: AVX-512 without VNNI
        ("x86_64", {"AVX2", "AVX512BW", "AVX512VNNI"}, "vnni"),  # Cascade Lake, Ice Lake, Zen 4
        ("AMD64", {"AVX2", "AVX_VNNI"}, "vnni"),  # Alder Lake (VEX-encoded VNNI)
        ("x86_64", {"AVX2", "AVX512VNNI", "AMX_INT8"}, "amx"),  # Sapphire Rapids
        ("x86_64", {"SSE42"}, "x86-sse"),
        ("aarch64", {"ASIMD", "ASIMDDP"}, "arm64"),
        ("arm64", set(), "arm64"),
        ("riscv64", set(), "other"),
    ],
)
def test_classify_cpu(machine, features, kind):
    cpu = saturation.classify_cpu(machine, features)
    assert cpu.kind == kind
    assert cpu.saturates == (kind == "avx2-no-vnni")


def test_this_cpu_is_classified():
    cpu = saturation.cpu_int8()
    assert cpu.kind in saturation.CPU_KINDS and cpu.description


# ---- the pairwise int16 model -------------------------------------------------------------------------------


def test_int_matmul_hand_computed_pairs():
    a = np.array([[255, 255, 255, 255]])
    w = np.array([[127, -128, 127, 100], [127, -128, -128, 100], [1, 1, 1, 1], [0, 0, 0, 0]])
    exact, n_exact = saturation.int_matmul(a, w, saturate=False)
    assert (
        exact.tolist() == [[255 * 254 + 255, -255 * 256 + 255, -255 + 255, 255 * 200 + 255]] and n_exact == 0
    )
    sat, clipped = saturation.int_matmul(a, w, saturate=True)
    # pair (0, 1): 64770 -> 32767; -65280 -> -32768; 127 - 128: no clip; 51000 -> 32767; pair (2, 3) is 255
    assert sat.tolist() == [[32767 + 255, -32768 + 255, -255 + 255, 32767 + 255]] and clipped == 3
    # an odd reduction length pairs the last element with a zero
    sat, clipped = saturation.int_matmul(np.array([[255, 255, 255]]), np.array([[127], [127], [127]]), True)
    assert sat.tolist() == [[32767 + 255 * 127]] and clipped == 1


def test_int_matmul_matches_a_brute_force_loop():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=(37, 11))
    w = rng.integers(-128, 128, size=(11, 5))
    sat, clipped = saturation.int_matmul(a, w, saturate=True)
    loop, count = np.zeros((37, 5), np.int64), 0
    for p, n in itertools.product(range(37), range(5)):
        for k in range(0, 11, 2):
            s = a[p, k] * w[k, n] + (a[p, k + 1] * w[k + 1, n] if k + 1 < 11 else 0)
            count += not -32768 <= s <= 32767
            loop[p, n] += min(max(s, -32768), 32767)
    assert np.array_equal(sat, loop) and clipped == count > 0
    assert np.array_equal(saturation.int_matmul(a, w, saturate=False)[0], a @ w)


# ---- the layers at risk --------------------------------------------------------------------------------------


def _qdq_conv_file(path, weights: np.ndarray, group: int = 1):
    """DQ(uint8 x) and DQ(int8 codes) -> Conv -> Q -> DQ: the pattern ONNX Runtime fuses into QLinearConv."""
    cout, cin_g, k, _ = weights.shape
    cin = cin_g * group
    f32 = lambda v, n: numpy_helper.from_array(np.asarray(v, np.float32), n)  # noqa: E731
    inits = [
        f32(0.02, "sx"),
        numpy_helper.from_array(np.array(0, np.uint8), "zx"),
        numpy_helper.from_array(weights.astype(np.int8), "wq"),
        f32(np.full(cout, 0.01), "sw"),
        numpy_helper.from_array(np.zeros(cout, np.int8), "zw"),
        f32(0.5, "sy"),
        numpy_helper.from_array(np.array(0, np.uint8), "zy"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
        helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], axis=0),
        helper.make_node("Conv", ["xd", "wd"], ["c"], name="conv", group=group, pads=[1, 1, 1, 1]),
        helper.make_node("QuantizeLinear", ["c", "sy", "zy"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "sy", "zy"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


def test_layers_at_risk_counts_hand_placed_pairs(tmp_path):
    w = np.zeros(
        (3, 4, 3, 3), np.int8
    )  # 3 output channels, 4 input channels: K = 36, pairs = channels (0,1), (2,3)
    w[0, 0, 1, 1] = w[0, 1, 1, 1] = 127  # same tap, channels 0 and 1: one pair, 255 * 254 > 32767
    w[1, 0, 0, 0] = w[1, 2, 0, 0] = 127  # channels 0 and 2 are not neighbours: no risky pair
    w[2, 2, 2, 2], w[2, 3, 2, 2] = -128, -1  # 255 * 129 = 32895 > 32768: risky at the negative end
    path = _qdq_conv_file(tmp_path / "conv.onnx", w)
    (layer,) = saturation.integer_layers(path)
    assert layer.kernel == "QLinearConv" and layer.u8s8 and layer.x_max_code == 255
    risk = saturation.layers_at_risk(path)
    assert risk["risky_pairs"].tolist() == [2] and risk["pairs"].tolist() == [18 * 3]
    assert risk["worst"].iloc[0] == pytest.approx(255 * 254 / 32767)
    # the emulator clips exactly the sums the probe predicts: all-255 input codes hit both pairs at the centre taps
    x = np.full((1, 4, 6, 6), 255 * 0.02, np.float32)
    _, clipped = saturation.emulate(path, x)
    assert clipped["conv"] > 0
    w[2, 3, 2, 2] = 0  # -128 alone: 255 * 128 = 32640 fits
    risk = saturation.layers_at_risk(_qdq_conv_file(tmp_path / "conv2.onnx", w))
    assert risk["risky_pairs"].tolist() == [1]


def test_layers_at_risk_by_grid(files):
    risk = {key: saturation.layers_at_risk(path) for key, (_, path) in files.items()}
    full = risk[("cnn", "w8")]
    assert full["at_risk"].all() and (full["worst"] > 1).all() and (full["x_max_code"] == 255).all()
    # 7-bit weights: 255 * (63 + 63) < 32767; 7-bit activations: 127 * (127 + 127) < 32767
    for key in (("cnn", "w8rr"), ("cnn", "a8rr"), ("dwcnn", "w8rr"), ("dwcnn", "a8rr")):
        assert not risk[key]["at_risk"].any() and (risk[key]["worst"] < 1).all(), key
    assert (risk[("cnn", "a8rr")]["x_max_code"] == 127).all()
    # depthwise convs run in ORT's int32 depthwise kernel: never at risk
    dw = risk[("dwcnn", "w8")]
    model = files[("dwcnn", "w8")][0]
    depthwise = {n for n, m in model.named_modules() if getattr(m, "groups", 1) > 1}
    assert depthwise and set(dw["layer"]) >= depthwise
    assert not dw.set_index("layer").loc[sorted(depthwise), "u8s8"].any()
    assert dw["at_risk"].any()  # the pointwise and full convs are


# ---- the emulator against the reference and the real kernels --------------------------------------------------


def test_emulator_without_saturation_is_the_reference(files, digits):
    _, x_test = digits
    for key in (("cnn", "w8"), ("dwcnn", "w8"), ("cnn", "a8rr")):
        path = files[key][1]
        ref = saturation.run_reference(path, [x_test.numpy()])[0]
        exact, clipped = saturation.emulate(path, x_test, saturate=False)
        # integer accumulation vs float32 sums: the same codes up to rare rounding ties (measured: 0.0-0.4 LSB)
        assert np.abs(exact - ref).max() <= 1.0 * _lsb(ref) and sum(clipped.values()) == 0, key
        assert (exact.argmax(1) == ref.argmax(1)).mean() >= 0.995, key


def test_emulated_saturation_breaks_full_range_and_spares_reduced_range(files, digits):
    _, x_test = digits
    ref = saturation.run_reference(files[("cnn", "w8")][1], [x_test.numpy()])[0]
    sat, clipped = saturation.emulate(files[("cnn", "w8")][1], x_test)
    # measured on the digits CNN: 28.6 output LSB, argmax agreement 0.967, 62,454 clipped sums in the first conv
    assert np.abs(sat - ref).max() > 5 * _lsb(ref) and sum(clipped.values()) > 100
    for key in (("cnn", "w8rr"), ("cnn", "a8rr"), ("dwcnn", "w8rr")):
        path = files[key][1]
        ref = saturation.run_reference(path, [x_test.numpy()])[0]
        sat, clipped = saturation.emulate(path, x_test)
        assert sum(clipped.values()) == 0 and np.abs(sat - ref).max() <= 1.0 * _lsb(ref), key


_QEMU_ORT = """
import sys, numpy as np, onnxruntime as ort
from qatlab import saturation
so = ort.SessionOptions(); so.intra_op_num_threads = 1; so.log_severity_level = 3
for path in sys.argv[2:]:
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    np.save(path + ".out.npy", s.run(None, {s.get_inputs()[0].name: np.load(sys.argv[1])})[0])
print(saturation.cpu_int8().kind)
"""


def test_emulator_matches_onnx_runtime_on_an_avx2_cpu_without_vnni(files, digits, tmp_path, on_haswell):
    """ONNX Runtime itself on qemu's Haswell CPU (AVX2, no VNNI): its int8 kernels saturate, as on such a real
    CPU; the emulator reproduces them and the reduced-range files are exact there."""
    _, x_test = digits
    np.save(tmp_path / "x.npy", x_test.numpy())
    paths = [str(files[key][1]) for key in (("cnn", "w8"), ("dwcnn", "w8"), ("cnn", "w8rr"), ("cnn", "a8rr"))]
    stdout = on_haswell(_QEMU_ORT, tmp_path / "x.npy", *paths)
    assert stdout.split()[-1] == "avx2-no-vnni"  # the classifier reads the emulated CPU's CPUID
    for path in paths:
        haswell = np.load(path + ".out.npy")
        ref = saturation.run_reference(path, [x_test.numpy()])[0]
        emulated, clipped = saturation.emulate(path, x_test)
        lsb = _lsb(ref)
        # measured: emulator vs ORT on Haswell 0.00 LSB on all four files (bit-identical outputs)
        assert np.abs(emulated - haswell).max() <= 0.5 * lsb, path
        assert (emulated.argmax(1) == haswell.argmax(1)).all(), path
        if path.endswith("_w8.onnx"):  # full range: ORT really saturates (measured 28.6 and 13.7 LSB)
            assert np.abs(haswell - ref).max() > 5 * lsb and sum(clipped.values()) > 0, path
        else:  # reduced range: the same as the reference
            assert np.abs(haswell - ref).max() <= 1.0 * lsb and sum(clipped.values()) == 0, path


# ---- verify_onnx's diagnosis and export_onnx's warning, on any CPU ---------------------------------------------


@pytest.fixture
def as_avx2(monkeypatch):
    """This process treated as an AVX2-without-VNNI CPU: the class, and ORT's output replaced by the emulator's."""
    monkeypatch.setattr(saturation, "cpu_int8", lambda: saturation.CPU_KINDS["avx2-no-vnni"])
    monkeypatch.setattr(
        export, "ort_outputs", lambda path, inputs, threads=1: saturation.emulate(path, inputs)[0]
    )


def test_verify_onnx_reports_both_parities(files, digits):
    _, x_test = digits
    model, path = files[("cnn", "w8")]
    r = export.verify_onnx(model, path, x_test)
    assert (
        r["semantic_passed"] and r["semantic_diff_in_lsb"] <= 1.0 and r["semantic_argmax_agreement"] >= 0.999
    )
    assert r["cpu_int8"] == saturation.cpu_int8().kind
    assert r["layers_at_risk"] == [
        "features.0",
        "features.3",
        "features.6",
    ]  # the last conv and the head: float
    assert r["saturates_here"] == saturation.cpu_int8().saturates
    if r["saturates_here"]:
        assert not r["passed"] and r["diagnosis"] and r["ok"]
    else:
        assert r["passed"] and r["diagnosis"] is None and r["ok"]


def test_diagnosis_names_cause_layers_and_fix(files, digits, as_avx2):
    _, x_test = digits
    model, path = files[("cnn", "w8")]
    r = export.verify_onnx(model, path, x_test)
    assert not r["passed"] and r["semantic_passed"] and r["saturates_here"] and r["ok"]
    for words in ("int16", "features.0", "features.3", "features.6", "reduce_range=True", "VNNI"):
        assert words in r["diagnosis"], words
    assert r["emulated_vs_ort_lsb"] == 0.0
    reduced_model, reduced = files[("cnn", "w8rr")]
    r = export.verify_onnx(reduced_model, reduced, x_test)
    assert r["passed"] and r["diagnosis"] is None and not r["saturates_here"] and r["ok"]


def test_unexplained_ort_deviation_is_not_ok(files, digits, monkeypatch):
    """ORT off on a CPU that does not saturate: no diagnosis, and the report is not ok."""
    _, x_test = digits
    model, path = files[("cnn", "w8")]
    monkeypatch.setattr(saturation, "cpu_int8", lambda: saturation.CPU_KINDS["vnni"])
    monkeypatch.setattr(
        export, "ort_outputs", lambda path, inputs, threads=1: saturation.emulate(path, inputs)[0]
    )
    r = export.verify_onnx(model, path, x_test)
    assert not r["passed"] and r["semantic_passed"] and r["diagnosis"] is None and not r["ok"]


def test_export_warns_on_a_saturating_cpu(files, digits, tmp_path, as_avx2):
    _, x_test = digits
    with pytest.warns(
        UserWarning, match=r"will saturate in 3 layer\(s\) \(features.0, features.3, features.6\)"
    ):
        export.export_onnx(files[("cnn", "w8")][0], tmp_path / "w.onnx", x_test[:1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reduced range: no warning
        export.export_onnx(files[("cnn", "w8rr")][0], tmp_path / "r.onnx", x_test[:1])


def test_export_and_check_writes_and_reports(files, digits, monkeypatch, tmp_path, capsys):
    _, x_test = digits
    monkeypatch.setenv("QATLAB_BUILD", str(tmp_path))
    r = export.export_and_check(files[("cnn", "w8rr")][0], "rr", x_test[:64])
    assert r["path"] == tmp_path / "onnx" / "rr.onnx" and r["path"].exists() and r["ok"] and r["n"] == 64
    printed = capsys.readouterr().out
    assert "reference evaluator vs PyTorch" in printed and "ONNX Runtime on this CPU" in printed


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "group", "pads", "strides", "dilations"),
    [
        ((8, 16, 28, 28), (32, 16, 3, 3), 1, (1, 1, 1, 1), (1, 1), (1, 1)),
        ((8, 32, 14, 14), (32, 1, 3, 3), 32, (1, 1, 1, 1), (2, 2), (1, 1)),  # depthwise, strided
        ((4, 8, 9, 7), (12, 4, 3, 2), 2, (0, 1, 2, 0), (2, 1), (1, 1)),  # groups, uneven kernel and pads
        ((2, 3, 5, 5), (4, 3, 1, 1), 1, (0, 0, 0, 0), (1, 1), (1, 1)),  # 1x1
        ((2, 4, 9, 9), (6, 4, 3, 3), 1, (2, 2, 2, 2), (1, 1), (2, 2)),  # dilated: onnx's own implementation
    ],
)
def test_reference_conv_is_onnx_reference_conv_bit_for_bit(x_shape, w_shape, group, pads, strides, dilations):
    """run_reference's faster Conv gathers the same column matrix as onnx's reference Conv: equal to the bit."""
    rng = np.random.default_rng(0)
    feeds = {
        "X": rng.standard_normal(x_shape, dtype=np.float32),
        "W": rng.standard_normal(w_shape, dtype=np.float32),
        "B": rng.standard_normal(w_shape[0], dtype=np.float32),
    }
    node = helper.make_node(
        "Conv", ["X", "W", "B"], ["Y"], group=group, pads=list(pads), strides=list(strides),
        dilations=list(dilations),
    )  # fmt: skip
    graph = helper.make_graph(
        [node], "conv",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in feeds],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
    )  # fmt: skip
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    from onnx.reference import ReferenceEvaluator

    expected = ReferenceEvaluator(proto).run(None, feeds)[0]
    got = saturation.run_reference(proto, list(feeds.values()))[0]
    assert got.dtype == np.float32 and got.shape == expected.shape and np.array_equal(got, expected)
