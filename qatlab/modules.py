"""QAT building blocks: the ``FakeQuantizer`` module and the quantized Conv2d / Linear / Conv+BN layers.

Each quantized layer fake-quantizes its input activation and its weight, then runs the float op, so
``prepare_qat`` can swap it in for ``nn.Conv2d`` / ``nn.Linear`` without touching the rest of the model.
BatchNorm folding lives here too (:class:`QuantConvBn2d`, :func:`fold_bn`), in three modes:

- ``fold``: BN folded into the conv before QAT (eval statistics); the layer is a plain :class:`QuantConv2d`.
- ``simulate``: the folded weight ``w * gamma / sigma`` is quantized during training, and the output is
  corrected to batch statistics (``* sigma / sigma_B``, Jacob et al. 2018 sec. 3.2, Krishnamoorthi 2018
  sec. 3.2); after ``freeze_bn_stats`` it uses running statistics and equals the deployed folded conv.
- ``keep``: BN stays a separate float op after the quantized conv; folded only for export.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qatlab import formats
from qatlab.config import QuantSpec
from qatlab.observers import make_observer
from qatlab.quant import SCALE_EPS, dynamic_qparams, fake_quant


class FakeQuantizer(nn.Module):
    """Observer + qparams + fake quant for one tensor; each part switchable.

    ``observer_enabled``: update the range from each tensor seen in training (or calibration, see
    ``prepare.calibrate``) and recompute (scale, zero_point); eval passes never move the range.
    ``fake_quant_enabled``: quantize-dequantize the tensor; off, the module is the identity.
    For learned scales (``ste`` "lsq"/"pact") ``scale`` is an ``nn.Parameter``: the observer initialises it
    (calibration, or the first batch seen) and from then on training owns it, in train and eval mode.

    Example:
        >>> fq = FakeQuantizer(QuantSpec(bits=4))
        >>> y = fq(torch.randn(16))  # observes, then fake-quantizes
    """

    def __init__(self, spec: QuantSpec, num_channels: int | None = None) -> None:
        super().__init__()
        self.spec = spec
        # a weight quantizer (it knows its channel count): a conv weight is blocked along Cin x kh x kw
        self.is_weight = num_channels is not None
        self.conv_spec = spec.with_(block_axis=1) if spec.blocked and spec.block_axis == -1 else spec
        self.observer = make_observer(spec, num_channels)
        n = num_channels if spec.per_channel else 1
        if spec.learned:
            self.scale = nn.Parameter(torch.ones(n))
        else:
            self.register_buffer("scale", torch.ones(n))
        self.register_buffer("zero_point", torch.zeros(n, dtype=torch.int32))
        self.fake_quant_enabled = True
        self.observer_enabled = True
        self.calibrating = False  # set by prepare.calibrate: learned scales take the observer's range
        # multiplier of a learned scale's gradient; None: LSQ's 1 / sqrt(N * qmax) (1.0 turns the scaling off)
        self.grad_factor: float | None = None

    @property
    def dynamic(self) -> bool:
        """True when each tensor is quantized with its own run-time range (``observer="dynamic"``), or with
        block scales computed from it (groups, per token, MX: ``qatlab.formats``)."""
        return not self.spec.stored_scale

    @property
    def calibrated(self) -> bool:
        return self.dynamic or bool(self.observer.initialized)

    @torch.no_grad()
    def update_qparams(self) -> None:
        """Copy the observer's (scale, zero_point) into this module."""
        s, z = self.observer.qparams()
        self.scale.data.copy_(s.to(self.scale.device))
        self.zero_point.copy_(z.to(self.zero_point.device))

    @property
    def updates_in_training(self) -> bool:
        """Whether a training-mode forward changes this quantizer's state (its range, or a dynamic quantizer's
        last scale): False once observers are frozen, or for a learned scale after calibration."""
        return self.dynamic or (self.observer_enabled and not (self.spec.learned and self.calibrated))

    @property
    def compiles_in_training(self) -> bool:
        """Whether a training-mode forward compiles as one graph: no state changes, or an integer grid whose
        observer updates without data-dependent branches (:attr:`qatlab.observers.Observer.compiles`)."""
        if not self.updates_in_training:
            return True
        observer = self.observer
        return not self.dynamic and self.spec.is_integer and observer.compiles and not observer.sync_ranks

    def forward(self, x: Tensor) -> Tensor:
        # Ranges move only while calibrating or training, never in an eval pass (evaluating a model must not
        # change it). A learned scale is initialised by the observer (calibration, or the first training
        # batch) and then belongs to the optimizer: observing again would undo the training.
        if self.dynamic:
            return self._dynamic(x)
        observe = (self.calibrating and self.observer_enabled) or (self.training and self.updates_in_training)
        if observe:
            self.observer(x)
            self.update_qparams()
        if not self.fake_quant_enabled:
            return x
        # (export traces with symbolic shapes: a data-dependent check would break the trace)
        if not torch.compiler.is_compiling() and not self.calibrated:
            raise RuntimeError(
                "FakeQuantizer has no range yet (observers update only in training or calibration): run "
                "qatlab.calibrate(model, loader) first"
            )
        if not self.spec.is_integer:  # FP8 or NVFP4 with a calibrated scale
            return self._format(x, self.scale)
        scale = torch.clamp(self.scale, min=SCALE_EPS) if self.spec.learned else self.scale
        return fake_quant(x, scale, self.zero_point, self.spec, self.grad_factor)

    def _format(self, x: Tensor, scale: Tensor | None) -> Tensor:
        """``qatlab.formats.fake_quant``; a conv weight (4-D) is blocked along its flattened Cin x kh x kw axis."""
        spec = self.spec
        if self.is_weight and spec.blocked and x.dim() > 2:
            return formats.fake_quant(x.flatten(1), spec, scale).reshape(x.shape)
        if spec.blocked and x.dim() == 4 and spec.block_axis == -1:
            spec = self.conv_spec  # an (N, C, H, W) activation blocks along C, the axis a conv reduces over
        return formats.fake_quant(x, spec, scale)

    def _dynamic(self, x: Tensor) -> Tensor:
        # The range of this very tensor (ONNX DynamicQuantizeLinear's formula); scale and zero_point keep the
        # last batch's values for inspection. Calibration only records the range in the observer.
        if self.calibrating and self.observer_enabled:
            self.observer(x)
        if not self.fake_quant_enabled:
            return x
        if not self.spec.is_integer:  # block scales from the tensor itself (qatlab.formats)
            return self._format(x, None)
        scale, zero_point = dynamic_qparams(x, self.spec)
        if not torch.compiler.is_compiling():
            with torch.no_grad():
                self.scale.copy_(scale)
                self.zero_point.copy_(zero_point)
        return fake_quant(x, scale, zero_point, self.spec)

    def extra_repr(self) -> str:
        s = self.spec
        fmt = "" if s.format == "int" else f"format={s.format}, "
        fmt += "" if s.group_size is None else f"group_size={s.group_size}, "
        fmt += "per_token, " if s.per_token else ""
        return (
            f"{fmt}bits={s.bits}, {'symmetric' if s.symmetric else 'asymmetric'}, "
            f"{'per_channel' if s.per_channel else 'per_tensor'}, observer={s.observer}, ste={s.ste}, "
            f"fake_quant={self.fake_quant_enabled}, observer_on={self.observer_enabled}"
        )


def _quantizer(spec: QuantSpec | None, num_channels: int | None = None) -> FakeQuantizer | None:
    return None if spec is None else FakeQuantizer(spec, num_channels)


class _QuantLayer(nn.Module):
    """Shared parts: an input-activation quantizer, a weight quantizer, an optional fused ReLU."""

    def _init_quant(self, wspec, aspec, out_channels: int, relu: bool) -> None:
        self.input_quant = _quantizer(aspec)
        self.weight_quant = _quantizer(wspec, out_channels)
        # set by prepare_qat(quantize_outputs=True) where no quantized layer reads the output
        self.output_quant: FakeQuantizer | None = None
        self.relu = relu

    def _qin(self, x: Tensor) -> Tensor:
        return x if self.input_quant is None else self.input_quant(x)

    def _qw(self, w: Tensor) -> Tensor:
        return w if self.weight_quant is None else self.weight_quant(w)

    def _act(self, y: Tensor) -> Tensor:
        y = F.relu(y) if self.relu else y
        return y if self.output_quant is None else self.output_quant(y)

    def _qbias(self, b: Tensor | None) -> Tensor | None:
        """Round the bias to the int32 grid of the accumulator, scale ``s_in * s_w``, as ONNX Runtime does.

        ORT's graph optimizer quantizes a float Conv/Gemm bias to int32 with exactly this scale; at 3-4 bits
        the float bias and the rounded one give visibly different outputs. Rounding here too makes the QAT
        model compute what ORT computes (a bias already on the grid is a fixed point of ORT's rounding).
        The gradient passes straight through.
        """
        qa, qw = self.input_quant, self.weight_quant
        if b is None or qa is None or qw is None or not (qa.fake_quant_enabled and qw.fake_quant_enabled):
            return b
        if not (qa.spec.is_integer and qw.spec.is_integer):  # no integer accumulator grid (qatlab.formats)
            return b
        s = (qa.scale.detach() * qw.scale.detach()).reshape(-1)  # (C,) or (1,): the accumulator's LSB
        b_q = torch.clamp(torch.round(b / s), -(2**31), 2**31 - 1) * s
        return b + (b_q - b).detach()


class QuantConv2d(_QuantLayer):
    """Conv2d with fake-quantized input and weight: ``conv(q_a(x), q_w(W)) + b`` (+ ReLU)."""

    def __init__(self, conv: nn.Conv2d, wspec, aspec, relu: bool = False) -> None:
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode={conv.padding_mode!r} is not supported; use padding_mode='zeros'")
        self.stride, self.padding = conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.weight = nn.Parameter(conv.weight.detach().clone())
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone())
        self._init_quant(wspec, aspec, conv.out_channels, relu)

    def _conv(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: Tensor) -> Tensor:  # (B, Cin, H, W) -> (B, Cout, H', W')
        x, w = self._qin(x), self._qw(self.weight)  # quantizers first: the bias grid needs their scales
        return self._act(self._conv(x, w, self._qbias(self.bias)))


class QuantLinear(_QuantLayer):
    """Linear with fake-quantized input and weight (+ ReLU)."""

    def __init__(self, linear: nn.Linear, wspec, aspec, relu: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        self._init_quant(wspec, aspec, linear.out_features, relu)

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        x, w = self._qin(x), self._qw(self.weight)
        return self._act(F.linear(x, w, self._qbias(self.bias)))


def fold_bn(weight: Tensor, bias: Tensor | None, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Fold eval-mode BN into a conv: ``w * gamma / sigma`` and ``(b - mu) * gamma / sigma + beta``.

    ``sigma = sqrt(running_var + eps)``. Returns new tensors; nothing is modified.
    """
    gamma = bn.weight if bn.affine else torch.ones_like(bn.running_var)
    beta = bn.bias if bn.affine else torch.zeros_like(bn.running_var)
    factor = gamma / torch.sqrt(bn.running_var + bn.eps)  # (C,)
    b = torch.zeros_like(bn.running_mean) if bias is None else bias
    w_fold = weight * factor.reshape(-1, *([1] * (weight.dim() - 1)))
    return w_fold, (b - bn.running_mean) * factor + beta


class QuantConvBn2d(QuantConv2d):
    """Conv2d + BatchNorm2d (+ ReLU) for QAT, BN handled by ``mode`` ("simulate" or "keep")."""

    def __init__(
        self, conv: nn.Conv2d, bn: nn.BatchNorm2d, wspec, aspec, relu: bool = False, mode="simulate"
    ):
        super().__init__(conv, wspec, aspec, relu)
        if mode not in ("simulate", "keep"):
            raise ValueError(
                f"mode={mode!r}: QuantConvBn2d takes 'simulate' or 'keep' ('fold' uses QuantConv2d)"
            )
        if bn.num_features != conv.out_channels:
            raise ValueError(
                f"BatchNorm has {bn.num_features} features but the conv {conv.out_channels} channels"
            )
        self.mode = mode
        self.bn = bn.__class__(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        self.bn.load_state_dict(bn.state_dict())
        self.bn_frozen = False
        # set by prepare.reestimate_bn: the variance the weight is folded with in train mode while BN's statistics
        # are recomputed (eval mode always folds with the running statistics, weight and bias alike)
        self.fold_var: Tensor | None = None

    def _bn_train(self) -> bool:
        return self.training and not self.bn_frozen

    def _batch_norm(self, y: Tensor, train: bool) -> Tensor:
        bn = self.bn
        return F.batch_norm(
            y, bn.running_mean, bn.running_var, bn.weight, bn.bias, train, bn.momentum or 0.1, bn.eps
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self._qin(x)
        if self.mode == "keep":
            y = self._conv(x, self._qw(self.weight), self.bias)
            return self._act(self._batch_norm(y, self._bn_train()))
        bn = self.bn
        train = self._bn_train()
        # while BN statistics are re-estimated (train mode only) the weight stays folded with fold_var
        var = self.fold_var if train and self.fold_var is not None else bn.running_var
        gamma = bn.weight if bn.affine else torch.ones_like(var)
        factor = gamma / torch.sqrt(var + bn.eps)  # gamma / sigma, (C,)
        w_q = self._qw(self.weight * factor.reshape(-1, 1, 1, 1))  # the quantized folded weight
        if train:
            # Undo the running-sigma scaling and normalise with batch statistics: the net effect is the
            # sigma / sigma_B correction, and BN's running statistics keep updating. The scaling is undone on
            # the weight (conv is linear per output channel), not on the much larger output.
            y = self._conv(x, w_q / factor.reshape(-1, 1, 1, 1), self.bias)
            return self._act(self._batch_norm(y, True))
        y = self._conv(x, w_q, None)
        _, b_fold = fold_bn(self.weight, self.bias, bn)
        return self._act(y + self._qbias(b_fold).reshape(1, -1, 1, 1))

    def folded(self) -> tuple[Tensor, Tensor]:
        """The deployable (weight, bias) with BN folded in using the running statistics."""
        return fold_bn(self.weight, self.bias, self.bn)
