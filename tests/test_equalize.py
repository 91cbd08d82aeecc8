"""Cross-layer equalization keeps the float function and equalizes channel ranges; bias correction removes the
mean output shift of weight quantization; clear errors."""

import itertools

import pytest
import torch
from torch import nn

import qatlab
from qatlab import QATConfig, QuantSpec, equalize
from qatlab.data import digits_loaders
from qatlab.models import build_model


def _with_spread_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """BN statistics and affine parameters spread over two orders of magnitude, as folding meets them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.copy_(10 ** (4 * torch.rand(m.num_features, generator=g) - 2))
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))
    return model.eval()


@pytest.mark.parametrize("name", ["cnn", "dwcnn"])
def test_equalization_keeps_the_function_and_narrows_the_spread(name):
    torch.manual_seed(0)
    model = _with_spread_bn(build_model(name))
    x = torch.rand(16, 1, 28, 28)
    eq, table = equalize.equalize(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in eq.modules())
    with torch.no_grad():
        ref, out = model(x), eq(x)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    # every conv with a successor in the chain gets narrower channel ranges (the last one only has its inputs
    # rescaled: its outputs feed the pooling, not a conv)
    inner = table.iloc[:-1]
    assert (inner["spread_after"] <= inner["spread_before"] * (1 + 1e-6)).all()
    assert inner["spread_after"].max() < inner["spread_before"].max() / 2


def test_one_pair_ends_with_equal_ranges():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
    with torch.no_grad():
        model[0].weight.mul_(torch.logspace(-2, 2, 8).reshape(8, 1, 1, 1))
    assert equalize.conv_pairs(model) == [("0", "2")]
    eq, table = equalize.equalize(model)
    r1 = eq[0].weight.abs().flatten(1).amax(dim=1)
    r2 = eq[2].weight.abs().amax(dim=(0, 2, 3))
    assert torch.allclose(r1, r2, rtol=1e-5)  # s_i = sqrt(r1_i / r2_i): both ranges become sqrt(r1_i r2_i)
    assert table.loc["0", "sweeps"] == 2  # one sweep equalizes, the second finds nothing left to move


def test_pairs_of_the_depthwise_cnn():
    pairs = equalize.conv_pairs(equalize.fold_batchnorm(build_model("dwcnn")))
    assert pairs == [(f"features.{3 * i}", f"features.{3 * i + 3}") for i in range(6)]  # 7 convs, one chain


@pytest.fixture(scope="module")
def mlp_ptq():
    train, test = digits_loaders(batch_size=64, seed=0)
    torch.manual_seed(0)
    model = build_model("mlp", in_features=64, hidden=(64, 32))
    qatlab.fit(model, train, epochs=2, lr=0.05, progress=False)
    cfg = QATConfig(weight=QuantSpec(bits=3, symmetric=True, per_channel=False), activation=QuantSpec(bits=8))
    return model.eval(), qatlab.ptq(model.eval(), cfg, train, num_batches=4), train


def test_bias_correction_removes_the_mean_output_shift(mlp_ptq):
    _, q, train = mlp_ptq
    batches = [
        batch for batch, _ in itertools.islice(train, 4)
    ]  # fixed: a shuffled loader changes every pass
    first = next(m for m in q.modules() if isinstance(m, qatlab.modules.QuantLinear))
    x = torch.cat(batches).flatten(1)
    with torch.no_grad():
        qx = first._qin(x)
        w, qw, b = first.weight.clone(), first.weight_quant(first.weight), first.bias.clone()
        shift = (qw - w) @ qx.mean(0)
    table = equalize.correct_bias(q, batches, num_batches=4)
    assert torch.allclose(
        b - first.bias.detach(), shift, atol=1e-6
    )  # the first layer: exactly the mean shift
    assert (table["shift"] > 0.01).all() and (table["shift_after"] < 1e-5).all()  # same batches: nothing left
    # the corrected layer's mean pre-activation equals the float weights' on the same quantized input
    with torch.no_grad():
        corrected = torch.nn.functional.linear(qx, qw, first.bias).mean(0)
        reference = torch.nn.functional.linear(qx, w, b).mean(0)
    assert torch.allclose(corrected, reference, atol=1e-5)


def test_errors(mlp_ptq):
    model, _, train = mlp_ptq
    with pytest.raises(ValueError, match="no conv -> \\(ReLU\\) -> conv pairs"):
        equalize.equalize(model)
    with pytest.raises(ValueError, match="max_sweeps=0"):
        equalize.equalize(build_model("cnn"), max_sweeps=0)
    with pytest.raises(ValueError, match="qatlab.ptq"):
        equalize.correct_bias(model, train)
    with pytest.raises(ValueError, match="num_batches=0"):
        equalize.correct_bias(model, train, num_batches=0)


def test_ptq_sweep_applies_bias_correction_to_each_calibrated_model(mlp_ptq):
    from qatlab.experiments import ptq_sweep

    model, _, train = mlp_ptq
    _, test = digits_loaders(batch_size=128, seed=0)
    configs = {
        f"W{b}": QATConfig(
            weight=QuantSpec(bits=b, symmetric=True, per_channel=False), activation=QuantSpec(bits=8)
        )
        for b in (3, 4)
    }
    seen = []

    def hook(q):
        seen.append(equalize.correct_bias(q, train, num_batches=2))

    plain = ptq_sweep(model, train, test, configs, calib_batches=2, progress=False)
    corrected = ptq_sweep(model, train, test, configs, calib_batches=2, progress=False, after_ptq=hook)
    assert len(seen) == 2 and all((t["shift"] > 0).all() for t in seen)
    assert list(corrected["config"]) == ["W3", "W4"]
    assert (
        corrected["output_sqnr_db"] != plain["output_sqnr_db"]
    ).all()  # the hook changed what was evaluated
