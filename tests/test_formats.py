"""The number formats (``qatlab.formats``) inside the lab: specs, quantizers, QAT, export and the runtimes.

The element-level arithmetic is checked bit for bit in ``test_formats_reference.py``; here, that the same numbers
reach the layers (a conv weight blocked along Cin x kh x kw, a conv input along its channels), that a calibrated
FP8 / NVFP4 scale is the format's rule applied to the observed range, that QAT trains, and that the exported file
computes what PyTorch computes: per quantizer bit for bit under the ONNX reference evaluator, for every format.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from qatlab import QATConfig, QuantSpec, calibrate, convert, formats, prepare_qat, ptq
from qatlab import export as ex
from qatlab.modules import FakeQuantizer
from qatlab.saturation import run_reference

# (weight spec, activation spec) per format, as a deployment would pair them
PAIRS = {
    "int4 g32": (QuantSpec(bits=4, symmetric=True, group_size=32), QuantSpec(bits=8)),
    "int4 g32 asym": (QuantSpec(bits=4, group_size=32), None),
    "int3 g32": (QuantSpec(bits=3, symmetric=True, group_size=32), None),
    "8da4w": (
        QuantSpec(bits=4, symmetric=True, group_size=32),
        QuantSpec(bits=8, symmetric=True, observer="dynamic", per_token=True),
    ),
    "fp8_e4m3": (
        QuantSpec(format="fp8_e4m3", per_channel=True),
        QuantSpec(format="fp8_e4m3", observer="ema"),
    ),
    "fp8_e5m2": (QuantSpec(format="fp8_e5m2"), QuantSpec(format="fp8_e5m2")),
    "fp8 rowwise": (
        QuantSpec(format="fp8_e4m3", per_channel=True),
        QuantSpec(format="fp8_e4m3", observer="dynamic", per_token=True),
    ),
    "mxfp8": (QuantSpec(format="mxfp8"), QuantSpec(format="mxfp8")),
    "mxfp4": (QuantSpec(format="mxfp4"), QuantSpec(format="mxfp4")),
    "nvfp4": (QuantSpec(format="nvfp4"), QuantSpec(format="nvfp4")),
    "nvfp4 dynamic": (QuantSpec(format="nvfp4"), QuantSpec(format="nvfp4", observer="dynamic")),
}


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 10)).eval()


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 16, 3),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    ).eval()


# ----------------------------------------------------------------------------------------------------------
# Specs
# ----------------------------------------------------------------------------------------------------------


def test_spec_fields_and_errors():
    """A non-integer format fixes bits and symmetry; the combinations that make no sense name their fix."""
    assert QuantSpec(format="mxfp4").bits == 4 and QuantSpec(format="fp8_e5m2").bits == 8
    assert QuantSpec(format="nvfp4").symmetric and QuantSpec(format="nvfp4").stored_scale
    assert QuantSpec(format="mxfp8").blocked and not QuantSpec(format="mxfp8").stored_scale
    assert QuantSpec(format="fp8_e4m3").is_integer is False and QuantSpec(bits=4).is_integer
    with pytest.raises(ValueError, match="observer='mse'"):
        QuantSpec(format="fp8_e4m3", observer="mse")
    with pytest.raises(ValueError, match="observer="):
        QuantSpec(bits=4, group_size=32, observer="ema")
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec(format="mxfp4", group_size=32)
    with pytest.raises(ValueError, match="format="):
        QuantSpec(format="int8")
    with pytest.raises(ValueError, match="reduce_range"):
        QuantSpec(format="fp8_e4m3", reduce_range=True)


def test_config_round_trip_and_keep_bits():
    """A format config survives to_dict/from_dict; kept layers get the lab's integer spec at keep_bits."""
    cfg = QATConfig(weight=PAIRS["nvfp4"][0], activation=PAIRS["8da4w"][1], keep=("first",), keep_bits=8)
    assert QATConfig.from_dict(cfg.to_dict()) == cfg
    kept = cfg.spec_for("weight", keep=True)
    assert kept.format == "int" and kept.bits == 8 and kept.per_channel and kept.group_size is None
    assert cfg.spec_for("activation", keep=True).observer == "ema"


def test_bits_per_element():
    """Storage per element, scales included: MXFP4 4.25, NVFP4 4.5 (+ one float32), int4 g32 with fp16 scales 4.5."""
    shape = (256, 1024)
    assert formats.bits_per_element(QuantSpec(format="mxfp4"), shape) == 4.25
    assert formats.bits_per_element(QuantSpec(format="nvfp4"), shape) == pytest.approx(
        4.5 + 32 / (256 * 1024)
    )
    g32 = QuantSpec(bits=4, symmetric=True, group_size=32)
    assert formats.bits_per_element(g32, shape, scale_bits=16) == 4.5
    per_channel = QuantSpec(bits=4, symmetric=True, per_channel=True)
    assert formats.bits_per_element(per_channel, shape) == pytest.approx(4 + 32 / 1024)


# ----------------------------------------------------------------------------------------------------------
# The quantizers in layers
# ----------------------------------------------------------------------------------------------------------


def test_ragged_mx_block_is_zero_padded():
    """An MX/NVFP4 axis the block does not divide ends in a shorter block: the result equals quantizing the
    zero-padded tensor and cutting the padding off (zeros change no block maximum)."""
    torch.manual_seed(1)
    x = torch.randn(3, 40) * 3
    for fmt in ("mxfp4", "mxfp8", "nvfp4"):
        spec = QuantSpec(format=fmt)
        pad = torch.nn.functional.pad(x, (0, -40 % formats.FORMATS[fmt][1]))
        scale = formats.nvfp4_tensor_scale(x.abs().max().reshape(1)) if fmt == "nvfp4" else None
        want = formats.fake_quant(pad, spec, scale)[:, :40]
        assert torch.equal(formats.fake_quant(x, spec), want), fmt


def test_conv_weight_and_input_blocks():
    """A conv weight is blocked along its flattened Cin x kh x kw axis, a conv input (N, C, H, W) along C."""
    model = prepare_qat(
        _cnn(), QATConfig(weight=QuantSpec(format="mxfp4"), activation=QuantSpec(format="mxfp4"))
    )
    conv = model[0]
    w = conv.weight.detach()
    want_w = formats.fake_quant(w.flatten(1), QuantSpec(format="mxfp4")).reshape(w.shape)
    assert torch.equal(conv.weight_quant(w), want_w)
    x = torch.randn(2, 32, 6, 6)
    want_x = formats.fake_quant(x, QuantSpec(format="mxfp4", block_axis=1))
    assert torch.equal(conv.input_quant(x), want_x)
    # one shared scale per 32 channels of a pixel: every value is an E2M1 value times a power of two
    y = conv.input_quant(x).permute(0, 2, 3, 1).reshape(-1, 32)
    s = formats.mx_scale(x.permute(0, 2, 3, 1).reshape(-1, 32).abs().amax(1, keepdim=True), formats.E2M1)
    assert bool(torch.isin(y / s, formats.lattice("e2m1")).all())


def test_calibrated_fp8_and_nvfp4_scales():
    """Static FP8 and NVFP4 activations store the format's scale of the calibrated range: amax / 448 and
    amax / (448 * 6); the quantizer then uses it, not each batch's own range."""
    for spec, divisor in ((QuantSpec(format="fp8_e4m3"), 448.0), (QuantSpec(format="nvfp4"), 448.0 * 6)):
        fq = FakeQuantizer(spec)
        fq.calibrating = True
        x = torch.randn(8, 64)
        x[0, 0] = 5.0  # the maximum
        fq(x)
        fq.calibrating = False
        fq.eval()
        assert fq.scale.item() == pytest.approx(5.0 / divisor, rel=1e-6)
        small = torch.randn(8, 64) * 0.01  # a batch of its own would get a 500x smaller scale
        assert torch.equal(fq(small), formats.fake_quant(small, spec, fq.scale))


@pytest.mark.parametrize("name", list(PAIRS))
def test_qat_step_trains(name):
    """One QAT step per format: finite loss, every weight gets a gradient (the clipped STE passes it), the
    loss goes down over a few steps on a fixed batch."""
    wspec, aspec = PAIRS[name]
    model = prepare_qat(_mlp().train(), QATConfig(weight=wspec, activation=aspec))
    torch.manual_seed(2)
    x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
    calibrate(model, [(x, y)])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(8):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        losses.append(loss.item())
        for layer in (model[0], model[2]):
            assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
        opt.step()
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses


# ----------------------------------------------------------------------------------------------------------
# Export: bit for bit per quantizer, every format
# ----------------------------------------------------------------------------------------------------------


def _dq_outputs(proto: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """Names of the DequantizeLinear outputs of weights (constant inputs) and of activations (NVFP4's dequantized
    block scales, the scale input of another Q/DQ, are neither)."""
    const = {i.name for i in proto.graph.initializer}
    scales = {n.input[1] for n in proto.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")}
    weights, acts = [], []
    for node in proto.graph.node:
        if node.op_type == "Constant":
            const.update(node.output)
        elif node.op_type != "DequantizeLinear" or node.output[0] in scales:
            continue
        elif node.input[0] in const:
            weights.append(node.output[0])
        else:
            acts.append(node.output[0])
    return weights, acts


def _quantized_input(proto: onnx.ModelProto, dq_output: str) -> str:
    """The float tensor an activation's QuantizeLinear reads (its scale, computed in the graph or stored, is a
    function of the same tensor): the input of the QuantizeLinear feeding the DequantizeLinear ``dq_output``."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    q = producer[producer[dq_output].input[0]]
    assert q.op_type == "QuantizeLinear", q.op_type
    return q.input[0]


@pytest.mark.parametrize("name", list(PAIRS))
def test_export_matches_bit_for_bit(name, tmp_path):
    """Each format exports (opset 21, or 23 for FP4) and the ONNX reference evaluator reproduces PyTorch's
    quantized weights and quantized activations exactly, and the model output to float summation order.
    Weights are stored as codes of the quantized ONNX type.

    An activation quantizer behind a Linear reads a tensor that PyTorch and numpy sum in different orders, so an
    element one ulp from a rounding tie may round the other way on another CPU. Each PyTorch activation quantizer
    is therefore fed the float tensor the reference evaluator quantized (checked to equal PyTorch's own input up
    to summation order, exactly for the graph input): the quantizers are compared bit for bit on the same float
    input, whatever the CPU."""
    wspec, aspec = PAIRS[name]
    torch.manual_seed(3)
    x = torch.randn(16, 64) * 2
    model = ptq(_mlp(), QATConfig(weight=wspec, activation=aspec), [(x, None)])
    path = ex.export_onnx(model, tmp_path / "m.onnx", x[:1])
    proto = onnx.load(str(path))
    assert proto.opset_import[0].version == (23 if wspec.format in ("mxfp4", "nvfp4") else 21)
    w_names, a_names = _dq_outputs(proto)
    assert len(w_names) == 2 and len(a_names) == (2 if aspec is not None else 0)
    a_inputs = [_quantized_input(proto, n) for n in a_names]
    assert a_inputs[:1] == [proto.graph.input[0].name] * len(a_inputs[:1])  # the first reads the model input
    values = run_reference(
        path, [x.numpy()], outputs=[*w_names, *a_names, *a_inputs, proto.graph.output[0].name]
    )
    onnx_w, onnx_a, onnx_in = values[:2], values[2 : 2 + len(a_names)], values[2 + len(a_names) : -1]
    a_keys = ["0.input_quant", "2.input_quant"][: len(a_names)]
    deployed = convert(model)
    captured, torch_in = {}, {}

    def feed(k: str):
        def hook(m, args):
            torch_in[k] = args[0].detach().clone()
            return (torch.from_numpy(np.asarray(onnx_in[a_keys.index(k)])).reshape(args[0].shape),)

        return hook

    hooks = [
        m.register_forward_hook(lambda m, i, o, k=k: captured.__setitem__(k, o.detach()))
        for k, m in deployed.named_modules()
        if isinstance(m, FakeQuantizer)
    ]
    hooks += [deployed.get_submodule(k).register_forward_pre_hook(feed(k)) for k in a_keys]
    with torch.no_grad():
        out = deployed(x)
    for h in hooks:
        h.remove()
    torch_w = [captured["0.weight_quant"], captured["2.weight_quant"]]
    for got, want in zip(onnx_w, torch_w, strict=True):
        assert np.array_equal(np.asarray(got).reshape(want.shape), want.numpy())
    for k, got_in, got in zip(a_keys, onnx_in, onnx_a, strict=True):
        want_in, want = torch_in[k].numpy(), captured[k].numpy()
        got_in = np.asarray(got_in).reshape(want_in.shape)
        if k == "0.input_quant":  # the model input: the same floats on both sides
            assert np.array_equal(got_in, want_in)
        else:  # behind a Linear: equal up to float summation order
            assert np.abs(got_in - want_in).max() <= 1e-5 * (1 + np.abs(want_in).max()), k
        assert np.array_equal(np.asarray(got).reshape(want.shape), want), k
    assert np.abs(values[-1] - out.numpy()).max() <= 1e-5 * (1 + np.abs(out.numpy()).max())
    # weights travel as codes: no float copy of a quantized weight is left in the file
    types = {i.data_type for i in proto.graph.initializer if len(i.dims) == 2 and min(i.dims) > 8}
    assert onnx.TensorProto.FLOAT not in types, types


def test_fp4_needs_opset_23(tmp_path):
    """Asking for opset 21 with an FP4 format names the fix."""
    x = torch.randn(8, 64)
    model = ptq(_mlp(), QATConfig(weight=QuantSpec(format="mxfp4"), activation=None), [(x, None)])
    with pytest.raises(ValueError, match="opset=23"):
        ex.export_onnx(model, tmp_path / "m.onnx", x[:1], opset=21)


def test_fold_weight_codes_keeps_the_numbers(tmp_path):
    """Folding the weights' QuantizeLinear into stored codes changes no output (reference evaluator) and shrinks
    an int4 file to about an eighth of its float weights."""
    x = torch.randn(8, 64)
    model = ptq(_mlp(), QATConfig(weight=QuantSpec(bits=4, symmetric=True, group_size=32)), [(x, None)])
    plain = ex.export_onnx(model, tmp_path / "plain.onnx", x[:1], fold_codes=False)
    folded = ex.export_onnx(model, tmp_path / "folded.onnx", x[:1])
    a, b = (run_reference(p, [x.numpy()])[0] for p in (plain, folded))
    assert np.array_equal(a, b)
    init = {i.name: i for i in onnx.load(str(folded)).graph.initializer}
    codes = [i for i in init.values() if i.data_type == onnx.TensorProto.INT4]
    assert sum(int(np.prod(i.dims)) for i in codes) == 64 * 96 + 96 * 10
    code_bytes = sum(len(i.raw_data) for i in codes)
    assert code_bytes == pytest.approx((64 * 96 + 96 * 10) / 2, abs=8)


# ----------------------------------------------------------------------------------------------------------
# Runtimes: what runs where, said, never skipped
# ----------------------------------------------------------------------------------------------------------


def test_format_runtime_table(tmp_path):
    """Every format loads, computes and matches under the reference evaluator; where ONNX Runtime cannot load a
    file, the row says so (never a silent fallback); where it loads, it matches."""
    torch.manual_seed(4)
    x = torch.randn(32, 64)
    names = ("int4 g32", "fp8_e4m3", "mxfp8", "mxfp4", "nvfp4")
    models = {
        n: ptq(_mlp(), QATConfig(weight=PAIRS[n][0], activation=PAIRS[n][1]), [(x, None)]) for n in names
    }
    df = ex.format_runtime_table(models, x, tmp_path)
    assert list(df["format"]) == list(names)
    assert df["reference_matches"].all() and (df["file_kb"] > 0).all()
    for _, row in df.iterrows():
        if row["ort_computes"]:
            assert row["ort_matches"], row.to_dict()
        else:
            assert "ort (" in row["note"] and row["note"].split("ort (")[1].strip(), row.to_dict()
    # int8/int4/FP8 kernels exist in every ONNX Runtime this lab pins
    assert df.set_index("format").loc[["int4 g32", "fp8_e4m3", "mxfp8"], "ort_matches"].all()


def test_verify_onnx_reports_a_missing_kernel(tmp_path):
    """verify_onnx on a file ORT cannot run: semantic parity decides ``ok``, and the report says why ORT is out."""
    x = torch.randn(16, 64)
    model = ptq(_mlp(), QATConfig(weight=QuantSpec(format="nvfp4"), activation=None), [(x, None)])
    path = ex.export_onnx(model, tmp_path / "m.onnx", x[:1])
    report = ex.verify_onnx(model, path, x)
    assert report["semantic_passed"] and report["ok"]
    if report["ort_error"] is not None:
        assert not report["passed"] and "reference evaluator only" in report["diagnosis"]
        assert "cannot run the file" in ex.describe_parity(report)
    else:
        assert report["passed"]


def test_format_parity_is_judged_per_row_and_catches_a_wrong_scale(tmp_path):
    """A float-format model passes semantic parity by rows (one tie flipped by float summation may move a row);
    a model whose activation scale no longer matches the file fails it."""
    torch.manual_seed(5)
    x = torch.randn(64, 64)
    model = ptq(_mlp(), QATConfig(weight=PAIRS["fp8_e4m3"][0], activation=PAIRS["fp8_e4m3"][1]), [(x, None)])
    path = ex.export_onnx(model, tmp_path / "m.onnx", x[:1])
    report = ex.verify_onnx(model, path, x)
    assert report["semantic_passed"] and report["semantic_rows_within_lsb"] >= ex.FORMAT_ROW_SHARE
    with torch.no_grad():
        model[0].input_quant.scale.mul_(1.5)  # the model drifts from what was exported
    assert not ex.verify_onnx(model, path, x)["semantic_passed"]


def test_ragged_mx_conv_weight_is_stored_as_codes(tmp_path):
    """A conv weight whose Cin x kh x kw (16 x 3 x 3 = 144) ends in a short MX block is zero-padded before the
    quantizer and sliced after it; the file still stores FP4 codes (padded to 160), not the float weight, and
    computes what the model computes."""
    torch.manual_seed(6)
    m = nn.Sequential(nn.Conv2d(16, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10)).eval()
    x = torch.randn(8, 16, 6, 6)
    model = ptq(m, QATConfig(weight=QuantSpec(format="mxfp4"), activation=None), [(x, None)])
    path = ex.export_onnx(model, tmp_path / "m.onnx", x[:1])
    weights = {tuple(i.dims): i.data_type for i in onnx.load(str(path)).graph.initializer if len(i.dims) >= 2}
    assert weights.get((8, 160)) == onnx.TensorProto.FLOAT4E2M1 and (8, 16, 3, 3) not in weights, weights
    with torch.no_grad():
        want = convert(model)(x).numpy()
    assert np.abs(run_reference(path, [x.numpy()])[0] - want).max() <= 1e-5 * (1 + np.abs(want).max())
