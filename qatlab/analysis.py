"""Measuring quantization error: per-layer weights and activations, and SQNR tables as tidy DataFrames.

Example:
    >>> from qatlab import analysis, zoo
    >>> model, (train, test), _ = zoo.trained_cnn()  # doctest: +SKIP
    >>> weights = analysis.layer_weights(model)  # doctest: +SKIP
    >>> specs = {"W8 per-channel": QuantSpec(bits=8, symmetric=True, per_channel=True)}
    >>> analysis.sqnr_table(weights, specs)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import pandas as pd
import torch
from torch import Tensor, nn

from qatlab import formats
from qatlab.config import QATConfig, QuantSpec
from qatlab.modules import FakeQuantizer, QuantConv2d, QuantLinear
from qatlab.prepare import prepare_qat, run_batch
from qatlab.quant import fake_quant, qparams, sqnr


def layer_kind(layer: nn.Module) -> str:
    """``"linear"``, ``"depthwise"`` (a grouped conv), ``"pointwise"`` (1x1 kernel) or ``"full"`` conv."""
    if not hasattr(layer, "groups"):  # nn.Linear, QuantLinear
        return "linear"
    if layer.groups > 1:
        return "depthwise"
    return "pointwise" if all(k == 1 for k in layer.weight.shape[2:]) else "full"


def layer_weights(model: nn.Module, fold_bn: bool = True) -> dict[str, Tensor]:
    """The weight of every Conv2d/Linear by module name; with ``fold_bn`` BatchNorm is folded in first
    (the weights that are deployed, and quantized, after folding)."""
    if fold_bn:
        folded = prepare_qat(model, QATConfig(activation=None, bn_mode="fold"))
        return {
            n: m.weight.detach().clone()
            for n, m in folded.named_modules()
            if isinstance(m, (QuantConv2d, QuantLinear))
        }
    return {
        n: m.weight.detach().clone()
        for n, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    }


@torch.no_grad()
def layer_inputs(
    model: nn.Module, loader: Iterable, num_batches: int = 2, device: str | torch.device = "cpu"
) -> dict[str, Tensor]:
    """The input activation of every Conv2d/Linear (float model, eval mode) over ``num_batches`` batches."""
    captured: dict[str, list[Tensor]] = {}
    hooks = [
        m.register_forward_pre_hook(
            lambda m, args, name=n: captured.setdefault(name, []).append(args[0].cpu())
        )
        for n, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    was_training = model.training
    model.eval()
    try:
        for i, batch in enumerate(loader):
            if i >= num_batches:
                break
            run_batch(model, batch, device)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {n: torch.cat(v) for n, v in captured.items()}


@torch.no_grad()
def quantize_tensor(x: Tensor, spec: QuantSpec, is_weight: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Observe ``x`` with ``spec``'s observer and fake-quantize it: ``(x_hat, scale, zero_point)``.

    ``is_weight``: ``x`` is a layer's weight (a conv weight is then blocked along Cin x kh x kw, as in the layer;
    an (N, C, H, W) activation along C). For block formats the returned scale is not the block scales."""
    channels = x.shape[spec.ch_axis] if spec.per_channel else (x.shape[0] if is_weight else None)
    fq = FakeQuantizer(spec.with_(ste="clipped"), channels).eval()
    fq.calibrating = True
    x_hat = fq(x)
    return x_hat, fq.scale.clone(), fq.zero_point.clone()


def clipped_fraction(x: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec) -> float:
    """Fraction of values beyond the grid's ends by more than half a step: clipped, not just rounded."""
    if spec.per_channel:
        shape = [1] * x.dim()
        shape[spec.ch_axis] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    lo = scale * (spec.qmin - zero_point.float() - 0.5)
    hi = scale * (spec.qmax - zero_point.float() + 0.5)
    return float(((x < lo) | (x > hi)).float().mean())


def sqnr_table(
    tensors: Mapping[str, Tensor], specs: Mapping[str, QuantSpec], kind: str = "weight"
) -> pd.DataFrame:
    """SQNR (dB) of every tensor under every spec: one row per (layer, spec).

    Any ``qatlab.formats`` spec works (groups, FP8, MX, NVFP4): ``format``, ``bits_per_element`` (scales
    included, :func:`qatlab.formats.bits_per_element`) and, for those, ``clipped_frac`` is the saturated fraction.
    """
    rows = []
    for layer, x in tensors.items():
        for label, spec in specs.items():
            x_hat, scale, zp = quantize_tensor(x, spec, is_weight=kind == "weight")
            view = x.flatten(1) if kind == "weight" and spec.blocked and x.dim() > 2 else x
            if spec.blocked and kind != "weight" and x.dim() == 4 and spec.block_axis == -1:
                view = x.movedim(1, -1)  # an activation blocks along its channels (FakeQuantizer's rule)
            rows.append(
                {
                    "layer": layer,
                    "kind": kind,
                    "config": label,
                    "bits": spec.bits,
                    "format": spec.format,
                    "bits_per_element": formats.bits_per_element(spec, tuple(view.shape)),
                    "observer": spec.observer,
                    "granularity": _granularity(spec),
                    "sqnr_db": sqnr(x, x_hat),
                    "clipped_frac": clipped_fraction(x, scale, zp, spec)
                    if spec.is_integer
                    else formats.saturated_fraction(view, spec),
                }
            )
    return pd.DataFrame(rows)


def _granularity(spec: QuantSpec) -> str:
    if spec.per_token:
        return "per-token"
    if spec.blocked:
        return f"per-block ({spec.group_size or formats.FORMATS[spec.format][1]})"
    return "per-channel" if spec.per_channel else "per-tensor"


def bn_fold_channel_stats(weight, folded, bits: int = 8):
    """Per output channel of a conv: max|w| before and after folding BN, and the SQNR (dB) of the folded
    channel when the folded tensor is quantized symmetric with one scale per tensor vs one per channel.

    Returns a pandas DataFrame with columns ``channel``, ``max_before``, ``max_after``, ``sqnr_per_tensor``,
    ``sqnr_per_channel`` (a channel that quantizes to all zeros has SQNR 0 dB).
    """
    weight, folded = weight.detach().float(), folded.detach().float()  # (C, Cin/groups, kh, kw)
    quantized = {}
    with torch.no_grad():
        for per_channel in (False, True):
            spec = QuantSpec(bits=int(bits), symmetric=True, per_channel=per_channel)
            amax = folded.abs().flatten(1).amax(dim=1) if per_channel else folded.abs().max()
            scale, zp = qparams(-amax, amax, spec)
            quantized[per_channel] = fake_quant(folded, scale, zp, spec)
    channels = range(len(folded))
    return pd.DataFrame(
        {
            "channel": channels,
            "max_before": weight.abs().flatten(1).amax(dim=1).numpy(),
            "max_after": folded.abs().flatten(1).amax(dim=1).numpy(),
            "sqnr_per_tensor": [sqnr(folded[c], quantized[False][c]) for c in channels],
            "sqnr_per_channel": [sqnr(folded[c], quantized[True][c]) for c in channels],
        }
    )


def ste_curves(x, scale: float, zero_point: int, spec) -> pd.DataFrame:
    """Forward and backward pass of ``fake_quant`` at every value of ``x``, one row per value.

    The gradients are what autograd returns through :func:`qatlab.fake_quant` with ``spec.ste``, read per
    element: the scale is repeated once per value (a per-channel scale, one "channel" per value), so
    ``d out_i / d S`` comes back for each ``x_i`` unsummed, with LSQ's gradient factor set to 1.

    Columns: ``x``; ``fake_quant`` (the staircase); ``error`` (``x - fake_quant``); ``grad_x`` (the STE's
    ``d out / d x``); ``grad_scale`` (``d out / d S``; NaN when the STE leaves S fixed); ``grad_alpha``
    (PACT only: ``d out / d alpha`` with ``alpha = S (qmax - Z)``; else NaN); ``grad_round_x`` and
    ``grad_round_scale``: the same quantizer written with ``torch.round`` and differentiated by autograd,
    no STE.

    Example:
        >>> from qatlab import QuantSpec
        >>> import torch
        >>> ste_curves(torch.linspace(-1, 1, 5), 0.25, 0, QuantSpec(bits=4, symmetric=True)).grad_x.tolist()
        [1.0, 1.0, 1.0, 1.0, 1.0]
    """
    x = torch.as_tensor(x, dtype=torch.float32).detach().reshape(-1)
    n, z0 = x.numel(), int(zero_point)
    xg = x.clone().requires_grad_(True)
    s = torch.full((n,), float(scale), requires_grad=True)
    z = torch.full((n,), z0, dtype=torch.int32)
    y = fake_quant(xg, s, z, spec.with_(per_channel=True, ch_axis=0), grad_factor=1.0)
    y.sum().backward()
    nan = torch.full((n,), float("nan"))
    grad_scale = s.grad if s.grad is not None else nan
    grad_alpha = grad_scale / (spec.qmax - z0) if spec.ste == "pact" and spec.qmax > z0 else nan
    # The same quantizer written with torch.round, and autograd's own derivative of it (round' = 0).
    xr = x.clone().requires_grad_(True)
    sr = torch.full((n,), float(scale), requires_grad=True)
    code = torch.clamp(torch.round(xr / sr) + z0, spec.qmin, spec.qmax)
    (sr * (code - z0)).sum().backward()
    return pd.DataFrame(
        {
            "x": x.numpy(),
            "fake_quant": y.detach().numpy(),
            "error": (x - y.detach()).numpy(),
            "grad_x": xg.grad.numpy(),
            "grad_scale": grad_scale.detach().numpy(),
            "grad_alpha": grad_alpha.detach().numpy(),
            "grad_round_x": xr.grad.numpy(),
            "grad_round_scale": sr.grad.numpy(),
        }
    )
