"""The integer arithmetic behind a QDQ layer: what ONNX Runtime's QLinearConv computes, step by step, in numpy.

A QDQ file writes one quantized conv as ``y = Q(relu(conv(DQ(x), DQ(w)) + b))``: floats everywhere, with
quantize/dequantize pairs around them. ONNX Runtime fuses that pattern into one ``QLinearConv`` that never
touches a float activation:

1. **accumulate** in int32: ``acc[o] = sum_k (x_q[k] - z_x) * (w_q[o, k] - z_w[o])``, uint8 activation codes
   times int8 weight codes (symmetric weights: ``z_w = 0``);
2. **bias** on the accumulator's own grid: ``b_q[o] = round(b[o] / (s_x * s_w[o]))`` as int32, added to ``acc``;
3. **requantize** to the output grid with one multiplier per output channel, ``M[o] = s_x * s_w[o] / s_y``
   (well below 1): ``y_q = clamp(round(acc * M) + z_y, 0, 255)``. ONNX Runtime multiplies in float32 and rounds
   half to even. Integer-only hardware (gemmlowp, TFLite, most NPUs) writes ``M = m0 * 2**-(31 + shift)`` with
   ``m0`` a 31-bit integer and computes ``(acc * m0) >> (31 + shift)`` with rounding: :func:`fixed_point` and
   :func:`requantize_fixed_point` show it, and how often it lands one code away from the float multiply;
4. **ReLU** costs nothing: the output grid is uint8 with ``z_y = 0``, so the clamp at 0 *is* the ReLU.

:func:`conv_layer` reads one conv of an exported file (its codes, scales, zero points, bias, attributes) into an
:class:`IntegerConv`; :func:`accumulate` and :func:`requantize` compute it; :func:`ort_layer_codes` asks ONNX
Runtime for the same layer's input and output codes inside the file it runs; :func:`qlinearconv_model` builds the
one-node ``QLinearConv`` file from the integers alone. ``tests/test_integer.py`` checks that all of them agree
code for code.

On x86-64 CPUs with AVX2 but no VNNI the accumulation of step 1 saturates pairs of products in int16
(``qatlab.saturation``): ``accumulate(..., saturate=True)`` reproduces that.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qatlab import saturation

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


@dataclass
class IntegerConv:
    """One quantized conv of an exported file, as integers and the scales that tie them to real numbers."""

    name: str  # the PyTorch module it was exported from
    x_scale: np.float32
    x_zero: int
    w: np.ndarray  # int8 weight codes (O, C / group, kh, kw)
    w_scale: np.ndarray  # float32 (O,): one scale per output channel (or one repeated)
    w_zero: np.ndarray  # int (O,)
    bias: np.ndarray | None  # float32 (O,): the folded bias, as the file stores it
    y_scale: np.float32
    y_zero: int
    y_dtype: type  # np.uint8 or np.int8: the output grid
    relu: bool  # a ReLU sits between the conv and the output's QuantizeLinear
    pads: tuple[int, int, int, int]
    strides: tuple[int, int]
    dilations: tuple[int, int]
    group: int

    @property
    def acc_scale(self) -> np.ndarray:
        """float32 (O,): the accumulator's grid step ``s_x * s_w``, also the bias's (computed in float32)."""
        return (np.float32(self.x_scale) * self.w_scale).astype(np.float32)

    @property
    def bias_codes(self) -> np.ndarray:
        """int32 (O,): ``round(b / (s_x * s_w))``, half to even, as QuantizeLinear rounds."""
        if self.bias is None:
            return np.zeros(self.w.shape[0], np.int32)
        codes = np.rint(self.bias.astype(np.float32) / self.acc_scale)
        return np.clip(codes, INT32_MIN, INT32_MAX).astype(np.int32)

    @property
    def multiplier(self) -> np.ndarray:
        """float32 (O,): ``M = s_x * s_w / s_y``, the one number per channel that maps ``acc`` to output codes."""
        return (self.acc_scale / np.float32(self.y_scale)).astype(np.float32)

    @property
    def y_range(self) -> tuple[int, int]:
        info = np.iinfo(self.y_dtype)
        return int(info.min), int(info.max)


def _attr(node, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return tuple(a.ints) if a.ints else a.i
    return default


def _consumers(proto) -> dict[str, list]:
    out: dict[str, list] = {}
    for n in proto.graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def _layer_nodes(proto, layer: saturation.IntegerLayer):
    """The conv's output QuantizeLinear (through a ReLU, if any), or an error naming what follows it."""
    consumers = _consumers(proto)
    follow = consumers.get(layer.node.output[0], [])
    relu = len(follow) == 1 and follow[0].op_type == "Relu"
    if relu:
        follow = consumers.get(follow[0].output[0], [])
    if len(follow) != 1 or follow[0].op_type != "QuantizeLinear":
        got = ", ".join(n.op_type for n in follow) or "nothing"
        raise ValueError(
            f"layer {layer.name!r}: its output goes to {got}, not to one QuantizeLinear; pick a conv followed by "
            "an activation quantizer (every conv but the last of the lab's CNNs)"
        )
    return follow[0], relu


def conv_layer(path: str | os.PathLike, name: str, example: Any) -> IntegerConv:
    """Read the conv exported from module ``name`` (e.g. ``"features.3"``) out of the QDQ file ``path``.

    ``example`` (one input batch of the file, a tensor or array) is needed only because some zero points and
    scales are computed by the graph; they are evaluated with the ONNX reference evaluator.
    """
    import onnx

    path = Path(path)
    layers = {layer.name: layer for layer in saturation.integer_layers(path) if layer.node.op_type == "Conv"}
    if name not in layers:
        raise ValueError(
            f"name={name!r} is not a conv ONNX Runtime runs in integers here; choose one of {sorted(layers)}"
        )
    layer = layers[name]
    proto = onnx.load(str(path))
    q, relu = _layer_nodes(proto, layer)
    wanted = [*layer.x_dq.input[1:3], *layer.w_dq.input[1:3], q.input[1], q.input[2]]
    has_bias = len(layer.node.input) > 2 and layer.node.input[2]
    if has_bias:
        wanted.append(layer.node.input[2])
    x = example.detach().cpu().numpy() if hasattr(example, "detach") else np.asarray(example)
    values = saturation.run_reference(proto, [x[:1]], outputs=wanted)
    x_scale, x_zero, w_scale, w_zero, y_scale, y_zero = values[:6]
    (w_codes,) = saturation.weight_codes(proto, [layer])
    out_channels = w_codes.shape[0]
    pads = _attr(layer.node, "pads", (0, 0, 0, 0))
    return IntegerConv(
        name=name,
        x_scale=np.float32(np.asarray(x_scale).reshape(-1)[0]),
        x_zero=int(np.asarray(x_zero).reshape(-1)[0]),
        w=np.asarray(w_codes),
        w_scale=np.broadcast_to(np.asarray(w_scale, np.float32).reshape(-1), (out_channels,)).copy(),
        w_zero=np.broadcast_to(np.asarray(w_zero).astype(np.int64).reshape(-1), (out_channels,)).copy(),
        bias=np.asarray(values[6], np.float32) if has_bias else None,
        y_scale=np.float32(np.asarray(y_scale).reshape(-1)[0]),
        y_zero=int(np.asarray(y_zero).reshape(-1)[0]),
        y_dtype=np.asarray(y_zero).dtype.type,
        relu=relu,
        pads=tuple(int(p) for p in pads),  # type: ignore[arg-type]
        strides=tuple(int(s) for s in _attr(layer.node, "strides", (1, 1))),  # type: ignore[arg-type]
        dilations=tuple(int(d) for d in _attr(layer.node, "dilations", (1, 1))),  # type: ignore[arg-type]
        group=int(_attr(layer.node, "group", 1)),
    )


def accumulate(layer: IntegerConv, x_codes: np.ndarray, saturate: bool = False) -> tuple[np.ndarray, int]:
    """Steps 1 and 2: the int32 accumulator ``sum (x_q - z_x)(w_q - z_w) + b_q``, (N, O, OH, OW) as int64.

    ``saturate=True`` adds neighbouring u8 x s8 products in int16 with saturation, as ONNX Runtime does on a CPU
    with AVX2 but no VNNI (depthwise convs excepted). Also returns how many pair sums were clipped. Raises if
    the accumulator leaves int32 (it cannot for 8-bit codes and fewer than 2**15 terms per output).
    """
    acc, clipped = saturation.int_conv(
        x_codes,
        layer.x_zero,
        layer.w,
        layer.w_zero,
        layer.group,
        layer.pads,
        layer.strides,
        layer.dilations,
        saturate,
    )
    acc = acc + layer.bias_codes.astype(np.int64)[None, :, None, None]
    if acc.min() < INT32_MIN or acc.max() > INT32_MAX:
        raise OverflowError(
            f"layer {layer.name!r}: the accumulator left int32 (range {acc.min()}..{acc.max()})"
        )
    return acc, clipped


def requantize(layer: IntegerConv, acc: np.ndarray) -> np.ndarray:
    """Step 3 as ONNX Runtime does it: ``float32(acc) * M`` in float32, rounded half to even, plus ``z_y``,
    clamped to the output type (the clamp at 0 is the ReLU)."""
    scaled = acc.astype(np.float32) * layer.multiplier.reshape(1, -1, 1, 1)
    lo, hi = layer.y_range
    return np.clip(np.rint(scaled) + layer.y_zero, lo, hi).astype(layer.y_dtype)


def fixed_point(multiplier: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``M = m0 * 2**-(31 + shift)`` with ``m0`` an integer in ``[2**30, 2**31)``: the form integer-only
    hardware stores. Returns ``(m0, shift)`` per channel (int64). ``M`` must be positive and below 1."""
    m = np.asarray(multiplier, np.float64).reshape(-1)
    if not np.all((m > 0) & (m < 1)):
        raise ValueError(f"multiplier must lie in (0, 1) for a right shift; got {m.min()}..{m.max()}")
    mantissa, exponent = np.frexp(m)  # m = mantissa * 2**exponent, mantissa in [0.5, 1)
    m0 = np.rint(mantissa * 2.0**31).astype(np.int64)
    carry = m0 == 2**31  # a mantissa that rounds up to 1.0
    m0[carry] //= 2
    return m0, (-exponent - carry).astype(np.int64)


def requantize_fixed_point(layer: IntegerConv, acc: np.ndarray) -> np.ndarray:
    """Step 3 in integers only: ``(acc * m0 + 2**(n - 1)) >> n`` with ``n = 31 + shift`` (round half up), plus
    ``z_y``, clamped. Differs from :func:`requantize` by at most one code, where ``acc * M`` lies within
    rounding error of a half."""
    m0, shift = fixed_point(layer.multiplier)
    n = (31 + shift).reshape(1, -1, 1, 1)
    prod = acc.astype(np.int64) * m0.reshape(1, -1, 1, 1)  # |acc| < 2**31, m0 < 2**31: fits int64
    rounded = (prod + (np.int64(1) << (n - 1))) >> n
    lo, hi = layer.y_range
    return np.clip(rounded + layer.y_zero, lo, hi).astype(layer.y_dtype)


def ort_layer_codes(path: str | os.PathLike, name: str, example: Any) -> tuple[np.ndarray, np.ndarray]:
    """ONNX Runtime's input and output codes of conv ``name`` inside the file (the QuantizeLinear outputs
    around the layer, made graph outputs so the session returns them; its QDQ fusion still runs)."""
    import onnx

    path = Path(path)
    layer = next(x for x in saturation.integer_layers(path) if x.name == name)
    proto = onnx.load(str(path))
    q, _ = _layer_nodes(proto, layer)
    names = [layer.x_dq.input[0], q.output[0]]
    proto.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    session = _session(proto)
    x = example.detach().cpu().numpy() if hasattr(example, "detach") else np.asarray(example)
    x_codes, y_codes = session.run(names, {session.get_inputs()[0].name: x.astype(np.float32)})
    return x_codes, y_codes


def qlinearconv_model(layer: IntegerConv):
    """A one-node ONNX file: ``QLinearConv`` with this layer's weight codes, scales, zero points and int32
    bias as initializers; input and output are codes. What ONNX Runtime's fused kernel is, written down."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    u8 = np.uint8
    inits = [
        numpy_helper.from_array(np.array(layer.x_scale, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(layer.x_zero, u8), "x_zero_point"),
        numpy_helper.from_array(layer.w.astype(np.int8), "w"),
        numpy_helper.from_array(layer.w_scale.astype(np.float32), "w_scale"),
        numpy_helper.from_array(layer.w_zero.astype(np.int8), "w_zero_point"),
        numpy_helper.from_array(np.array(layer.y_scale, np.float32), "y_scale"),
        numpy_helper.from_array(np.array(layer.y_zero, layer.y_dtype), "y_zero_point"),
        numpy_helper.from_array(layer.bias_codes, "bias"),
    ]
    node = helper.make_node(
        "QLinearConv",
        ["x", "x_scale", "x_zero_point", "w", "w_scale", "w_zero_point", "y_scale", "y_zero_point", "bias"],
        ["y"],
        pads=list(layer.pads),
        strides=list(layer.strides),
        dilations=list(layer.dilations),
        group=layer.group,
        kernel_shape=list(layer.w.shape[2:]),
    )
    y_type = helper.np_dtype_to_tensor_dtype(np.dtype(layer.y_dtype))
    graph = helper.make_graph(
        [node],
        f"qlinearconv_{layer.name}",
        [
            helper.make_tensor_value_info(
                "x", TensorProto.UINT8, ["N", layer.w.shape[1] * layer.group, "H", "W"]
            )
        ],
        [helper.make_tensor_value_info("y", y_type, ["N", layer.w.shape[0], "OH", "OW"])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    return model


def run_qlinearconv(layer: IntegerConv, x_codes: np.ndarray) -> np.ndarray:
    """ONNX Runtime's ``QLinearConv`` kernel on ``x_codes`` (uint8), through :func:`qlinearconv_model`."""
    return _session(qlinearconv_model(layer)).run(None, {"x": np.asarray(x_codes, np.uint8)})[0]


def _session(proto):
    """An ONNX Runtime CPU session on an in-memory model, with its default (QDQ-fusing) optimizations."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def walkthrough(layer: IntegerConv, x_codes: np.ndarray, saturate: bool | None = None) -> dict[str, Any]:
    """Every step of the layer on ``x_codes``, for a notebook to show: the accumulator, the output codes by
    float and by fixed-point requantization, and ``saturate`` (default: whether this CPU saturates)."""
    if saturate is None:
        saturate = saturation.cpu_int8().saturates
    acc, clipped = accumulate(layer, x_codes, saturate=saturate)
    y = requantize(layer, acc)
    y_fixed = requantize_fixed_point(layer, acc)
    return {"acc": acc, "clipped_pairs": clipped, "y": y, "y_fixed_point": y_fixed, "saturate": saturate}


def channel_table(layer: IntegerConv, channels: int = 4):
    """The numbers of the first ``channels`` output channels, one row each: weight scale, float and int32 bias,
    the requantization multiplier ``M`` and its fixed-point form ``m0 * 2**-(31 + shift)``."""
    import pandas as pd

    m0, shift = fixed_point(layer.multiplier)
    rows = slice(0, channels)
    bias = layer.bias if layer.bias is not None else np.zeros(layer.w.shape[0], np.float32)
    return pd.DataFrame(
        {
            "w_scale": layer.w_scale[rows],
            "bias": bias[rows],
            "bias_codes": layer.bias_codes[rows],
            "M": layer.multiplier[rows],
            "m0": m0[rows],
            "shift": 31 + shift[rows],
        },
        index=pd.RangeIndex(min(channels, layer.w.shape[0]), name="channel"),
    )


def trace(layer: IntegerConv, x_codes: np.ndarray, at: tuple[int, int, int, int]):
    """One output code computed by hand, every step a row: ``at = (image, channel, row, col)`` of the output.

    The receptive field is read from the zero-point-padded input; the products are summed exactly (the pair
    saturation of some CPUs is left to :func:`accumulate`)."""
    import pandas as pd

    n, o, i, j = at
    _, cg, kh, kw = layer.w.shape
    g = o // (layer.w.shape[0] // layer.group)
    top, left = layer.pads[0], layer.pads[1]
    x = np.asarray(x_codes).astype(np.int64)[n, g * cg : (g + 1) * cg]
    padded = np.pad(x, ((0, 0), (top, layer.pads[2]), (left, layer.pads[3])), constant_values=layer.x_zero)
    r0, c0 = i * layer.strides[0], j * layer.strides[1]
    window = padded[:, r0 : r0 + layer.dilations[0] * (kh - 1) + 1 : layer.dilations[0],
                    c0 : c0 + layer.dilations[1] * (kw - 1) + 1 : layer.dilations[1]]  # fmt: skip
    w = layer.w[o].astype(np.int64) - int(layer.w_zero[o])
    dot = int(((window - layer.x_zero) * w).sum())
    acc = dot + int(layer.bias_codes[o])
    scaled = np.float32(acc) * layer.multiplier[o]
    lo, hi = layer.y_range
    code = int(np.clip(np.rint(scaled) + layer.y_zero, lo, hi))
    steps = [
        ("terms (C/group x kh x kw)", window.size),
        ("sum (x_q - z_x)(w_q - z_w)", dot),
        ("+ bias codes", int(layer.bias_codes[o])),
        ("= int32 accumulator", acc),
        ("x M (float32)", round(float(scaled), 4)),
        ("round half to even, + z_y", int(np.rint(scaled)) + layer.y_zero),
        (f"clamp to [{lo}, {hi}] (the ReLU) = output code", code),
        ("output value (code - z_y) x s_y", round(float((code - layer.y_zero) * layer.y_scale), 5)),
    ]
    return pd.DataFrame(steps, columns=["step", "value"], dtype=object).set_index("step")  # ints stay ints
