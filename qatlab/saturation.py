"""Why ONNX Runtime's int8 output depends on the CPU, which layers of a file are at risk, and an emulator.

ONNX Runtime runs the Conv/Gemm/MatMul of a QDQ file in integer kernels (QLinearConv, QGemm,
MatMulIntegerToFloat) with uint8 activation codes and int8 weight codes ("U8S8"). How the CPU multiplies
u8 x s8 decides whether that is exact:

- **x86-64 with AVX2 (or AVX-512) but without VNNI**: ``VPMADDUBSW`` multiplies the codes of two neighbours
  along the reduction axis and adds the two products in int16 *with saturation*. A pair of weights 127, 127
  against activation codes 255, 255 sums to 64,770 and is stored as 32,767: the layer's output is wrong.
- **VNNI or AMX** (``VPDPBUSD``, ``TDPBUSD``), **ARM64** and x86-64 **without AVX2** (SSE): the products are
  accumulated in int32. Exact.

Measured with ONNX Runtime 1.32 under ``qemu-x86_64 -cpu Haswell`` (AVX2, no VNNI), probing one weight pair per
output channel: the neighbours are adjacent elements of the reduction axis in ONNX Runtime's order (a conv's
filter is read as (kh, kw, c_in): input channels vary fastest, so the pairs are channels (0, 1), (2, 3), ... of one
kernel tap; with one input channel, taps (0, 1), (2, 3), ...); the pair sums use the raw codes (the activation's
zero point is subtracted afterwards, and padded pixels hold the zero point); depthwise convs and int8 x int8
(S8S8) pairs do not saturate; the sum saturates at both ends (-65,280 becomes -32,768).

Where things are:

- :func:`cpu_int8` says what this CPU does (``kind``, ``saturates``);
- :func:`integer_layers` asks ONNX Runtime which nodes of a file it runs in integers;
- :func:`layers_at_risk` predicts, from the exported weight codes alone, which layers have neighbouring weight
  pairs whose sum times the largest activation code leaves int16;
- :func:`emulate` runs a file the way a saturating CPU does (the ONNX reference evaluator, with each integer
  layer computed in numpy integers, pairs saturated), so a machine with VNNI can show and test the effect;
- :func:`run_reference` runs a file with the ONNX reference evaluator (numpy, no ORT kernels): the
  runtime-independent check of an export that ``qatlab.export.verify_onnx`` reports as ``semantic_passed``.

The fix is one bit less of range for weights or activations: ``QuantSpec(reduce_range=True)`` (7-bit codes in
the 8-bit container; then ``63 * 2 * 255 < 32767`` and ``127 * 2 * 127 < 32767``), trained with QAT so
nothing is lost at deployment, or a CPU with VNNI.
"""

from __future__ import annotations

import functools
import os
import platform
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

INT16_MIN, INT16_MAX = -32768, 32767
# ONNX Runtime kernels that multiply integer codes (after its QDQ fusions)
INTEGER_GEMM_KERNELS = (
    "QLinearConv",
    "QGemm",
    "QLinearMatMul",
    "MatMulIntegerToFloat",
    "MatMulInteger",
    "ConvInteger",
    "DynamicQuantizeMatMul",
)
EMULATED_DOMAIN = "qatlab.emulate"


# ---------------------------------------------------------------------------------------------------------
# What this CPU does
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuInt8:
    """The int8 kernel class of a CPU, as ONNX Runtime's U8S8 kernels see it."""

    kind: str  # "avx2-no-vnni", "vnni", "amx", "x86-sse", "arm64", "other"
    saturates: bool
    description: str


CPU_KINDS = {
    c.kind: c
    for c in (
        CpuInt8(
            "avx2-no-vnni",
            True,
            "x86-64 with AVX2 but no VNNI: VPMADDUBSW adds pairs of u8 x s8 products in int16 with saturation",
        ),
        CpuInt8("vnni", False, "x86-64 with VNNI: VPDPBUSD sums u8 x s8 products in int32 (exact)"),
        CpuInt8("amx", False, "x86-64 with AMX-INT8: tile products summed in int32 (exact)"),
        CpuInt8("x86-sse", False, "x86-64 without AVX2: 16-bit widened products summed in int32 (exact)"),
        CpuInt8("arm64", False, "ARM64: dot-product / widening multiply-add into int32 (exact)"),
        CpuInt8("other", False, "a CPU qatlab does not classify (assumed exact)"),
    )
}


def classify_cpu(machine: str, features: set[str]) -> CpuInt8:
    """The int8 kernel class from ``platform.machine()`` and upper-case CPU feature names (``AVX2``,
    ``AVX512BW``, ``AVX512VNNI``, ``AVX_VNNI``, ``AMX_INT8``)."""
    machine = machine.lower()
    if machine in ("aarch64", "arm64"):
        return CPU_KINDS["arm64"]
    if machine not in ("x86_64", "amd64", "x64"):
        return CPU_KINDS["other"]
    if "AMX_INT8" in features:
        return CPU_KINDS["amx"]
    if features & {"AVX512VNNI", "AVX_VNNI"}:
        return CPU_KINDS["vnni"]
    if features & {"AVX2", "AVX512BW"}:
        return CPU_KINDS["avx2-no-vnni"]
    return CPU_KINDS["x86-sse"]


def _cpu_features() -> set[str]:
    # numpy reads CPUID itself (so an emulated CPU, e.g. qemu -cpu Haswell, reports its own features);
    # AVX-VNNI and AMX are not in numpy's list: Linux's /proc/cpuinfo has them.
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as feats
    except ImportError:  # numpy < 2
        from numpy.core._multiarray_umath import __cpu_features__ as feats
    found = {k.upper() for k, v in feats.items() if v}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []
    )
    found |= {f.upper() for f in flags if f in ("avx_vnni", "amx_int8")}
    return found


@functools.lru_cache(maxsize=1)
def cpu_int8() -> CpuInt8:
    """This CPU's int8 kernel class (cached).

    Example:
        >>> cpu_int8().kind in CPU_KINDS
        True
    """
    return classify_cpu(platform.machine(), _cpu_features())


# ---------------------------------------------------------------------------------------------------------
# Running a file with the ONNX reference evaluator
# ---------------------------------------------------------------------------------------------------------


def _gather_elements():
    from onnx.reference.op_run import OpRun

    class GatherElements(OpRun):
        """onnx 1.23's reference GatherElements fails above 64 indices along an axis (np.choose's limit)."""

        def _run(self, data, indices, axis=None):
            axis = 0 if axis is None else axis
            indices = np.where(indices < 0, indices + data.shape[axis], indices)
            return (np.take_along_axis(data, indices, axis=axis),)

    return GatherElements


def _conv():
    from onnx.reference.ops.op_conv import Conv as ReferenceConv

    class Conv(ReferenceConv):
        """onnx's reference Conv, with its im2col gathered through strided views instead of index arrays: the same
        column matrix, so the same matrix product and the same numbers (tested bit for bit). The gather was 96% of
        onnx's Conv time; whole CNN files of notebooks 02 and 03 now run 1.8-2.9x faster. 2-D convolutions
        without dilation or automatic padding; anything else goes to onnx's own implementation."""

        def _run(self, X, W, B=None, auto_pad=None, dilations=None, group=None, kernel_shape=None, pads=None,
                 strides=None):  # fmt: skip
            group = 1 if group is None else group
            kernel_shape = tuple(W.shape[2:]) if kernel_shape is None else tuple(kernel_shape)
            pads = (0, 0, 0, 0) if pads is None else tuple(pads)
            strides = (1, 1) if strides is None else tuple(strides)
            if (
                X.ndim != 4
                or auto_pad not in (None, "NOTSET")
                or any(d != 1 for d in (dilations or ()))
                or kernel_shape != tuple(W.shape[2:])
                or X.shape[1] != W.shape[1] * group
                or W.shape[0] % group
            ):
                return super()._run(X, W, B, auto_pad, dilations, group, kernel_shape, pads, strides)
            (kh, kw), (sh, sw) = kernel_shape, strides
            padded = np.pad(X, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
            windows = np.lib.stride_tricks.sliding_window_view(padded, (kh, kw), axis=(2, 3))[
                :, :, ::sh, ::sw
            ]
            n, c, oh, ow = windows.shape[:4]
            # rows (channel, kernel row, kernel column), columns (image, output row, output column): onnx's layout
            cols = windows.transpose(1, 4, 5, 0, 2, 3).reshape(group, c // group * kh * kw, n * oh * ow)
            out = W.reshape(group, W.shape[0] // group, -1) @ cols
            out = out.reshape(W.shape[0], n, oh, ow).transpose(1, 0, 2, 3)
            if B is not None:
                out = out + (B if B.size == 1 else B.reshape(1, -1, 1, 1))
            return (out.astype(X.dtype),)

    return Conv


def _matmul_nbits():
    """ONNX Runtime's contrib op ``com.microsoft.MatMulNBits`` for the reference evaluator, from its spec:
    ``Y = A @ dequant(B)^T``, B (N, k_blocks, block_size * bits / 8) uint8 codes packed low bits first along K,
    ``dequant = (code - zero_point) * scale`` per block, zero point ``2**(bits - 1)`` unless given (unpacked, as
    ``export.to_matmul_nbits`` never writes one, only the default is implemented)."""
    from onnx.reference.op_run import OpRun

    class MatMulNBits(OpRun):
        op_domain = "com.microsoft"

        def _run(self, a, b, scales, zero_points=None, g_idx=None, bias=None, **attrs):
            k, n, bits, block = (
                attrs.get(key, getattr(self, key, None)) for key in ("K", "N", "bits", "block_size")
            )
            if zero_points is not None or g_idx is not None:
                raise NotImplementedError(
                    "MatMulNBits reference: explicit zero points / g_idx are not implemented"
                )
            per_byte = 8 // bits
            shifts = np.arange(per_byte, dtype=np.uint8) * bits
            codes = (b[..., None] >> shifts) & ((1 << bits) - 1)  # (N, k_blocks, blob, per_byte)
            codes = codes.reshape(n, -1, block).astype(np.float32) - 2 ** (bits - 1)
            w = (codes * scales.reshape(n, -1, 1).astype(np.float32)).reshape(n, -1)[:, :k]
            y = np.matmul(a, w.T)
            return (((y + bias) if bias is not None else y).astype(np.float32),)

    return MatMulNBits


def _feeds(proto, inputs: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    names = [i.name for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
    if len(names) != len(inputs):
        raise ValueError(f"the ONNX file takes {len(names)} inputs, got {len(inputs)}")
    return dict(zip(names, (np.asarray(x) for x in inputs), strict=True))


def _load(path_or_proto):
    import onnx

    return path_or_proto if isinstance(path_or_proto, onnx.ModelProto) else onnx.load(str(path_or_proto))


def run_reference(
    path_or_proto, inputs: Sequence[np.ndarray], outputs: Sequence[str] | None = None, new_ops=()
):
    """Run an ONNX file with ``onnx.reference.ReferenceEvaluator`` (pure numpy: no ONNX Runtime kernel, the same
    result on every CPU up to float rounding). Returns the list of ``outputs`` (default: the graph outputs).
    """
    from onnx.reference import ReferenceEvaluator

    proto = _load(path_or_proto)
    evaluator = ReferenceEvaluator(proto, new_ops=[_gather_elements(), _conv(), _matmul_nbits(), *new_ops])
    return evaluator.run(list(outputs) if outputs else None, _feeds(proto, inputs))


# ---------------------------------------------------------------------------------------------------------
# Which layers ORT runs in integers, and which of them can saturate
# ---------------------------------------------------------------------------------------------------------


@dataclass
class IntegerLayer:
    """A Conv/Gemm/MatMul of the file that ONNX Runtime runs with an integer kernel."""

    node: Any  # the onnx NodeProto (Conv, Gemm or MatMul)
    kernel: str  # ORT's kernel, e.g. "QLinearConv"
    module: str  # the PyTorch module it was exported from ("" when the file does not say)
    x_dq: Any  # DequantizeLinear of the activation
    w_dq: Any  # DequantizeLinear of the weight
    w_perm: tuple[int, ...] | None  # a Transpose between the weight's DequantizeLinear and the node
    x_max_code: int  # the largest activation code the grid allows (255, or a Clip's upper end)
    u8s8: bool  # uint8 activations x int8 weights: the kind of pair that saturates
    constant_weight: bool = True  # False: both operands are activations (e.g. attention's Q K^T)

    @property
    def name(self) -> str:
        return self.module or self.node.name

    def depthwise(self, w: np.ndarray) -> bool:
        """A depthwise conv (one input and one output channel per group, weight ``w`` (M, 1, kh, kw)): ORT runs
        it in its own int32 depthwise kernel, without pairs."""
        group = next((a.i for a in self.node.attribute if a.name == "group"), 1)
        return self.node.op_type == "Conv" and w.shape[1] == 1 and w.shape[0] == group > 1


def _module_name(node) -> str:
    import ast

    scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None)
    if not scopes:
        return ""
    try:
        names = ast.literal_eval(scopes)
    except (ValueError, SyntaxError):
        return ""
    return names[-2] if len(names) >= 2 else ""


def _ort_integer_nodes(path: Path) -> dict[str, str]:
    """Node name -> ORT kernel for every node ONNX Runtime fuses into an integer kernel (its extended
    optimizations keep the fused node's name)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        so.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", "optimized.data"
        )
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        so.log_severity_level = 3
        try:
            ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - ORT lacks a kernel for the file's format: it runs no int8 layer
            if "NOT_IMPLEMENTED" not in str(exc):
                raise
            return {}
        optimized = onnx.load(so.optimized_model_filepath, load_external_data=False)
    return {n.name: n.op_type for n in optimized.graph.node if n.op_type in INTEGER_GEMM_KERNELS}


def _const_int(proto, producers, name: str) -> int | None:
    """The value of a scalar integer constant (initializer, Constant or Cast of one), else None."""
    from onnx import numpy_helper

    for init in proto.graph.initializer:
        if init.name == name:
            return int(numpy_helper.to_array(init).reshape(-1)[0])
    node = producers.get(name)
    if node is None:
        return None
    if node.op_type == "Cast":
        return _const_int(proto, producers, node.input[0])
    if node.op_type == "Constant":
        attr = node.attribute[0]
        if attr.name == "value_int":
            return int(attr.i)
        if attr.name == "value":
            return int(numpy_helper.to_array(attr.t).reshape(-1)[0])
    return None


def _elem_type(proto, producers, dq) -> int | None:
    """ONNX element type of a DequantizeLinear's codes (from its zero point, or the Cast that made it)."""
    from onnx import helper

    if len(dq.input) < 3:
        return None
    zp = dq.input[2]
    for init in proto.graph.initializer:
        if init.name == zp:
            return init.data_type
    node = producers.get(zp)
    if node is not None and node.op_type == "Cast":
        return next(a.i for a in node.attribute if a.name == "to")
    if node is not None and node.op_type == "DynamicQuantizeLinear":
        return helper.np_dtype_to_tensor_dtype(np.dtype(np.uint8))
    return None


def integer_layers(path: str | os.PathLike) -> list[IntegerLayer]:
    """The Conv/Gemm/MatMul nodes of ``path`` that ONNX Runtime runs with integer kernels, in graph order,
    with where their activation and weight codes come from."""
    from onnx import TensorProto

    path = Path(path)
    proto = _load(path)
    producers = {o: n for n in proto.graph.node for o in n.output}
    fused = _ort_integer_nodes(path)
    dynamic = {i.name for i in proto.graph.input}  # every value that depends on a graph input
    for node in proto.graph.node:
        if any(i in dynamic for i in node.input):
            dynamic.update(node.output)
    layers = []
    for node in proto.graph.node:
        if node.name not in fused or node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        x_dq = producers.get(node.input[0])
        w_src, perm = producers.get(node.input[1]), None
        if w_src is not None and w_src.op_type == "Transpose":
            perm = tuple(next((a.ints for a in w_src.attribute if a.name == "perm"), ()))
            w_src = producers.get(w_src.input[0])
        if not (x_dq and w_src and x_dq.op_type == w_src.op_type == "DequantizeLinear"):
            continue
        x_type, w_type = _elem_type(proto, producers, x_dq), _elem_type(proto, producers, w_src)
        top = 255 if x_type == TensorProto.UINT8 else 127
        codes = producers.get(x_dq.input[0])
        if codes is not None and codes.op_type == "Clip" and len(codes.input) >= 3:
            hi = _const_int(proto, producers, codes.input[2])
            top = min(top, hi) if hi is not None else top
        layers.append(
            IntegerLayer(
                node=node,
                kernel=fused[node.name],
                module=_module_name(node),
                x_dq=x_dq,
                w_dq=w_src,
                w_perm=perm,
                x_max_code=top,
                u8s8=x_type == TensorProto.UINT8 and w_type == TensorProto.INT8,
                constant_weight=w_src.input[0] not in dynamic,
            )
        )
    return layers


def weight_codes(proto, layers: list[IntegerLayer]) -> list[np.ndarray]:
    """The weight codes of each layer (they depend on initializers only), as the node reads them."""
    import onnx
    from onnx import numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    wanted = [layer.w_dq.input[0] for layer in layers]
    computed = [w for w in wanted if w not in inits]
    needed, stack = set(), list(computed)
    while stack:
        node = producers.get(stack.pop())
        if node is not None and node.name not in needed:
            needed.add(node.name)
            stack.extend(node.input)
    values = {w: numpy_helper.to_array(inits[w]) for w in wanted if w in inits}
    if computed:  # codes made in the graph (QuantizeLinear [-> Clip] of a float initializer): evaluate them
        graph = onnx.helper.make_graph(
            [n for n in proto.graph.node if n.name in needed],
            "weights",
            [],
            [onnx.helper.make_value_info(w, onnx.TypeProto()) for w in computed],
            list(proto.graph.initializer),
        )
        sub = onnx.helper.make_model(graph, opset_imports=proto.opset_import, functions=proto.functions)
        sub.ir_version = proto.ir_version
        values.update(zip(computed, run_reference(sub, [], outputs=computed), strict=True))
    return [
        np.transpose(values[w], layer.w_perm) if layer.w_perm else np.asarray(values[w])
        for layer, w in zip(layers, wanted, strict=True)
    ]


def _as_kn(layer: IntegerLayer, w: np.ndarray) -> np.ndarray:
    """Weight codes as the node reads them -> (K, N) int64 in ORT's reduction order."""
    w = w.astype(np.int64)
    op = layer.node.op_type
    if op == "Conv":  # (M, C/g, kh, kw) -> (kh, kw, C/g, M) -> (K, M): one group's reduction order
        return np.transpose(w, (2, 3, 1, 0)).reshape(-1, w.shape[0])
    if op == "Gemm" and next((a.i for a in layer.node.attribute if a.name == "transB"), 0):
        return w.T
    return w


def _pair_reach(w_kn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(K/2, N) each: the sums of the positive and of the negative parts (as magnitudes) of each pair of
    neighbouring weight codes. Times an activation code ``a``, the farthest a pair sum ``a1 * w1 + a2 * w2``
    (a1, a2 in [0, a]) can go above and below 0."""
    if w_kn.shape[0] % 2:
        w_kn = np.concatenate([w_kn, np.zeros((1, w_kn.shape[1]), w_kn.dtype)])
    w0, w1 = w_kn[0::2], w_kn[1::2]
    return np.maximum(w0, 0) + np.maximum(w1, 0), -(np.minimum(w0, 0) + np.minimum(w1, 0))


def _risky_pairs(w_kn: np.ndarray, a_max: int) -> np.ndarray:
    """Boolean (K/2, N): pairs whose sum with activation codes up to ``a_max`` can leave int16."""
    pos, neg = _pair_reach(w_kn)
    return (a_max * pos > INT16_MAX) | (a_max * neg > -INT16_MIN)


def _layer_pairs(
    path: Path, layers: list[IntegerLayer] | None
) -> list[tuple[IntegerLayer, np.ndarray, bool]]:
    """Per integer layer with constant weights: its weight codes (K, N) in ORT's order, and whether its pairs can
    saturate. (A product of two activations, attention's Q K^T, depends on the data: :func:`emulate` covers it.)"""
    layers = [
        layer for layer in (integer_layers(path) if layers is None else layers) if layer.constant_weight
    ]
    codes = weight_codes(_load(path), layers) if layers else []
    return [
        (layer, _as_kn(layer, w), layer.u8s8 and not layer.depthwise(w))
        for layer, w in zip(layers, codes, strict=True)
    ]


def _reach(layer: IntegerLayer, w: np.ndarray) -> np.ndarray:
    """(K/2, N): the farthest each pair sum can go from 0, ``x_max_code * |w1 + w2|`` over same-sign parts."""
    return layer.x_max_code * np.maximum(*_pair_reach(w))


def layers_at_risk(path: str | os.PathLike, layers: list[IntegerLayer] | None = None):
    """One row per layer ONNX Runtime runs in integers: how many neighbouring weight pairs can leave int16 on
    a CPU with AVX2 but no VNNI, from the exported weight codes and the activation grid's largest code.

    Columns: ``layer`` (PyTorch module), ``node``, ``kernel`` (ORT's), ``u8s8`` (uint8 x int8 pairs in a
    kernel that pairs them: not a depthwise conv), ``x_max_code``, ``pairs``, ``risky_pairs``, ``worst`` (the
    largest ``x_max_code * |w1 + w2|`` over same-sign parts of a pair, in units of 32767: above 1 can
    saturate), ``at_risk`` (``u8s8`` and ``risky_pairs > 0``).
    """
    import pandas as pd

    rows = [
        {
            "layer": layer.name,
            "node": layer.node.name,
            "kernel": layer.kernel,
            "u8s8": can_saturate,
            "x_max_code": layer.x_max_code,
            "pairs": int(_reach(layer, w).size),
            "risky_pairs": int(_risky_pairs(w, layer.x_max_code).sum()) if can_saturate else 0,
            "worst": float(_reach(layer, w).max() / INT16_MAX) if w.size else 0.0,
        }
        for layer, w, can_saturate in _layer_pairs(Path(path), layers)
    ]
    df = pd.DataFrame(
        rows, columns=["layer", "node", "kernel", "u8s8", "x_max_code", "pairs", "risky_pairs", "worst"]
    )
    df["at_risk"] = df["u8s8"] & (df["risky_pairs"] > 0)
    return df


def pair_sums(path: str | os.PathLike, layers: list[IntegerLayer] | None = None):
    """Long table, one row per pair of neighbouring weight codes of each layer that can saturate: ``layer`` and
    ``reach``, the farthest its sum can go from 0 (``x_max_code * |w1 + w2|``, same-sign parts) in units of
    32767. Above 1 the int16 sum of VPMADDUBSW can saturate. For a histogram (``plot.pair_sums``)."""
    import pandas as pd

    frames = [
        pd.DataFrame({"layer": layer.name, "reach": _reach(layer, w).reshape(-1) / INT16_MAX})
        for layer, w, can_saturate in _layer_pairs(Path(path), layers)
        if can_saturate
    ]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame({"layer": [], "reach": []})


# ---------------------------------------------------------------------------------------------------------
# The emulator: integer layers computed as a saturating CPU computes them
# ---------------------------------------------------------------------------------------------------------


def int_matmul(a: np.ndarray, w: np.ndarray, saturate: bool) -> tuple[np.ndarray, int]:
    """``a @ w`` of integer codes, (P, K) x (K, N) -> (P, N) int64, exact or with the pairwise int16 saturation
    of VPMADDUBSW: neighbouring products ``a[:, 2j] * w[2j] + a[:, 2j + 1] * w[2j + 1]`` clipped to
    [-32768, 32767] before they are summed. Also returns how many pair sums were clipped.

    Only pairs that can leave int16 for the largest code in ``a`` are computed one by one; the rest is one
    exact float64 matrix product (integers below 2**53).
    """
    exact = np.rint(a.astype(np.float64) @ w.astype(np.float64)).astype(np.int64)
    if not saturate or a.size == 0:
        return exact, 0
    if a.shape[1] % 2:
        a = np.concatenate([a, np.zeros((a.shape[0], 1), a.dtype)], axis=1)
        w = np.concatenate([w, np.zeros((1, w.shape[1]), w.dtype)])
    a = a.astype(np.int64)
    w = w.astype(np.int64)
    jj, nn = np.nonzero(_risky_pairs(w, int(np.abs(a).max())))
    clipped = 0
    chunk = max(1, 2_000_000 // max(a.shape[0], 1))
    for start in range(0, len(jj), chunk):
        j, n = jj[start : start + chunk], nn[start : start + chunk]
        pair = a[:, 2 * j] * w[2 * j, n] + a[:, 2 * j + 1] * w[2 * j + 1, n]  # (P, R)
        fix = np.clip(pair, INT16_MIN, INT16_MAX) - pair
        clipped += int(np.count_nonzero(fix))
        np.add.at(exact.T, n, fix.T)  # columns repeat: add.at accumulates them
    return exact, clipped


def im2col(
    x: np.ndarray, kh: int, kw: int, pads, strides, dilations, fill: int
) -> tuple[np.ndarray, int, int]:
    """(N, C, H, W) codes -> (N * OH * OW, kh * kw * C) in ORT's (kh, kw, c) order; padding holds ``fill`` (the
    zero point's code, which stands for 0.0)."""
    n, c, h, w = x.shape
    top, left, bottom, right = pads
    xp = np.full((n, c, h + top + bottom, w + left + right), fill, dtype=np.int64)
    xp[:, :, top : top + h, left : left + w] = x
    oh = (h + top + bottom - dilations[0] * (kh - 1) - 1) // strides[0] + 1
    ow = (w + left + right - dilations[1] * (kw - 1) - 1) // strides[1] + 1
    taps = []
    for i in range(kh):
        for j in range(kw):
            r, s = i * dilations[0], j * dilations[1]
            taps.append(xp[:, :, r : r + strides[0] * oh : strides[0], s : s + strides[1] * ow : strides[1]])
    cols = np.stack(taps, axis=1)  # (N, kh*kw, C, OH, OW)
    return cols.transpose(0, 3, 4, 1, 2).reshape(n * oh * ow, kh * kw * c), oh, ow


def int_conv(
    x: np.ndarray,
    x_zero: int,
    w: np.ndarray,
    w_zero,
    group: int = 1,
    pads=(0, 0, 0, 0),
    strides=(1, 1),
    dilations=(1, 1),
    saturate: bool = False,
) -> tuple[np.ndarray, int]:
    """The integer part of a quantized conv as ONNX Runtime's kernel computes it: ``sum (x - z_x)(w - z_w)``
    over each output's window, (N, O, OH, OW) int64, from (N, C, H, W) codes ``x`` and (O, C/group, kh, kw)
    codes ``w`` (``w_zero``: one zero point or one per output channel; ``pads`` in ONNX order). The raw codes
    are multiplied first and the zero points taken out after, as the kernel does. ``saturate`` adds neighbouring
    products in int16 with saturation (:func:`int_matmul`), except in depthwise convs, which ORT runs in its own
    int32 kernel. Also returns how many pair sums were clipped."""
    x, w = np.asarray(x).astype(np.int64), np.asarray(w).astype(np.int64)
    zw = np.asarray(w_zero).astype(np.int64).reshape(-1)
    out_c, cg, kh, kw = w.shape
    per_group = out_c // group
    depthwise = group > 1 and cg == 1 and per_group == 1
    outs, clipped = [], 0
    for g in range(group):
        cols, oh, ow = im2col(x[:, g * cg : (g + 1) * cg], kh, kw, tuple(pads), strides, dilations, x_zero)
        w_kn = np.transpose(w[g * per_group : (g + 1) * per_group], (2, 3, 1, 0)).reshape(-1, per_group)
        acc, n = int_matmul(cols, w_kn, saturate and not depthwise)
        clipped += n
        zw_g = zw[g * per_group : (g + 1) * per_group] if zw.size > 1 else zw
        acc = (
            acc - x_zero * w_kn.sum(0)[None, :] - np.outer(cols.sum(1), zw_g) + cols.shape[1] * x_zero * zw_g
        )
        outs.append(acc.reshape(x.shape[0], oh, ow, per_group).transpose(0, 3, 1, 2))
    return np.concatenate(outs, axis=1), clipped


def _emulated_op(stats: dict[str, int]):
    """The custom op that replaces each integer layer: codes in, the float output ORT's kernel stands for out."""
    from onnx.reference.op_run import OpRun

    class IntegerLayerOp(OpRun):
        op_domain = EMULATED_DOMAIN

        def _run(self, x, sx, zx, w, sw, zw, *bias, op=None, saturate=None, layer=None, **attrs):
            x, w = x.astype(np.int64), w.astype(np.int64)
            zx, sx = int(np.asarray(zx).reshape(-1)[0]), float(np.asarray(sx).reshape(-1)[0])
            zw = np.asarray(zw).astype(np.int64).reshape(-1)
            sw = np.asarray(sw).astype(np.float64).reshape(-1)
            op = op.decode() if isinstance(op, bytes) else op
            if op == "Conv":
                y = self._conv(x, zx, w, zw, bool(saturate), attrs, layer)
                shape_c = (1, -1, 1, 1)
            else:
                w = w.T if (op == "Gemm" and attrs.get("transB")) else w
                if w.ndim == 2:  # a weight: one (K, N) matrix for every row of x
                    y = self._matmul(x.reshape(-1, x.shape[-1]), zx, w, zw, saturate, layer)
                    y = y.reshape(*x.shape[:-1], -1)
                else:  # two activations (attention's Q K^T): one product per broadcast batch index
                    batch = np.broadcast_shapes(x.shape[:-2], w.shape[:-2])
                    xb = np.broadcast_to(x, (*batch, *x.shape[-2:])).reshape(-1, *x.shape[-2:])
                    wb = np.broadcast_to(w, (*batch, *w.shape[-2:])).reshape(-1, *w.shape[-2:])
                    y = np.stack(
                        [self._matmul(a, zx, b, zw, saturate, layer) for a, b in zip(xb, wb, strict=True)]
                    )
                    y = y.reshape(*batch, *y.shape[-2:])
                shape_c = (-1,)
            y = y.astype(np.float64) * sx * sw.reshape(shape_c if sw.size > 1 else ())
            if bias:
                y = y + bias[0].reshape(shape_c)
            return (y.astype(np.float32),)

        def _matmul(self, x, zx, w, zw, saturate, layer):
            """(P, K) x (K, N) codes, the zero points' contributions taken out as the kernel does after summing."""
            acc, clipped = int_matmul(x, w, bool(saturate))
            stats[layer] = stats.get(layer, 0) + clipped
            k = x.shape[1]
            return acc - zx * w.sum(0)[None, :] - np.outer(x.sum(1), zw) + k * zx * zw

        def _conv(self, x, zx, w, zw, saturate, attrs, layer):
            pads = attrs.get("pads") or [0, 0, 0, 0]
            acc, clipped = int_conv(
                x, zx, w, zw, int(attrs.get("group") or 1), tuple(pads[:4]),
                attrs.get("strides") or [1, 1], attrs.get("dilations") or [1, 1], saturate,
            )  # fmt: skip
            stats[layer] = stats.get(layer, 0) + clipped
            return acc

    return IntegerLayerOp


def _rewrite(proto, layers: list[IntegerLayer], saturate: bool):
    """A copy of ``proto`` whose integer layers are ``qatlab.emulate.IntegerLayerOp`` nodes on the codes."""
    import copy

    import onnx

    proto = copy.deepcopy(proto)
    by_name = {layer.node.name: layer for layer in layers}
    nodes = []
    for node in proto.graph.node:
        layer = by_name.get(node.name)
        if layer is None:
            nodes.append(node)
            continue
        w_codes = layer.w_dq.input[0]
        if layer.w_perm:
            w_codes = f"{node.name}__w_codes_t"
            nodes.append(
                onnx.helper.make_node("Transpose", [layer.w_dq.input[0]], [w_codes], perm=layer.w_perm)
            )
        zp_x = layer.x_dq.input[2]
        zp_w = layer.w_dq.input[2]
        inputs = [layer.x_dq.input[0], layer.x_dq.input[1], zp_x, w_codes, layer.w_dq.input[1], zp_w]
        inputs += list(node.input[2:3])
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        nodes.append(
            onnx.helper.make_node(
                "IntegerLayerOp",
                inputs,
                list(node.output),
                domain=EMULATED_DOMAIN,
                name=node.name,
                op=node.op_type,
                saturate=int(saturate and layer.u8s8),
                layer=layer.name,
                **attrs,
            )
        )
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    proto.opset_import.append(onnx.helper.make_opsetid(EMULATED_DOMAIN, 1))
    return proto


def emulate(
    path: str | os.PathLike, inputs, saturate: bool = True, layers: list[IntegerLayer] | None = None
) -> tuple[np.ndarray, dict[str, int]]:
    """Run ``path`` as ONNX Runtime's U8S8 kernels on a CPU with AVX2 but no VNNI would: every layer that ORT
    runs in integers is computed from its integer codes with neighbouring u8 x s8 products summed in int16 with
    saturation (``saturate=False``: summed exactly, as VNNI, AMX and ARM do); everything else as the ONNX
    reference evaluator computes it.

    Returns:
        ``(output, clipped)``: the first graph output, and per layer (PyTorch module name) how many pair sums
        were clipped.

    Example:
        >>> out, clipped = emulate("build/onnx/02_ptq_w8a8.onnx", x_test)  # doctest: +SKIP
    """
    path = Path(path)
    layers = integer_layers(path) if layers is None else layers
    stats: dict[str, int] = {}
    proto = _rewrite(_load(path), layers, saturate)
    arrays = [np.asarray(t.detach().cpu().numpy() if hasattr(t, "detach") else t) for t in _tuple(inputs)]
    out = run_reference(proto, arrays, new_ops=[_emulated_op(stats)])[0]
    return out, {layer.name: stats.get(layer.name, 0) for layer in layers}


def _tuple(inputs) -> tuple:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
