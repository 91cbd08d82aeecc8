"""Number formats beyond the integer grid: per-group int, FP8, MX (MXFP8/MXFP4) and NVFP4, as fake quantization.

One :class:`~qatlab.config.QuantSpec` describes each format; :func:`fake_quant` quantizes and dequantizes a
tensor by the format's rule, with the scales computed from the tensor itself (or a stored scale for static FP8
and NVFP4's tensor scale). Blocks run along ``spec.block_axis`` (default -1: the reduction axis of a Linear
weight and of a Linear's input), cut into consecutive runs of the block size; the block size must divide the
axis for integer groups; an MX or NVFP4 axis that the block does not divide ends in a shorter block (as ONNX's
blocked QuantizeLinear allows, and as the MX spec's padding with zeros gives). All arithmetic is float32, in the op order written below, which is also the order of the ONNX graph
``export.py`` writes, so the exported file computes the same numbers bit for bit:

- **int, per group** (``group_size=g``, or ``per_token=True``: one group per row): per group,
  symmetric ``s = max(amax / qmax, eps)``, ``q = clamp(round(v / s), qmin, qmax)``, ``y = q * s``; asymmetric
  as :func:`qatlab.qparams` on the group's min-max (widened to include 0). This equals per-channel quantization
  of the regrouped tensor, except that ``v / s`` divides (as ONNX QuantizeLinear does) where torch's per-channel
  kernel multiplies by ``1 / s``; the two differ in the last bit of a few quotients, and so at rare exact ties.
- **FP8** (``fp8_e4m3``: max 448, ``fp8_e5m2``: max 57344): ``s = amax / max_normal`` per tensor, per channel
  or per token, or a calibrated scale; ``y = fp8(clamp(v / s, -max, max)) * s`` with torch's own
  ``float8_e4m3fn`` / ``float8_e5m2`` casts (round to nearest even; the clamp makes them saturate).
- **MX** (OCP Microscaling Formats v1.0; ``mxfp8``: E4M3 elements, ``mxfp4``: E2M1 elements
  0, 0.5, 1, 1.5, 2, 3, 4, 6), blocks of 32 sharing an E8M0 scale ``2**shared`` with
  ``shared = clamp(floor(log2(amax)) - emax_elem, -127, 127)`` (emax_elem 8 for E4M3, 2 for E2M1); elements
  ``v / 2**shared`` rounded to nearest (ties to even), saturating. An all-zero block (``amax = 0``, taken as
  ``2**-126``) has the smallest scale and quantizes to zeros. The spec's rounding of the shared exponent (floor)
  is the only one here; it can saturate up to ``8 / 6`` of a block's largest values in MXFP4.
- **NVFP4**: blocks of 16, E2M1 elements, each block with an E4M3 scale, and a float32 tensor scale
  ``ts = amax_tensor / (448 * 6)`` (or a calibrated one; at least ``2**-126``). Block scale
  ``b = e4m3(clamp(amax_block / 6 / ts, 2**-9, 448))``: the lower clamp keeps a block whose scale would round
  to zero in E4M3 on the smallest E4M3 subnormal (no 0 / 0); ``y = e2m1(v / (b * ts)) * (b * ts)``.

The straight-through estimator (``spec.ste``): ``"clipped"`` passes the gradient where the element is not
saturated (its code inside the integer grid, or ``|v / s| <= max_elem``) and zeroes it where it is; the scales,
computed from the tensor, are treated as constants (no gradient flows through the amax). ``"identity"`` passes
it everywhere. Learned scales (LSQ, PACT) are not offered for these formats (``QuantSpec`` says so).

Example:
    >>> import torch
    >>> from qatlab import QuantSpec
    >>> fake_quant(torch.tensor([[0.1, 0.7, 1.3, 5.0] * 8]), QuantSpec(format="mxfp4"))[0, :4]
    tensor([0.0000, 0.5000, 1.5000, 4.0000])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from qatlab import quant
from qatlab.config import QuantSpec
from qatlab.quant import channel_axis, qparams_unchecked

EPS = quant.SCALE_EPS  # the smallest integer/FP8 scale: an all-zero range gets it, never 0
MIN_NORMAL = 2.0**-126  # float32's smallest normal: the floor of an MX block amax and of NVFP4's tensor scale
NVFP4_BLOCK_SCALE_MIN = 2.0**-9  # E4M3's smallest subnormal


@dataclass(frozen=True)
class Element:
    """A floating-point element format: exponent and mantissa bits, its largest normal and its smallest normal
    exponent (``emin``); ``emax`` is the exponent of the largest normal (the MX spec's ``emax_elem``)."""

    name: str
    ebits: int
    mbits: int
    max: float
    emin: int
    emax: int
    torch_dtype: torch.dtype | None


E4M3 = Element("e4m3", 4, 3, 448.0, -6, 8, torch.float8_e4m3fn)
E5M2 = Element("e5m2", 5, 2, 57344.0, -14, 15, torch.float8_e5m2)
E2M1 = Element("e2m1", 2, 1, 6.0, 0, 2, None)  # torch has no E2M1 cast: rounded by the formula below

# format -> (element, block size (0: per tensor or per channel), code for the custom op)
FORMATS = {
    "fp8_e4m3": (E4M3, 0, 1),
    "fp8_e5m2": (E5M2, 0, 2),
    "mxfp8": (E4M3, 32, 3),
    "mxfp4": (E2M1, 32, 4),
    "nvfp4": (E2M1, 16, 5),
}
INT_CODE = 0
_BY_CODE = {code: (name, elem) for name, (elem, _, code) in FORMATS.items()}
ELEMENTS = {"e4m3": E4M3, "e5m2": E5M2, "e2m1": E2M1}


# ----------------------------------------------------------------------------------------------------------
# Element rounding and lattices
# ----------------------------------------------------------------------------------------------------------


def round_minifloat(v: Tensor, elem: Element) -> Tensor:
    """``v`` rounded to the nearest value of ``elem`` (ties to even mantissa), saturating to ``+-elem.max``.

    Written out for any element format: the quantum of a value is ``2**(e - mbits)`` with ``e`` its binade
    exponent (at least ``emin``: below it, the subnormals share one quantum); dividing by a power of two is
    exact, so ``torch.round`` (half to even) does the rounding. FP8 uses torch's casts instead (:func:`round_element`);
    the tests check that this formula agrees with them on every E4M3 and E5M2 value and tie.
    """
    a = torch.clamp(v.abs(), max=elem.max)
    _, exp = torch.frexp(a)  # a = m * 2**exp, m in [0.5, 1): floor(log2 a) = exp - 1
    e = torch.clamp(exp - 1, min=elem.emin)
    quantum = _pow2(e - elem.mbits)
    r = torch.round(a / quantum) * quantum
    return torch.copysign(torch.clamp(r, max=elem.max), v)


def round_element(v: Tensor, elem: Element) -> Tensor:
    """``v`` rounded to ``elem`` (nearest, ties to even, saturating): torch's cast for FP8, the formula for E2M1."""
    if elem.torch_dtype is None:
        return round_minifloat(v, elem)
    return torch.clamp(v, -elem.max, elem.max).to(elem.torch_dtype).to(v.dtype)


def lattice(fmt: str | QuantSpec) -> Tensor:
    """The representable values, sorted, of an element format (``"e2m1"``, ``"e4m3"``, ``"e5m2"``) or of a
    spec's format (``"mxfp4"``, ``"nvfp4"``: E2M1; ``"fp8_e4m3"``, ``"mxfp8"``: E4M3; ``"fp8_e5m2"``: E5M2), in
    units of the scale; for an integer spec, its codes ``qmin..qmax``. Finite values only, zero once.

    Example:
        >>> lattice("mxfp4")[7:].tolist()
        [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    """
    if isinstance(fmt, QuantSpec):
        if fmt.format == "int":
            return torch.arange(fmt.qmin, fmt.qmax + 1, dtype=torch.float32)
        fmt = fmt.format
    if fmt in FORMATS:
        elem = FORMATS[fmt][0]
    elif fmt in ELEMENTS:
        elem = ELEMENTS[fmt]
    else:
        raise ValueError(
            f"fmt={fmt!r} is not a number format; choose one of {', '.join(map(repr, [*FORMATS, *ELEMENTS]))} "
            "or pass a QuantSpec"
        )
    # every bit pattern: sign, exponent field, mantissa field (subnormals at exponent field 0)
    bias = 2 ** (elem.ebits - 1) - 1
    values = set()
    for field in range(2**elem.ebits):
        for m in range(2**elem.mbits):
            if field == 0:
                v = m / 2**elem.mbits * 2.0 ** (1 - bias)
            else:
                v = (1 + m / 2**elem.mbits) * 2.0 ** (field - bias)
            if v <= elem.max:
                values.update((v, -v))
    return torch.tensor(sorted(values), dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------
# Scales, by each format's rule
# ----------------------------------------------------------------------------------------------------------


def _pow2(e: Tensor) -> Tensor:
    """``2.0 ** e`` for integer ``e`` in [-149, 127], exact: built from the float32 bit pattern."""
    e = e.to(torch.int32)
    normal = torch.clamp(e + 127, min=1) << 23  # exponent field of 2**e for e >= -126
    sub = torch.ones_like(e) << torch.clamp(e + 149, 0, 22)  # the subnormals 2**-149 .. 2**-127
    return torch.where(e >= -126, normal, sub).view(torch.float32)


def mx_scale(amax: Tensor, elem: Element) -> Tensor:
    """The MX shared scale ``2**clamp(floor(log2(amax)) - emax_elem, -127, 127)`` of blocks with maximum ``amax``
    (an all-zero block counts as ``2**-126``)."""
    _, exp = torch.frexp(torch.clamp(amax, min=MIN_NORMAL))
    return _pow2(torch.clamp(exp - 1 - elem.emax, -127, 127))


def nvfp4_tensor_scale(amax: Tensor) -> Tensor:
    """NVFP4's second-level float32 scale, ``amax_tensor / (448 * 6)``, at least ``2**-126``."""
    return torch.clamp(amax / (E4M3.max * E2M1.max), min=MIN_NORMAL)


def nvfp4_block_scale(amax_block: Tensor, tensor_scale: Tensor) -> Tensor:
    """NVFP4's effective block scale ``e4m3(amax_block / 6 / ts) * ts`` (the E4M3 value clamped to
    [2**-9, 448] first)."""
    b = torch.clamp(amax_block / E2M1.max / tensor_scale, NVFP4_BLOCK_SCALE_MIN, E4M3.max)
    return b.to(torch.float8_e4m3fn).to(torch.float32) * tensor_scale


def _fp8_scale(amax: Tensor, elem: Element) -> Tensor:
    return torch.clamp(amax / elem.max, min=EPS)


def stored_qparams(min_val: Tensor, max_val: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """The calibrated ``(scale, zero_point)`` of a non-integer format from an observed range: FP8's
    ``amax / max_normal`` (per tensor or per channel), NVFP4's tensor scale ``amax / (448 * 6)``; zero points 0."""
    amax = torch.maximum(min_val.float().abs(), max_val.float().abs()).reshape(-1)
    if spec.format == "nvfp4":
        scale = nvfp4_tensor_scale(amax)
    elif spec.format in ("fp8_e4m3", "fp8_e5m2"):
        scale = _fp8_scale(amax, FORMATS[spec.format][0])
    else:
        raise ValueError(
            f"format={spec.format!r} has no stored scale: its block scales come from each tensor"
        )
    return scale, torch.zeros_like(scale, dtype=torch.int32)


# ----------------------------------------------------------------------------------------------------------
# The computation: (output, not-saturated mask) for a 2-D (rows, D) tensor blocked along D, or for FP8 with a
# per-tensor / per-channel scale
# ----------------------------------------------------------------------------------------------------------


def _int_blocks(xb: Tensor, qmin: int, qmax: int) -> tuple[Tensor, Tensor]:
    """Per-block integer fake quant of (rows, n_blocks, block) ``xb``: output and in-grid mask."""
    if qmin < 0:  # symmetric
        s = torch.clamp(xb.abs().amax(-1, keepdim=True) / qmax, min=EPS)
        q = torch.round(xb / s)
        inside = (q >= qmin) & (q <= qmax)
        return torch.clamp(q, qmin, qmax) * s, inside
    lo = torch.clamp(xb.amin(-1, keepdim=True), max=0.0)
    hi = torch.clamp(xb.amax(-1, keepdim=True), min=0.0)
    s = torch.clamp((hi - lo) / (qmax - qmin), min=EPS)
    z = torch.clamp(qmin - torch.round(lo / s), qmin, qmax)
    q = torch.round(xb / s) + z
    inside = (q >= qmin) & (q <= qmax)
    return (torch.clamp(q, qmin, qmax) - z) * s, inside


def _elements(v: Tensor, s: Tensor, elem: Element) -> tuple[Tensor, Tensor]:
    """``round_element(v / s) * s`` and the mask of elements that did not saturate."""
    r = v / s
    return round_element(r, elem) * s, r.abs() <= elem.max


def _compute(
    x: Tensor, scale: Tensor, fmt: int, block: int, axis: int, qmin: int, qmax: int
) -> tuple[Tensor, Tensor]:
    """The format's fake quant of ``x``: ``(y, mask)``. ``block > 0``: ``x`` is 2-D, blocked along dim 1, scales
    from the data (``scale`` is NVFP4's tensor scale, or empty); ``block == 0``: FP8 with ``scale`` per tensor
    (``axis < 0``) or per channel along ``axis``, or empty for a per-tensor scale from ``x``."""
    xf = x.float()
    if block == 0:  # FP8, scale per tensor or per channel
        elem = _BY_CODE[fmt][1]
        s = _fp8_scale(xf.abs().amax().reshape(1), elem) if scale.numel() == 0 else scale.float()
        if axis >= 0:
            shape = [1] * x.dim()
            shape[axis] = -1
            s = s.reshape(shape)
        else:
            s = s.reshape(())
        y, mask = _elements(xf, s, elem)
        return y.to(x.dtype), mask
    rows, d = xf.shape
    pad = -d % block  # MX / NVFP4: a shorter last block, zero-padded (zeros change no block maximum)
    xb = (torch.nn.functional.pad(xf, (0, pad)) if pad else xf).reshape(rows, -1, block)
    if fmt == INT_CODE:
        y, mask = _int_blocks(xb, qmin, qmax)
    else:
        name, elem = _BY_CODE[fmt]
        amax = xb.abs().amax(-1, keepdim=True)
        if name in ("mxfp8", "mxfp4"):
            s = mx_scale(amax, elem)
        elif name == "nvfp4":
            ts = nvfp4_tensor_scale(xf.abs().amax()) if scale.numel() == 0 else scale.float().reshape(())
            s = nvfp4_block_scale(amax, ts)
        else:  # FP8 per token (rowwise)
            s = _fp8_scale(amax, elem)
        y, mask = _elements(xb, s, elem)
    return y.reshape(rows, -1)[:, :d].to(x.dtype), mask.reshape(rows, -1)[:, :d]


def _impl(
    x: Tensor, scale: Tensor, fmt: int, block: int, axis: int, qmin: int, qmax: int, ste: int
) -> Tensor:
    return _compute(x, scale, fmt, block, axis, qmin, qmax)[0]


# The custom op export and torch.compile capture (export.py maps it to QuantizeLinear/DequantizeLinear).
_format_op = torch.library.custom_op("qatlab::fake_quant_format", _impl, mutates_args=())


@_format_op.register_fake
def _(x, scale, fmt, block, axis, qmin, qmax, ste):
    return torch.empty_like(x)


def _op_setup(ctx, inputs, output):
    x, scale, fmt, block, axis, qmin, qmax, ste = inputs
    ctx.save_for_backward(x, scale)
    ctx.args = (fmt, block, axis, qmin, qmax, ste)


def _op_backward(ctx, grad):
    x, scale = ctx.saved_tensors
    fmt, block, axis, qmin, qmax, ste = ctx.args
    if ste == 1:
        return grad, None, None, None, None, None, None, None
    _, mask = _compute(x, scale, fmt, block, axis, qmin, qmax)
    return grad * mask, None, None, None, None, None, None, None


_format_op.register_autograd(_op_backward, setup_context=_op_setup)


class _FormatFakeQuant(torch.autograd.Function):
    """Eager training: the op's forward, keeping the mask for a one-multiply backward."""

    @staticmethod
    def forward(ctx, x, scale, fmt, block, axis, qmin, qmax, ste):  # noqa: D102
        y, mask = _compute(x, scale, fmt, block, axis, qmin, qmax)
        ctx.identity = ste == 1
        if not ctx.identity:
            ctx.save_for_backward(mask)
        return y

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        if ctx.identity:
            return grad, None, None, None, None, None, None, None
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------
# The functional form
# ----------------------------------------------------------------------------------------------------------


def block_size(spec: QuantSpec, axis_len: int | None = None) -> int:
    """The number of elements sharing one scale along ``spec.block_axis``: ``group_size``, 32 (MX), 16 (NVFP4),
    the whole axis (``per_token``), or 0 for a per-tensor / per-channel scale."""
    if spec.group_size is not None:
        return spec.group_size
    if spec.format in FORMATS and FORMATS[spec.format][1]:
        return FORMATS[spec.format][1]
    if spec.per_token:
        if axis_len is None:
            raise ValueError("per_token blocks span the whole axis: pass axis_len")
        return axis_len
    return 0


def _op_code(spec: QuantSpec) -> int:
    return INT_CODE if spec.format == "int" else FORMATS[spec.format][2]


def fake_quant(x: Tensor, spec: QuantSpec, scale: Tensor | float | None = None) -> Tensor:
    """Quantize and dequantize ``x`` in ``spec``'s number format, scales computed by the format's rule (module doc).

    Args:
        x: a floating-point tensor.
        spec: the format: per-group int (``group_size``), per-token int or FP8 (``per_token=True``), FP8 per
            tensor or per channel, MXFP8, MXFP4, NVFP4; a plain integer spec (no groups) is quantized per tensor
            or per channel over its own min-max, as a calibrated observer would.
        scale: a stored scale instead of one from ``x``: FP8's per-tensor (1,) or per-channel (C,) scale,
            or NVFP4's tensor scale (1,). ``None``: computed from ``x``.

    Returns:
        A tensor like ``x``. Its gradient is the straight-through estimator of ``spec.ste`` (module doc).

    Example:
        >>> x = torch.randn(4, 64)
        >>> y = fake_quant(x, QuantSpec(bits=4, symmetric=True, group_size=32))
        >>> bool(((y / y.abs().amax()) * 7).round().unique().numel() <= 15)
        True
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(
            f"x must be a floating-point tensor, got {type(x).__name__} {getattr(x, 'dtype', '')}"
        )
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec={spec!r} must be a QuantSpec, e.g. QuantSpec(format='mxfp4')")
    if spec.is_integer:
        return _int_fake_quant(x, spec)
    if x.dim() == 0:
        raise ValueError(f"{spec.format!r} needs a tensor with at least one axis, got a scalar")
    scale_t = _scale_arg(scale, x, spec)
    if scale_t.numel() == 0 and spec.format in ("fp8_e4m3", "fp8_e5m2", "nvfp4") and not spec.per_token:
        # a scale from x itself, computed here (not in the op) so export writes it as plain ONNX ops
        scale_t = _dynamic_scale(x.detach(), spec)
    op = _format_op if torch.compiler.is_compiling() else _FormatFakeQuant.apply
    ste = 1 if spec.ste == "identity" else 0
    code = _op_code(spec)
    if not spec.blocked:  # FP8 per tensor / per channel
        axis = spec.ch_axis % x.dim() if spec.per_channel else -1
        return op(x, scale_t, code, 0, axis, spec.qmin, spec.qmax, ste)
    axis = _block_axis(x, spec)
    moved = x.movedim(axis, -1)
    d = moved.shape[-1]
    block = block_size(spec, d)
    if d % block and spec.group_size is not None:
        raise ValueError(
            f"group_size={block} does not divide the block axis ({d} elements, block_axis={spec.block_axis}, "
            f"tensor {tuple(x.shape)}): pick a group_size that divides {d}, or keep this layer out "
            "(QATConfig(keep=(name,)))"
        )
    if not torch.compiler.is_compiling() and x.numel() == 0:
        return x.clone()
    rows = moved.flatten(0, -2) if moved.dim() > 1 else moved.reshape(1, d)
    pad = -d % block  # a shorter last block (MX, NVFP4): zero-padded here, so the op sees whole blocks
    if pad:
        rows = torch.nn.functional.pad(rows, (0, pad))
    y = op(rows, scale_t, code, block, -1, spec.qmin, spec.qmax, ste)
    if pad:
        y = y[:, :d]
    y = y.reshape(moved.shape)
    # back in x's layout (contiguous: a channels-last result would make a following conv's export guard the batch)
    return y if axis == x.dim() - 1 else y.movedim(-1, axis).contiguous()


def _dynamic_scale(x: Tensor, spec: QuantSpec) -> Tensor:
    """FP8's ``amax / max_normal`` (per tensor, or per channel) or NVFP4's tensor scale, from ``x`` itself."""
    xf = x.float().abs()  # (max(), not amax(): the ONNX exporter maps only the former without dims)
    if spec.format == "nvfp4":
        return nvfp4_tensor_scale(xf.max().reshape(1))
    if spec.per_channel:
        axis = spec.ch_axis % x.dim()
        dims = [d for d in range(x.dim()) if d != axis]
        amax = xf.amax(dim=dims) if dims else xf
    else:
        amax = xf.max().reshape(1)
    return _fp8_scale(amax, FORMATS[spec.format][0])


def _block_axis(x: Tensor, spec: QuantSpec) -> int:
    if not -x.dim() <= spec.block_axis < x.dim():
        raise ValueError(
            f"block_axis={spec.block_axis} is out of range for a tensor of shape {tuple(x.shape)}; use an axis "
            f"in [{-x.dim()}, {x.dim() - 1}] (-1: the last)"
        )
    return spec.block_axis % x.dim()


def _scale_arg(scale: Tensor | float | None, x: Tensor, spec: QuantSpec) -> Tensor:
    """The ``scale`` argument as a float32 tensor (empty when the scale comes from ``x``), checked."""
    if scale is None:
        return torch.empty(0, device=x.device)
    if spec.format not in ("fp8_e4m3", "fp8_e5m2", "nvfp4") or spec.per_token:
        raise ValueError(
            f"scale= is a stored scale for FP8 (per tensor or per channel) or NVFP4's tensor scale; "
            f"format={spec.format!r}{' per token' if spec.per_token else ''} computes its scales from x: "
            "pass scale=None"
        )
    s = torch.as_tensor(scale, dtype=torch.float32, device=x.device).reshape(-1)
    want = x.shape[spec.ch_axis % x.dim()] if spec.per_channel else 1
    if s.numel() != want:
        raise ValueError(
            f"scale has {s.numel()} values, expected {want} "
            f"({'one per channel along ch_axis' if spec.per_channel else 'one per tensor'})"
        )
    if not torch.compiler.is_compiling() and not bool(((s > 0) & torch.isfinite(s)).all()):
        raise ValueError(f"scale must be positive and finite, got {s.detach()[:4].tolist()}")
    return s


def _int_fake_quant(x: Tensor, spec: QuantSpec) -> Tensor:
    """A plain integer spec over ``x``'s own min-max (per tensor or per channel): the reference row of tables."""
    axis = channel_axis(x, spec)
    xd = x.detach().float()
    if axis >= 0:
        rows = xd.movedim(axis, 0).reshape(x.shape[axis], -1)
        lo, hi = rows.amin(1), rows.amax(1)
    else:
        lo, hi = xd.amin().reshape(1), xd.amax().reshape(1)
    s, z = qparams_unchecked(lo, hi, spec)
    return quant.fake_quant(x, s, z, spec)


# ----------------------------------------------------------------------------------------------------------
# What a format costs: bits per element, scales included
# ----------------------------------------------------------------------------------------------------------


def bits_per_element(spec: QuantSpec, shape: tuple[int, ...], scale_bits: int = 32) -> float:
    """Storage bits per element of a tensor of ``shape`` in ``spec``, scales (and zero points) included.

    Integer and FP8 scales are counted at ``scale_bits`` (float32 by default; 16 for the fp16 scales many int4
    kernels store), zero points at 8 bits (4 for 4-bit codes), MX scales at 8 (E8M0), NVFP4's block scales at 8
    (E4M3) plus one float32 tensor scale.

    Example:
        >>> bits_per_element(QuantSpec(format="mxfp4"), (256, 1024))
        4.25
    """
    n = math.prod(shape)
    if n == 0:
        raise ValueError(f"shape={shape} has no elements")
    axis_len = shape[spec.block_axis % len(shape)] if shape else 1
    block = block_size(spec, axis_len) if spec.blocked else 0
    if spec.format in ("mxfp8", "mxfp4"):
        return spec.bits + 8 / block
    if spec.format == "nvfp4":
        return spec.bits + 8 / block + 32 / n
    if block:
        groups = n / block
    elif spec.per_channel:
        groups = shape[spec.ch_axis % len(shape)]
    else:
        groups = 1
    zp_bits = 0 if spec.symmetric else min(spec.bits, 8)
    return spec.bits + groups * (scale_bits + zp_bits) / n


def saturated_fraction(x: Tensor, spec: QuantSpec) -> float:
    """Fraction of the elements of ``x`` that ``spec`` saturates (the clipped STE's zeros): beyond the integer
    grid, or ``|v / s| > max_elem``. For MXFP4 this is where the floor rule of the shared exponent bites."""
    xi = x.detach().float().clone().requires_grad_(True)
    fake_quant(xi, spec.with_(ste="clipped")).sum().backward()
    return float((xi.grad == 0).float().mean())


def describe(specs: dict[str, QuantSpec], shape: tuple[int, ...] = (256, 1024)):
    """One row per spec: the element format, the block (elements per scale), the scale's type and the storage
    bits per element of a tensor of ``shape`` with float32 (int, FP8) or the format's own scales."""
    import pandas as pd

    rows = []
    for name, spec in specs.items():
        axis_len = shape[spec.block_axis % len(shape)]
        if spec.format == "int":
            element = f"int{spec.bits}" + ("" if spec.symmetric else " (zero point)")
        else:
            element = {E4M3: "E4M3", E5M2: "E5M2", E2M1: "E2M1"}[FORMATS[spec.format][0]]
        block = block_size(spec, axis_len) if spec.blocked else 0
        scale = {
            "mxfp8": "E8M0 (power of two)",
            "mxfp4": "E8M0 (power of two)",
            "nvfp4": "E4M3 per block x FP32 per tensor",
        }.get(spec.format, "FP32")
        where = f"{block} elements" if block else ("per channel" if spec.per_channel else "per tensor")
        rows.append(
            {
                "format": name,
                "element": element,
                "scale per": where,
                "scale type": scale,
                "bits per element": bits_per_element(spec, shape),
            }
        )
    return pd.DataFrame(rows)


def comparison_arms(group_size: int = 32, keep: tuple[str, ...] = (), keep_bits: int | None = None) -> dict:
    """Notebook 10's formats at (nearly) equal bits per element, weights and activations each in its format,
    as ``{name: QATConfig}``; every activation quantizer uses the clipped STE (no learned scales here).

    4 bits: int4 per-channel weights with static per-tensor int4 activations (EMA); int4 per-group
    (``group_size``) weights and dynamic per-group int4 activations; MXFP4; NVFP4 (static tensor scale for the
    activations). 8 bits: int8 per-channel with static int8 activations; FP8 E4M3 (per-channel weight scales,
    static activation scale); MXFP8. And 8da4w: int4 per-group weights, dynamic per-token int8 activations.
    """
    from qatlab.config import QATConfig

    def cfg(weight: QuantSpec, activation: QuantSpec) -> QATConfig:
        return QATConfig(weight=weight, activation=activation, keep=keep, keep_bits=keep_bits)

    g = group_size
    return {
        "int4 per-channel": cfg(
            QuantSpec(bits=4, symmetric=True, per_channel=True), QuantSpec(bits=4, observer="ema")
        ),
        f"int4 g{g}": cfg(
            QuantSpec(bits=4, symmetric=True, group_size=g),
            QuantSpec(bits=4, group_size=g, observer="dynamic"),
        ),
        "mxfp4": cfg(QuantSpec(format="mxfp4"), QuantSpec(format="mxfp4")),
        "nvfp4": cfg(QuantSpec(format="nvfp4"), QuantSpec(format="nvfp4", observer="ema")),
        "int8": cfg(QuantSpec(bits=8, symmetric=True, per_channel=True), QuantSpec(bits=8, observer="ema")),
        "fp8_e4m3": cfg(
            QuantSpec(format="fp8_e4m3", per_channel=True), QuantSpec(format="fp8_e4m3", observer="ema")
        ),
        "mxfp8": cfg(QuantSpec(format="mxfp8"), QuantSpec(format="mxfp8")),
        "8da4w": cfg(
            QuantSpec(bits=4, symmetric=True, group_size=g),
            QuantSpec(bits=8, symmetric=True, observer="dynamic", per_token=True),
        ),
    }
