"""Quantization settings as validated dataclasses, and the fast-mode switch.

A :class:`QuantSpec` says how one tensor is quantized (bits, symmetry, granularity, range estimation,
straight-through estimator). A :class:`QATConfig` says how a whole model is prepared: one spec for weights,
one for activations, the BatchNorm handling and the layers kept in higher precision.

Example:
    >>> from qatlab import QATConfig, QuantSpec
    >>> cfg = QATConfig(weight=QuantSpec(bits=4, symmetric=True, per_channel=True))
    >>> cfg.weight.qmin, cfg.weight.qmax
    (-8, 7)
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

OBSERVERS = ("minmax", "ema", "percentile", "mse", "dynamic")
# Number formats (qatlab.formats): integer grids, and the floating-point element formats QAT targets today.
FORMATS = ("int", "fp8_e4m3", "fp8_e5m2", "mxfp8", "mxfp4", "nvfp4")
# bits per element of each non-integer format
FORMAT_BITS = {"fp8_e4m3": 8, "fp8_e5m2": 8, "mxfp8": 8, "mxfp4": 4, "nvfp4": 4}
STES = ("clipped", "identity", "lsq", "pact")
BN_MODES = ("fold", "simulate", "keep")
MIN_BITS, MAX_BITS = 2, 16


def fast() -> bool:
    """True when the environment asks for fast mode (``QATLAB_FAST=1``): small data, short loops."""
    return os.environ.get("QATLAB_FAST", "0").strip().lower() in ("1", "true", "yes")


def progress_bar(iterable: Any = None, *, progress: bool = True, **kwargs: Any) -> Any:
    """A tqdm bar (a widget in Jupyter, text in a terminal); hidden with ``progress=False`` or ``TQDM_DISABLE=1``.

    ``make run`` sets ``TQDM_DISABLE=1`` (and ``HF_HUB_DISABLE_PROGRESS_BARS=1`` for the transformers library)
    in the kernels it runs, so the saved notebooks hold results, not bars frozen at 0%. The variable is read here
    because tqdm's notebook bar ignores it.
    """
    from tqdm.auto import (
        tqdm,
    )  # here, not at the top: the ablation CLI imports this module before it needs tqdm

    off = not progress or os.environ.get("TQDM_DISABLE", "").strip().lower() in ("1", "true", "yes")
    return tqdm(iterable, disable=off, **kwargs)


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """Raise a ValueError naming ``name`` and its valid ``choices`` when ``value`` is not one of them."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {', '.join(map(repr, choices))}")


def check_positive_int(name: str, value: object) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is a positive int (``True`` is refused: a bool is
    an int subclass, but ``batch_size=True`` is always a mistake)."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}={value!r} is invalid; pass a positive integer")


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    Args:
        bits: integer bit width, 2..16.
        symmetric: symmetric range around zero with a signed grid and zero point 0; otherwise an asymmetric
            unsigned grid ``[0, 2**bits - 1]`` with a zero point.
        per_channel: one scale per slice along ``ch_axis`` instead of one per tensor.
        ch_axis: channel axis for per-channel quantization (0 for conv/linear weights).
        narrow_range: drop the most negative code of a symmetric grid (e.g. -127..127 at 8 bits).
        reduce_range: use half the grid in the same container, one bit less of range (8-bit signed
            ``[-64, 63]``, unsigned ``[0, 127]``), the convention of torch.ao's x86/fbgemm qconfig and ONNX
            Runtime's ``quantize_static(reduce_range=True)``. x86-64 CPUs with AVX2 but no VNNI add pairs of
            u8 x s8 products in int16 with saturation; with 7-bit weights or activations no pair can overflow
            (``qatlab.saturation``). Needs ``bits >= 3``.
        observer: range estimator: ``"minmax"``, ``"ema"`` (moving-average min-max), ``"percentile"``, ``"mse"``;
            or ``"dynamic"``: no stored range, each tensor is quantized with its own min/max at run time
            (per tensor, activations only, a fixed estimator: no learned scale).
        ste: straight-through estimator: ``"clipped"`` (gradient 1 inside the range, 0 outside),
            ``"identity"`` (1 everywhere), ``"lsq"`` (learned scale, Esser et al. 2019) or ``"pact"``
            (learned clipping value, Choi et al. 2018).
        averaging_constant: EMA weight of the newest batch for the ``"ema"`` observer.
        percentile: percentile (0 < p <= 100) of |x| or x kept by the ``"percentile"`` observer.
        format: the number format (``qatlab.formats``): ``"int"`` (the integer grid above, the default);
            ``"fp8_e4m3"`` / ``"fp8_e5m2"`` (FP8 elements, a scale ``amax / max_normal`` per tensor or per
            channel); ``"mxfp8"`` / ``"mxfp4"`` (OCP Microscaling: blocks of 32 along ``block_axis`` sharing a
            power-of-two scale, E4M3 / E2M1 elements); ``"nvfp4"`` (blocks of 16 with an E4M3 scale each and
            an FP32 tensor scale, E2M1 elements). A non-integer format fixes the element width: leave ``bits``
            out (it is set to 8 or 4).
        group_size: integer format only: one scale (and zero point when asymmetric) per group of
            ``group_size`` consecutive elements along ``block_axis`` (e.g. 32, 64, 128: "per-group int4").
            The scales come from each tensor's own groups (min-max), every time it is quantized.
        block_axis: the axis the groups/blocks run along, default -1: the reduction axis of a Linear weight
            and of a Linear's input (a conv weight is blocked along its flattened ``Cin x kh x kw`` axis).
        per_token: with ``observer="dynamic"``: one run-time range per row (per token) along ``block_axis``
            instead of one per tensor, as in 8da4w (int8 per-token activations) and FP8 "rowwise".

    Example:
        >>> QuantSpec(bits=8).qmax
        255
        >>> QuantSpec(format="mxfp4").bits
        4
    """

    bits: int | None = None
    symmetric: bool = False
    per_channel: bool = False
    ch_axis: int = 0
    narrow_range: bool = False
    reduce_range: bool = False
    observer: str = "minmax"
    ste: str = "clipped"
    averaging_constant: float = 0.01
    percentile: float = 99.99
    format: str = "int"
    group_size: int | None = None
    block_axis: int = -1
    per_token: bool = False

    def __post_init__(self) -> None:
        check_choice("format", self.format, FORMATS)
        if self.format != "int":
            width = FORMAT_BITS[self.format]
            if self.bits is not None and self.bits != width:
                raise ValueError(
                    f"bits={self.bits!r} conflicts with format={self.format!r}, whose elements have {width} bits: "
                    "leave bits out for a non-integer format (or use format='int' for an integer grid)"
                )
            object.__setattr__(self, "bits", width)
        elif self.bits is None:
            object.__setattr__(self, "bits", 8)
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise TypeError(
                f"bits={self.bits!r} must be an int between {MIN_BITS} and {MAX_BITS}, e.g. bits=8"
            )
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(
                f"bits={self.bits} is out of range; fake quantization supports {MIN_BITS}..{MAX_BITS} bits "
                "(use bits=8 for int8, bits=4 for int4)"
            )
        for name in ("symmetric", "per_channel", "narrow_range", "reduce_range"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}={getattr(self, name)!r} must be a bool (True or False)")
        if isinstance(self.ch_axis, bool) or not isinstance(self.ch_axis, int):
            raise TypeError(f"ch_axis={self.ch_axis!r} must be an int (0 for conv/linear weights)")
        check_choice("observer", self.observer, OBSERVERS)
        check_choice("ste", self.ste, STES)
        if self.observer == "dynamic" and (self.per_channel or self.ste in ("lsq", "pact")):
            raise ValueError(
                "observer='dynamic' computes a per-tensor range from each tensor at run time: use "
                "per_channel=False and ste='clipped' or 'identity'"
            )
        if self.narrow_range and not self.symmetric:
            raise ValueError(
                "narrow_range=True needs symmetric=True (it drops the most negative signed code)"
            )
        if self.reduce_range and self.bits < 3:
            raise ValueError(
                f"reduce_range=True with bits={self.bits} would leave a {self.bits - 1}-bit grid; use bits >= 3 "
                "(reduce_range is meant for 8-bit codes: bits=8 gives [-64, 63] signed, [0, 127] unsigned)"
            )
        for name in ("averaging_constant", "percentile"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"{name}={v!r} must be a number")
        if not (0.0 < self.averaging_constant <= 1.0):
            raise ValueError(f"averaging_constant={self.averaging_constant!r} must be in (0, 1], e.g. 0.01")
        if not (math.isfinite(self.percentile) and 0.0 < self.percentile <= 100.0):
            raise ValueError(f"percentile={self.percentile!r} must be in (0, 100], e.g. 99.99")
        self._check_format()

    def _check_format(self) -> None:
        """The combinations of ``format``, ``group_size``, ``block_axis`` and ``per_token`` that make sense."""
        if isinstance(self.block_axis, bool) or not isinstance(self.block_axis, int):
            raise TypeError(f"block_axis={self.block_axis!r} must be an int (-1: the last axis)")
        if not isinstance(self.per_token, bool):
            raise TypeError(f"per_token={self.per_token!r} must be a bool (True or False)")
        if self.group_size is not None:
            check_positive_int("group_size", self.group_size)
            if self.format != "int":
                raise ValueError(
                    f"group_size={self.group_size} is for format='int'; format={self.format!r} fixes its own blocks "
                    "(MX: 32, NVFP4: 16; FP8: per tensor or per channel): drop group_size"
                )
        if self.per_token and self.observer != "dynamic":
            raise ValueError(
                "per_token=True takes each row's range at run time: it needs observer='dynamic' "
                "(or per_token=False for a calibrated per-tensor range)"
            )
        blocked = self.group_size is not None or self.per_token or self.format in ("mxfp8", "mxfp4", "nvfp4")
        if blocked and self.per_channel:
            what = f"format={self.format!r}" if self.format != "int" else "group_size/per_token"
            raise ValueError(
                f"per_channel=True with {what}: the scales are per block along block_axis already; "
                "use per_channel=False"
            )
        if self.format == "int" and not blocked:
            return
        if self.ste not in ("clipped", "identity"):
            scales = (
                "a power-of-two scale" if self.format.startswith("mx") else "scales computed from each tensor"
            )
            raise ValueError(
                f"ste={self.ste!r} learns a stored integer scale; {self.format!r}"
                f"{' with group_size' if self.group_size else ''} uses {scales}, which LSQ/PACT do not cover "
                "here: use ste='clipped' (gradient 1 where the element is not saturated) or 'identity'"
            )
        if self.format != "int" and self.observer == "mse":
            raise ValueError(
                f"observer='mse' searches an integer grid; for format={self.format!r} use 'minmax', 'ema', "
                "'percentile' or 'dynamic'"
            )
        if self.format == "int" and self.observer not in ("minmax", "dynamic"):
            raise ValueError(
                f"observer={self.observer!r} with group_size/per_token: group ranges are each tensor's own "
                "min-max; use observer='minmax' (weights) or 'dynamic' (activations)"
            )
        if self.reduce_range or self.narrow_range:
            if self.format != "int":
                raise ValueError(
                    f"reduce_range/narrow_range are integer-grid options; drop them for format={self.format!r}"
                )
        if self.format != "int" and not self.symmetric:
            object.__setattr__(self, "symmetric", True)  # floating-point elements are sign-magnitude

    @property
    def blocked(self) -> bool:
        """True when scales are per block along ``block_axis`` (groups, per token, MX, NVFP4), computed from
        each tensor as it is quantized, rather than stored per tensor or per channel."""
        return self.group_size is not None or self.per_token or self.format in ("mxfp8", "mxfp4", "nvfp4")

    @property
    def stored_scale(self) -> bool:
        """True when the scale is calibrated and stored (the integer grid; FP8 per tensor or per channel; NVFP4's
        tensor scale), False when every tensor brings its own (groups, per token, MX, ``observer="dynamic"``)."""
        if self.observer == "dynamic" or self.per_token or self.group_size is not None:
            return False
        return self.format not in ("mxfp8", "mxfp4")

    @property
    def is_integer(self) -> bool:
        """True for the plain integer path of ``qatlab.quant`` (no groups, no float format)."""
        return self.format == "int" and not self.blocked

    @property
    def range_bits(self) -> int:
        """Bits of range the codes use: ``bits``, or one less with ``reduce_range``."""
        return self.bits - 1 if self.reduce_range else self.bits

    @property
    def qmin(self) -> int:
        """Smallest integer code of the grid."""
        if not self.symmetric:
            return 0
        return -(2 ** (self.range_bits - 1)) + (1 if self.narrow_range else 0)

    @property
    def qmax(self) -> int:
        """Largest integer code of the grid."""
        return 2 ** (self.range_bits - 1) - 1 if self.symmetric else 2**self.range_bits - 1

    @property
    def signed(self) -> bool:
        return self.symmetric

    @property
    def learned(self) -> bool:
        """True when the scale is a trained parameter (LSQ or PACT)."""
        return self.ste in ("lsq", "pact")

    def with_(self, **changes: object) -> QuantSpec:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)


def default_weight_spec() -> QuantSpec:
    return QuantSpec(bits=8, symmetric=True, per_channel=True, observer="minmax")


def default_activation_spec() -> QuantSpec:
    return QuantSpec(bits=8, symmetric=False, per_channel=False, observer="ema")


@dataclass(frozen=True)
class QATConfig:
    """How :func:`qatlab.prepare_qat` turns a float model into a QAT model.

    Args:
        weight: spec for conv/linear weights (default 8-bit symmetric per-channel min-max).
        activation: spec for the input activations of each quantized layer (default 8-bit asymmetric
            per-tensor moving average); ``None`` quantizes weights only.
        bn_mode: ``"fold"`` folds BatchNorm into the conv before QAT; ``"simulate"`` quantizes the folded
            weight during training with batch-statistics correction (Jacob et al. 2018, Krishnamoorthi 2018);
            ``"keep"`` leaves BatchNorm separate and folds it only at export.
        keep: layers left unquantized (or quantized with ``keep_bits``): qualified module names, or the
            tokens ``"first"`` and ``"last"`` for the first and last quantizable layer.
        keep_bits: bit width for the ``keep`` layers; ``None`` leaves them in float.
        fuse_relu: fold a ReLU module that directly follows a conv/BN/linear into the quantized layer.
        quantize_outputs: also fake-quantize (with the activation spec) the output of a quantized layer,
            after its fused ReLU, where no quantized layer reads it next: before a pooling, a residual add,
            a flatten (models that ``torch.fx`` traces; the model's own output stays float). An integer
            runtime can then keep that layer in int8 too (ONNX Runtime: QLinearConv instead of a float conv
            between a DequantizeLinear and the pooling), as deployment needs; the QAT model gains a
            quantization point there, so its numbers differ slightly from the default's.
        overrides: per-layer precision (mixed precision): ``{layer: (weight_spec, activation_spec)}``, each
            spec a :class:`QuantSpec` or ``None`` (float), or ``{layer: None}`` for a layer left in float.
            Names are qualified module names (or ``"first"``/``"last"``); an override wins over ``keep``.
            Stored as a tuple of ``(layer, weight_spec, activation_spec)`` (the config stays hashable);
            :meth:`layer_specs` gives it back as a dict. :mod:`qatlab.precision` writes these.
        quantize_adds: with ``quantize_outputs``, also quantize the result of every tensor addition (after a
            ReLU that directly follows it), and quantize each tensor **once, where it is produced**: a layer
            whose input is already codes (an addition's result, or another layer's quantized output, as at a
            residual fork) reads those codes instead of quantizing them again with a scale of its own. ONNX
            Runtime then runs the additions in integers too (``QLinearAdd``). Needs a model that traces with
            ``torch.fx``; the prepared model is then a ``torch.fx.GraphModule``.

    Example:
        >>> cfg = QATConfig(weight=QuantSpec(bits=4, symmetric=True, per_channel=True), keep=("first", "last"))
    """

    weight: QuantSpec = field(default_factory=default_weight_spec)
    activation: QuantSpec | None = field(default_factory=default_activation_spec)
    bn_mode: str = "simulate"
    keep: tuple[str, ...] = ()
    keep_bits: int | None = None
    fuse_relu: bool = True
    quantize_outputs: bool = False
    quantize_adds: bool = False
    overrides: Any = ()

    def __post_init__(self) -> None:
        if not isinstance(self.weight, QuantSpec):
            raise TypeError(
                f"weight={self.weight!r} must be a QuantSpec, e.g. QuantSpec(bits=8, symmetric=True)"
            )
        _check_layer_specs(self.weight, self.activation, "")
        object.__setattr__(self, "overrides", _normalise_overrides(self.overrides))
        check_choice("bn_mode", self.bn_mode, BN_MODES)
        if self.quantize_outputs and self.activation is None:
            raise ValueError(
                "quantize_outputs=True needs an activation spec (outputs use it); pass activation=QuantSpec(...) "
                "or quantize_outputs=False"
            )
        if self.quantize_adds and not self.quantize_outputs:
            raise ValueError(
                "quantize_adds=True quantizes additions whose inputs are layer outputs: it needs "
                "quantize_outputs=True as well (or quantize_adds=False)"
            )
        if isinstance(self.keep, str) or not all(isinstance(k, str) for k in self.keep):
            raise TypeError(f"keep={self.keep!r} must be a tuple of module names, e.g. ('first', 'last')")
        object.__setattr__(self, "keep", tuple(self.keep))
        if self.keep_bits is not None:
            try:
                QuantSpec(bits=self.keep_bits)
            except (TypeError, ValueError) as exc:
                raise type(exc)(
                    f"keep_bits={self.keep_bits!r} is invalid: {exc} (or None to keep float)"
                ) from None

    def to_dict(self) -> dict:
        """A JSON-ready dict (specs as dicts); :meth:`from_dict` inverts it."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> QATConfig:
        """Rebuild a config from :meth:`to_dict`'s output (e.g. read from a JSON run file)."""
        if not isinstance(d, dict):
            raise TypeError(f"from_dict needs a dict (QATConfig.to_dict() output), got {type(d).__name__}")
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(
                f"unknown QATConfig fields {sorted(unknown)}; valid: {[f.name for f in fields(cls)]}"
            )
        d = dict(d)
        for key in ("weight", "activation"):
            if isinstance(d.get(key), dict):
                d[key] = QuantSpec(**d[key])
        if "keep" in d:
            d["keep"] = tuple(d["keep"])
        if "overrides" in d:
            d["overrides"] = tuple(
                (name, *(QuantSpec(**s) if isinstance(s, dict) else s for s in specs))
                for name, *specs in d["overrides"]
            )
        return cls(**d)

    def layer_specs(self) -> dict[str, tuple[QuantSpec | None, QuantSpec | None]]:
        """The per-layer ``overrides`` as ``{layer: (weight_spec, activation_spec)}`` (``None``: float)."""
        return {name: (w, a) for name, w, a in self.overrides}

    def spec_for(self, kind: str, keep: bool, layer: str | None = None) -> QuantSpec | None:
        """The spec used for ``kind`` ("weight" or "activation") of a layer; ``None`` means float. ``layer``
        (its qualified name, resolved) picks its entry in ``overrides`` first."""
        check_choice("kind", kind, ("weight", "activation"))
        if layer is not None:
            for name, w, a in self.overrides:
                if name == layer:
                    return w if kind == "weight" else a
        spec = self.weight if kind == "weight" else self.activation
        if spec is None or not keep:
            return spec
        if self.keep_bits is None:
            return None
        if spec.format != "int" or spec.blocked:  # a kept layer gets the lab's integer default at keep_bits
            default = default_weight_spec() if kind == "weight" else default_activation_spec()
            return default.with_(bits=self.keep_bits)
        return spec.with_(bits=self.keep_bits)


def _check_layer_specs(weight: Any, activation: Any, where: str) -> None:
    """The checks a (weight, activation) pair of specs must pass; ``where`` names an override's layer."""
    at = f" (overrides[{where!r}])" if where else ""
    if weight is not None and not isinstance(weight, QuantSpec):
        raise TypeError(
            f"weight={weight!r}{at} must be a QuantSpec, e.g. QuantSpec(bits=8, symmetric=True)"
            + (", or None for float" if where else "")
        )
    if activation is not None and not isinstance(activation, QuantSpec):
        raise TypeError(f"activation={activation!r}{at} must be a QuantSpec or None (weights only)")
    if activation is not None and activation.per_channel:
        raise ValueError(
            f"activation.per_channel=True{at} is not supported: activations are quantized per tensor "
            "(use per_channel=False)"
        )
    if weight is not None and weight.observer == "dynamic":
        raise ValueError(
            f"weight.observer='dynamic'{at} is for activations; weights use a stored range (e.g. 'minmax')"
        )
    if weight is not None and weight.ste == "pact":
        raise ValueError(f"weight.ste='pact'{at} is not supported: PACT learns an activation clip; use 'lsq'")


def _normalise_overrides(overrides: Any) -> tuple[tuple[str, QuantSpec | None, QuantSpec | None], ...]:
    """``overrides`` as a tuple of ``(layer, weight_spec, activation_spec)``, from a dict or such a tuple."""
    fix = "pass overrides={'layer.name': (QuantSpec(bits=8, symmetric=True, per_channel=True), QuantSpec(bits=8))}"
    if isinstance(overrides, dict):
        items = list(overrides.items())
    elif isinstance(overrides, (tuple, list)) and all(
        isinstance(t, (tuple, list)) and len(t) == 3 for t in overrides
    ):
        items = [(t[0], (t[1], t[2])) for t in overrides]
    else:
        raise TypeError(
            f"overrides={overrides!r} must be a dict of layer -> (weight spec, activation spec); {fix}"
        )
    out = []
    for name, specs in items:
        if not isinstance(name, str):
            raise TypeError(f"overrides key {name!r} must be a layer name (str); {fix}")
        if specs is None:
            specs = (None, None)
        if not (isinstance(specs, (tuple, list)) and len(specs) == 2):
            raise TypeError(
                f"overrides[{name!r}]={specs!r} must be a pair (weight spec or None, activation spec or None), "
                f"or None for float; {fix}"
            )
        _check_layer_specs(specs[0], specs[1], name)
        out.append((name, specs[0], specs[1]))
    names = [n for n, _, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"overrides names a layer twice: {names}; give each layer one entry")
    return tuple(out)


def lab_config(bits: int, activations: bool = True, bn_mode: str = "simulate") -> QATConfig:
    """The lab's QAT configuration at ``bits`` (notebooks 04 and 05): weights per-channel symmetric with min-max
    ranges; activations (``activations=True``) at the same bits, EMA-calibrated, with an LSQ-learned scale.

    Example:
        >>> lab_config(4).activation.ste
        'lsq'
    """
    return QATConfig(
        weight=QuantSpec(bits=bits, symmetric=True, per_channel=True),
        activation=QuantSpec(bits=bits, observer="ema", ste="lsq") if activations else None,
        bn_mode=bn_mode,
    )
