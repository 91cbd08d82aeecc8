"""Small image classifiers for the QAT experiments, sized for 2 CPU cores.

Every model works on 28x28 (Fashion-MNIST) and 8x8 (digits) inputs, is traceable by ``torch.fx``, and builds
its convolutions as ``Conv2d(bias=False) -> BatchNorm2d -> ReLU`` modules in a row, which is the pattern that
the fusion pass looks for. :class:`ResidualCNN` adds a residual addition and a functional ReLU on purpose, so
that model surgery must also handle ops that are not modules.

Example:
    >>> import torch
    >>> model = build_model("cnn", width=8)
    >>> model(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qatlab.config import check_positive_int


def _conv_bn_relu(
    c_in: int, c_out: int, kernel: int = 3, stride: int = 1, groups: int = 1
) -> list[nn.Module]:
    # Returned as a flat list so the three modules end up as consecutive children of one Sequential.
    return [
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    ]


class LabCNN(nn.Module):
    """Four conv-BN-ReLU blocks (two of them stride 2), global average pool, linear classifier.

    Args:
        num_classes: number of output logits.
        in_channels: input image channels.
        width: channels of the first block; later blocks use 2x and 4x.

    Example:
        >>> LabCNN(width=8)(torch.zeros(4, 1, 8, 8)).shape
        torch.Size([4, 10])
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("in_channels", in_channels), ("width", width)):
            check_positive_int(name, value)
        w = width
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, w),
            *_conv_bn_relu(w, 2 * w, stride=2),
            *_conv_bn_relu(2 * w, 2 * w),
            *_conv_bn_relu(2 * w, 4 * w, stride=2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W)
        x = self.features(x)  # (B, 4w, H/4, W/4)
        return self.classifier(self.flatten(self.pool(x)))  # (B, num_classes)


class DepthwiseCNN(nn.Module):
    """A stem conv, then three depthwise-separable blocks (the MobileNet pattern), pool, linear.

    Depthwise convs have one filter per channel, so per-tensor weight quantization suffers where
    per-channel does not: the point of this model in the lab.

    Args:
        num_classes: number of output logits.
        in_channels: input image channels.
        width: stem channels; the blocks widen to 2x, 4x and 8x.

    Example:
        >>> DepthwiseCNN(width=8)(torch.zeros(4, 1, 28, 28)).shape
        torch.Size([4, 10])
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("in_channels", in_channels), ("width", width)):
            check_positive_int(name, value)
        layers = _conv_bn_relu(in_channels, width)
        c = width
        for stride in (1, 2, 2):
            layers += _conv_bn_relu(c, c, stride=stride, groups=c)  # depthwise
            layers += _conv_bn_relu(c, 2 * c, kernel=1)  # pointwise
            c *= 2
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W)
        x = self.features(x)  # (B, 8w, H/4, W/4)
        return self.classifier(self.flatten(self.pool(x)))  # (B, num_classes)


class MLP(nn.Module):
    """Flatten, then ``Linear -> ReLU`` hidden layers and a final linear classifier.

    Args:
        in_features: pixels per image: 784 for 28x28, 64 for 8x8.
        hidden: sizes of the hidden layers (may be empty for a linear model).
        num_classes: number of output logits.

    Example:
        >>> MLP(in_features=64, hidden=(32,))(torch.zeros(4, 1, 8, 8)).shape
        torch.Size([4, 10])
    """

    def __init__(
        self, in_features: int = 784, hidden: Sequence[int] = (256, 128), num_classes: int = 10
    ) -> None:
        super().__init__()
        check_positive_int("in_features", in_features)
        check_positive_int("num_classes", num_classes)
        if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Sequence):
            raise TypeError(f"hidden={hidden!r} must be a sequence of layer sizes, e.g. (256, 128)")
        layers: list[nn.Module] = [nn.Flatten()]
        n = in_features
        for i, h in enumerate(hidden):
            check_positive_int(f"hidden[{i}]", h)
            layers += [nn.Linear(n, h), nn.ReLU()]
            n = h
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(n, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W) with C*H*W == in_features
        return self.classifier(self.features(x))  # (B, num_classes)


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN, plus a shortcut, then a *functional* ReLU.

    The shortcut is the identity, or a 1x1 conv + BN when the stride or the channel count changes.

    Args:
        c_in: input channels.
        c_out: output channels.
        stride: stride of the first conv (and of the shortcut).

    Example:
        >>> ResidualBlock(8, 16, stride=2)(torch.zeros(2, 8, 8, 8)).shape
        torch.Size([2, 16, 4, 4])
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        for name, value in (("c_in", c_in), ("c_out", c_out), ("stride", stride)):
            check_positive_int(name, value)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, c_in, H, W)
        # A Python-level branch on a module attribute, not on tensor data, so fx tracing stays static.
        identity = x if self.downsample is None else self.downsample(x)  # (B, c_out, H/s, W/s)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + identity
        # Functional on purpose: the surgery passes must find this relu in the fx graph, not as a module.
        return F.relu(out)  # (B, c_out, H/s, W/s)


class ResidualCNN(nn.Module):
    """A stem conv-BN-ReLU, two residual blocks (the second with stride 2), pool, linear.

    Args:
        num_classes: number of output logits.
        in_channels: input image channels.
        width: stem channels; the second block doubles them.

    Example:
        >>> ResidualCNN(width=8)(torch.zeros(4, 1, 28, 28)).shape
        torch.Size([4, 10])
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("in_channels", in_channels), ("width", width)):
            check_positive_int(name, value)
        self.stem = nn.Sequential(*_conv_bn_relu(in_channels, width))
        self.layer1 = ResidualBlock(width, width)
        self.layer2 = ResidualBlock(width, 2 * width, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W)
        x = self.layer2(self.layer1(self.stem(x)))  # (B, 2w, H/2, W/2)
        return self.classifier(self.flatten(self.pool(x)))  # (B, num_classes)


class _ConvBNReLU6(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU6(inplace=False),
        )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear projection; residual when shapes match."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        self.use_residual = stride == 1 and c_in == c_out
        layers: list[nn.Module] = [_ConvBNReLU6(c_in, hidden, 1)] if expand != 1 else []
        layers += [
            _ConvBNReLU6(hidden, hidden, 3, stride, groups=hidden),  # depthwise
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al. 2018), width 1.0, with the module names of the ImageNet checkpoint.

    52 BatchNorm layers and 17 depthwise convs: the classic case where folding BN makes per-tensor
    weight quantization fail (Krishnamoorthi 2018, Table 3). :func:`qatlab.zoo.mobilenet_v2_imagenet` loads
    the pretrained weights.
    """

    # (expansion t, channels c, repeats n, first stride s), as in the paper's Table 2
    SETTINGS = (
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )

    def __init__(self, num_classes: int = 1000, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [_ConvBNReLU6(in_channels, 32, 3, 2)]
        c_in = 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(c_in, c, s if i == 0 else 1, t))
                c_in = c
        layers.append(_ConvBNReLU6(c_in, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, num_classes)
        return self.classifier(self.flatten(self.pool(self.features(x))))


MODELS: dict[str, type[nn.Module]] = {
    "cnn": LabCNN,
    "dwcnn": DepthwiseCNN,
    "mlp": MLP,
    "resnet": ResidualCNN,
}  # MobileNetV2 is built directly (ImageNet-sized, see qatlab.zoo.mobilenet_v2_imagenet)


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """A model by name: ``"cnn"`` (:class:`LabCNN`), ``"dwcnn"``, ``"mlp"`` or ``"resnet"``.

    Weights come from PyTorch's default init, so ``torch.manual_seed`` before the call fixes them.

    Args:
        name: one of the keys of :data:`MODELS`.
        **kwargs: passed to the model's constructor (e.g. ``width=8``, or ``in_features=64`` for the MLP).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> build_model("mlp", in_features=64, hidden=(32,)).classifier.out_features
        10
    """
    if name not in MODELS:
        raise ValueError(f"name={name!r} is not a known model; use one of {', '.join(map(repr, MODELS))}")
    return MODELS[name](**kwargs)


def count_parameters(model: nn.Module) -> int:
    """Total number of parameter elements (trainable or not; buffers such as BN statistics excluded).

    Example:
        >>> count_parameters(MLP(in_features=64, hidden=(32,)))
        2410
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model={type(model).__name__} is not a torch.nn.Module; pass a model")
    return sum(p.numel() for p in model.parameters())
