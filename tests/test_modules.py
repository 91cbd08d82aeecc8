"""FakeQuantizer and the quantized layers: BN folding math and the three BN modes."""

import pytest
import torch
from torch import nn

from qatlab.config import QuantSpec
from qatlab.modules import FakeQuantizer, QuantConv2d, QuantConvBn2d, QuantLinear, fold_bn
from qatlab.prepare import calibrate

W8 = QuantSpec(bits=8, symmetric=True, per_channel=True)
A8 = QuantSpec(bits=8)


def _conv_bn(seed=0, cin=3, cout=6, bias=False, groups=1):
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=bias, groups=groups)
    bn = nn.BatchNorm2d(cout)
    with torch.no_grad():  # non-trivial statistics and affine parameters
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.2, 3)
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    return conv, bn


@pytest.mark.parametrize("bias", [False, True])
def test_fold_bn_matches_formula_and_eval_conv_bn(bias):
    conv, bn = _conv_bn(bias=bias)
    bn.eval()
    x = torch.randn(4, 3, 9, 9)
    w, b = fold_bn(conv.weight, conv.bias, bn)
    sigma = torch.sqrt(bn.running_var + bn.eps)
    # hand formula, channel 2
    expect_w = bn.weight[2] * conv.weight[2] / sigma[2]
    cb = conv.bias[2] if bias else 0.0
    expect_b = bn.weight[2] * (cb - bn.running_mean[2]) / sigma[2] + bn.bias[2]
    torch.testing.assert_close(w[2], expect_w)
    torch.testing.assert_close(b[2], expect_b)
    ref = bn(conv(x))
    folded = nn.functional.conv2d(x, w, b, padding=1)
    assert (folded - ref).abs().max().item() <= 1e-5
    # torch's own fusion agrees
    fused = torch.nn.utils.fusion.fuse_conv_bn_eval(conv.eval(), bn)
    torch.testing.assert_close(fused.weight, w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["simulate", "keep"])
def test_conv_bn_modes_float_equal_conv_bn(mode):
    conv, bn = _conv_bn()
    m = QuantConvBn2d(conv, bn, W8, A8, relu=True, mode=mode)
    m.input_quant.fake_quant_enabled = False
    m.weight_quant.fake_quant_enabled = False
    x = torch.randn(8, 3, 7, 7)
    ref_bn = nn.BatchNorm2d(6)
    ref_bn.load_state_dict(bn.state_dict())
    # train mode: batch statistics, and the running stats update the same way
    m.train()
    ref_bn.train()
    out = m(x)
    ref = torch.relu(ref_bn(conv(x)))
    assert (out - ref).abs().max().item() <= 1e-5
    torch.testing.assert_close(m.bn.running_mean, ref_bn.running_mean)
    torch.testing.assert_close(m.bn.running_var, ref_bn.running_var)
    # eval: running statistics
    m.eval()
    ref_bn.eval()
    assert (m(x) - torch.relu(ref_bn(conv(x)))).abs().max().item() <= 1e-5


def test_simulate_eval_equals_folded_quantized_conv():
    conv, bn = _conv_bn()
    m = QuantConvBn2d(conv, bn, W8, A8, mode="simulate").eval()
    x = torch.randn(8, 3, 7, 7)
    calibrate(m, [x])  # observes the input and the folded weight
    out = m(x)
    w, b = fold_bn(m.weight, None, m.bn)
    fq_w = torch.fake_quantize_per_channel_affine(
        w, m.weight_quant.scale, m.weight_quant.zero_point, 0, W8.qmin, W8.qmax
    )
    xq = torch.fake_quantize_per_tensor_affine(
        x, m.input_quant.scale, m.input_quant.zero_point, A8.qmin, A8.qmax
    )
    s_acc = m.input_quant.scale * m.weight_quant.scale  # the int32 bias grid (as ONNX Runtime uses)
    ref = nn.functional.conv2d(xq, fq_w, torch.round(b / s_acc) * s_acc, padding=1)
    assert (out - ref).abs().max().item() <= 1e-5
    # the weight quantizer saw the folded weight: per-channel max |w_fold| maps to qmax
    torch.testing.assert_close(m.weight_quant.scale, w.detach().abs().amax((1, 2, 3)) / 127)


def test_simulate_train_uses_batch_stats_correction():
    """In training, simulate = BN(batch stats) applied to conv(x, q(w_fold)) / (gamma / sigma)."""
    conv, bn = _conv_bn()
    m = QuantConvBn2d(conv, bn, W8, None, mode="simulate").train()
    x = torch.randn(16, 3, 7, 7)
    sigma = torch.sqrt(bn.running_var + bn.eps)
    factor = bn.weight / sigma
    out = m(x)
    q = m.weight_quant
    wq = torch.fake_quantize_per_channel_affine(
        conv.weight * factor.reshape(-1, 1, 1, 1), q.scale, q.zero_point, 0, -128, 127
    )
    y = nn.functional.conv2d(x, wq, None, padding=1) / factor.reshape(1, -1, 1, 1)
    mu, var = y.mean((0, 2, 3)), y.var((0, 2, 3), unbiased=False)
    ref = (y - mu.reshape(1, -1, 1, 1)) / torch.sqrt(var + bn.eps).reshape(1, -1, 1, 1)
    ref = ref * bn.weight.reshape(1, -1, 1, 1) + bn.bias.reshape(1, -1, 1, 1)
    assert (out - ref).abs().max().item() <= 1e-4
    # frozen BN statistics: training output now equals the eval (deployed) output
    m.bn_frozen = True
    before = m.bn.running_mean.clone()
    out_frozen = m(x)
    torch.testing.assert_close(m.bn.running_mean, before)
    m.eval()
    torch.testing.assert_close(out_frozen, m(x))


def test_fake_quantizer_equals_core_op_and_disable():
    fq = FakeQuantizer(QuantSpec(bits=4))
    x = torch.randn(100) * 2
    out = fq(x)
    s, z = fq.scale, fq.zero_point
    assert torch.equal(out, torch.fake_quantize_per_tensor_affine(x, s, z, 0, 15))
    torch.testing.assert_close(s, (x.max() - x.min()).reshape(1) / 15)
    fq.fake_quant_enabled = False
    assert torch.equal(fq(x), x)


def test_fake_quantizer_uncalibrated_raises():
    fq = FakeQuantizer(QuantSpec(bits=8))
    fq.observer_enabled = False
    with pytest.raises(RuntimeError, match="calibrate"):
        fq(torch.randn(4))


def test_lsq_scale_is_learned_and_not_overwritten_in_training():
    fq = FakeQuantizer(QuantSpec(bits=4, symmetric=True, ste="lsq"))
    x = torch.randn(256)
    fq.eval()
    calibrate(fq, [x])  # calibration initialises the learned scale from the observer
    init = fq.scale.detach().clone()
    torch.testing.assert_close(init, x.abs().max().reshape(1) / 7)
    fq.train()
    opt = torch.optim.SGD(fq.parameters(), lr=0.1)
    for _ in range(5):
        opt.zero_grad()
        loss = (fq(x) - x).pow(2).sum()
        loss.backward()
        assert fq.scale.grad is not None and fq.scale.grad.abs().item() > 0
        opt.step()
    assert not torch.equal(fq.scale.detach(), init)  # training, not the observer, owns the scale now
    trained = fq.scale.detach().clone()
    fq.eval()
    fq(x * 3)  # an eval pass (e.g. evaluate() mid-training) must not re-observe a learned scale
    assert torch.equal(fq.scale.detach(), trained)


def test_grad_factor_scales_the_learned_scale_gradient_only():
    from qatlab.quant import lsq_grad_factor

    x = torch.randn(64, 10)
    grads = {}
    for factor in (None, 1.0):
        fq = FakeQuantizer(QuantSpec(bits=3, symmetric=True, ste="lsq"))
        fq.eval()
        calibrate(fq, [x])
        fq.train()
        fq.grad_factor = factor
        xi = x.clone().requires_grad_(True)
        (fq(xi) * torch.linspace(-1, 1, 10)).sum().backward()
        grads[factor] = (fq.scale.grad.clone(), xi.grad.clone())
    g = lsq_grad_factor(x, QuantSpec(bits=3, symmetric=True, ste="lsq"))  # 1 / sqrt(640 * 3)
    assert g == pytest.approx(1 / (640 * 3) ** 0.5)
    torch.testing.assert_close(grads[None][0], grads[1.0][0] * g)  # LSQ's scaling, and 1.0 turns it off
    torch.testing.assert_close(grads[None][1], grads[1.0][1])  # the input gradient does not change


def test_quant_linear_and_conv_match_manual():
    torch.manual_seed(1)
    lin = nn.Linear(5, 3)
    m = QuantLinear(lin, W8, A8, relu=True)
    x = torch.randn(7, 5)
    out = m(x)
    wq = torch.fake_quantize_per_channel_affine(
        lin.weight, m.weight_quant.scale, m.weight_quant.zero_point, 0, -128, 127
    )
    xq = torch.fake_quantize_per_tensor_affine(x, m.input_quant.scale, m.input_quant.zero_point, 0, 255)
    s_acc = m.input_quant.scale * m.weight_quant.scale
    b_q = torch.round(lin.bias / s_acc) * s_acc
    assert torch.equal(out, torch.relu(nn.functional.linear(xq, wq, b_q)))
    assert not torch.equal(b_q, lin.bias)  # the rounding is real, and at most half a grid step
    assert ((b_q - lin.bias).abs() <= s_acc / 2 + 1e-12).all()
    conv = nn.Conv2d(4, 4, 3, groups=4, stride=2)
    mc = QuantConv2d(conv, W8, None)
    xc = torch.randn(2, 4, 9, 9)
    out_c = mc(xc)  # observes the weight, then quantizes it
    wq = torch.fake_quantize_per_channel_affine(
        conv.weight, mc.weight_quant.scale, mc.weight_quant.zero_point, 0, -128, 127
    )
    assert torch.equal(out_c, nn.functional.conv2d(xc, wq, conv.bias, stride=2, groups=4))
    with pytest.raises(ValueError, match="padding_mode"):
        QuantConv2d(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), W8, A8)
