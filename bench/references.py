"""Train steps of *other tools'* QAT on the lab models, as references for ``bench/bench_train_step.py``.

Each reference prepares the same float model (``build_model(model_name)``, one copy per tool) for W8A8 QAT
with that tool's own API: 8-bit per-channel symmetric weights, 8-bit per-tensor activations with
moving-average statistics (as close to that as the tool allows), and BatchNorm handled the tool's default
QAT way. A step is one ``SGD(lr=0.01, momentum=0.9)`` update on cross-entropy, like the benchmark's FP32 and
qatlab steps.

References:
    ``torch.ao eager``: ``fuse_modules_qat`` (Conv-BN-ReLU, simulated BN folding), ``QuantWrapper`` stubs,
    ``prepare_qat``.
    ``torch.ao FX``: ``prepare_qat_fx`` with the same qconfig (fuses Conv-BN-ReLU the same way).
    ``torchao PT2E``: ``torch.export`` then torchao's ``prepare_qat_pt2e`` with ``X86InductorQuantizer`` in
    QAT mode (Conv-BN fused in the graph with simulated folding).
    ``Brevitas``: the model rebuilt with ``QuantConv2d``/``QuantLinear``/``QuantReLU``; BatchNorm stays a
    float layer during training (Brevitas merges BN into the conv only after training).

A tool that is not installed, or that fails to prepare or to run one step, is reported as ``(None,
reason)`` rather than raising, so the benchmark still runs. Install them with :data:`INSTALL`.

Example:
    >>> import torch
    >>> x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    >>> steps = reference_steps("cnn", x, y)
    >>> step, note = steps["torch.ao FX"]
    >>> step()  # one QAT training step
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from qatlab.models import build_model

Step = Callable[[], None]

#: Installs the reference tools that work beside the pinned torch, without letting pip touch torch itself.
INSTALL = "pip install --no-deps torchao==0.18.0 brevitas==0.13.4 dependencies==2.0.1 unfoldNd==0.2.3"

LR = 0.01
MOMENTUM = 0.9
EMA = 0.01  # moving-average constant of the activation statistics (torch.ao's default averaging_constant)


def _make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Step:
    """One SGD step of ``model`` on the batch ``(x, y)``, as in ``bench_train_step._step_fn``."""
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return step


def _conv_bn_relu_names(model: nn.Module) -> list[list[str]]:
    """Qualified names of every ``Conv2d -> BatchNorm2d -> ReLU`` run of consecutive Sequential children."""
    groups: list[list[str]] = []
    for prefix, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for i in range(len(children) - 2):
            (n0, m0), (n1, m1), (n2, m2) = children[i : i + 3]
            if isinstance(m0, nn.Conv2d) and isinstance(m1, nn.BatchNorm2d) and isinstance(m2, nn.ReLU):
                groups.append([f"{prefix}.{n}" if prefix else n for n in (n0, n1, n2)])
    return groups


def _torch_ao_qconfig() -> torch.ao.quantization.QConfig:
    """W8 per-channel symmetric, A8 per-tensor affine, both ``FusedMovingAvgObsFakeQuantize``.

    The same fake-quantizers as ``get_default_qat_qconfig("x86")`` but without its ``reduce_range`` (a 7-bit
    activation range kept for old CPUs), so activations get the full 8 bits like the other references.
    """
    from torch.ao.quantization import QConfig
    from torch.ao.quantization.fake_quantize import (
        FusedMovingAvgObsFakeQuantize,
        default_fused_per_channel_wt_fake_quant,
    )
    from torch.ao.quantization.observer import MovingAverageMinMaxObserver

    activation = FusedMovingAvgObsFakeQuantize.with_args(
        observer=MovingAverageMinMaxObserver,
        averaging_constant=EMA,
        quant_min=0,
        quant_max=255,
        dtype=torch.quint8,
        qscheme=torch.per_tensor_affine,
    )
    return QConfig(activation=activation, weight=default_fused_per_channel_wt_fake_quant)


def _torch_ao_eager(float_model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[Step, str]:
    from torch.ao.quantization import QuantWrapper, fuse_modules_qat, prepare_qat

    model = copy.deepcopy(float_model).train()
    groups = _conv_bn_relu_names(model)
    fuse_modules_qat(model, groups, inplace=True)
    wrapped = QuantWrapper(model)  # quantizes the input, dequantizes the logits; qatlab stays untouched
    wrapped.qconfig = _torch_ao_qconfig()
    prepare_qat(wrapped, inplace=True)
    note = f"torch {torch.__version__}: fuse_modules_qat ({len(groups)} Conv-BN-ReLU), prepare_qat"
    return _make_step(wrapped, x, y), note


def _torch_ao_fx(float_model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[Step, str]:
    from torch.ao.quantization import QConfigMapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    model = copy.deepcopy(float_model).train()
    prepared = prepare_qat_fx(model, QConfigMapping().set_global(_torch_ao_qconfig()), example_inputs=(x,))
    return _make_step(prepared, x, y), f"torch {torch.__version__}: prepare_qat_fx"


@contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    """Silence these loggers' warnings for a while (torchao's import logs one per CUDA-only extension)."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _torchao_pt2e(float_model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[Step, str]:
    with _quiet_loggers("torchao", "torch.utils._pytree"):
        import torchao
        from torchao.quantization.pt2e import move_exported_model_to_train
        from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer,
            get_default_x86_inductor_quantization_config,
        )

    model = copy.deepcopy(float_model).train()
    exported = torch.export.export(model, (x,)).module()
    # W8 per-channel symmetric + A8 per-tensor affine, FusedMovingAvgObsFakeQuantize, full 8-bit range.
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config(is_qat=True))
    prepared = prepare_qat_pt2e(exported, quantizer)
    move_exported_model_to_train(prepared)  # train-mode BatchNorm; .train() is disallowed on the graph
    note = f"torchao {torchao.__version__}: torch.export + prepare_qat_pt2e(X86InductorQuantizer, is_qat)"
    return _make_step(prepared, x, y), note


def _brevitas_model(float_model: nn.Module) -> nn.Module:
    """``float_model`` with its Conv2d, Linear and ReLU layers swapped for Brevitas quant layers.

    The float weights are copied, BatchNorm and pooling stay as they are, and the forward code is the
    model's own, so the layer structure is unchanged. Weights: ``Int8WeightPerChannelFloat`` (symmetric,
    narrow range). Activations: per-tensor 8-bit with the scale from abs-max statistics, kept as a moving
    average (``EMA``) for eval; in training Brevitas quantizes with the batch's own abs-max. The first conv
    also quantizes the (signed) network input and the classifier its (signed) logits.
    """
    import brevitas.nn as qnn
    from brevitas.inject.enum import ScalingImplType, StatsOp
    from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerChannelFloat, Uint8ActPerTensorFloat

    class Int8ActEMA(Int8ActPerTensorFloat):  # signed: the network input and the logits
        scaling_impl_type = ScalingImplType.STATS
        scaling_stats_op = StatsOp.MAX
        scaling_stats_momentum = EMA

    class Uint8ActEMA(Uint8ActPerTensorFloat):  # unsigned: ReLU outputs
        scaling_impl_type = ScalingImplType.STATS
        scaling_stats_op = StatsOp.MAX
        scaling_stats_momentum = EMA

    model = copy.deepcopy(float_model)
    first_conv = True

    def convert(parent: nn.Module) -> None:
        nonlocal first_conv
        for name, child in parent.named_children():
            new: nn.Module | None = None
            if isinstance(child, nn.Conv2d):
                new = qnn.QuantConv2d(
                    child.in_channels,
                    child.out_channels,
                    child.kernel_size,
                    stride=child.stride,
                    padding=child.padding,
                    dilation=child.dilation,
                    groups=child.groups,
                    padding_mode=child.padding_mode,
                    bias=child.bias is not None,
                    weight_quant=Int8WeightPerChannelFloat,
                    input_quant=Int8ActEMA if first_conv else None,
                )
                first_conv = False
            elif isinstance(child, nn.Linear):
                new = qnn.QuantLinear(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    weight_quant=Int8WeightPerChannelFloat,
                    output_quant=Int8ActEMA,
                )
            elif isinstance(child, nn.ReLU):
                new = qnn.QuantReLU(act_quant=Uint8ActEMA)
            else:
                convert(child)
            if new is None:
                continue
            with torch.no_grad():
                for pname, param in child.named_parameters(recurse=False):  # weight and bias
                    getattr(new, pname).copy_(param)
            setattr(parent, name, new)

    convert(model)
    return model


def _brevitas(float_model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[Step, str]:
    import brevitas

    model = _brevitas_model(float_model).train()
    note = f"brevitas {brevitas.__version__}: QuantConv2d/QuantLinear/QuantReLU, float BN (not folded)"
    return _make_step(model, x, y), note


_INSTALL_HINTS = {
    "torch.ao eager": "torch.ao.quantization is not in this torch build",
    "torch.ao FX": "torch.ao.quantization.quantize_fx is not in this torch build",
    "torchao PT2E": "torchao not installed (or without the PT2E API): pip install torchao --no-deps",
    "Brevitas": "brevitas not installed: pip install brevitas dependencies==2.0.1 unfoldNd --no-deps",
}

_BUILDERS: dict[str, Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[Step, str]]] = {
    "torch.ao eager": _torch_ao_eager,
    "torch.ao FX": _torch_ao_fx,
    "torchao PT2E": _torchao_pt2e,
    "Brevitas": _brevitas,
}


def reference_steps(model_name: str, x: torch.Tensor, y: torch.Tensor) -> dict[str, tuple[Step | None, str]]:
    """Reference QAT train steps, by tool name: ``(step, note)``, or ``(None, reason)`` where a tool fails.

    Every tool gets its own copy of one float ``build_model(model_name)`` (so seed before the call to fix
    the weights). Each returned ``step`` has already run once, as a check that it works, so a tool that
    breaks at run time is reported here rather than in the middle of the benchmark. Deprecation warnings
    raised while a tool prepares its model are not printed; those about quantization APIs go in its note
    (torch 2.13 still ships ``torch.ao.quantization`` but warns that it is deprecated in favour of torchao).

    Args:
        model_name: a :func:`qatlab.models.build_model` name, e.g. ``"cnn"`` or ``"dwcnn"``.
        x: the input batch, e.g. of shape (64, 1, 28, 28); PT2E traces the graph at this shape.
        y: the class labels, of shape (batch,).
    """
    float_model = build_model(model_name).train()
    out: dict[str, tuple[Step | None, str]] = {}
    for name, build in _BUILDERS.items():
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", DeprecationWarning)
                step, note = build(float_model, x, y)
                step()
        except ImportError as e:
            out[name] = (None, f"{_INSTALL_HINTS[name]} ({type(e).__name__}: {e})")
        except Exception as e:  # any failure of a third-party tool is a reason, not a crash
            out[name] = (None, f"failed: {type(e).__name__}: {e}")
        else:
            out[name] = (step, note + _deprecations(caught))
    return out


def _deprecations(caught: list[warnings.WarningMessage]) -> str:
    """The distinct deprecations of quantization APIs among ``caught``, first lines, as a note's suffix.

    The warnings that are not deprecations are issued again, as they would have been without the capture.
    """
    for w in caught:
        if not issubclass(w.category, DeprecationWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    # Only those about quantization APIs: others (e.g. torch.jit, used inside a tool) are not the point.
    firsts = [
        str(w.message).strip().splitlines()[0].strip()
        for w in caught
        if issubclass(w.category, DeprecationWarning) and "quantiz" in str(w.message)
    ]
    return "".join(f"; deprecated: {msg}" for msg in dict.fromkeys(firsts))
