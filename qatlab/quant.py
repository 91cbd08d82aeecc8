"""Quantization math: qparams, quantize/dequantize, and ``fake_quant`` with its straight-through estimators.

The formulas (Krishnamoorthi 2018, Nagel et al. 2021), for a grid of integer codes ``[qmin, qmax]``::

    asymmetric:  S = (max - min) / (qmax - qmin),  Z = qmin - round(min / S)
    symmetric:   S = max(|min|, |max|) / qmax,     Z = 0
    quantize:    q = clamp(round(x / S) + Z, qmin, qmax)
    dequantize:  x_hat = S * (q - Z)

``fake_quant`` is quantize followed by dequantize in one op, bit for bit what torch's own core ops
(``torch.fake_quantize_per_tensor_affine`` / ``..._per_channel_affine``) compute; it is registered as the custom
op ``qatlab::fake_quant`` so that ONNX export can map it to QuantizeLinear/DequantizeLinear, and its backward
pass is the straight-through estimator (STE) chosen by ``spec.ste``. This file is where the STE lives.

Reading order: the qparams formulas, quantize/dequantize, the straight-through estimators (``clipped_ste``,
``ste_grads``), ``fake_quant``, then the machinery that makes it fast and exportable (the custom op and an
autograd.Function for eager training). When a large tensor runs as one compiled kernel instead of torch's core
ops is ``fused.py``'s business; the numbers are the same either way.

Example:
    >>> import torch
    >>> from qatlab import QuantSpec, qparams, fake_quant
    >>> spec = QuantSpec(bits=4, symmetric=True)
    >>> x = torch.linspace(-1, 1, 5)
    >>> s, z = qparams(x.min(), x.max(), spec)
    >>> fake_quant(x, s, z, spec)
    tensor([-1.0000, -0.4286,  0.0000,  0.4286,  1.0000])
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from qatlab import fused
from qatlab.config import QuantSpec

# Codes of the STE variants as the custom op sees them (ints keep the op schema simple).
_STE_CODE = {"clipped": 0, "identity": 1, "lsq": 2, "pact": 3}
# The smallest scale we hand out: an all-zero (or constant-zero) range would otherwise give S = 0 and NaNs.
SCALE_EPS = torch.finfo(torch.float32).eps


def qparams(min_val: Tensor | float, max_val: Tensor | float, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Scale and zero point for a range ``[min_val, max_val]`` (per tensor: scalars; per channel: (C,)).

    The range is widened to include 0 so that zero (padding, ReLU output) is exactly representable.
    A zero-width range gives the smallest positive scale, never NaN or inf.

    Returns:
        ``(scale, zero_point)``: float32 and int32 tensors of shape (1,) per tensor, (C,) per channel.

    Example:
        >>> qparams(torch.tensor(-1.0), torch.tensor(3.0), QuantSpec(bits=8))
        (tensor([0.0157]), tensor([64], dtype=torch.int32))
    """
    min_val = torch.as_tensor(min_val, dtype=torch.float32)
    max_val = torch.as_tensor(max_val, dtype=torch.float32)
    if min_val.shape != max_val.shape:
        raise ValueError(f"min_val shape {tuple(min_val.shape)} != max_val shape {tuple(max_val.shape)}")
    _check_finite("min_val", min_val)
    _check_finite("max_val", max_val)
    if (min_val > max_val).any():
        raise ValueError("min_val > max_val for some channel; pass the range as (min, max)")
    return qparams_unchecked(min_val, max_val, spec)


def qparams_unchecked(min_val: Tensor, max_val: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """:func:`qparams` without the checks, for ranges known to be finite and ordered (observers, every step)."""
    min_neg = torch.clamp(min_val.reshape(-1).float(), max=0.0)
    max_pos = torch.clamp(max_val.reshape(-1).float(), min=0.0)
    if spec.symmetric:
        amax = torch.maximum(-min_neg, max_pos)
        scale = torch.clamp(amax / spec.qmax, min=SCALE_EPS)
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        scale = torch.clamp((max_pos - min_neg) / (spec.qmax - spec.qmin), min=SCALE_EPS)
        zp = spec.qmin - torch.round(min_neg / scale)
        zero_point = torch.clamp(zp, spec.qmin, spec.qmax).to(torch.int32)
    return scale.to(torch.float32), zero_point


def dynamic_qparams(x: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Per-tensor (scale, zero_point) from ``x``'s own min/max, the formula of ONNX ``DynamicQuantizeLinear``.

    The range is widened to include 0; scale = (max - min) / (qmax - qmin), zero point = qmin - round(min / scale)
    (round half to even), clamped to the grid; symmetric specs use max|x| / qmax and zero point 0. Plain tensor
    ops without data-dependent checks, so it traces into an exported graph.

    Example:
        >>> dynamic_qparams(torch.tensor([-1.0, 3.0]), QuantSpec(bits=8))
        (tensor([0.0157]), tensor([64], dtype=torch.int32))
    """
    lo = torch.clamp(x.detach().float().min(), max=0.0).reshape(1)
    hi = torch.clamp(x.detach().float().max(), min=0.0).reshape(1)
    if spec.symmetric:
        scale = torch.clamp(torch.maximum(-lo, hi) / spec.qmax, min=SCALE_EPS)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    scale = torch.clamp((hi - lo) / (spec.qmax - spec.qmin), min=SCALE_EPS)
    zero_point = torch.clamp(spec.qmin - torch.round(lo / scale), spec.qmin, spec.qmax).to(torch.int32)
    return scale, zero_point


def quantize(x: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec) -> Tensor:
    """Reference quantization to integer codes (int32), written out in plain torch for reading.

    ``x * (1 / S)`` rather than ``x / S``: torch's kernels multiply by the reciprocal, and the two differ in
    the last float bit for a few values, which would flip a rounding.
    """
    axis = channel_axis(x, spec)
    s = _bshape(scale.to(torch.float32), x.dim(), axis)
    z = _bshape(zero_point.to(torch.int32), x.dim(), axis)
    q = torch.round(x * (1.0 / s)) + z  # round half to even, as torch and ONNX do
    return torch.clamp(q, spec.qmin, spec.qmax).to(torch.int32)


def dequantize(q: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec) -> Tensor:
    """Integer codes back to real values: ``S * (q - Z)``."""
    axis = channel_axis(q, spec)
    s = _bshape(scale.to(torch.float32), q.dim(), axis)
    z = _bshape(zero_point.to(torch.int32), q.dim(), axis)
    return (q - z).to(torch.float32) * s


# ----------------------------------------------------------------------------------------------------------
# The straight-through estimators (STE): the backward pass of fake_quant.
# ----------------------------------------------------------------------------------------------------------


def clipped_ste(grad: Tensor, x: Tensor, inv_scale: Tensor, zero_point: Tensor, qmin, qmax) -> Tensor:
    """The clipped STE: ``grad`` where the code ``round(x / S) + Z`` lies on the grid ``[qmin, qmax]``, else 0.

    Rounding itself is treated as the identity (its true derivative is 0 almost everywhere). The mask is the
    one torch's ``..._cachemask`` ops save. Plain elementwise ops, so ``fused`` can compile it as it is.
    """
    q = torch.round(x * inv_scale) + zero_point
    return torch.where((q >= qmin) & (q <= qmax), grad, torch.zeros_like(grad))


def ste_grads(
    grad: Tensor,
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    quant_min: int,
    quant_max: int,
    axis: int,
    ste: str,
    grad_factor: float = 1.0,
    scale_grad: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """The gradients of ``fake_quant(x, scale, zero_point)`` w.r.t. ``x`` and ``scale`` under the STE ``ste``
    (the rules are listed in :func:`fake_quant`); ``grad`` is the gradient of the output. The scale's gradient
    is None for ``clipped``/``identity`` or when ``scale_grad`` is False."""
    if ste == "identity":
        return grad, None
    if ste == "clipped" and fused.use_fused(x) and grad.is_contiguous():
        view, inv_s, _, z, qmin, qmax = fused.flat_args(x, scale, zero_point, axis, quant_min, quant_max)
        grad_x = fused.call(clipped_ste, grad.detach().view(view.shape), view, inv_s, z, qmin, qmax)
        if grad_x is not None:
            return grad_x.view(x.shape), None
    s = _bshape(scale, x.dim(), axis)
    z = _bshape(zero_point, x.dim(), axis)
    inv_s = 1.0 / s
    if ste == "clipped":
        return clipped_ste(grad, x, inv_s, z, quant_min, quant_max), None
    x_over_s = x * inv_s
    if ste == "pact":
        # PACT clips x itself: the gradient goes to alpha = S * (qmax - Z) for every x >= alpha.
        q = x_over_s + z
        below, above = q < quant_min, q >= quant_max
    else:  # lsq: d/dx is the clipped STE's, on the codes computed here once for both gradients
        q = torch.round(x_over_s) + z
        below, above = q < quant_min, q > quant_max
    inside = ~(below | above)
    grad_x = grad * inside
    if not scale_grad:
        return grad_x, None
    # d x_hat / d S: (qmin - Z) below the range, (qmax - Z) above it; inside, LSQ keeps the rounding
    # residual round(x/S) - x/S (Esser et al. 2019, eq. 3) and PACT drops it (Choi et al. 2018).
    outside = torch.where(below, quant_min - z, quant_max - z).to(x.dtype)
    if ste == "lsq":
        d_scale = torch.where(inside, torch.round(x_over_s) - x_over_s, outside)
    else:
        d_scale = torch.where(inside, torch.zeros_like(x), outside)
    per_elem = grad * d_scale
    if axis < 0:
        grad_scale = per_elem.sum().reshape(scale.shape)
    elif x.dim() == 1:  # one value per channel (e.g. a bias): nothing to reduce
        grad_scale = per_elem.reshape(scale.shape)
    else:
        dims = [d for d in range(x.dim()) if d != axis]
        grad_scale = per_elem.sum(dim=dims).reshape(scale.shape)
    return grad_x, grad_scale * grad_factor


def lsq_grad_factor(x: Tensor, spec: QuantSpec) -> float:
    """LSQ's gradient scale g = 1 / sqrt(N * Qp): N values share each scale, Qp is the top code."""
    axis = channel_axis(x, spec)
    n = x.numel() // (x.shape[axis] if axis >= 0 else 1)
    if not isinstance(n, int):  # a symbolic size while exporting: only the forward pass is traced
        return 1.0
    return 1.0 / math.sqrt(max(n, 1) * max(spec.qmax, 1))


def fake_quant(
    x: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec, grad_factor: float | None = None
) -> Tensor:
    """Quantize and dequantize ``x`` in one differentiable op (the heart of QAT).

    Forward: ``S * (clamp(round(x / S) + Z, qmin, qmax) - Z)``, bit-exact with torch's core fake-quant ops.
    Backward, by ``spec.ste``:

    - ``clipped``: d/dx = 1 where the code is inside ``[qmin, qmax]``, else 0 (no gradient for S);
    - ``identity``: d/dx = 1 everywhere;
    - ``lsq``: d/dx as clipped; d/dS = round(x/S) - x/S inside, qmin - Z / qmax - Z outside, times
      ``grad_factor`` (default LSQ's 1/sqrt(N * qmax));
    - ``pact``: the clip acts on x itself (Choi et al. 2018): d/dx = 1 for x in [S (qmin - Z), alpha) with
      alpha = S (qmax - Z), else 0; d/dS = qmax - Z for x >= alpha, qmin - Z below the range, 0 inside
      (so d/d alpha = 1 for x >= alpha, as in PACT).

    The zero point is never learned (int32). An empty ``x`` gives an empty result.

    Args:
        x: float tensor.
        scale: float32 (1,) per tensor or (C,) per channel, every value > 0 (else ``ValueError``); give it
            ``requires_grad`` to learn it (lsq/pact).
        zero_point: int32, same shape as ``scale``, inside ``[spec.qmin, spec.qmax]``.
        spec: bits, granularity, channel axis and STE.
        grad_factor: multiplier of the scale gradient (lsq/pact); ``None`` uses the default above.

    Example:
        >>> spec = QuantSpec(bits=8)
        >>> fake_quant(torch.tensor([0.0, 0.26, 9.0]), torch.tensor([0.1]), torch.tensor([0], dtype=torch.int32), spec)
        tensor([0.0000, 0.3000, 9.0000])
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(
            f"x must be a floating-point tensor, got {type(x).__name__} {getattr(x, 'dtype', '')}"
        )
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec={spec!r} must be a QuantSpec")
    axis = channel_axis(x, spec)
    scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    zero_point = torch.as_tensor(zero_point, device=x.device).to(torch.int32)
    expected = x.shape[axis] if axis >= 0 else 1
    if scale.numel() != expected or zero_point.numel() != expected:
        raise ValueError(
            f"scale has {scale.numel()} and zero_point {zero_point.numel()} elements, expected {expected} "
            f"({'one per channel along ch_axis' if axis >= 0 else 'one per tensor'})"
        )
    if not torch.compiler.is_compiling():
        if not bool(((scale > 0) & torch.isfinite(scale)).all()):  # NaN fails both tests
            raise ValueError(
                f"scale must be positive and finite, got {scale.detach().flatten()[:4].tolist()}: a scale of 0 or "
                "below maps every value to the zero point (or divides by zero); compute it with "
                "qatlab.qparams(min_val, max_val, spec), which never returns one"
            )
        if x.numel() == 0:
            return x.clone()
    if grad_factor is None:
        grad_factor = lsq_grad_factor(x, spec) if spec.ste == "lsq" else 1.0
    if axis >= 0:
        scale, zero_point = scale.reshape(-1), zero_point.reshape(-1)
    # export captures the custom op (the exporter turns it into Q/DQ); eager training and a compiled training
    # step (fit(compile=True)) run the autograd function, which the compiler traces and fuses with its neighbours
    op = _fake_quant_op if torch.compiler.is_exporting() else _FakeQuant.apply
    return op(x, scale, zero_point, spec.qmin, spec.qmax, axis, _STE_CODE[spec.ste], float(grad_factor))


def sqnr(x: Tensor, x_hat: Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(||x||^2 / ||x - x_hat||^2); inf for no error."""
    noise = (x.double() - x_hat.double()).pow(2).sum()
    signal = x.double().pow(2).sum()
    if noise == 0:
        return math.inf
    return float(10.0 * torch.log10(signal / noise))


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------


def _bshape(t: Tensor, ndim: int, axis: int) -> Tensor:
    """Reshape per-channel params (C,) so they broadcast against a tensor along ``axis``."""
    if axis < 0:
        return t.reshape(())
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


def _check_finite(name: str, t: Tensor) -> None:
    if not torch.isfinite(t).all():
        raise ValueError(
            f"{name} contains NaN or inf ({t.flatten()[:4].tolist()}...); quantization ranges must be finite: "
            "check the data or the model for overflow before calibrating"
        )


def channel_axis(x: Tensor, spec: QuantSpec) -> int:
    """The normalised channel axis (>= 0) of ``x`` under ``spec`` per channel, -1 per tensor."""
    if not spec.per_channel:
        return -1
    if x.dim() == 0 or not -x.dim() <= spec.ch_axis < max(x.dim(), 1):
        raise ValueError(
            f"ch_axis={spec.ch_axis} is out of range for a tensor of shape {tuple(x.shape)}; "
            f"use an axis in [{-x.dim()}, {x.dim() - 1}] (0 for conv/linear weights)"
        )
    return spec.ch_axis % x.dim()


# ----------------------------------------------------------------------------------------------------------
# The machinery: a custom op (what export and torch.compile capture) and an autograd.Function (eager training)
# with the same forward (torch's core fake-quant kernels, or fused's compiled one) and backward (ste_grads).
# ----------------------------------------------------------------------------------------------------------

_STE_NAME = {code: name for name, code in _STE_CODE.items()}


def fake_quant_formula(x: Tensor, inv_s: Tensor, s: Tensor, z: Tensor, qmin: Tensor, qmax: Tensor) -> Tensor:
    """The forward as one elementwise expression, for ``fused`` to compile (bit-exact with the core ops)."""
    # no a * b + c anywhere: a compiler may not fuse it into one FMA (one rounding), which would move ties
    q = torch.round(x * inv_s) + z
    return (torch.clamp(q, qmin, qmax) - z) * s


def fake_quant_masked_formula(
    x: Tensor, inv_s: Tensor, s: Tensor, z: Tensor, qmin: Tensor, qmax: Tensor
) -> tuple[Tensor, Tensor]:
    """The forward and the clipped STE's mask (:func:`clipped_ste`'s) in one pass, for ``fused`` to compile: the
    backward is then ``grad * mask``, a core multiply, instead of a second compiled call. The mask is float32
    (1.0 on the grid, else 0.0): a bool mask made the compiled kernel 16x slower (4.37 vs 0.27 ms on
    64x16x28x28, one thread) and the mixed-type multiply 5x slower than this one."""
    q = torch.round(x * inv_s) + z
    return (torch.clamp(q, qmin, qmax) - z) * s, ((q >= qmin) & (q <= qmax)).to(x.dtype)


def _fake_quant_impl(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    quant_min: int,
    quant_max: int,
    axis: int,
    ste: int,
    grad_factor: float,
) -> Tensor:
    """The forward computation: the fused kernel for large contiguous float32 tensors, else the core op."""
    if fused.use_fused(x, count=True):
        y = fused.call(fake_quant_formula, *fused.flat_args(x, scale, zero_point, axis, quant_min, quant_max))
        if y is not None:
            return y.view(x.shape)
    if axis < 0:
        return torch.fake_quantize_per_tensor_affine(
            x, scale.reshape(1), zero_point.reshape(1), quant_min, quant_max
        )
    return torch.fake_quantize_per_channel_affine(x, scale, zero_point, axis, quant_min, quant_max)


# The same function as the custom op (its annotations give the op's schema): what export and compile capture.
_fake_quant_op = torch.library.custom_op("qatlab::fake_quant", _fake_quant_impl, mutates_args=())


@_fake_quant_op.register_fake
def _(x, scale, zero_point, quant_min, quant_max, axis, ste, grad_factor):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, scale, zero_point, quant_min, quant_max, axis, ste, grad_factor = inputs
    ctx.save_for_backward(x, scale, zero_point)
    ctx.args = (quant_min, quant_max, axis, ste, grad_factor)


def _ste_backward(ctx, grad):
    """Autograd's view of :func:`ste_grads`: one gradient per input of the op, None for the non-tensors."""
    x, scale, zero_point = ctx.saved_tensors
    quant_min, quant_max, axis, ste, grad_factor = ctx.args
    grad_x, grad_scale = ste_grads(
        grad,
        x,
        scale,
        zero_point,
        quant_min,
        quant_max,
        axis,
        _STE_NAME[ste],
        grad_factor,
        scale_grad=ctx.needs_input_grad[1],
    )
    return grad_x, grad_scale, None, None, None, None, None, None


_fake_quant_op.register_autograd(_ste_backward, setup_context=_setup_context)


class _FakeQuant(torch.autograd.Function):
    """The same forward and backward as the custom op, without the custom-op dispatch (about half of the
    per-call cost of a small tensor in eager training). Graph captures (export, torch.compile) use the op.

    With the clipped STE the forward also saves the STE's mask and the backward is one multiply instead of
    recomputing the codes: small tensors (weights, mostly) through torch's ``..._cachemask`` op, large ones
    through one compiled pass that writes both (:func:`fake_quant_masked_formula`).
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, quant_min, quant_max, axis, ste, grad_factor):  # noqa: D102
        args = (x, scale, zero_point, quant_min, quant_max, axis, ste, grad_factor)
        clipped = ste == _STE_CODE["clipped"] and x.dtype == torch.float32
        large = clipped and fused.use_fused(x, count=True)  # counted here once; other STEs count in the impl
        if large:  # one compiled pass writes the output and the clipped STE's mask
            flat = fused.flat_args(x, scale, zero_point, axis, quant_min, quant_max)
            both = fused.call(fake_quant_masked_formula, *flat)
            if both is not None:
                out, mask = both
                ctx.masked = True
                ctx.save_for_backward(mask.view(x.shape))
                return out.view(x.shape)
        ctx.masked = clipped  # small, or compiling failed: torch's cachemask op gives the mask
        if not ctx.masked:
            out = _fake_quant_impl(*args)
            _setup_context(ctx, args, out)
            return out
        if axis < 0:
            on = torch.ones(1, dtype=torch.long, device=x.device)
            out, mask = torch.ops.aten._fake_quantize_per_tensor_affine_cachemask_tensor_qparams(
                x, scale.reshape(1), zero_point.reshape(1), on, quant_min, quant_max
            )
        else:
            out, mask = torch.ops.aten.fake_quantize_per_channel_affine_cachemask(
                x, scale, zero_point, axis, quant_min, quant_max
            )
        ctx.save_for_backward(mask)
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        if ctx.masked:
            (mask,) = ctx.saved_tensors
            return grad * mask, None, None, None, None, None, None, None
        return _ste_backward(ctx, grad)
