"""Model surgery: prepare_qat / calibrate / ptq / convert on the lab's models."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qatlab
from qatlab import QATConfig, QuantSpec
from qatlab.models import build_model
from qatlab.modules import FakeQuantizer, QuantConv2d, QuantConvBn2d, QuantLinear
from qatlab.prepare import convert, enable_fake_quant, quantizers


def _warm(model, shape=(16, 1, 28, 28), steps=3):
    """Give BatchNorm non-trivial running statistics, then return the model in eval mode."""
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(shape))
    return model.eval()


@pytest.fixture
def resnet():
    torch.manual_seed(0)
    return _warm(build_model("resnet"))


def _batches(n=3, shape=(16, 1, 28, 28), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g), torch.zeros(shape[0], dtype=torch.long)) for _ in range(n)]


@pytest.mark.parametrize("bn_mode", ["fold", "simulate", "keep"])
def test_prepare_residual_model(resnet, bn_mode):
    before = copy.deepcopy(resnet.state_dict())
    x = torch.randn(8, 1, 28, 28)
    ref = resnet(x)
    qat = qatlab.prepare_qat(resnet, QATConfig(bn_mode=bn_mode))
    # the float model is untouched
    for k, v in resnet.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not any(isinstance(m, FakeQuantizer) for m in resnet.modules())
    # the expected layers were swapped: 6 convs (+BN), 1 linear; the residual add and F.relu untouched
    kinds = [type(m) for m in qat.modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    conv_type = QuantConv2d if bn_mode == "fold" else QuantConvBn2d
    assert kinds.count(conv_type) == 6 and kinds.count(QuantLinear) == 1
    assert not any(isinstance(m, nn.BatchNorm2d) for n, m in qat.named_modules() if not n.endswith(".bn"))
    # fake quant off: the QAT model computes the float model
    enable_fake_quant(qat, False)
    assert (qat(x) - ref).abs().max().item() <= 1e-5
    # on (after calibration): it differs, but little at 8 bits
    qatlab.calibrate(qat, _batches())
    out = qat(x)
    diff = (out - ref).abs().max().item()
    assert 0 < diff < 0.05 * ref.abs().max().item()


def test_state_dict_round_trip(resnet):
    qat = qatlab.ptq(
        resnet, QATConfig(weight=QuantSpec(bits=4, symmetric=True, per_channel=True)), _batches()
    )
    x = torch.randn(4, 1, 28, 28)
    out = qat(x)
    fresh = qatlab.prepare_qat(resnet, QATConfig(weight=QuantSpec(bits=4, symmetric=True, per_channel=True)))
    fresh.load_state_dict(qat.state_dict())
    qatlab.freeze_observers(fresh)
    qatlab.freeze_bn_stats(fresh)
    fresh.eval()
    assert torch.equal(fresh(x), out)
    for (_, a), (_, b) in zip(quantizers(qat), quantizers(fresh), strict=True):
        assert torch.equal(a.scale, b.scale) and torch.equal(a.zero_point, b.zero_point)


@pytest.mark.parametrize("name", ["cnn", "dwcnn", "mlp", "resnet"])
@pytest.mark.parametrize("bn_mode", ["simulate", "keep"])
def test_convert_matches_qat_model(name, bn_mode):
    torch.manual_seed(0)
    model = _warm(build_model(name))
    qat = qatlab.ptq(model, QATConfig(bn_mode=bn_mode), _batches())
    x = torch.randn(8, 1, 28, 28)
    deployed = convert(qat)
    assert not any(isinstance(m, QuantConvBn2d) for m in deployed.modules())
    diff = (deployed(x) - qat(x)).abs().max().item()
    if bn_mode == "simulate":
        assert diff <= 1e-5  # the weight quantizer already saw the folded weight
    else:  # keep: the folded weight is re-quantized, so outputs move by about a weight LSB
        assert diff <= 0.05 * qat(x).abs().max().item()


def test_keep_first_last_and_keep_bits():
    model = _warm(build_model("cnn"))
    qat = qatlab.prepare_qat(model, QATConfig(keep=("first", "last")))
    assert isinstance(qat.features[0], nn.Conv2d) and not isinstance(qat.features[0], QuantConvBn2d)
    assert isinstance(qat.classifier, nn.Linear)
    assert sum(isinstance(m, QuantConvBn2d) for m in qat.modules()) == 3
    cfg = QATConfig(weight=QuantSpec(bits=4, symmetric=True, per_channel=True), keep=("last",), keep_bits=8)
    qat8 = qatlab.prepare_qat(model, cfg)
    assert qat8.classifier.weight_quant.spec.bits == 8 and qat8.features[0].weight_quant.spec.bits == 4
    with pytest.raises(ValueError, match="keep entry 'nope'"):
        qatlab.prepare_qat(model, QATConfig(keep=("nope",)))


def test_relu_fused_and_functional_relu_left():
    model = _warm(build_model("cnn"))
    qat = qatlab.prepare_qat(model)
    assert qat.features[0].relu and isinstance(qat.features[2], nn.Identity)
    assert not qat.classifier.relu


class _Untraceable(nn.Module):
    """Data-dependent control flow defeats torch.fx: prepare falls back to Sequential children."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        y = self.body(x)
        if y.sum() > 0:
            y = y * 1.0
        return self.head(y.mean((2, 3)))


def test_untraceable_model_falls_back_to_sequential():
    model = _warm(_Untraceable(), shape=(8, 1, 6, 6))
    qat = qatlab.prepare_qat(model)
    assert isinstance(qat.body[0], QuantConvBn2d) and qat.body[0].relu
    assert isinstance(qat.head, QuantLinear)
    x = torch.randn(4, 1, 6, 6)
    enable_fake_quant(qat, False)
    assert (qat(x) - model(x)).abs().max().item() <= 1e-5
    with pytest.warns(UserWarning, match="does not trace with torch.fx"):
        outs = qatlab.prepare_qat(model, QATConfig(quantize_outputs=True))
    assert not [n for n, _ in quantizers(outs) if n.endswith("output_quant")]


# ---- bad input -------------------------------------------------------------------------------------------


def test_errors():
    model = _warm(build_model("cnn"))
    with pytest.raises(TypeError, match="QATConfig"):
        qatlab.prepare_qat(model, {"bits": 8})
    with pytest.raises(TypeError, match="nn.Module"):
        qatlab.prepare_qat("model")
    with pytest.raises(ValueError, match="no quantizable layers"):
        qatlab.prepare_qat(nn.Sequential(nn.ReLU(), nn.Flatten()))
    qat = qatlab.prepare_qat(model)
    with pytest.raises(ValueError, match="prepared twice"):
        qatlab.prepare_qat(qat)
    with pytest.raises(ValueError, match="prepare the QAT model first, then wrap"):
        qatlab.prepare_qat(nn.DataParallel(model))
    with pytest.raises(ValueError, match="prepare it first"):
        qatlab.calibrate(model, _batches())
    with pytest.raises(ValueError, match="loader has no batches"):
        qatlab.calibrate(qat, [])
    with pytest.raises(ValueError, match="num_batches"):
        qatlab.calibrate(qat, _batches(), num_batches=0)
    bad = _batches(1)
    bad[0][0][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        qatlab.calibrate(qatlab.prepare_qat(model), bad)
    with pytest.raises(ValueError, match="NaN or inf"):
        qatlab.calibrate(qatlab.prepare_qat(model), [(torch.full((2, 1, 28, 28), float("inf")), None)])


def test_calibrate_restores_mode_and_respects_num_batches():
    model = _warm(build_model("cnn"))
    qat = qatlab.prepare_qat(model).train()
    qatlab.calibrate(qat, _batches(5), num_batches=2)
    assert qat.training
    counts = {int(q.observer.num_batches) for _, q in quantizers(qat)}
    assert counts == {2}
    # calibration data ran with fake quant off: the first layer's input range is the data's range
    data = torch.cat([b[0] for b in _batches(5)[:2]])
    obs = qat.features[0].input_quant.observer
    assert obs.num_batches == 2
    first = _batches(5)[0][0]
    c = 0.01
    expect_max = first.max() + c * (data[16:].max() - first.max())
    torch.testing.assert_close(obs.max_val, expect_max.reshape(1))


def test_reestimate_bn_uses_the_quantized_layer_output_and_restores_everything():
    torch.manual_seed(0)
    qat = qatlab.prepare_qat(build_model("cnn", width=4).eval(), QATConfig())
    x = torch.randn(8, 1, 28, 28)
    qatlab.calibrate(qat, [x])
    layer = next(m for m in qat.modules() if isinstance(m, QuantConvBn2d))
    layer.bn_frozen = True
    scales = {n: q.scale.clone() for n, q in quantizers(qat)}
    momentum = layer.bn.momentum
    with torch.no_grad():  # by hand (simulate mode, train-mode forward): the conv of the quantized folded
        bn = layer.bn  # weight, the running-sigma scaling undone: the tensor BN normalises with batch stats
        factor = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).reshape(-1, 1, 1, 1)
        y = layer._conv(layer._qin(x), layer._qw(layer.weight * factor), None) / factor.reshape(1, -1, 1, 1)
        y = y + layer.bias.reshape(1, -1, 1, 1) if layer.bias is not None else y
    qat.eval()
    qatlab.reestimate_bn(qat, [x], num_batches=1)
    assert torch.allclose(layer.bn.running_mean, y.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(layer.bn.running_var, y.var(dim=(0, 2, 3)), rtol=1e-4, atol=1e-6)
    # restored: mode, BN flag, momentum, observer switches; activation ranges untouched, and each simulated layer's
    # per-channel weight scale follows sigma_old / sigma_new (next test)
    assert not qat.training and layer.bn_frozen and layer.bn.momentum == momentum and layer.fold_var is None
    assert all(q.observer_enabled for _, q in quantizers(qat))
    assert all(torch.equal(scales[n], q.scale) for n, q in quantizers(qat) if not n.endswith("weight_quant"))
    assert not torch.equal(scales["features.0.weight_quant"], layer.weight_quant.scale)


@pytest.mark.parametrize("ste", ["clipped", "lsq"])
def test_reestimate_bn_keeps_the_weight_codes_of_simulated_folding(ste):
    """New BN statistics must not move the integer weight codes QAT trained (simulate mode): the folded weight
    w * gamma / sigma changes with sigma, so the scale follows it; the model is then BN(new) of the same
    quantized conv."""
    torch.manual_seed(0)
    cfg = QATConfig(weight=QuantSpec(bits=3, symmetric=True, per_channel=True, ste=ste))
    qat = qatlab.calibrate(qatlab.prepare_qat(build_model("cnn", width=4).eval(), cfg), _batches())
    layer = next(m for m in qat.modules() if isinstance(m, QuantConvBn2d))
    with torch.no_grad():  # QAT drifted the running variance: some channels far off what the data gives
        layer.bn.running_var.mul_(torch.linspace(0.3, 3.0, layer.bn.num_features))

    def codes_and_weight(m):
        factor = m.bn.weight / torch.sqrt(m.bn.running_var + m.bn.eps)
        w_f = m.weight * factor.reshape(-1, 1, 1, 1)
        s = m.weight_quant.scale.reshape(-1, 1, 1, 1)
        codes = torch.clamp(torch.round(w_f / s), m.weight_quant.spec.qmin, m.weight_quant.spec.qmax)
        return codes, m.weight_quant(w_f) / factor.reshape(-1, 1, 1, 1)  # the quantized weight, unfolded

    qat.eval()
    codes_before, w_eff = codes_and_weight(layer)
    naive = copy.deepcopy(qat)  # keep_codes=False: the old scale quantizes the newly folded weight
    qatlab.reestimate_bn(naive, _batches(), num_batches=2, keep_codes=False)
    assert not torch.equal(
        codes_and_weight(next(m for m in naive.modules() if isinstance(m, QuantConvBn2d)))[0], codes_before
    )
    qatlab.reestimate_bn(qat, _batches(), num_batches=2)
    codes_after, w_eff_after = codes_and_weight(layer)
    assert torch.equal(codes_before, codes_after)  # the same integer codes
    assert torch.allclose(w_eff, w_eff_after, rtol=1e-5, atol=1e-7)  # the same quantized conv ...
    x = _batches()[0][0]
    with torch.no_grad():  # ... followed by BN with the new statistics: what the deployed layer computes
        bn = layer.bn
        want = F.batch_norm(layer._conv(layer._qin(x), w_eff, layer.bias), bn.running_mean, bn.running_var,
                            bn.weight, bn.bias, False, 0.0, bn.eps)  # fmt: skip
        want = F.relu(want) if layer.relu else want
        got = layer(x)  # eval mode: folded with the new statistics, bias on the accumulator's grid
    lsb = (layer.input_quant.scale * layer.weight_quant.scale).reshape(1, -1, 1, 1)  # the accumulator's LSB
    assert ((got - want).abs() <= lsb / 2 + 1e-5).all()  # the bias rounded to that grid, nothing else


def test_reestimate_bn_is_a_plain_average_over_batches():
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(3)
    model = nn.Sequential(bn)
    batches = [torch.randn(16, 3) * (k + 1) + k for k in range(4)]
    qatlab.reestimate_bn(model, batches, num_batches=4)
    assert torch.allclose(bn.running_mean, torch.stack([b.mean(0) for b in batches]).mean(0), atol=1e-6)
    assert torch.allclose(bn.running_var, torch.stack([b.var(0) for b in batches]).mean(0), atol=1e-5)
    assert bn.momentum == 0.1
    with pytest.raises(ValueError, match="num_batches"):
        qatlab.reestimate_bn(model, batches, num_batches=0)
    with pytest.raises(ValueError, match="no BatchNorm"):
        qatlab.reestimate_bn(nn.Linear(3, 3), batches)
    with pytest.raises(ValueError, match="no batches"):
        qatlab.reestimate_bn(model, [])


def test_quantize_outputs_only_where_no_quantized_layer_reads_next():
    def outputs(model, **kw):
        q = qatlab.prepare_qat(model, QATConfig(quantize_outputs=True, **kw))
        return [n for n, _ in quantizers(q) if n.endswith("output_quant")]

    torch.manual_seed(0)
    cnn = build_model("cnn")
    assert outputs(cnn) == ["features.9.output_quant"]  # the last conv feeds the pooling
    assert outputs(cnn, keep=("features.3",)) == ["features.0.output_quant", "features.9.output_quant"]
    assert outputs(cnn, keep=("features.3",), keep_bits=4) == ["features.9.output_quant"]
    assert outputs(build_model("resnet")) == [  # the residual adds read these
        "stem.0.output_quant", "layer1.conv2.output_quant", "layer2.conv2.output_quant",
        "layer2.downsample.0.output_quant",
    ]  # fmt: skip
    assert not [
        n for n, _ in quantizers(qatlab.prepare_qat(cnn)) if n.endswith("output_quant")
    ]  # off by default
    # the output quantizer reads the fused ReLU's output: its range starts at 0, the grid's first code
    q = qatlab.calibrate(qatlab.prepare_qat(cnn, QATConfig(quantize_outputs=True)), _batches())
    oq = q.features[9].output_quant
    assert float(oq.observer.min_val) == 0.0 and int(oq.zero_point) == oq.spec.qmin
    x = _batches(1)[0][0]
    with torch.no_grad():
        q.features[9].output_quant = None
        inner = q(x)  # the same model without the output quantizer
        q.features[9].output_quant = oq
        assert not torch.equal(q(x), inner)
    with pytest.raises(ValueError, match="quantize_outputs=True needs an activation spec"):
        QATConfig(activation=None, quantize_outputs=True)
