"""Cross-layer equalization and bias correction: the two PTQ fixes of Nagel et al. 2019 ("Data-Free Quantization
Through Weight Equalization and Bias Correction", arXiv:1906.04721), the tools AIMET users reach for before QAT.

**Cross-layer equalization** (:func:`equalize`). Folding BatchNorm multiplies each output channel of a conv by
``gamma / sigma``, so channel ranges spread over orders of magnitude (notebook 03) and one per-tensor scale fits
none of them. For two convs with a ReLU between them, ``relu(x / s) = relu(x) / s`` for ``s > 0``: dividing output
channel ``i`` of the first conv (weights and bias) by ``s_i`` and multiplying input channel ``i`` of the second by
``s_i`` computes exactly the same function. With ``r1_i`` the range of the first conv's channel ``i`` and ``r2_i``
that of the second conv's input channel ``i``, ``s_i = sqrt(r1_i / r2_i)`` gives both the range
``sqrt(r1_i r2_i)``: the channels of each layer move toward a common range. Chains of convs are swept until the
scales settle.

**Bias correction** (:func:`correct_bias`). Quantizing a weight adds an error ``dW`` whose mean effect on the
output, ``dW E[x]``, does not average out: it shifts every output of a channel by the same amount, and the next
layers see a biased input. With the input's per-channel mean ``E[x]`` measured on a few batches (the paper's
empirical variant), subtracting ``dW E[x]`` from the bias removes that shift, layer by layer in execution order
(each layer measured with the earlier ones already corrected).

Both are PTQ: no gradient, a handful of batches at most. ``tests/test_equalize.py`` checks that equalization
leaves the float function unchanged and equalizes the ranges, and that bias correction zeroes the mean output
shift it targets.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qatlab.modules import QuantConv2d, QuantConvBn2d, QuantLinear, fold_bn
from qatlab.prepare import run_batch

# modules that may sit between two convs without breaking the equalization: x -> f(x / s) = f(x) / s, s > 0
_HOMOGENEOUS = (nn.ReLU, nn.Identity, nn.Dropout)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A float copy of ``model`` with every ``Conv2d -> BatchNorm2d`` pair (neighbours in an ``nn.Sequential``)
    folded into the conv (weights ``w * gamma / sigma``, a bias) and the BN replaced by ``nn.Identity``."""
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
            names = list(seq._modules)
            for a, b in itertools.pairwise(names):
                conv, bn = seq._modules[a], seq._modules[b]
                if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                    w, bias = fold_bn(conv.weight, conv.bias, bn)
                    conv.weight.copy_(w)
                    conv.bias = nn.Parameter(bias.detach().clone())
                    seq._modules[b] = nn.Identity()
    return model


def conv_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """Names of ``(conv1, conv2)`` pairs that can be equalized: neighbours inside one ``nn.Sequential`` with only
    ReLU / Identity / Dropout between them (BatchNorm must be folded first: :func:`fold_batchnorm`)."""
    names = {m: n for n, m in model.named_modules()}
    pairs = []
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        last = None
        for child in seq.children():
            if isinstance(child, nn.Conv2d):
                if last is not None:
                    pairs.append((names[last], names[child]))
                last = child
            elif not isinstance(child, _HOMOGENEOUS):
                last = None
    return pairs


def _input_channel_ranges(conv: nn.Conv2d) -> Tensor:
    """(C_in,): the largest |w| that reads each input channel (for a grouped conv, over its group's filters)."""
    w = conv.weight.detach().abs()
    out_c, cg = w.shape[:2]
    per_group = out_c // conv.groups
    ranges = w.reshape(conv.groups, per_group, cg, -1).amax(dim=(1, 3))  # (groups, cg)
    return ranges.reshape(-1)


def _scale_input_channels(conv: nn.Conv2d, s: Tensor) -> None:
    out_c, cg = conv.weight.shape[:2]
    per_group = out_c // conv.groups
    w = conv.weight.data.reshape(conv.groups, per_group, cg, *conv.weight.shape[2:])
    w.mul_(s.reshape(conv.groups, 1, cg, *([1] * (conv.weight.dim() - 2))))


def equalize(model: nn.Module, max_sweeps: int = 20, tol: float = 1e-3) -> tuple[nn.Module, Any]:
    """Cross-layer equalization of a float model: BN folded (:func:`fold_batchnorm`), then every pair of
    :func:`conv_pairs` rescaled channel by channel (see the module docstring), sweeping the chain until no scale
    moves by more than ``tol`` (at most ``max_sweeps`` sweeps). The function the model computes is unchanged.

    Returns:
        ``(equalized copy, table)``: one row per conv with ``spread_before`` and ``spread_after``, the ratio of
        its largest to its smallest per-output-channel range (all-zero channels left out), and ``sweeps``.
    """
    import pandas as pd

    if not isinstance(max_sweeps, int) or max_sweeps < 1:
        raise ValueError(f"max_sweeps={max_sweeps!r} must be a positive int, e.g. 20")
    model = fold_batchnorm(model)
    pairs = conv_pairs(model)
    if not pairs:
        raise ValueError(
            f"{type(model).__name__} has no conv -> (ReLU) -> conv pairs inside an nn.Sequential; nothing to equalize"
        )
    convs = {n: model.get_submodule(n) for n in dict.fromkeys(n for p in pairs for n in p)}

    def spread(conv: nn.Conv2d) -> float:  # over the channels with any weight (a zero channel has no range)
        r = conv.weight.detach().abs().flatten(1).amax(dim=1)
        r = r[r > 0]
        return float(r.max() / r.min()) if len(r) else 1.0

    before = {n: spread(c) for n, c in convs.items()}
    sweeps = 0
    with torch.no_grad():
        while sweeps < max_sweeps:
            sweeps += 1
            moved = 0.0
            for a, b in pairs:
                c1, c2 = convs[a], convs[b]
                r1 = c1.weight.abs().flatten(1).amax(dim=1)  # (C,) output channels of conv 1
                r2 = _input_channel_ranges(c2)  # (C,) input channels of conv 2
                live = (r1 > 0) & (r2 > 0)  # a dead channel (all-zero weights) keeps its scale
                s = torch.where(live, torch.sqrt(r1 / r2.clamp_min(1e-30)), torch.ones_like(r1))
                c1.weight.div_(s.reshape(-1, *([1] * (c1.weight.dim() - 1))))
                if c1.bias is not None:
                    c1.bias.div_(s)
                _scale_input_channels(c2, s)
                moved = max(moved, float((s.log()).abs().max()))
            if moved < tol:
                break
    table = pd.DataFrame(
        {
            "layer": list(convs),
            "spread_before": list(before.values()),
            "spread_after": [spread(c) for c in convs.values()],
        }
    )
    table["sweeps"] = sweeps
    return model, table.set_index("layer")


def _weight_error_effect(m: nn.Module, mean: Tensor) -> Tensor:
    """(C_out,): ``(q(W) - W) E[x]`` for one quantized layer, ``mean`` the per-channel mean of its input."""
    w = m.weight.detach()
    dw = m.weight_quant(w).detach() - w
    if isinstance(m, QuantLinear):
        return dw @ mean
    kh, kw = dw.shape[2:]
    patch = mean.reshape(1, -1, 1, 1).expand(1, -1, kh, kw)  # a constant input the size of one kernel
    return F.conv2d(patch, dw, groups=m.groups).reshape(-1)


def correct_bias(qmodel: nn.Module, loader, num_batches: int = 8, device: str | torch.device = "cpu") -> Any:
    """Empirical bias correction of a calibrated quantized model (``qatlab.ptq``), in place.

    For each ``QuantConv2d`` / ``QuantLinear`` in execution order: measure the per-channel mean of its quantized
    input on ``num_batches`` batches (earlier layers already corrected), compute the mean output shift
    ``(q(W) - W) E[x]`` its weight quantization causes, and subtract it from the bias (a zero bias is created
    where there was none). Layers with simulated BN folding (``QuantConvBn2d``) are skipped: their quantized
    weight is the folded one; fold first (``bn_mode="fold"`` or :func:`fold_batchnorm`).

    Returns:
        A table, one row per layer: ``shift``, the largest |mean output shift| corrected (in the layer's output
        units), and ``shift_after``, what is left of it when the input means are measured again on the loader's
        next batches (0 for a fixed list of batches; a shuffled loader shows how well the correction carries over).
    """
    import pandas as pd

    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"num_batches={num_batches!r} must be a positive int, e.g. 8")
    layers = [
        (n, m)
        for n, m in qmodel.named_modules()
        if isinstance(m, (QuantConv2d, QuantLinear))
        and not isinstance(m, QuantConvBn2d)
        and m.weight_quant is not None
    ]
    if not layers:
        raise ValueError(
            "qmodel has no quantized Conv2d/Linear layers with folded weights; pass qatlab.ptq(...)'s model"
        )
    was_training = qmodel.training
    qmodel.eval()

    def input_mean(m: nn.Module) -> Tensor:
        total, count = None, 0

        def hook(mod, args):
            nonlocal total, count
            x = mod._qin(args[0].detach())
            dims = [d for d in range(x.dim()) if d != (1 if isinstance(mod, QuantConv2d) else x.dim() - 1)]
            s = x.sum(dim=dims)
            total = s if total is None else total + s
            count += x.numel() // x.shape[1 if isinstance(mod, QuantConv2d) else -1]

        handle = m.register_forward_pre_hook(hook)
        try:
            with torch.no_grad():
                for batch in itertools.islice(loader, num_batches):
                    run_batch(qmodel, batch, device)
        finally:
            handle.remove()
        return total / count

    rows, applied = [], []
    with torch.no_grad():
        for name, m in layers:
            shift = _weight_error_effect(m, input_mean(m))
            if m.bias is None:
                m.bias = nn.Parameter(torch.zeros_like(shift))
            m.bias.sub_(shift)
            applied.append(shift)
            rows.append({"layer": name, "shift": float(shift.abs().max())})
        # what is left: the shift measured again (on the loader's next batches) minus the correction made
        for row, (_, m), done in zip(rows, layers, applied, strict=True):
            row["shift_after"] = float((_weight_error_effect(m, input_mean(m)) - done).abs().max())
    qmodel.train(was_training)
    return pd.DataFrame(rows).set_index("layer")
