"""Where Q/DQ goes at residual additions: prepare's quantize_adds, export's scalar_scales, the placement table
and the probe of ONNX Runtime's fusion rules (residual CNN on digits)."""

import dataclasses

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import qatlab
from qatlab import QATConfig, export
from qatlab.data import digits_loaders
from qatlab.models import build_model
from qatlab.prepare import enable_fake_quant, quantizers
from qatlab.saturation import run_reference

ADDS = QATConfig(quantize_outputs=True, quantize_adds=True)


@pytest.fixture(scope="module")
def resnet():
    train, test = digits_loaders(batch_size=64, seed=0)
    torch.manual_seed(0)
    model = build_model("resnet", width=8)
    qatlab.fit(model, train, epochs=1, lr=0.05, progress=False)
    return model.eval(), train, test, torch.cat([x for x, _ in test])[:128]


def test_quantize_adds_quantizes_each_tensor_once(resnet):
    model, train, _, x = resnet
    q = qatlab.ptq(model, ADDS, train, num_batches=2)
    assert isinstance(q, torch.fx.GraphModule) and sorted(q.add_quant) == ["add", "add_1"]
    # a layer whose input is already codes (an add's result, or the stem's quantized output at the fork)
    # quantizes nothing again; the stem (the image) and the classifier (after pooling) still do
    for name in ("layer1.conv1", "layer2.conv1", "layer2.downsample.0"):
        assert q.get_submodule(name).input_quant is None, name
    for name in ("stem.0", "classifier"):
        assert q.get_submodule(name).input_quant is not None, name
    seen = {}
    handles = [
        q.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, a[0]))
        for n in ("layer2.conv1", "layer2.downsample.0")
    ]
    with torch.no_grad():
        q(x)
    for h in handles:
        h.remove()
    aq = q.add_quant["add"]
    for name, t in seen.items():  # what they read lies on the grid of the first addition's quantizer
        codes = t / aq.scale + aq.zero_point
        assert torch.allclose(codes, codes.round(), atol=1e-3), name
        assert codes.min() >= 0 and codes.max() <= 255, name
    # the rewrite keeps the float computation: with fake quant off, the QAT model is the float model
    enable_fake_quant(q, False)
    with torch.no_grad():
        torch.testing.assert_close(q(x), model(x), atol=1e-4, rtol=1e-4)


def test_quantize_adds_errors(resnet):
    with pytest.raises(ValueError, match="quantize_adds=True .* needs quantize_outputs=True"):
        QATConfig(quantize_adds=True)

    class Branchy(nn.Module):  # control flow on data: torch.fx cannot trace it
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)

        def forward(self, x):
            y = self.conv(x)
            return y + y if y.sum() > 0 else y

    with pytest.raises(ValueError, match="quantize_adds=True needs a model that traces with torch.fx"):
        qatlab.prepare_qat(Branchy(), ADDS)


def test_scalar_scales_change_the_shape_not_the_arithmetic(resnet, tmp_path):
    model, train, _, x = resnet
    q = qatlab.ptq(model, ADDS, train, num_batches=2)
    paths = {s: export.export_onnx(q, tmp_path / f"r{s}.onnx", x[:1], scalar_scales=s) for s in (False, True)}
    outs = {s: run_reference(p, [x.numpy()])[0] for s, p in paths.items()}
    np.testing.assert_array_equal(outs[True], outs[False])
    assert export.verify_onnx(q, paths[True], x)["semantic_passed"]  # and it computes what PyTorch computes
    # per-tensor Q/DQ (one scale) read rank-0 scales in one file, shape [1] in the other
    for s, path in paths.items():
        proto = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
        shapes = {i.name: list(i.dims) for i in proto.graph.initializer}
        shapes |= {
            v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in proto.graph.value_info
        }
        scales = [
            shapes[n.input[1]]
            for n in proto.graph.node
            if n.op_type in ("QuantizeLinear", "DequantizeLinear")
        ]
        one = [shape for shape in scales if int(np.prod(shape)) == 1]
        assert len(one) >= 10 and {len(shape) for shape in one} == {0 if s else 1}, (s, one)


def test_placement_table(resnet, tmp_path):
    model, train, test, x = resnet
    base = QATConfig()
    placements = {
        "inputs": (base, False),
        "outputs": (dataclasses.replace(base, quantize_outputs=True), False),
        "adds": (ADDS, False),
        "adds, scalar": (ADDS, True),
    }
    t = export.placement_table(model, placements, train, x, test, calib_batches=2, folder=tmp_path, repeats=2)
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert list(t.index) == list(placements) and t["reference_ok"].all()
    assert t.loc["inputs", "QLinearConv"] < convs and t.loc["inputs", "float_adds"] == 2
    assert (t.loc[["outputs", "adds", "adds, scalar"], "QLinearConv"] == convs).all()
    # shape-[1] scales: no fusion; scalar scales: every addition and conv in integers
    assert t.loc["adds", "QLinearAdd"] == 0 and t.loc["adds", "float_adds"] == 2
    scalar = t.loc["adds, scalar"]
    assert scalar["QLinearAdd"] == 2 and scalar["float_adds"] + scalar["float_convs"] == 0
    n_default = sum(1 for _ in quantizers(qatlab.ptq(model, base, train, num_batches=1)))
    assert t.loc["inputs", "quantizers"] == n_default
    assert t.loc["inputs", "time_vs_first"] == 1.0 and (t["ort_ms"] > 0).all()
    assert ((t["accuracy"] > 0) & (t["accuracy"] <= 1)).all()
    with pytest.raises(ValueError, match="placements is empty"):
        export.placement_table(model, {}, train, x)


def test_fusion_probe_answers_for_the_installed_runtime():
    probe = export.fusion_probe().set_index(["op", "scales", "input scales"]).sort_index()
    for op, kernel in (("Add", "QLinearAdd"), ("Mul", "QLinearMul")):
        for same in ("equal", "different"):
            assert probe.loc[(op, "scalar", same), "ORT runs"] == kernel
            assert probe.loc[(op, "shape [1]", same), "ORT runs"] == op  # not fused: float op between Q/DQ
    assert (probe.loc["Concat", "ORT runs"] == "QLinearConcat").all()  # takes either shape
    assert probe["integer kernel"].sum() == 8
