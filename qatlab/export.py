"""ONNX export (QuantizeLinear/DequantizeLinear) and ONNX Runtime parity checks: what you trained is what deploys.

``export_onnx`` folds BatchNorm (``prepare.convert``), traces the model with the dynamo exporter and maps
every ``qatlab::fake_quant`` node to ``QuantizeLinear -> [Clip] -> DequantizeLinear``:

- 8-bit codes use INT8/UINT8; 4-bit per-channel weights use ONNX's INT4/UINT4 types (opset 21); every
  other width (2, 3, 5-7 bits, and 4-bit per-tensor codes) uses the 8-bit type plus a ``Clip`` to the
  narrower range (ONNX Runtime has no Clip kernel for 4-bit types). Per-tensor 4-bit codes avoid INT4
  because of two ONNX Runtime 1.32 bugs found here: ``ReluQuantRewrite`` removes a Relu in front of an
  INT4 QuantizeLinear with zero point 0 (negative inputs then pass: max diff 2.8 on logits of range ~10),
  and a UINT4 activation next to an INT8 weight is fused into a QLinearConv that fails to load.
- Per-channel weights get per-axis Q/DQ; activations per tensor. Learned scales (LSQ, PACT) are exported
  as the fixed qparams they reached.
- The bias: ONNX Runtime's graph optimizer quantizes a float Conv/Gemm bias to int32 with scale
  ``s_in * s_w``. qatlab's layers round the bias to exactly that grid whenever fake quant is on
  (``modules._QuantLayer._qbias``), so the exported float bias is a fixed point of ORT's rounding and
  PyTorch and ORT compute the same thing; no ORT optimizer has to be switched off.

``verify_onnx`` checks two parities and reports them apart: ``semantic_passed``, the file run by the ONNX
reference evaluator (numpy, no ONNX Runtime kernel: the export itself is right, on every CPU), and ``passed``,
ONNX Runtime on this CPU. Where ORT's int8 kernels saturate (x86-64 with AVX2 but no VNNI, see
``qatlab.saturation``) and the file has weight pairs that can overflow int16, the report's ``diagnosis`` names the
cause, the layers and the fix (``QuantSpec(reduce_range=True)``), and ``export_onnx`` warns when it writes such a
file on such a CPU. ``export_and_check`` does export + verify in one call for the notebooks.
``ort_integer_kernels`` and ``time_ort`` show whether ORT really runs integer kernels and what that buys.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from qatlab import saturation
from qatlab.data import reseed
from qatlab.files import atomic, build_dir
from qatlab.modules import FakeQuantizer, QuantConv2d, QuantConvBn2d, QuantLinear
from qatlab.prepare import convert, ptq, quantizers
from qatlab.train import accuracy

# Node types that mean "ORT runs this in integer arithmetic" after its graph optimizations.
INTEGER_KERNELS = (
    "QLinearConv",
    "QGemm",
    "QLinearMatMul",
    "MatMulInteger",
    "MatMulIntegerToFloat",
    "ConvInteger",
    "DynamicQuantizeMatMul",
    "QLinearAdd",
    "QLinearGlobalAveragePool",
    "QLinearMul",
    "QLinearConcat",
)
KNOWN_QUANT_MODULES = (QuantConv2d, QuantConvBn2d, QuantLinear)
MIN_OPSET = 19  # QuantizeLinear with per-axis scales and the saturating types below


FP4_OPSET = 23  # QuantizeLinear/DequantizeLinear with FLOAT4E2M1 (MXFP4, NVFP4)


def _onnx_translation(scalar_scales: bool = False, opset: int = 21):
    """The onnxscript functions that replace ``qatlab::fake_quant`` and ``qatlab::fake_quant_format`` in the
    exported graph; ``scalar_scales`` writes per-tensor scales and zero points as rank-0 tensors instead of
    shape ``[1]``."""
    import onnxscript
    from onnx import TensorProto

    op = onnxscript.opset23 if opset >= FP4_OPSET else onnxscript.opset21

    def fake_quant_qdq(
        x, scale, zero_point, quant_min: int, quant_max: int, axis: int, ste: int, grad_factor: float
    ):
        signed = quant_min < 0
        span = quant_max - quant_min + 1
        # INT4/UINT4 only for per-axis (weight) codes; per-tensor 4-bit codes use INT8 + Clip (module doc).
        if span == 16 and axis >= 0:
            to, container_span = (TensorProto.INT4 if signed else TensorProto.UINT4), 16
        else:
            to, container_span = (TensorProto.INT8 if signed else TensorProto.UINT8), 256
        zp = op.Cast(zero_point, to=to)
        kw = {"axis": axis} if axis >= 0 else {}
        if scalar_scales and axis < 0:  # shape [1] -> rank 0
            scale, zp = op.Squeeze(scale), op.Squeeze(zp)
        q = op.QuantizeLinear(x, scale, zp, **kw)
        if span != container_span:  # narrower than the container: clip the codes to [quant_min, quant_max]
            lo = op.Cast(op.Constant(value_int=quant_min), to=to)
            hi = op.Cast(op.Constant(value_int=quant_max), to=to)
            q = op.Clip(q, lo, hi)
        return op.DequantizeLinear(q, scale, zp, **kw)

    def fake_quant_format_qdq(x, scale, fmt: int, block: int, axis: int, qmin: int, qmax: int, ste: int):
        return _format_qdq(op, TensorProto, x, scale, fmt, block, axis, qmin, qmax)

    return {
        torch.ops.qatlab.fake_quant.default: fake_quant_qdq,
        torch.ops.qatlab.fake_quant_format.default: fake_quant_format_qdq,
    }


def _format_qdq(op, tp, x, scale, fmt: int, block: int, axis: int, qmin: int, qmax: int):
    """``qatlab::fake_quant_format`` as ONNX: the format's scales computed in the graph in ``formats.py``'s op
    order (so the reference evaluator reproduces PyTorch bit for bit), then QuantizeLinear/DequantizeLinear into
    the ONNX element type: INT4/INT8/UINT4/UINT8 blocked (``block_size``, opset 21), FLOAT8E4M3FN/FLOAT8E5M2,
    FLOAT4E2M1 (opset 23). For a weight the scale computation is a constant subgraph ORT folds at load."""
    from qatlab import formats

    def const(v: float):
        return op.Constant(value_float=float(v))

    if block == 0:  # FP8 with a per-tensor or per-channel scale
        elem = formats._BY_CODE[fmt][1]
        kw = {"axis": axis} if axis >= 0 else {}
        q = op.QuantizeLinear(x, scale, output_dtype=_ONNX_ELEMENT[elem.name], saturate=1, **kw)
        return op.DequantizeLinear(q, scale, **kw)
    xb = op.Reshape(x, op.Constant(value_ints=[0, -1, block]))
    amax = op.ReduceMax(op.Abs(xb), op.Constant(value_ints=[2]), keepdims=0)
    blk = {"axis": 1, "block_size": block}
    if fmt == formats.INT_CODE:
        signed, span = qmin < 0, qmax - qmin + 1
        if span == 16:
            to, container = (tp.INT4 if signed else tp.UINT4), 16
        else:
            to, container = (tp.INT8 if signed else tp.UINT8), 256
        if signed:  # zero point 0: left out, the code type given by output_dtype
            s = op.Max(op.Div(amax, const(qmax)), const(formats.EPS))
            q = op.QuantizeLinear(x, s, output_dtype=to, **blk)
        else:
            axes = op.Constant(value_ints=[2])
            lo = op.Min(op.ReduceMin(xb, axes, keepdims=0), const(0.0))
            hi = op.Max(op.ReduceMax(xb, axes, keepdims=0), const(0.0))
            s = op.Max(op.Div(op.Sub(hi, lo), const(qmax - qmin)), const(formats.EPS))
            z = op.Clip(op.Sub(const(qmin), op.Round(op.Div(lo, s))), const(qmin), const(qmax))
            zp = op.Cast(z, to=to)
            q = op.QuantizeLinear(x, s, zp, **blk)
        if span != container:
            q = op.Clip(
                q, op.Cast(op.Constant(value_int=qmin), to=to), op.Cast(op.Constant(value_int=qmax), to=to)
            )
        return op.DequantizeLinear(q, s, **blk) if signed else op.DequantizeLinear(q, s, zp, **blk)
    name, elem = formats._BY_CODE[fmt]
    if name in ("mxfp8", "mxfp4"):
        s = _mx_scale_onnx(op, tp, amax, elem.emax, const)
    elif name == "nvfp4":
        b = op.Clip(
            op.Div(op.Div(amax, const(6.0)), scale), const(formats.NVFP4_BLOCK_SCALE_MIN), const(448.0)
        )
        # the two levels as ONNX writes them: E4M3 block scales dequantized by the float32 tensor scale
        s = op.DequantizeLinear(op.Cast(b, to=tp.FLOAT8E4M3FN, saturate=1), op.Squeeze(scale))
    else:  # FP8 per token
        s = op.Max(op.Div(amax, const(elem.max)), const(formats.EPS))
    q = op.QuantizeLinear(x, s, output_dtype=_ONNX_ELEMENT[elem.name], saturate=1, **blk)
    return op.DequantizeLinear(q, s, **blk)


def _mx_scale_onnx(op, tp, amax, emax: int, const):
    """The MX scale ``2**clamp(floor(log2(max(amax, 2**-126))) - emax, -127, 127)`` exactly in ONNX ops: a
    float Log gives floor(log2) to within one near powers of two, corrected against an exact table of powers of
    two (Gather), which also builds the scale (ONNX Pow of 2 is not exact in every runtime)."""
    table = op.Constant(value=_pow2_table())  # 2**k for k = -127 .. 128, index k + 127
    a = op.Max(amax, const(2.0**-126))
    e0 = op.Clip(op.Floor(op.Mul(op.Log(a), const(1.0 / np.log(2.0)))), const(-126.0), const(128.0))
    p = op.Gather(table, op.Cast(op.Add(e0, const(127.0)), to=tp.INT64))
    up = op.Cast(op.GreaterOrEqual(a, op.Mul(p, const(2.0))), to=tp.FLOAT)
    down = op.Cast(op.Greater(p, a), to=tp.FLOAT)
    shared = op.Clip(op.Sub(op.Sub(op.Add(e0, up), down), const(emax)), const(-127.0), const(127.0))
    return op.Gather(table, op.Cast(op.Add(shared, const(127.0)), to=tp.INT64))


def _pow2_table():
    from onnx import numpy_helper

    with np.errstate(over="ignore"):  # 2**128 is inf in float32: only compared against, never used as a scale
        table = np.ldexp(1.0, np.arange(-127, 129)).astype(np.float32)
    return numpy_helper.from_array(table, "pow2")


_ONNX_ELEMENT = {"e4m3": 17, "e5m2": 19, "e2m1": 23}  # TensorProto.FLOAT8E4M3FN, FLOAT8E5M2, FLOAT4E2M1


@contextlib.contextmanager
def _quiet():
    """Silence the exporter's progress prints, warnings and log lines (e.g. about torchvision ops)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


# (registry class, opset) -> the exporter's torchlib registry, built once per process
_TORCHLIB: dict[tuple[type, int], Any] = {}


@contextlib.contextmanager
def _torchlib_once():
    """Build the exporter's table of ONNX translations (torchlib: about 500 functions, parsed from their source)
    once per process and opset instead of at every ``torch.onnx.export`` call: a warm CNN export took 0.99 s
    instead of 1.56 s (byte-identical files); on a MiniLM export (about 10 s) the gain was within the noise.
    Each call gets its own copy of the table, so custom translations registered on it do not leak into the next
    export. Should torch's private registry move, this does nothing and every export builds its own table again.
    """
    try:
        from torch.onnx._internal.exporter import _registration

        cls = _registration.ONNXRegistry
        original = cls.__dict__["from_torchlib"]
        build = original.__func__
        probe = cls()
        if not (isinstance(probe.functions, dict) and hasattr(probe, "_opset_version")):
            raise AttributeError("ONNXRegistry changed")
    except (ImportError, AttributeError, KeyError):
        yield
        return

    def from_torchlib(klass, opset_version=probe._opset_version):
        key = (klass, opset_version)
        if key not in _TORCHLIB:
            _TORCHLIB[key] = build(klass, opset_version)
        base = _TORCHLIB[key]
        registry = klass()
        registry._opset_version = base._opset_version
        registry.functions = {target: list(metas) for target, metas in base.functions.items()}
        return registry

    cls.from_torchlib = classmethod(from_torchlib)
    try:
        yield
    finally:
        cls.from_torchlib = original


def _as_tuple(example: Any) -> tuple[Tensor, ...]:
    if isinstance(example, Tensor):
        return (example,)
    if isinstance(example, (tuple, list)) and example and all(isinstance(t, Tensor) for t in example):
        return tuple(example)
    raise TypeError(f"example_input must be a Tensor or a tuple of Tensors, got {type(example).__name__}")


def check_exportable(model: nn.Module, opset: int) -> None:
    """Raise a clear error for what export cannot handle (before spending time tracing)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    qs = list(quantizers(model))
    if not qs:
        raise ValueError(
            "model has no FakeQuantizers: it is a float model. Prepare and calibrate it first "
            "(qatlab.ptq(model, config, loader) or qatlab.prepare_qat + qatlab.calibrate), then export"
        )
    for name, q in qs:
        if q.fake_quant_enabled and not q.calibrated:
            raise ValueError(
                f"quantizer {name!r} was never calibrated (it has no range): run qatlab.calibrate(model, loader) "
                "or train with observers enabled before exporting"
            )
        if q.spec.bits > 8:
            raise ValueError(
                f"quantizer {name!r} uses {q.spec.bits} bits; ONNX export supports 2..8 bits "
                "(keep that layer in float with QATConfig(keep=...) instead)"
            )
        if q.spec.format in ("mxfp4", "nvfp4") and opset < FP4_OPSET:
            raise ValueError(
                f"quantizer {name!r} uses {q.spec.format} (FLOAT4E2M1), which needs opset >= {FP4_OPSET}; "
                f"got opset={opset}: pass opset={FP4_OPSET} or opset=None (the lowest that works)"
            )
        if q.spec.range_bits <= 4 and opset < 21:
            raise ValueError(
                f"{q.spec.range_bits}-bit quantizer {name!r} needs opset >= 21 (INT4/UINT4); got opset={opset}"
            )
    if opset < MIN_OPSET:
        raise ValueError(f"opset={opset} is too old for per-axis QDQ export; use opset=21 (the default)")
    for name, m in model.named_modules():
        has_q = any(isinstance(c, FakeQuantizer) for c in m.children())
        # a container of quantizers called from its parent's forward (transformer.quantize_attention) is fine
        standalone = isinstance(m, nn.ModuleDict) and all(isinstance(c, FakeQuantizer) for c in m.children())
        if (
            has_q
            and not isinstance(m, KNOWN_QUANT_MODULES)
            and not isinstance(m, FakeQuantizer)
            and not standalone
        ):
            raise ValueError(
                f"module {name!r} of type {type(m).__name__} holds quantizers but export does not know that layer "
                f"type; known: {', '.join(t.__name__ for t in KNOWN_QUANT_MODULES)}"
            )


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_input: Tensor | tuple[Tensor, ...],
    dynamic_batch: bool = True,
    opset: int | None = None,
    dynamic_dims: dict[int, str] | None = None,
    input_names: tuple[str, ...] | None = None,
    output_names: tuple[str, ...] = ("output",),
    scalar_scales: bool = False,
    fold_codes: bool | None = None,
    matmul_nbits: bool = False,
) -> Path:
    """Export a prepared (calibrated or trained) model to an ONNX QDQ file; BatchNorm is folded first.

    The training batch and the export batch are independent (the AIMET lesson): the example is cut to
    batch 1 and the batch axis is dynamic, so the file runs at any batch size. ``dynamic_batch=False``
    fixes the batch to the example's first dimension as given.

    Args:
        model: a model from ``prepare_qat``/``ptq`` after calibration or QAT.
        path: the ``.onnx`` file to write; its folder must exist.
        example_input: one input tensor (or a tuple for several inputs) of the right shape.
        dynamic_batch: make dimension 0 of every input dynamic.
        opset: ONNX opset; ``None`` (default): 21, which has the INT4/UINT4 types and blocked QuantizeLinear,
            or 23 when a quantizer uses FLOAT4E2M1 (MXFP4, NVFP4).
        dynamic_dims: more dynamic dimensions of every input, e.g. ``{1: "sequence"}`` for token ids.
        input_names, output_names: graph input/output names (default ``input``, ``input_1``, ...).
        scalar_scales: write per-tensor scales and zero points as scalars (rank 0) rather than shape ``[1]``,
            the shape of the quantizers' buffers. The arithmetic is the same; ONNX Runtime's fusion of
            ``DequantizeLinear -> Add -> QuantizeLinear`` into ``QLinearAdd`` (and of other element-wise ops)
            takes scalars only, while ``QLinearConv`` and ``QLinearConcat`` take either (:func:`fusion_probe`, notebook 02).
        fold_codes: store each weight as codes in its quantized type plus DequantizeLinear
            (:func:`fold_weight_codes`) instead of float weights plus QuantizeLinear. ``None`` (default): on when a
            quantizer uses a ``qatlab.formats`` format (groups, FP8, MX, NVFP4), whose file size is part of the
            point; off for plain integer grids, whose files stay as they were.
        matmul_nbits: write Linear layers with symmetric per-group int4 weights (``group_size`` a power of two
            >= 16) as ONNX Runtime's ``MatMulNBits`` (:func:`to_matmul_nbits`), its int4 CPU kernel, instead of
            DequantizeLinear + Gemm, which ORT runs as a float GEMM after dequantizing. A ``ValueError`` when no
            layer qualifies.

    Returns:
        The path written. The file passes ``onnx.checker.check_model(..., full_check=True)``.

    Example:
        >>> export_onnx(qat_model, "build/cnn_w8a8.onnx", torch.randn(1, 1, 28, 28))  # doctest: +SKIP
    """
    import onnx

    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(
            f"folder {str(path.parent)!r} does not exist; create it first (Path(...).mkdir(parents=True))"
        )
    if opset is None:
        opset = FP4_OPSET if any(q.spec.format in ("mxfp4", "nvfp4") for _, q in quantizers(model)) else 21
    check_exportable(model, opset)
    inputs = _as_tuple(example_input)
    if dynamic_batch:
        inputs = tuple(t[:1] for t in inputs)
    deployed = convert(model)
    device = next((p.device for p in deployed.parameters()), torch.device("cpu"))
    inputs = tuple(t.to(device) for t in inputs)
    names = (
        tuple(input_names)
        if input_names
        else tuple("input" if i == 0 else f"input_{i}" for i in range(len(inputs)))
    )
    dynamic_shapes = None
    if dynamic_batch or dynamic_dims:
        batch = torch.export.Dim("batch", min=1, max=1 << 16)
        extra = {d: torch.export.Dim(n, min=1, max=1 << 16) for d, n in (dynamic_dims or {}).items()}
        dynamic_shapes = tuple(({0: batch} if dynamic_batch else {}) | extra for _ in inputs)
    with _quiet(), _torchlib_once():
        program = torch.onnx.export(
            deployed,
            inputs,
            dynamo=True,
            opset_version=opset,
            dynamic_shapes=dynamic_shapes,
            input_names=list(names),
            output_names=list(output_names),
            custom_translation_table=_onnx_translation(scalar_scales, opset),
            verbose=False,
        )
    atomic(path, lambda tmp: program.save(str(tmp)))
    onnx.checker.check_model(str(path), full_check=True)
    if fold_codes is None:
        fold_codes = any(not q.spec.is_integer for _, q in quantizers(model))
    if fold_codes or matmul_nbits:
        fold_weight_codes(path)
    if matmul_nbits and not to_matmul_nbits(path):
        raise ValueError(
            "matmul_nbits=True, but no Linear layer has symmetric per-group int4 weights with a power-of-two "
            "group_size >= 16: use weight=QuantSpec(bits=4, symmetric=True, group_size=32), or matmul_nbits=False"
        )
    _warn_if_saturates(path)
    return path


_SHAPE_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Slice")
MATMUL_NBITS_DOMAIN = "com.microsoft"


def to_matmul_nbits(path: str | os.PathLike, accuracy_level: int = 0) -> int:
    """Rewrite every Linear of ``path`` whose weight is stored as symmetric per-group int4 codes (INT4 codes,
    blocked DequantizeLinear along K, groups a power of two >= 16) into ONNX Runtime's contrib op
    ``com.microsoft.MatMulNBits``: its CPU kernel for block-wise int4 weights, the path ORT's LLM tooling uses.
    The weight codes are repacked (code + 8, two per byte, low nibble first along K, the op's default zero
    point 8), the scales kept; the activation path in front is unchanged. Returns the number of layers rewritten.

    ``accuracy_level``: the op's attribute: 0 (default) computes in float32 (the lab's semantics: only the
    summation order differs); 4 lets ORT quantize the activations to int8 per block on the fly (faster on CPUs
    with int8 dot products, but no longer the model that was trained).
    The reference evaluator runs the op through ``saturation.run_reference``'s numpy implementation.
    """
    import onnx
    from onnx import helper, numpy_helper

    path = Path(path)
    proto = onnx.load(str(path))
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    users = Counter(i for n in graph.node for i in n.input)
    new_nodes, drop, rewritten = [], set(), 0
    for node in graph.node:
        if node.op_type not in ("Gemm", "MatMul"):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        w_in = node.input[1]
        transpose = None
        if node.op_type == "Gemm":
            if attrs.get("transB", 0) != 1 or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0:
                continue
            if len(node.input) > 2 and node.input[2] and attrs.get("beta", 1.0) != 1.0:
                continue
        else:
            transpose = producer.get(w_in)
            if transpose is None or transpose.op_type != "Transpose" or users[w_in] != 1:
                continue
            perm = [helper.get_attribute_value(a) for a in transpose.attribute if a.name == "perm"]
            if perm and list(perm[0]) != [1, 0]:
                continue
            w_in = transpose.input[0]
        dq = producer.get(w_in)
        if dq is None or dq.op_type != "DequantizeLinear" or users[w_in] != 1 or len(dq.input) > 2:
            continue
        dq_attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
        block = dq_attrs.get("block_size", 0)
        codes_init, scale_init = inits.get(dq.input[0]), inits.get(dq.input[1])
        if (
            codes_init is None
            or scale_init is None
            or codes_init.data_type != onnx.TensorProto.INT4
            or dq_attrs.get("axis", 1) != 1
            or block < 16
            or block & (block - 1)
        ):
            continue
        codes = numpy_helper.to_array(codes_init).astype(np.int16)  # (N, K) signed int4
        n_out, k = codes.shape
        blocks = -(-k // block)
        u = np.zeros((n_out, blocks * block), np.uint8)
        u[:, :k] = codes + 8
        pairs = u.reshape(n_out, blocks, block // 2, 2)
        packed = (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8)
        scales = numpy_helper.to_array(scale_init).astype(np.float32).reshape(-1)
        stem = node.name or node.output[0]
        b_name, s_name = f"{stem}_nbits_B", f"{stem}_nbits_scales"
        graph.initializer.extend(
            [numpy_helper.from_array(packed, b_name), numpy_helper.from_array(scales, s_name)]
        )
        out = node.output[0]
        bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
        mm_out = f"{out}_nbits" if bias else out
        new_nodes.append(
            (
                node,
                [
                    helper.make_node(
                        "MatMulNBits",
                        [node.input[0], b_name, s_name],
                        [mm_out],
                        name=f"{stem}_MatMulNBits",
                        domain=MATMUL_NBITS_DOMAIN,
                        K=k,
                        N=n_out,
                        bits=4,
                        block_size=block,
                        accuracy_level=accuracy_level,
                    )
                ]
                + ([helper.make_node("Add", [mm_out, bias], [out], name=f"{stem}_bias")] if bias else []),
            )
        )
        drop.update(id(n) for n in (dq, transpose) if n is not None)
        rewritten += 1
    if not rewritten:
        return 0
    replace = {id(old): repl for old, repl in new_nodes}
    nodes = []
    for n in graph.node:
        if id(n) in drop:
            continue
        nodes.extend(replace.get(id(n), [n]))
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if not any(o.domain == MATMUL_NBITS_DOMAIN for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(MATMUL_NBITS_DOMAIN, 1))
    atomic(path, lambda tmp: onnx.save(proto, str(tmp)))
    onnx.checker.check_model(str(path))
    return rewritten


def fold_weight_codes(path: str | os.PathLike) -> Path:
    """Rewrite ``path`` so every value computable from the file's constants alone is stored, not computed: each
    weight's QuantizeLinear (and the block-scale arithmetic before it) becomes an initializer of codes in the
    quantized type (INT4, FLOAT8E4M3FN, FLOAT4E2M1, ...) followed by DequantizeLinear, the usual QDQ deployment
    form. The values come from the ONNX reference evaluator run on the constant part of the graph, so the file
    computes exactly what it computed before; it only shrinks (4-bit codes are stored packed, two per byte).
    """
    import onnx
    from onnx import helper

    path = Path(path)
    proto = onnx.load(str(path))
    graph = proto.graph
    const = {init.name for init in graph.initializer}
    const_nodes = []
    for node in graph.node:  # topological order
        if node.op_type == "Constant" or (node.input and all(i in const for i in node.input if i)):
            const_nodes.append(node)
            const.update(o for o in node.output if o)
    # A constant DequantizeLinear that a computed node reads stays in the graph, so its codes are what is stored
    # (weights; NVFP4's E4M3 block scales); its output is still folded into constant consumers (NVFP4's weight
    # QuantizeLinear reads the dequantized block scales).
    # The same holds for the shape ops between it and its reader (a conv weight is blocked as a 2-D view).
    const_ids = {id(n) for n in const_nodes}
    outputs = {o.name for o in graph.output}
    dequantized: set[str] = set()  # values that are a DequantizeLinear's output, maybe reshaped
    for n in const_nodes:
        if n.op_type == "DequantizeLinear" or (n.op_type in _SHAPE_OPS and n.input[0] in dequantized):
            dequantized.update(n.output)
    live_inputs = {i for n in graph.node if id(n) not in const_ids for i in n.input if i} | outputs
    kept_dq: set[int] = set()
    for n in reversed(const_nodes):
        if n.output[0] in dequantized and any(o in live_inputs for o in n.output):
            kept_dq.add(id(n))
            live_inputs.update(i for i in n.input if i)
    live = [n for n in graph.node if id(n) not in const_ids or id(n) in kept_dq]
    needed = {i for n in live for i in n.input if i} | outputs
    frontier = [v for n in const_nodes if id(n) not in kept_dq for v in n.output if v in needed]
    if not frontier:
        return path
    sub = helper.make_graph(
        const_nodes,
        "constants",
        [],
        [helper.make_value_info(v, onnx.TypeProto()) for v in frontier],
        list(graph.initializer),
    )
    sub_model = helper.make_model(sub, opset_imports=proto.opset_import)
    values = saturation.run_reference(sub_model, [], outputs=frontier)
    from onnx import numpy_helper

    kept = [init for init in graph.initializer if init.name in needed]
    folded = [numpy_helper.from_array(np.asarray(v), name) for name, v in zip(frontier, values, strict=True)]
    del graph.node[:]
    graph.node.extend(live)
    del graph.initializer[:]
    graph.initializer.extend(kept + folded)
    kept_names = {i.name for i in graph.initializer} | {o for n in live for o in n.output}
    keep_info = [vi for vi in graph.value_info if vi.name in kept_names and vi.name not in set(frontier)]
    del graph.value_info[:]
    graph.value_info.extend(keep_info)
    atomic(path, lambda tmp: onnx.save(proto, str(tmp)))
    onnx.checker.check_model(str(path), full_check=True)
    return path


def _warn_if_saturates(path: Path) -> None:
    """Warn when this CPU's ONNX Runtime int8 kernels will saturate on the file just written."""
    cpu = saturation.cpu_int8()
    if not cpu.saturates:
        return
    risk = saturation.layers_at_risk(path)
    names = list(risk.loc[risk["at_risk"], "layer"])
    if names:
        warnings.warn(
            f"{path.name}: ONNX Runtime on this CPU ({cpu.description}) will saturate in {len(names)} layer(s) "
            f"({', '.join(names[:6])}{', ...' if len(names) > 6 else ''}): their neighbouring int8 weight codes "
            "times the largest uint8 activation code exceed 32767. The file is right; its ORT output here is "
            "not. Fix: QuantSpec(..., reduce_range=True) for the weights or the activations (train with it), "
            "or deploy on a CPU with VNNI, AMX or ARM64.",
            stacklevel=3,
        )


# ---------------------------------------------------------------------------------------------------------
# ONNX Runtime side
# ---------------------------------------------------------------------------------------------------------


def ort_session(
    path: str | os.PathLike, threads: int = 1, optimized_path: str | None = None, optimize: bool = True
):
    """An ONNX Runtime CPU session; one intra-op thread by default (spinning threads hurt on 2 vCPUs)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _feed(session, inputs: tuple[Tensor, ...]) -> dict[str, np.ndarray]:
    meta = session.get_inputs()
    if len(meta) != len(inputs):
        raise ValueError(f"the ONNX file takes {len(meta)} inputs, got {len(inputs)}")
    feed = {}
    for m, t in zip(meta, inputs, strict=True):
        want = m.shape
        for i, (w, got) in enumerate(zip(want, t.shape, strict=False)):
            if isinstance(w, int) and w != got:
                what = "batch" if i == 0 else f"dimension {i}"
                raise ValueError(
                    f"input {m.name!r} has a static {what} of {w} in the ONNX file but the inputs have {got}; "
                    f"feed {what} {w}, or re-export with dynamic_batch=True (or dynamic_dims) for other sizes"
                )
        feed[m.name] = t.detach().cpu().numpy()
    return feed


@torch.no_grad()
def flip_lsb(model: nn.Module, inputs: tuple[Tensor, ...]) -> tuple[Any, float]:
    """Run ``model`` once: its output, and the output step of one input-code flip in its last quantized
    layer, ``s_in * max|W_q|``.

    A rounding tie that PyTorch and ORT break differently moves one code of a layer's input by one; in the
    last layer that moves an output by at most this much. Flips in earlier layers propagate, so a few
    of these steps are normal for an 8-bit model that ORT runs with integer kernels.
    """
    order: list[nn.Module] = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: order.append(m))
        for m in model.modules()
        if isinstance(m, KNOWN_QUANT_MODULES)
    ]
    try:
        output = model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    last = order[-1]
    if last.input_quant is not None and not last.input_quant.spec.is_integer:
        # a format's block scales come from each input: no one code step; the output's 8-bit step is the unit
        return output, float(torch.finfo(torch.float32).eps)
    s_in = last.input_quant.scale.max() if last.input_quant is not None else torch.tensor(0.0)
    w = last.folded()[0] if isinstance(last, QuantConvBn2d) else last.weight
    return output, float(s_in * w.abs().max()) or float(torch.finfo(torch.float32).eps)


def output_lsb(reference: np.ndarray) -> float:
    """One step of an 8-bit grid over the reference output's range: ``(max - min) / 255``.

    The lab's models end in a float layer (logits), so "one output LSB" is the resolution an int8 output
    would have (or one input-code flip of the last layer, :func:`flip_lsb`, when that is coarser).
    Rounding flips stay within it; a wrong scale, zero point or bias does not.
    """
    span = float(reference.max() - reference.min()) if reference.size else 0.0
    return span / 255 if span > 0 else float(np.finfo(np.float32).eps)


def _argmax_agreement(ref: np.ndarray, out: np.ndarray) -> tuple[float, int]:
    """Fraction of rows whose ORT argmax is also a maximum of the PyTorch row, and how many rows tie.

    Coarse grids (2-3 bits) give exactly equal logits; which of two equal values is "the" argmax is then
    decided by float noise, so ORT picking the other one of a tie counts as agreement (and as a tie).
    """
    if ref.ndim < 2 or ref.shape[-1] < 2:
        return float("nan"), 0
    ref2, out2 = ref.reshape(-1, ref.shape[-1]), out.reshape(-1, out.shape[-1])
    rows = np.arange(ref2.shape[0])
    tol = 1e-5 * (1.0 + float(np.abs(ref2).max()))
    picked = ref2[rows, out2.argmax(-1)]
    best = ref2.max(-1)
    agree = picked >= best - tol
    ties = int(((out2.argmax(-1) != ref2.argmax(-1)) & agree).sum())
    return float(agree.mean()), ties


# The formats of qatlab.formats step coarsely where the values are: up to 1/8 (E4M3) or 1/3 (E2M1) of a value,
# amax / 7 of a 16-element int4 group. A rounding tie that the runtime's float summation breaks the other way moves
# one element by a whole step, and the rows it reaches by more than one output LSB. Their parity is judged per row:
# this share of rows within tolerance, and of argmax agreement. (Measured on the Fashion CNN, 1,024 images: FP8,
# 2 flips among 1.6M activations, 1 row off by 0.24; int4 g16 with dynamic per-group activations, one row off by
# 0.19.)
FORMAT_ROW_SHARE = 0.99


def _parity(
    ref: np.ndarray,
    out: np.ndarray,
    lsb: float,
    flip: float,
    tol_lsb: float,
    min_agreement: float,
    row_share: float | None = None,
):
    """How far ``out`` is from ``ref``: max abs diff, in output LSBs and flip steps, argmax agreement, the share
    of rows within ``tol_lsb``, passed (by the max diff, or with ``row_share`` by the share of rows)."""
    err = np.abs(out.astype(np.float64) - ref)
    diff = float(err.max()) if ref.size else 0.0
    rows = err.reshape(err.shape[0], -1).max(1) if err.ndim >= 1 and err.size else np.zeros(0)
    within = float((rows / lsb <= tol_lsb).mean()) if rows.size else 1.0
    agreement, ties = _argmax_agreement(ref, out)
    if row_share is None:
        passed = diff / lsb <= tol_lsb and (np.isnan(agreement) or agreement >= min_agreement)
    else:
        passed = within >= row_share and (np.isnan(agreement) or agreement >= row_share)
    return {
        "max_abs_diff": diff,
        "diff_in_lsb": diff / lsb,
        "diff_in_flips": diff / flip,
        "rows_within_lsb": within,
        "argmax_agreement": agreement,
        "argmax_ties": ties,
        "passed": bool(passed),
    }


def _row_share(model: nn.Module) -> float | None:
    """:data:`FORMAT_ROW_SHARE` when a quantizer of ``model`` uses a ``qatlab.formats`` format (a float element,
    or integer groups / per-token scales, whose 4-bit steps are as coarse), else None."""
    return FORMAT_ROW_SHARE if any(not q.spec.is_integer for _, q in quantizers(model)) else None


def ort_outputs(path: str | os.PathLike, inputs: tuple[Tensor, ...], threads: int = 1) -> np.ndarray:
    """The first output of ``path`` run by ONNX Runtime on this CPU."""
    session = ort_session(path, threads=threads)
    return session.run(None, _feed(session, inputs))[0]


# the saturation emulator is checked against ORT on at most this many inputs (it is numpy, not a kernel)
EMULATOR_CHECK_ROWS = 128


def _saturation_diagnosis(path, inputs, out, ref, lsb, semantic, at_risk, risk) -> tuple[str, float]:
    """The words of a diagnosis when ORT's int8 kernels saturate here, and the emulator's distance to ORT."""
    rows = min(EMULATOR_CHECK_ROWS, int(inputs[0].shape[0]))
    emulated, _ = saturation.emulate(path, tuple(t[:rows] for t in inputs))
    emulated_lsb = float(np.abs(emulated.astype(np.float64) - out[:rows]).max()) / lsb if rows else 0.0
    risky = risk.loc[risk["at_risk"]]
    text = (
        f"ONNX Runtime's int8 kernels on this CPU ({saturation.cpu_int8().description}) are off by "
        f"{np.abs(out.astype(np.float64) - ref).max() / lsb:.1f} output LSB. Cause: in "
        f"{len(at_risk)} layer(s), {', '.join(at_risk)}, {int(risky['risky_pairs'].sum())} pairs of neighbouring "
        f"int8 weight codes times the largest uint8 activation code ({int(risky['x_max_code'].max())}) exceed "
        f"32767, the int16 limit of those pair sums. The file is right: the ONNX reference evaluator matches "
        f"PyTorch to {semantic['diff_in_lsb']:.2f} output LSB, and qatlab.saturation.emulate, which saturates "
        f"those pairs, reproduces ONNX Runtime's output here to {emulated_lsb:.2f} LSB. Fix: "
        "QuantSpec(..., reduce_range=True) for the weights or the activations (7-bit codes in the int8 "
        "container; train with it), or deploy on a CPU with VNNI, AMX or ARM64."
    )
    return text, emulated_lsb


def verify_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    inputs: Tensor | tuple[Tensor, ...],
    tol_lsb: float = 1.0,
    min_agreement: float = 0.999,
    threads: int = 1,
    layerwise: bool = False,
) -> dict[str, Any]:
    """Check that ``path`` computes what the deployed PyTorch model computes, two ways, reported apart.

    The model side is ``convert(model)`` (BatchNorm folded, observers frozen), i.e. what was exported.

    - **Semantic parity** (``semantic_*``): the file run by the ONNX reference evaluator (numpy; no ONNX
      Runtime kernel). It proves the export itself is right, and holds on every CPU.
    - **ONNX Runtime parity** (``passed`` and the unprefixed numbers): ORT on this CPU, with its integer
      kernels. On x86-64 CPUs with AVX2 but no VNNI those add pairs of u8 x s8 products in int16 with
      saturation; when that explains ORT's deviation, ``diagnosis`` says so (``qatlab.saturation``).

    Returns:
        A dict with ``max_abs_diff``, ``output_lsb`` (the larger of :func:`output_lsb` and
        :func:`flip_lsb`), ``diff_in_lsb``, ``flip_lsb`` and ``diff_in_flips`` (the stricter unit of
        :func:`flip_lsb`), ``argmax_agreement`` (for outputs with a class dimension, else NaN; exact ties count
        as agreement, ``argmax_ties`` says how many), ``rows_within_lsb`` (the share of output rows within
        ``tol_lsb``; for a model with float element formats, FP8/MX/NVFP4, ``passed`` means that share and the
        argmax agreement reach :data:`FORMAT_ROW_SHARE`), ``passed`` (``diff_in_lsb <= tol_lsb`` and agreement
        ``>= min_agreement``), the same for the reference evaluator as ``semantic_max_abs_diff``,
        ``semantic_diff_in_lsb``, ``semantic_diff_in_flips``, ``semantic_argmax_agreement``,
        ``semantic_passed``; ``cpu_int8`` (this CPU's int8 kernel class), ``layers_at_risk`` (layers whose
        weight pairs can overflow int16 on a saturating CPU), ``saturates_here`` (this CPU saturates and that
        list is not empty), ``diagnosis`` (``None``, or the cause, layers and fix when ORT fails for that
        reason, with ``emulated_vs_ort_lsb``: how close the saturation emulator comes to ORT's output), ``ok``
        (semantic parity, and ORT parity or a diagnosis), ``n`` and, with ``layerwise=True``, ``layers``: a
        pandas DataFrame, one row per quantized layer in execution order, with its max abs diff (ORT without
        fusions), so a mismatch can be traced to the layer where it starts.

    Example:
        >>> report = verify_onnx(qat_model, "build/onnx/cnn.onnx", x_test)  # doctest: +SKIP
        >>> report["semantic_passed"], report["passed"], report["diagnosis"]  # doctest: +SKIP
        (True, True, None)
    """
    inputs = _as_tuple(inputs)
    deployed = convert(model)
    device = next((p.device for p in deployed.parameters()), torch.device("cpu"))
    with torch.no_grad():
        ref, flip = flip_lsb(deployed, tuple(t.to(device) for t in inputs))
    ref = (ref[0] if isinstance(ref, (tuple, list)) else ref).float().cpu().numpy()
    try:
        out = ort_outputs(path, inputs, threads=threads)
        ort_error = None
    except Exception as exc:  # noqa: BLE001 - ORT refusing the file is a result, reported below
        if "NOT_IMPLEMENTED" not in str(exc):
            raise
        out, ort_error = np.full_like(ref, np.nan), _first_line(exc)
    # One output LSB: the 8-bit resolution of the output, or one input-code flip of the last layer when
    # that is coarser (low-bit grids): a tie broken the other way must not count as a mismatch.
    lsb = max(output_lsb(ref), flip)
    result = {"output_lsb": lsb, "flip_lsb": flip, "n": int(inputs[0].shape[0])}
    share = _row_share(model)
    result.update(_parity(ref, out, lsb, flip, tol_lsb, min_agreement, share))
    arrays = [t.detach().cpu().numpy() for t in inputs]
    semantic = _parity(
        ref, saturation.run_reference(path, arrays)[0], lsb, flip, tol_lsb, min_agreement, share
    )
    result.update({f"semantic_{k}": v for k, v in semantic.items() if k != "argmax_ties"})
    risk = saturation.layers_at_risk(path)
    at_risk = list(risk.loc[risk["at_risk"], "layer"])
    cpu = saturation.cpu_int8()
    result.update(
        cpu_int8=cpu.kind,
        layers_at_risk=at_risk,
        saturates_here=cpu.saturates and bool(at_risk),
        diagnosis=None,
        ort_error=ort_error,
    )
    if ort_error is not None:  # said, never skipped: the file is checked by the reference evaluator only
        result["passed"] = False
        result["diagnosis"] = (
            f"ONNX Runtime {_ort_version()} cannot run this file on CPU ({ort_error}); the export is checked by "
            "the ONNX reference evaluator only. See export.format_runtime_table for what each runtime runs."
        )
    elif not result["passed"] and result["saturates_here"]:
        result["diagnosis"], result["emulated_vs_ort_lsb"] = _saturation_diagnosis(
            path, inputs, out, ref, lsb, semantic, at_risk, risk
        )
    result["ok"] = bool(semantic["passed"] and (result["passed"] or result["diagnosis"] is not None))
    if layerwise:
        result["layers"] = compare_layers(deployed, path, inputs, threads=threads)
    return result


def format_runtime_table(
    models: dict[str, nn.Module], inputs: Tensor | tuple[Tensor, ...], folder: str | os.PathLike | None = None
):
    """Which runtime runs which number format: one row per ``models`` entry (a prepared, calibrated model),
    exported to ``folder`` (default ``build/onnx/formats``) and run by the ONNX reference evaluator and by ONNX
    Runtime on this CPU. Nothing falls back silently: a runtime that cannot load or run a file says so in its
    columns and in ``note``.

    Columns: ``format``, ``opset``, ``file_kb`` (the file), ``weights_kb`` (its initializers: codes, scales and
    whatever stays float), per runtime ``<rt>_loads``, ``<rt>_computes``, ``<rt>_matches`` (within one output LSB
    of the PyTorch model, :func:`verify_onnx`'s test) and ``<rt>_max_abs_diff``, for ``rt`` in ``reference`` and
    ``ort``; ``note`` (the first line of an error).
    """
    import onnx
    import pandas as pd
    from onnx.reference import ReferenceEvaluator

    inputs = _as_tuple(inputs)
    folder = Path(folder) if folder is not None else build_dir() / "onnx" / "formats"
    folder.mkdir(parents=True, exist_ok=True)
    arrays = [t.detach().cpu().numpy() for t in inputs]
    rows = []
    for name, model in models.items():
        path = export_onnx(model, folder / f"{name.replace(' ', '_').replace('/', '_')}.onnx", inputs[0][:1])
        deployed = convert(model)
        with torch.no_grad():
            ref, flip = flip_lsb(deployed, inputs)
        ref = (ref[0] if isinstance(ref, (tuple, list)) else ref).float().cpu().numpy()
        lsb = max(output_lsb(ref), flip)
        proto = onnx.load(str(path))
        row = {
            "format": name,
            "opset": max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
            "file_kb": path.stat().st_size / 1024,
            "weights_kb": sum(len(i.SerializeToString()) for i in proto.graph.initializer) / 1024,
        }
        notes = []
        for rt in ("reference", "ort"):
            row.update({f"{rt}_loads": False, f"{rt}_computes": False, f"{rt}_matches": False})
            row[f"{rt}_max_abs_diff"] = float("nan")
            stage = "loads"
            try:
                if rt == "reference":
                    ReferenceEvaluator(proto)
                    row[f"{rt}_loads"], stage = True, "computes"
                    out = saturation.run_reference(proto, arrays)[0]
                else:
                    session = ort_session(path)
                    row[f"{rt}_loads"], stage = True, "computes"
                    out = session.run(None, _feed(session, inputs))[0]
                row[f"{rt}_computes"] = True
            except Exception as exc:  # noqa: BLE001 - a runtime refusing a format is the finding
                notes.append(
                    f"{rt} ({'does not load' if stage == 'loads' else 'fails to run'}): {_first_line(exc)}"
                )
                continue
            parity = _parity(ref, out, lsb, flip, 1.0, 0.999, _row_share(model))
            row[f"{rt}_matches"] = parity["passed"]
            row[f"{rt}_max_abs_diff"] = parity["max_abs_diff"]
        row["note"] = "; ".join(notes)
        rows.append(row)
    return pd.DataFrame(rows)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def export_and_check(
    model: nn.Module,
    name: str,
    inputs: Tensor | tuple[Tensor, ...],
    example: Tensor | tuple[Tensor, ...] | None = None,
    export_kwargs: dict[str, Any] | None = None,
    **verify_kwargs: Any,
) -> dict[str, Any]:
    """Export ``model`` to ``build/onnx/<name>.onnx`` and verify it on ``inputs``: the end of every notebook.

    ``example`` (default: the first of ``inputs``) is what the exporter traces; ``export_kwargs`` go to
    :func:`export_onnx` (e.g. ``dynamic_dims``), the rest to :func:`verify_onnx`. Prints one line per parity and
    returns :func:`verify_onnx`'s report with ``path`` added; ``report["ok"]`` is what a notebook asserts:
    the reference evaluator matches the model, and ONNX Runtime on this CPU does too or deviates only for the
    diagnosed cause.

    Example:
        >>> report = export_and_check(qat_model, "04_qat_w4a4", x_test)  # doctest: +SKIP
        >>> assert report["ok"], report["diagnosis"]  # doctest: +SKIP
    """
    folder = build_dir() / "onnx"
    folder.mkdir(parents=True, exist_ok=True)
    inputs = _as_tuple(inputs)
    example = tuple(t[:1] for t in inputs) if example is None else example
    path = export_onnx(model, folder / f"{name}.onnx", example, **(export_kwargs or {}))
    report = {"path": path, **verify_onnx(model, path, inputs, **verify_kwargs)}
    print(describe_parity(report))
    return report


def describe_parity(report: dict[str, Any]) -> str:
    """The two parities of a :func:`verify_onnx` report in a few lines a person reads."""
    agree = report["semantic_argmax_agreement"]
    lines = [
        f"reference evaluator vs PyTorch: {report['semantic_diff_in_lsb']:.2f} output LSB"
        + (f", argmax agreement {agree:.4f}" if not np.isnan(agree) else "")
        + (" (ok)" if report["semantic_passed"] else " (FAILED: the export itself is wrong)"),
        f"ONNX Runtime on this CPU ({report['cpu_int8']}) vs PyTorch: {report['diff_in_lsb']:.2f} output LSB"
        + (
            f", argmax agreement {report['argmax_agreement']:.4f}"
            if not np.isnan(report["argmax_agreement"])
            else ""
        )
        + (" (ok)" if report["passed"] else " (differs)"),
    ]
    if report.get("ort_error"):
        lines[1] = f"ONNX Runtime on this CPU: cannot run the file ({report['ort_error']})"
    at_risk = report["layers_at_risk"]
    if at_risk:
        named = ", ".join(at_risk[:4]) + (f" and {len(at_risk) - 4} more" if len(at_risk) > 4 else "")
        lines.append(
            f"{len(at_risk)} layer(s) whose int8 weight pairs can saturate on x86-64 CPUs with AVX2 but no VNNI: {named}"
        )
    if report["diagnosis"]:
        lines.append("diagnosis: " + report["diagnosis"])
    return "\n".join(lines)


def parity_table(outputs: dict[str, np.ndarray], labels: Tensor | np.ndarray | None = None):
    """Several runs of the same inputs, each against the first (the PyTorch model): one row per run with its
    max abs diff, the same in output LSBs (:func:`output_lsb` of the first), its argmax agreement with the first
    and, given ``labels``, its accuracy.

    Example:
        >>> outputs = {"PyTorch": ref, "reference": run_reference(path, [x])[0]}  # doctest: +SKIP
        >>> parity_table(outputs, y)  # doctest: +SKIP
    """
    import pandas as pd

    ref = next(iter(outputs.values()))
    lsb = output_lsb(ref)
    labels = None if labels is None else np.asarray(labels)
    rows = []
    for name, out in outputs.items():
        diff = float(np.abs(out.astype(np.float64) - ref).max())
        row = {
            "run": name,
            "max_abs_diff": diff,
            "diff_in_lsb": diff / lsb,
            "argmax_agreement": float((out.argmax(-1) == ref.argmax(-1)).mean()),
        }
        if labels is not None:
            row["accuracy"] = float((out.argmax(-1) == labels).mean())
        rows.append(row)
    return pd.DataFrame(rows).set_index("run")


def compare_layers(
    deployed: nn.Module, path: str | os.PathLike, inputs: tuple[Tensor, ...], threads: int = 1
):
    """Max abs diff between PyTorch and ORT at the output of every quantized layer, in execution order.

    Each layer's output in the ONNX graph is found from the exporter's ``name_scopes`` metadata (the last
    node inside that module), made a graph output, and run unoptimized so nothing is fused away.
    """
    import onnx
    import pandas as pd

    captured: dict[str, Tensor] = {}
    names = {m: n for n, m in deployed.named_modules()}
    hooks = [
        m.register_forward_hook(lambda m, i, o: captured.setdefault(names[m], o.detach().cpu()))
        for m in deployed.modules()
        if isinstance(m, KNOWN_QUANT_MODULES)
    ]
    try:
        with torch.no_grad():
            deployed(*inputs)
    finally:
        for h in hooks:
            h.remove()
    proto = onnx.load(str(path))
    last_output: dict[str, str] = {}
    for node in proto.graph.node:
        scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None)
        if scopes is None:
            continue
        for layer in captured:
            if f"'{layer}'" in scopes:
                last_output[layer] = node.output[0]
    existing = {o.name for o in proto.graph.output}
    for value in last_output.values():
        if value not in existing:
            proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(value))
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.onnx"
        onnx.save(proto, str(probe))
        session = ort_session(probe, threads=threads, optimize=False)
        values = dict(
            zip(
                [o.name for o in session.get_outputs()],
                session.run(None, _feed(session, inputs)),
                strict=True,
            )
        )
    rows = []
    for layer, ref in captured.items():
        ort_val = values.get(last_output.get(layer, ""), None)
        diff = float(np.abs(ort_val - ref.numpy()).max()) if ort_val is not None else float("nan")
        rows.append({"layer": layer, "onnx_value": last_output.get(layer, ""), "max_abs_diff": diff})
    return pd.DataFrame(rows)


def ort_integer_kernels(path: str | os.PathLike) -> dict[str, int]:
    """Counts of node types after ORT's graph optimizations; integer kernels listed in ``INTEGER_KERNELS``.

    A QDQ model whose count of integer kernels is 0 runs in float: ORT found no Q/DQ pattern to fuse.
    """
    return dict(Counter(n.op_type for n in ort_optimized_nodes(path)))


def ort_optimized_nodes(path: str | os.PathLike) -> list:
    """The nodes (ONNX ``NodeProto``) of ``path`` after ONNX Runtime's graph optimizations on this CPU."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        ort_session(path, optimized_path=str(optimized))
        return list(onnx.load(str(optimized)).graph.node)


def integer_kernel_count(counts: dict[str, int]) -> int:
    return sum(v for k, v in counts.items() if k in INTEGER_KERNELS)


def export_float_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_input: Tensor,
    opset: int = 21,
    dynamic_dims: dict[int, str] | None = None,
) -> Path:
    """Export a float model (dynamic batch, plus ``dynamic_dims`` as in :func:`export_onnx`) as the FP32
    baseline for timing."""
    path = Path(path)
    inputs = _as_tuple(example_input)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    extra = {d: torch.export.Dim(n, min=1, max=1 << 16) for d, n in (dynamic_dims or {}).items()}
    with _quiet(), _torchlib_once():
        program = torch.onnx.export(
            model.eval(),
            tuple(t[:1] for t in inputs),
            dynamo=True,
            opset_version=opset,
            dynamic_shapes=tuple({0: batch, **extra} for _ in inputs),
            input_names=["input"],
            output_names=["output"],
        )
    atomic(path, lambda tmp: program.save(str(tmp)))
    return path


def time_ort(
    paths: dict[str, str | os.PathLike], inputs: Tensor, repeats: int = 50, threads: int = 1
) -> dict[str, float]:
    """Median ORT latency (ms) of several files on the same input, runs interleaved so load hits all alike."""
    sessions = {k: ort_session(p, threads=threads) for k, p in paths.items()}
    feeds = {k: _feed(s, (inputs,)) for k, s in sessions.items()}
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for k, s in sessions.items():  # warm-up
        for _ in range(3):
            s.run(None, feeds[k])
    for _ in range(repeats):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feeds[k])
            times[k].append(time.perf_counter() - t0)
    return {k: 1e3 * float(np.median(v)) for k, v in times.items()}


# Node types that multiply by weights: after ORT's optimizations, any of these left is a float layer.
FLOAT_GEMMS = ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul")


# ONNX integer code types (TensorProto data types) and their ranges: uint8, int8, uint16, int16, uint4, int4
CODE_RANGES = {2: (0, 255), 3: (-128, 127), 4: (0, 65535), 5: (-32768, 32767), 21: (0, 15), 22: (-8, 7)}


def weight_bits(path: str | os.PathLike) -> dict[str, int]:
    """Bits per parameter of every initializer of an ONNX file, as deployed. A weight that goes through
    ``QuantizeLinear`` counts at the width of the integer grid its codes span (``ceil(log2(max - min + 1))``: int4
    codes in an int8 container count 4); everything else (float weights, biases, scales) at its stored width."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    arrays = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    types = {i.name: i.data_type for i in proto.graph.initializer}
    quantized = {
        n.input[0]: n for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in arrays
    }
    bits = {}
    for name, value in arrays.items():
        bits[name] = value.dtype.itemsize * 8
        q = quantized.get(name)
        if q is None or len(q.input) < 3 or not {q.input[1], q.input[2]} <= arrays.keys():
            continue
        scale, zero = arrays[q.input[1]].astype(np.float32), arrays[q.input[2]]
        axis = next((a.i for a in q.attribute if a.name == "axis"), 1)
        if scale.ndim == 1 and scale.size > 1:  # per channel along ``axis``
            shape = [1] * value.ndim
            shape[axis] = -1
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        if types[q.input[2]] not in CODE_RANGES:  # a float8 grid or another type: its stored width
            continue
        lo, hi = CODE_RANGES[types[q.input[2]]]
        codes = np.clip(np.rint(value.astype(np.float32) / scale) + zero.astype(np.int64), lo, hi)
        bits[name] = max(1, int(np.ceil(np.log2(codes.max() - codes.min() + 1))))
    return bits


def deployment_table(
    files: dict[str, str | os.PathLike], inputs: Tensor, repeats: int = 50, threads: int = 1, accuracy=None
):
    """Size and speed of several ONNX files of one model, one row each (the first row is the reference):

    ``file_kB`` (as written: a QDQ file stores float weights and quantizes them when ORT loads it),
    ``weights_kB`` (every parameter at its deployed width, :func:`weight_bits`), ``ort_ms`` (median batch latency
    in ONNX Runtime on this CPU, files interleaved, :func:`time_ort`), ``time_vs_first``, ``integer_kernels`` and
    ``float_gemms`` (layers ORT runs in integers / still in float after its fusions: a QDQ pattern ORT cannot fuse,
    such as a 4-bit ``Clip`` between Q and DQ, leaves float layers *plus* the Q/DQ arithmetic, so such a file is
    slower than FP32), and ``accuracy`` when given (a dict name -> accuracy).
    """
    import onnx
    import pandas as pd

    times = time_ort(files, inputs, repeats=repeats, threads=threads)
    rows = []
    for name, path in files.items():
        sizes = {i.name: int(np.prod(i.dims)) for i in onnx.load(str(path)).graph.initializer}
        bits = weight_bits(path)
        kernels = ort_integer_kernels(path)
        rows.append(
            {
                "file": name,
                "file_kB": os.path.getsize(path) / 1e3,
                "weights_kB": sum(sizes[k] * bits[k] for k in sizes) / 8e3,
                "ort_ms": times[name],
                "integer_kernels": integer_kernel_count(kernels),
                "float_gemms": sum(v for k, v in kernels.items() if k in FLOAT_GEMMS),
                **({"accuracy": accuracy[name]} if accuracy is not None else {}),
            }
        )
    table = pd.DataFrame(rows).set_index("file")
    table.insert(
        table.columns.get_loc("ort_ms") + 1, "time_vs_first", table["ort_ms"] / table["ort_ms"].iloc[0]
    )
    return table


def placement_table(
    model: nn.Module,
    placements: dict[str, tuple[Any, bool]],
    calib_loader: Any,
    inputs: Tensor,
    test_loader: Any = None,
    calib_batches: int = 8,
    seed: int = 0,
    folder: str | os.PathLike | None = None,
    repeats: int = 20,
):
    """Where the Q/DQ pairs go, and what ONNX Runtime makes of it: one PTQ of ``model`` per placement,
    exported, fused by ORT and run, one row each (the first row is the reference for ``time_vs_first``).

    Args:
        model: the float model.
        placements: name -> ``(QATConfig, scalar_scales)``; the config's ``quantize_outputs`` and
            ``quantize_adds`` choose the placement, ``scalar_scales`` goes to :func:`export_onnx`.
        calib_loader: calibration batches; reseeded with ``seed`` before each placement, so every placement
            calibrates on the same ``calib_batches`` batches.
        inputs: images for the parity check and the timing (the first 64).
        test_loader: when given, the PyTorch model's ``accuracy`` on it.
        folder: where the files go (default ``build_dir() / "onnx"``), named after the placements.

    Returns:
        A DataFrame indexed by placement: ``quantizers`` (in the PyTorch model), ``QLinearConv``,
        ``QLinearAdd``, ``float_convs`` (convolutions ORT still runs in float), ``float_adds`` (additions in
        float, alone or folded into a float ``FusedConv``), ``ort_ms``,
        ``time_vs_first``, ``ort_vs_torch_lsb`` and ``argmax_agreement`` (ORT on this CPU against PyTorch),
        ``reference_ok`` (the ONNX reference evaluator computes what PyTorch computes), ``accuracy`` and ``path``.
    """
    import pandas as pd

    if not placements:
        raise ValueError("placements is empty; pass name -> (QATConfig, scalar_scales) for at least one")
    folder = Path(folder) if folder is not None else build_dir() / "onnx"
    folder.mkdir(parents=True, exist_ok=True)
    rows, paths = [], {}
    for name, (config, scalar) in placements.items():
        reseed(calib_loader, seed)
        qmodel = ptq(model, config, calib_loader, num_batches=calib_batches)
        slug = "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")
        path = export_onnx(qmodel, folder / f"placement_{slug}.onnx", inputs[:1], scalar_scales=scalar)
        report = verify_onnx(qmodel, path, inputs)
        nodes = ort_optimized_nodes(path)
        counts = Counter(n.op_type for n in nodes)
        # ORT folds a float Add that follows a float conv into it: a FusedConv with a fourth input (the summand)
        fused_adds = sum(1 for n in nodes if n.op_type == "FusedConv" and len(n.input) > 3 and n.input[3])
        paths[name] = path
        rows.append(
            {
                "placement": name,
                "quantizers": sum(1 for _ in quantizers(qmodel)),
                "QLinearConv": counts.get("QLinearConv", 0),
                "QLinearAdd": counts.get("QLinearAdd", 0),
                "float_convs": counts.get("Conv", 0) + counts.get("FusedConv", 0),
                "float_adds": counts.get("Add", 0) + fused_adds,
                "ort_vs_torch_lsb": report["diff_in_lsb"],
                "argmax_agreement": report["argmax_agreement"],
                "reference_ok": bool(report["semantic_passed"]),
                **({"accuracy": accuracy(qmodel, test_loader)} if test_loader is not None else {}),
                "path": path,
            }
        )
    times = time_ort(paths, inputs[:64], repeats=repeats)
    table = pd.DataFrame(rows).set_index("placement")
    at = table.columns.get_loc("float_adds") + 1
    table.insert(at, "ort_ms", pd.Series(times))
    table.insert(at + 1, "time_vs_first", table["ort_ms"] / table["ort_ms"].iloc[0])
    return table


def fusion_probe(ops: tuple[str, ...] = ("Add", "Mul", "Concat")):
    """Which ``DequantizeLinear -> op -> QuantizeLinear`` patterns ONNX Runtime (CPU) fuses into one integer
    kernel, for scales written as scalars or as shape ``[1]`` and for equal or different input scales. Each row
    builds a two-input graph of that op and reports the node that replaces it after ORT's optimizations (the op
    itself when nothing was fused). Measured on the installed ORT, so a newer version may answer differently."""
    import onnx
    import pandas as pd
    from onnx import TensorProto, helper

    rows = []
    for op in ops:
        for scalar in (True, False):
            for same in (True, False):
                shape = [] if scalar else [1]
                scales = {"a": 0.05, "b": 0.05 if same else 0.03, "o": 0.05}
                inits = []
                for k, v in scales.items():
                    inits += [
                        helper.make_tensor(f"s{k}", TensorProto.FLOAT, shape, [v]),
                        helper.make_tensor(f"z{k}", TensorProto.UINT8, shape, [128]),
                    ]
                nodes = []
                for k in "ab":
                    nodes.append(helper.make_node("QuantizeLinear", [k, f"s{k}", f"z{k}"], [f"{k}q"]))
                    nodes.append(helper.make_node("DequantizeLinear", [f"{k}q", f"s{k}", f"z{k}"], [f"{k}d"]))
                extra = {"axis": 1} if op == "Concat" else {}
                nodes.append(helper.make_node(op, ["ad", "bd"], ["y"], **extra))
                nodes.append(helper.make_node("QuantizeLinear", ["y", "so", "zo"], ["yq"]))
                nodes.append(helper.make_node("DequantizeLinear", ["yq", "so", "zo"], ["out"]))
                x_info = [helper.make_tensor_value_info(k, TensorProto.FLOAT, [1, 4, 8, 8]) for k in "ab"]
                out_info = [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)]
                graph = helper.make_graph(nodes, op, x_info, out_info, inits)
                proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
                with tempfile.TemporaryDirectory() as tmp:
                    path, optimized = Path(tmp) / "probe.onnx", Path(tmp) / "optimized.onnx"
                    onnx.save(proto, str(path))
                    ort_session(path, optimized_path=str(optimized))
                    kinds = [n.op_type for n in onnx.load(str(optimized)).graph.node]
                fused = [k for k in kinds if k not in ("QuantizeLinear", "DequantizeLinear")]
                rows.append(
                    {
                        "op": op,
                        "scales": "scalar" if scalar else "shape [1]",
                        "input scales": "equal" if same else "different",
                        "ORT runs": fused[0] if len(fused) == 1 else " + ".join(fused),
                        "integer kernel": bool(fused) and fused[0] in INTEGER_KERNELS,
                    }
                )
    return pd.DataFrame(rows)
