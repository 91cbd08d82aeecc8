"""Accuracy-aware mixed precision: per-layer sensitivity, accuracy fallback, and a size-budgeted search.

Three questions every QAT user meets, answered with measurements:

- **Which layers hurt?** :func:`sensitivity` scores each quantizable layer at each candidate precision with four
  estimators, and measures the ground truth (the accuracy drop of quantizing that layer alone):

  - ``ptq``: one layer at a time, PTQ accuracy drop and loss increase on the evaluation data (the ground truth,
    and the estimator INC, AIMET and NNCF run);
  - ``hessian``: HAWQ-v2's ``Tr(H) / n * ||Q(t) - t||^2``, summed over the layer's weight and its input
    activation, the traces estimated with Hutchinson's method (``E[v^T H v]``, Rademacher ``v``);
  - ``fisher``: ModelOpt AutoQuantize's gradient score ``sum((dL/dY)^2 * (Y_q - Y)^2)`` on the layer's output;
  - ``sqnr``: the signal-to-quantization-noise ratio of the layer's own output (no labels, no backward).

  :func:`rank_correlation` says how well each estimator ranks the layers (Spearman's rho against the truth).
- **How few layers must stay in higher precision?** :func:`fallback` keeps layers (float, or ``keep_bits``)
  until PTQ accuracy is within ``tolerable_loss`` of float, as Intel Neural Compressor's accuracy criterion does.
- **Which mix is best for a size?** :func:`search` picks one candidate precision per layer minimising the summed
  sensitivity under a size budget (an exact integer program, as HAWQ-v3 and AutoQuantize set it up), and
  :func:`mixed_config` turns the choice into a :class:`~qatlab.QATConfig` (``overrides``) that prepares, trains,
  converts and exports like any other.

Every evaluation of a mixed model here is a PTQ model assembled from per-precision calibrations
(:class:`PTQCache`): calibration observes with fake quantization off, so a layer's ranges do not depend on the
other layers' precision, and one calibration per precision serves every mix.

Example:
    >>> cfg, steps = fallback(model, lab_config(4), calib, val, tolerable_loss=0.01)  # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from qatlab.config import QATConfig, QuantSpec, check_choice, progress_bar
from qatlab.data import reseed
from qatlab.formats import bits_per_element
from qatlab.modules import QuantConv2d, QuantConvBn2d, QuantLinear
from qatlab.prepare import (
    _resolve_keep,
    calibrate,
    enable_fake_quant,
    freeze_bn_stats,
    freeze_observers,
    prepare_qat,
    quantizers,
)
from qatlab.train import evaluate

ESTIMATORS = ("ptq", "hessian", "fisher", "sqnr")
ORDERS = ("leave_one_out", "one_layer", "fisher", "hessian", "sqnr")
_QUANT_LAYERS = (QuantConv2d, QuantConvBn2d, QuantLinear)
Pair = tuple[QuantSpec | None, QuantSpec | None]

# Candidate weight precisions for the search (activations keep the base config's spec): name -> spec (None: float)
CANDIDATES: dict[str, QuantSpec | None] = {
    "float": None,
    "int8": QuantSpec(bits=8, symmetric=True, per_channel=True),
    "int4": QuantSpec(bits=4, symmetric=True, per_channel=True),
    "int4 g32": QuantSpec(bits=4, symmetric=True, group_size=32),
    "int3": QuantSpec(bits=3, symmetric=True, per_channel=True),
    "int2": QuantSpec(bits=2, symmetric=True, per_channel=True),
    "mxfp4": QuantSpec(format="mxfp4"),
    "nvfp4": QuantSpec(format="nvfp4"),
    "fp8": QuantSpec(format="fp8_e4m3", per_channel=True),
}


def quantizable_layers(model: nn.Module) -> list[str]:
    """Qualified names of the model's ``nn.Conv2d`` / ``nn.Linear`` layers, in model order."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _weight_shape(module: nn.Module) -> tuple[int, ...]:
    """A weight's shape as its quantizer blocks it: a conv weight as ``(Cout, Cin*kh*kw)``."""
    w = module.weight
    return (w.shape[0], math.prod(w.shape[1:])) if w.dim() > 2 else tuple(w.shape)


def fits(spec: QuantSpec | None, shape: Sequence[int]) -> bool:
    """Whether ``spec`` can quantize a weight of (blocked) ``shape``: a group size must divide its axis."""
    if spec is None or spec.group_size is None:  # MX and NVFP4 take a short last block
        return True
    return shape[spec.block_axis % len(shape)] % spec.group_size == 0


def _check_loader(name: str, loader: Iterable) -> None:
    try:
        empty = len(loader) == 0  # type: ignore[arg-type]
    except TypeError:
        return
    if empty:
        raise ValueError(
            f"{name} has no batches (an empty data set?); pass a loader over a non-empty data set"
        )


def layer_specs(model: nn.Module, config: QATConfig) -> dict[str, Pair]:
    """``{layer: (weight_spec, activation_spec)}`` as ``prepare_qat(model, config)`` resolves them (keep,
    keep_bits, overrides, 'first'/'last'); ``(None, None)`` for a float layer. Model order."""
    return _specs_of(prepare_qat(model, config), quantizable_layers(model))


def _specs_of(qat: nn.Module, names: Iterable[str]) -> dict[str, Pair]:
    """Each layer's (weight spec, input spec) in a prepared model; ``(None, None)`` where it stayed float."""
    out: dict[str, Pair] = {}
    mods = dict(qat.named_modules())
    for name in names:
        m = mods.get(name)
        if isinstance(m, _QUANT_LAYERS):
            w = m.weight_quant.spec if m.weight_quant is not None else None
            a = m.input_quant.spec if m.input_quant is not None else None
            out[name] = (w, a)
        else:
            out[name] = (None, None)
    return out


def size_bits(model: nn.Module, config: QATConfig | Mapping[str, Pair]) -> float:
    """Storage bits of the quantizable layers' weights under ``config`` (or a :func:`layer_specs` dict):
    scales and zero points included (:func:`qatlab.formats.bits_per_element`), float layers at 32 bits."""
    specs = layer_specs(model, config) if isinstance(config, QATConfig) else config
    mods = dict(model.named_modules())
    total = 0.0
    for name, (w, _) in specs.items():
        shape = _weight_shape(mods[name])
        total += math.prod(shape) * (32.0 if w is None else bits_per_element(w, shape))
    return total


def precision_label(spec: QuantSpec | None) -> str:
    """A short name of a weight spec: a :data:`CANDIDATES` key when it is one, else e.g. ``"int6"``."""
    for name, cand in CANDIDATES.items():
        if cand == spec:
            return name
    if spec is None:
        return "float"
    if spec.format != "int":
        return spec.format
    return f"int{spec.bits}" + (f" g{spec.group_size}" if spec.group_size else "")


def precision_map(model: nn.Module, configs: Mapping[str, QATConfig]) -> pd.DataFrame:
    """One row per (map, layer): ``map`` (the key of ``configs``), ``layer``, ``precision`` (of the weight,
    :func:`precision_label`), ``activation`` (of the input), ``params``: what :func:`qatlab.plot.precision_map`
    draws."""
    mods = dict(model.named_modules())
    rows = []
    for label, cfg in configs.items():
        for name, (w, a) in layer_specs(model, cfg).items():
            act = "float" if a is None else (a.format if a.format != "int" else f"int{a.bits}")
            rows.append(
                {"map": label, "layer": name, "precision": precision_label(w), "activation": act,
                 "params": mods[name].weight.numel()}
            )  # fmt: skip
    return pd.DataFrame(rows)


class PTQCache:
    """PTQ models of any per-layer mix, from one calibration per (weight spec, activation spec) pair.

    Calibration observes each tensor with fake quantization off, so a quantizer's range depends only on the
    float model and the calibration batches, not on the other layers' precision: the quantizers of a layer at
    a given pair are calibrated once (every layer at that pair, one pass) and loaded into every mix that uses
    the pair. Equal, up to float rounding in folded Conv+BN, to ``ptq(model, mixed_config, calib_loader)``.

    Args:
        model: the float model.
        config: the base config (bn_mode, fuse_relu); mixes are its ``overrides``.
        calib_loader: calibration batches (reseeded with ``calib_seed`` before each calibration).
    """

    def __init__(
        self,
        model: nn.Module,
        config: QATConfig,
        calib_loader: Iterable,
        calib_batches: int = 8,
        calib_seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        if config.quantize_outputs:
            raise ValueError(
                "PTQCache assembles layer inputs and weights only; quantize_outputs=True needs "
                "qatlab.ptq(model, config, ...) for each mix"
            )
        _check_loader("calib_loader", calib_loader)
        self.model, self.config, self.calib_loader = model, config, calib_loader
        self.calib_batches, self.calib_seed, self.device = calib_batches, calib_seed, device
        self.layers = quantizable_layers(model)
        self._states: dict[Pair, dict[str, dict[str, Tensor]]] = {}

    def _uniform(self, pair: Pair) -> QATConfig:
        """Every layer at ``pair``, but those whose weight ``pair`` cannot quantize (a group size that does
        not divide it), which stay float."""
        mods = dict(self.model.named_modules())
        fit = {n: pair if fits(pair[0], _weight_shape(mods[n])) else (None, None) for n in self.layers}
        return replace(self.config, keep=(), keep_bits=None, overrides=fit)

    def states(self, pair: Pair) -> dict[str, dict[str, Tensor]]:
        """Calibrated quantizer states (by quantizer name) with every layer at ``pair``."""
        if pair not in self._states:
            q = prepare_qat(self.model, self._uniform(pair)).to(self.device)
            if any(True for _ in quantizers(q)):
                reseed(self.calib_loader, self.calib_seed)
                calibrate(q, self.calib_loader, num_batches=self.calib_batches, device=self.device)
            self._states[pair] = {
                n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in quantizers(q)
            }
        return self._states[pair]

    def ptq(self, config: QATConfig | Mapping[str, Pair]) -> nn.Module:
        """The PTQ model of ``config`` (a QATConfig, or ``{layer: (weight_spec, activation_spec)}`` over this
        cache's base config), in eval mode with observers and BN statistics frozen."""
        if not isinstance(config, QATConfig):
            config = replace(self.config, keep=(), keep_bits=None, overrides=dict(config))
        q = prepare_qat(self.model, config).to(self.device)
        specs = _specs_of(q, self.layers)
        for name, m in quantizers(q):
            layer = name.rsplit(".", 1)[0]
            m.load_state_dict(self.states(specs[layer])[name])
        freeze_observers(q)
        freeze_bn_stats(q)
        return q.eval()


def _loader_batches(loader: Iterable, n: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    reseed(loader, seed)
    out = []
    for batch in loader:
        out.append((batch[0], batch[1]))
        if len(out) >= n:
            break
    if not out:
        raise ValueError(
            "the loader has no batches (an empty data set?); pass a loader over a non-empty data set"
        )
    return out


def _float_scored(model: nn.Module, config: QATConfig, calib_loader, calib_batches, calib_seed, device):
    """A calibrated copy (BN folded into the weights) with fake quantization off: it computes the float model,
    and each layer's quantizers can be switched on alone."""
    cfg = replace(config, bn_mode="fold", quantize_outputs=False, quantize_adds=False)
    q = prepare_qat(model, cfg).to(device)
    reseed(calib_loader, calib_seed)
    calibrate(q, calib_loader, num_batches=calib_batches, device=device)
    freeze_observers(q)
    enable_fake_quant(q, False)
    q.eval()
    mods = dict(q.named_modules())
    return q, {n: mods[n] for n in quantizable_layers(model) if isinstance(mods.get(n), _QUANT_LAYERS)}


def _set_layer_quant(m: nn.Module, on: bool) -> None:
    for q in (m.weight_quant, m.input_quant):
        if q is not None:
            q.fake_quant_enabled = on


def _capture(layers: Mapping[str, nn.Module], store: dict[str, tuple[Tensor, Tensor]]):
    """Forward hooks that record each layer's (input, output), in the autograd graph."""

    def hook(name):
        def fn(module, args, output):
            store[name] = (args[0], output)

        return fn

    return [m.register_forward_hook(hook(n)) for n, m in layers.items()]


def _gradient_scores(
    q, layers, batches, samples: int, seed: int, device, hessian: bool = True
) -> pd.DataFrame:
    """Fisher (AutoQuantize) scores, Hutchinson Hessian traces and output SQNR for every layer of ``q``."""
    stats = {n: {"fisher": 0.0, "hess": 0.0, "sig": 0.0, "noise": 0.0} for n in layers}
    gen = torch.Generator().manual_seed(seed)
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        if x.is_floating_point():
            x = x.clone().requires_grad_(True)  # the first layer's input gets a Hessian trace too
        store: dict[str, tuple[Tensor, Tensor]] = {}
        hooks = _capture(layers, store)
        try:
            loss = F.cross_entropy(q(x), y)
        finally:
            for h in hooks:
                h.remove()
        names = list(layers)
        weights = [layers[n].weight for n in names]
        inputs = [store[n][0] for n in names]
        outputs = [store[n][1] for n in names]
        with_x = [i for i, t in enumerate(inputs) if t.requires_grad]
        wrt = weights + [inputs[i] for i in with_x] + outputs
        grads = torch.autograd.grad(loss, wrt, create_graph=hessian)
        g_w, g_x, g_y = (
            grads[: len(names)],
            grads[len(names) : len(names) + len(with_x)],
            grads[-len(names) :],
        )
        # quantization noise of each layer: its weight, its input, and its output with only it quantized
        with torch.no_grad():
            for i, n in enumerate(names):
                m = layers[n]
                _set_layer_quant(m, True)
                y_q = m(inputs[i].detach())
                _set_layer_quant(m, False)
                d_y = y_q - outputs[i].detach()
                stats[n]["fisher"] += float((g_y[i].detach().double() ** 2 * d_y.double() ** 2).sum())
                stats[n]["sig"] += float(outputs[i].detach().double().pow(2).sum())
                stats[n]["noise"] += float(d_y.double().pow(2).sum())
        # Hutchinson: E[v^T H v] = Tr(H) block by block (cross terms vanish in expectation)
        params_x = weights + [inputs[i] for i in with_x]
        first = list(g_w) + list(g_x)
        traces = [0.0] * len(params_x)
        for _ in range(samples if hessian else 0):
            vs = [torch.randint(0, 2, t.shape, generator=gen).to(t) * 2 - 1 for t in params_x]
            hv = torch.autograd.grad(first, params_x, grad_outputs=vs, retain_graph=True)
            for k, (v, h) in enumerate(zip(vs, hv, strict=True)):
                traces[k] += float((v * h).sum()) / samples
        with torch.no_grad():
            for i, n in enumerate(names if hessian else ()):
                m = layers[n]
                w = weights[i]
                if m.weight_quant is not None:
                    m.weight_quant.fake_quant_enabled = True
                    d_w = m.weight_quant(w) - w
                    m.weight_quant.fake_quant_enabled = False
                    stats[n]["hess"] += traces[i] / w.numel() * float(d_w.double().pow(2).sum())
                if i in with_x and m.input_quant is not None:
                    t = inputs[i].detach()
                    m.input_quant.fake_quant_enabled = True
                    d_x = m.input_quant(t) - t
                    m.input_quant.fake_quant_enabled = False
                    k = len(names) + with_x.index(i)
                    stats[n]["hess"] += traces[k] / t.numel() * float(d_x.double().pow(2).sum())
        del grads, store
    rows = []
    for n, s in stats.items():
        ratio = s["sig"] / s["noise"] if s["noise"] > 0 else math.inf
        rows.append({"layer": n, "hessian": s["hess"] / len(batches), "fisher": s["fisher"] / len(batches),
                     "sqnr_db": 10 * math.log10(ratio) if ratio > 0 else -math.inf})  # fmt: skip
    return pd.DataFrame(rows)


def sensitivity(
    model: nn.Module,
    configs: QATConfig | Mapping[str, QATConfig],
    calib_loader: Iterable,
    eval_loader: Iterable,
    estimators: Sequence[str] = ESTIMATORS,
    layers: Iterable[str] | None = None,
    calib_batches: int = 8,
    score_batches: int = 4,
    hutchinson_samples: int = 16,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> pd.DataFrame:
    """Per-layer sensitivity to quantization at each candidate precision, by several estimators.

    Each candidate (a config: its weight and activation specs apply to the one layer scored, every other layer
    stays float) is scored on ``score_batches`` batches of ``calib_loader`` (the data a user has to calibrate
    with) by ``hessian``, ``fisher`` and ``sqnr`` (see the module docstring); ``ptq`` measures what they try to
    predict on ``eval_loader``: the accuracy and loss of the float model with that layer alone quantized.

    Args:
        configs: one config, or ``{candidate name: config}``.
        estimators: any of ``"ptq"``, ``"hessian"``, ``"fisher"``, ``"sqnr"``.
        layers: the layers to score (default: every Conv2d/Linear).
        hutchinson_samples: Rademacher probes per batch for the Hessian traces.

    Returns:
        One row per (candidate, layer): ``candidate``, ``layer``, ``params``, and per estimator: ``acc``,
        ``acc_drop`` and ``loss_increase`` (``ptq``), ``hessian``, ``fisher``, ``sqnr_db`` (larger scores mean
        more harmful, except ``sqnr_db``: lower is worse).
    """
    configs = {"config": configs} if isinstance(configs, QATConfig) else dict(configs)
    if not configs:
        raise ValueError("configs is empty; pass a QATConfig or {name: QATConfig}")
    for name in estimators:
        check_choice("estimators", name, ESTIMATORS)
    _check_loader("calib_loader", calib_loader)
    _check_loader("eval_loader", eval_loader)
    names = quantizable_layers(model)
    layers = names if layers is None else list(layers)
    unknown = [n for n in layers if n not in names]
    if unknown:
        raise ValueError(f"layers {unknown} are not Conv2d/Linear layers of the model; valid: {names[:8]}...")
    model = model.to(device).eval()
    params = {n: m.weight.numel() for n, m in model.named_modules() if n in names}
    frames = []
    base = evaluate(model, eval_loader, device=device) if "ptq" in estimators else None
    mods = dict(model.named_modules())
    for cand, cfg in progress_bar(configs.items(), desc="candidates", progress=progress, leave=False):
        # the layers this candidate can quantize (a group size must divide the weight's axis); the rest float
        fit = [n for n in layers if fits(cfg.weight, _weight_shape(mods[n]))]
        cfg = replace(cfg, keep=(), keep_bits=None, overrides={n: None for n in names if n not in fit})
        df = pd.DataFrame({"candidate": cand, "layer": fit, "params": [params[n] for n in fit]})
        if {"hessian", "fisher", "sqnr"} & set(estimators):
            q, qmods = _float_scored(model, cfg, calib_loader, calib_batches, seed, device)
            batches = _loader_batches(calib_loader, score_batches, seed)
            scored = {n: qmods[n] for n in fit if n in qmods}
            grad = _gradient_scores(
                q, scored, batches, hutchinson_samples, seed, device, "hessian" in estimators
            )
            keep = ["layer"] + [c for e, c in (("hessian", "hessian"), ("fisher", "fisher"), ("sqnr", "sqnr_db"))
                                if e in estimators]  # fmt: skip
            df = df.merge(grad[keep], on="layer", how="left")
        if base is not None:
            cache = PTQCache(model, cfg, calib_loader, calib_batches, seed, device)
            pair = (cfg.weight, cfg.activation)
            rows = []
            for n in progress_bar(fit, desc=f"{cand}: one layer at a time", progress=progress, leave=False):
                spec = {m: (pair if m == n else (None, None)) for m in names}
                res = evaluate(cache.ptq(spec), eval_loader, device=device)
                rows.append({"layer": n, "acc": res["acc"], "acc_drop": base["acc"] - res["acc"],
                             "loss_increase": res["loss"] - base["loss"]})  # fmt: skip
            df = df.merge(pd.DataFrame(rows), on="layer", how="left")
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def long_scores(df: pd.DataFrame, truth: str = "acc_drop") -> pd.DataFrame:
    """:func:`sensitivity`'s table as one row per (layer, candidate, estimator) with a ``score`` where larger
    means more harmful (``sqnr`` enters as ``-sqnr_db``), beside the ``truth`` column: what
    :func:`qatlab.plot.estimator_scatter` draws. Other columns (``model``, ``seed``) are carried along."""
    if truth not in df.columns:
        raise ValueError(f"df has no {truth!r} column: run sensitivity with 'ptq' among the estimators")
    cols = {"hessian": "hessian", "fisher": "fisher", "sqnr": "sqnr_db"}
    ids = [
        c for c in df.columns if c not in {"hessian", "fisher", "sqnr_db", "acc", "acc_drop", "loss_increase"}
    ]
    frames = []
    for est, col in cols.items():
        if col not in df.columns:
            continue
        part = df[ids + [truth]].copy()
        part["estimator"] = est
        part["score"] = -df[col] if est == "sqnr" else df[col]
        frames.append(part)
    if not frames:
        raise ValueError("df has no estimator columns (hessian, fisher, sqnr_db)")
    return pd.concat(frames, ignore_index=True)


def rank_correlation(
    df: pd.DataFrame, truth: str = "acc_drop", by: Sequence[str] = ("model", "seed")
) -> pd.DataFrame:
    """Spearman's rank correlation of each estimator's score with ``truth`` (from :func:`sensitivity`, or
    :func:`long_scores` of it), per ``by`` group (columns that exist), then per model over its seeds: ``spearman``
    (mean), ``spearman_ci95`` (Student's t half-width, NaN with one seed), ``seeds``, ``points`` (layers x
    candidates per group)."""
    from scipy import stats

    long = df if "estimator" in df.columns else long_scores(df, truth)
    by = [c for c in by if c in long.columns]
    per = []
    for key, part in long.groupby(["estimator", *by], sort=False):
        key = key if isinstance(key, tuple) else (key,)
        ok = part[["score", truth]].replace([math.inf, -math.inf], math.nan).dropna()
        rho = float(stats.spearmanr(ok["score"], ok[truth]).statistic) if len(ok) > 2 else math.nan
        per.append({**dict(zip(["estimator", *by], key, strict=True)), "rho": rho, "points": len(ok)})
    per_df = pd.DataFrame(per)
    group = ["estimator"] + (["model"] if "model" in by else [])
    rows = []
    for key, part in per_df.groupby(group, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        rhos = part["rho"].dropna()
        n = len(rhos)
        half = float(stats.t.ppf(0.975, n - 1) * rhos.std(ddof=1) / n**0.5) if n > 1 else math.nan
        rows.append({**dict(zip(group, key, strict=True)), "spearman": float(rhos.mean()) if n else math.nan,
                     "spearman_ci95": half, "seeds": n, "points": int(part["points"].mean())})  # fmt: skip
    return pd.DataFrame(rows)


def _target(float_acc: float, tolerable_loss: float, relative: bool) -> float:
    return float_acc * (1 - tolerable_loss) if relative else float_acc - tolerable_loss


def fallback(
    model: nn.Module,
    config: QATConfig,
    calib_loader: Iterable,
    eval_loader: Iterable,
    tolerable_loss: float = 0.01,
    relative: bool = True,
    order: str | Sequence[str] = "leave_one_out",
    search: str = "greedy",
    calib_batches: int = 8,
    calib_seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[QATConfig, pd.DataFrame]:
    """Keep as few layers as possible in higher precision so that PTQ accuracy meets the criterion.

    The criterion (INC's ``AccuracyCriterion``): PTQ accuracy on ``eval_loader`` >= float accuracy x (1 -
    ``tolerable_loss``) (``relative=True``), or >= float accuracy - ``tolerable_loss`` (``relative=False``,
    absolute, as a fraction: 0.01 is one point). Kept layers use ``config.keep_bits`` (``None``: float), as
    ``QATConfig.keep`` does; layers already in ``config.keep`` stay kept.

    ``search="greedy"``: starting from every layer quantized, keep layers one at a time in ``order`` until the
    criterion holds, then re-quantize kept layers (least sensitive first) where the criterion still holds, in
    passes until none can go: no single kept layer can then be quantized (a local minimum).
    ``search="exhaustive"``: try every set of kept layers by increasing size (models of up to 16 layers): the
    fewest kept layers that meet the criterion, and among those the most accurate.

    ``order``: ``"leave_one_out"`` (the accuracy gained by keeping each layer alone, everything else quantized,
    as INC ranks its fallback), ``"one_layer"`` (the drop of quantizing each layer alone), ``"fisher"``,
    ``"hessian"``, ``"sqnr"`` (:func:`sensitivity`'s estimators, on ``calib_loader``), or a list of layer names.

    Returns:
        ``(config, steps)``: the config (``keep`` extended), and one row per evaluated step: ``step``,
        ``action`` (``"all quantized"``, ``"keep"``, ``"re-quantize"``, ``"try"``), ``layer``, ``kept``
        (how many), ``acc``, ``target``, ``meets``, ``accepted``, ``size_kb`` (weights), ``float_acc``.

    Raises:
        ValueError: a loader is empty, ``tolerable_loss`` is not in [0, 1), or the criterion fails even with
            every layer kept (the message gives that accuracy and what to change).
    """
    if not isinstance(config, QATConfig):
        raise TypeError(f"config must be a QATConfig, got {type(config).__name__}")
    if not (isinstance(tolerable_loss, (int, float)) and 0 <= tolerable_loss < 1):
        raise ValueError(
            f"tolerable_loss={tolerable_loss!r} must be in [0, 1), e.g. 0.01 (1% of float accuracy)"
        )
    check_choice("search", search, ("greedy", "exhaustive"))
    _check_loader("calib_loader", calib_loader)
    _check_loader("eval_loader", eval_loader)
    if config.overrides:
        raise ValueError("fallback works with keep/keep_bits; pass a config without overrides")
    model = model.to(device).eval()
    names = quantizable_layers(model)
    already = _resolve_keep(config.keep, names, model)  # 'first'/'last' resolved, unknown names an error
    free = [n for n in names if n not in already]
    float_acc = evaluate(model, eval_loader, device=device)["acc"]
    target = _target(float_acc, tolerable_loss, relative)
    cache = PTQCache(
        model, replace(config, keep=(), keep_bits=None), calib_loader, calib_batches, calib_seed, device
    )
    rows: list[dict[str, Any]] = []

    def cfg_of(kept: Iterable[str]) -> QATConfig:
        return replace(config, keep=tuple(n for n in names if n in set(kept) | already))

    def measure(kept: Iterable[str], action: str, layer: str) -> bool:
        q = cache.ptq(cfg_of(kept))
        acc = evaluate(q, eval_loader, device=device)["acc"]
        meets = acc >= target
        rows.append({"step": len(rows), "action": action, "layer": layer, "kept": len(set(kept) | already),
                     "acc": acc, "target": target, "meets": meets, "accepted": True,
                     "size_kb": size_bits(model, _specs_of(q, names)) / 8192, "float_acc": float_acc})  # fmt: skip
        return meets

    if measure([], "all quantized", "") or not free:
        if not rows[-1]["meets"]:
            raise ValueError(_unmet(rows[-1]["acc"], target, config))
        return cfg_of([]), pd.DataFrame(rows)
    if search == "exhaustive":
        kept = _exhaustive(free, measure, rows, config, target)
        return cfg_of(kept), pd.DataFrame(rows)
    ranked = _ranked(model, config, free, order, cache, calib_loader, eval_loader, calib_batches, calib_seed,
                     device, progress)  # fmt: skip
    kept: list[str] = []
    bar = progress_bar(ranked, desc="fallback", progress=progress, leave=False)
    for layer in bar:
        kept.append(layer)
        if measure(kept, "keep", layer):
            break
    else:
        raise ValueError(_unmet(rows[-1]["acc"], target, config))
    # Re-quantize kept layers (least harmful first) while the criterion holds. Accuracy need not rise with every
    # layer kept, so a layer that had to stay may become removable after another goes: repeat until a whole pass
    # removes none, and every kept layer has been tried against the final set.
    failed: set[frozenset[str]] = set()
    changed = True
    while changed and len(kept) > 1:
        changed = False
        for layer in reversed(list(kept)):
            trial = [n for n in kept if n != layer]
            if frozenset(trial) in failed:
                continue
            if measure(trial, "re-quantize", layer):
                kept, changed = trial, True
                break
            rows[-1]["accepted"] = False
            failed.add(frozenset(trial))
    return cfg_of(kept), pd.DataFrame(rows)


def _unmet(acc: float, target: float, config: QATConfig) -> str:
    how = "in float" if config.keep_bits is None else f"at keep_bits={config.keep_bits}"
    fix = "a larger tolerable_loss" + (", or keep_bits=None (float)" if config.keep_bits is not None else "")
    return (
        f"the accuracy criterion cannot be met: with every layer kept {how} PTQ accuracy is {acc:.4f}, below the "
        f"target {target:.4f}; pass {fix}"
    )


def _exhaustive(free: list[str], measure, rows, config: QATConfig, target: float) -> list[str]:
    if len(free) > 16:
        raise ValueError(f"search='exhaustive' tries 2**{len(free)} sets of layers; use search='greedy'")
    for size in range(1, len(free) + 1):
        best: tuple[float, list[str]] | None = None
        for subset in itertools.combinations(free, size):
            meets = measure(list(subset), "try", ",".join(subset))
            rows[-1]["accepted"] = False
            if meets and (best is None or rows[-1]["acc"] > best[0]):
                best = (rows[-1]["acc"], list(subset))
        if best is not None:
            for row in rows:
                row["accepted"] = row["action"] == "try" and row["layer"] == ",".join(best[1])
            return best[1]
    raise ValueError(_unmet(rows[-1]["acc"], target, config))


def _ranked(
    model, config, free, order, cache, calib_loader, eval_loader, calib_batches, seed, device, progress
):
    """``free`` layers, most harmful first, by ``order``."""
    if not isinstance(order, str):
        order = list(order)
        if sorted(order) != sorted(free):
            raise ValueError(f"order={order!r} must list each of the layers to consider exactly once: {free}")
        return order
    check_choice("order", order, ORDERS)
    if order in ("leave_one_out", "one_layer"):
        scores = {}
        for n in progress_bar(free, desc=f"rank layers ({order})", progress=progress, leave=False):
            if order == "leave_one_out":  # accuracy with only this layer kept: higher = more harmful layer
                cfg = replace(config, keep=tuple(set(config.keep) | {n}))
                scores[n] = evaluate(cache.ptq(cfg), eval_loader, device=device)["acc"]
            else:  # accuracy with only this layer quantized: lower = more harmful
                pair = (config.weight, config.activation)
                spec = {m: (pair if m == n else (None, None)) for m in quantizable_layers(model)}
                scores[n] = -evaluate(cache.ptq(spec), eval_loader, device=device)["acc"]
        return sorted(free, key=lambda n: -scores[n])
    df = sensitivity(model, config, calib_loader, eval_loader, estimators=(order,), layers=free,
                     calib_batches=calib_batches, seed=seed, device=device, progress=progress)  # fmt: skip
    col = {"sqnr": "sqnr_db"}.get(order, order)
    key = df[col] if order != "sqnr" else -df[col]
    return list(df.assign(key=key).sort_values("key", ascending=False)["layer"])


def mixed_config(base: QATConfig, choice: Mapping[str, str | QuantSpec | None]) -> QATConfig:
    """``base`` with each layer's weight spec from ``choice`` (``{layer: candidate name or spec}``, names from
    :data:`CANDIDATES`); a layer's activation keeps ``base.activation`` (``"float"`` weights: float input too).
    Layers not in ``choice`` follow ``base``."""
    overrides = {}
    for layer, c in choice.items():
        if isinstance(c, str):
            if c not in CANDIDATES:
                raise ValueError(
                    f"choice[{layer!r}]={c!r} is not a candidate; choose from {list(CANDIDATES)}"
                )
            c = CANDIDATES[c]
        overrides[layer] = (c, base.activation if c is not None else None)
    return replace(base, overrides=overrides)


def _check_candidates(name: str, candidates: Iterable[str]) -> None:
    unknown = [c for c in candidates if c not in CANDIDATES]
    if unknown:
        raise ValueError(f"{name} {unknown} are unknown; choose from {list(CANDIDATES)}")


def candidate_scores(
    model: nn.Module,
    base: QATConfig,
    calib_loader: Iterable,
    eval_loader: Iterable,
    candidates: Sequence[str] = ("int8", "int4", "int3", "int2"),
    estimator: str = "fisher",
    **kwargs: Any,
) -> pd.DataFrame:
    """Per (layer, candidate): the ``score`` by ``estimator`` (``"fisher"``, ``"hessian"``, or ``"ptq"``: the
    measured loss increase) and the weight ``bits`` (scales included). ``"float"`` scores 0 at 32 bits. A
    candidate that does not fit a layer (a group size that does not divide it) is left out for that layer."""
    check_choice("estimator", estimator, ("fisher", "hessian", "ptq"))
    _check_candidates("candidates", candidates)
    mods = dict(model.named_modules())
    configs = {
        c: replace(base, weight=CANDIDATES[c], keep=(), keep_bits=None) for c in candidates if c != "float"
    }
    df = sensitivity(model, configs, calib_loader, eval_loader, estimators=(estimator,), **kwargs)
    col = "loss_increase" if estimator == "ptq" else estimator
    df = df.rename(columns={col: "score"})[["candidate", "layer", "score"]]
    if "float" in candidates:
        df = pd.concat(
            [df, pd.DataFrame({"candidate": "float", "layer": quantizable_layers(model), "score": 0.0})]
        )
    shapes = {n: _weight_shape(mods[n]) for n in quantizable_layers(model)}
    df = df[[fits(CANDIDATES[c], shapes[n]) for c, n in zip(df["candidate"], df["layer"], strict=True)]]
    df["bits"] = [
        math.prod(shapes[n]) * (32.0 if CANDIDATES[c] is None else bits_per_element(CANDIDATES[c], shapes[n]))
        for c, n in zip(df["candidate"], df["layer"], strict=True)
    ]
    return df.reset_index(drop=True)


def search(
    scores: pd.DataFrame, budget_bits: float | None = None, *, budget_ms: float | None = None
) -> dict[str, str]:
    """One candidate per layer minimising the summed ``score`` with the summed ``bits`` within ``budget_bits``
    and/or the summed ``latency_ms`` within ``budget_ms`` (a multiple-choice knapsack solved exactly as an
    integer program, scipy's ``milp``). ``scores``: rows of ``layer``, ``candidate``, ``score``, and ``bits``
    (:func:`candidate_scores`) or ``latency_ms`` (:func:`latency_table`, merged on layer and candidate). The
    additive score is the assumption HAWQ-v3 and AutoQuantize make; the frontier in notebook 11 measures what it
    gives. Latency is not additive in ONNX Runtime (fusion depends on the neighbours): :func:`latency_search`
    checks a mix by measuring it.

    Raises:
        ValueError: when no budget is given, a budget's column is missing, or even the smallest candidate of
            every layer exceeds a budget.
    """
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    budgets = {c: b for c, b in (("bits", budget_bits), ("latency_ms", budget_ms)) if b is not None}
    if not budgets:
        raise ValueError("search needs a budget: pass budget_bits (weight size) and/or budget_ms (latency)")
    need = ["layer", "candidate", "score", *budgets]
    if not set(need) <= set(scores.columns):
        raise ValueError(f"scores needs columns {', '.join(need)}; got {list(scores.columns)}")
    df = scores.reset_index(drop=True)
    constraints = []
    for col, budget in budgets.items():
        smallest = float(df.groupby("layer")[col].min().sum())
        arg = "budget_bits" if col == "bits" else "budget_ms"
        if budget < smallest - 1e-9 * abs(smallest):
            raise ValueError(
                f"{arg}={budget:.6g} is below the smallest mix ({smallest:.6g} {col}: every layer at its "
                "smallest candidate); raise the budget or add smaller candidates"
            )
        constraints.append(LinearConstraint(df[col].to_numpy(float)[None], -np.inf, budget))
    layers = list(dict.fromkeys(df["layer"]))
    one_each = np.array([(df["layer"] == n).to_numpy(float) for n in layers])
    scale = max(float(df["score"].abs().max()), 1e-30)
    res = milp(
        c=df["score"].to_numpy(float) / scale,
        constraints=[LinearConstraint(one_each, 1, 1), *constraints],
        integrality=np.ones(len(df)),
        bounds=Bounds(0, 1),
        options={"mip_rel_gap": 0},  # the optimum, not a mix within HiGHS's default 0.01% of it
    )
    if not res.success:
        raise ValueError(f"the search found no mix within {budgets}: {res.message}")
    pick = df[res.x > 0.5]
    return dict(zip(pick["layer"], pick["candidate"], strict=True))


def _fit_choice(model: nn.Module, candidate: str, fallback: str = "int8") -> dict[str, str]:
    """Every layer at ``candidate``, or at ``fallback`` where it cannot quantize the layer (a group size that
    does not divide it)."""
    mods = dict(model.named_modules())
    return {
        n: candidate if fits(CANDIDATES[candidate], _weight_shape(mods[n])) else fallback
        for n in quantizable_layers(model)
    }


def time_mixes(
    cache: PTQCache,
    configs: Mapping[str, QATConfig],
    inputs: Tensor,
    repeats: int = 50,
    threads: int = 1,
) -> dict[str, float]:
    """Median ONNX Runtime latency (ms, CPU, ``threads`` intra-op threads) of each config's PTQ model from
    ``cache``, exported (:func:`qatlab.export.export_onnx`; a config that quantizes nothing as a float model) and
    timed together on ``inputs``, runs interleaved (:func:`qatlab.export.time_ort`) so that the machine's load
    hits every file alike."""
    import tempfile
    from pathlib import Path

    from qatlab.export import export_float_onnx, export_onnx, time_ort

    if not len(configs):
        raise ValueError("configs is empty; pass {name: QATConfig} to time")
    x = inputs.detach().cpu()
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for k, (name, cfg) in enumerate(configs.items()):
            q = cache.ptq(cfg).cpu()
            path = Path(tmp) / f"mix{k}.onnx"
            quantized = any(True for _ in quantizers(q))
            paths[name] = export_onnx(q, path, x[:1]) if quantized else export_float_onnx(q, path, x[:1])
        return time_ort(paths, x, repeats=repeats, threads=threads)


def latency_table(
    model: nn.Module,
    base: QATConfig,
    calib_loader: Iterable,
    inputs: Tensor,
    candidates: Sequence[str] = ("float", "int8", "int4", "int2"),
    reference: str = "int8",
    repeats: int = 50,
    threads: int = 1,
    calib_batches: int = 2,
    calib_seed: int = 0,
    device: str | torch.device = "cpu",
) -> pd.DataFrame:
    """Per (layer, candidate), the ONNX Runtime latency the layer costs at that candidate, measured in context.

    The model with every layer at ``reference`` (weights; activations as in ``base``) is timed together with
    each model that moves one layer to another candidate (:func:`time_mixes`, batch ``len(inputs)``). A layer's
    ``latency_ms`` at a candidate is the reference model's latency over the number of layers plus what moving
    that layer changed, so summing over layers gives the reference model's latency exactly, and a mix that
    differs from the reference in one layer exactly too. For other mixes the sum is a prediction: ONNX
    Runtime fuses ``DequantizeLinear -> Conv -> QuantizeLinear`` into ``QLinearConv`` depending on the
    neighbours, so latency is not additive (:func:`latency_search` measures each mix it picks).

    Returns:
        Columns ``layer``, ``candidate``, ``latency_ms``; ``attrs["reference_ms"]`` is the reference model's
        latency. A candidate that does not fit a layer is left out for that layer.
    """
    _check_candidates("candidates/reference", (*candidates, reference))
    if not isinstance(inputs, Tensor) or inputs.dim() == 0 or len(inputs) == 0:
        raise ValueError("inputs must be a non-empty batch tensor (the batch ORT is timed on)")
    model = model.to(device).eval()
    layers = quantizable_layers(model)
    mods = dict(model.named_modules())
    ref = _fit_choice(model, reference)
    cache = PTQCache(
        model, replace(base, keep=(), keep_bits=None), calib_loader, calib_batches, calib_seed, device
    )
    configs = {("", ""): mixed_config(base, ref)}
    for n in layers:
        for c in candidates:
            if c != ref[n] and fits(CANDIDATES[c], _weight_shape(mods[n])):
                configs[(n, c)] = mixed_config(base, {**ref, n: c})
    ms = time_mixes(cache, {f"{n}|{c}": cfg for (n, c), cfg in configs.items()}, inputs, repeats, threads)
    t_ref = ms["|"]
    rows = [
        {"layer": n, "candidate": c, "latency_ms": t_ref / len(layers) + (0.0 if (n, c) == (n, ref[n])
                                                                           else ms[f"{n}|{c}"] - t_ref)}
        for n in layers for c in candidates if c == ref[n] or (n, c) in configs
    ]  # fmt: skip
    out = pd.DataFrame(rows)
    out.attrs["reference_ms"] = t_ref
    return out


def latency_search(
    model: nn.Module,
    base: QATConfig,
    scores: pd.DataFrame,
    budget_ms: float,
    calib_loader: Iterable,
    inputs: Tensor,
    budget_bits: float | None = None,
    reference: str = "int8",
    rounds: int = 5,
    repeats: int = 50,
    threads: int = 1,
    calib_batches: int = 2,
    calib_seed: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[dict[str, str], pd.DataFrame]:
    """The mix :func:`search` picks under a latency budget, checked by measuring it in ONNX Runtime.

    ``scores`` needs ``latency_ms`` (:func:`latency_table`, merged into :func:`candidate_scores`) including the
    table's ``reference`` rows. Each round searches with the summed per-layer latencies within a working budget,
    exports the chosen mix and times it together with the all-``reference`` model, and when the measurement is
    over ``budget_ms`` lowers the working budget by the excess (latency is not additive: fusion depends on the
    neighbours) and searches again; below the fastest mix the table predicts, that mix is tried last.

    The measurement is in the table's units: the mix's time scaled by the reference model's latency in the
    table over its latency now (timed interleaved with the mix), so a machine busier or idler than when the
    table was measured moves both alike and does not move the verdict.

    Returns:
        ``(choice, rounds)``: the first mix measured within ``budget_ms`` (``{layer: candidate}``, for
        :func:`mixed_config`), and one row per round: ``round``, ``working_ms`` (the search's budget),
        ``predicted_ms`` (the summed table), ``measured_ms`` (in the table's units), ``raw_ms`` and
        ``reference_ms`` (the two times as measured in this round), ``meets``, ``mix``.

    Raises:
        ValueError: when ``budget_ms`` is below the fastest mix the table predicts, or no mix is measured within
            it in ``rounds`` rounds.
    """
    if budget_ms <= 0 or not math.isfinite(budget_ms):
        raise ValueError(f"budget_ms={budget_ms} must be a positive number of milliseconds")
    if rounds < 1:
        raise ValueError(f"rounds={rounds} must be >= 1")
    model = model.to(device).eval()
    ref_choice = _fit_choice(model, reference)
    df = scores.set_index(["layer", "candidate"])
    missing = [n for n, c in ref_choice.items() if (n, c) not in df.index]
    if "latency_ms" not in scores.columns or missing:
        raise ValueError(
            f"scores need latency_ms and the reference ({reference!r}) row of every layer (missing: {missing}); "
            "merge latency_table(..., reference=...) into them"
        )
    t_ref = float(sum(df.loc[(n, c), "latency_ms"] for n, c in ref_choice.items()))
    floor = float(scores.groupby("layer")["latency_ms"].min().sum())
    cache = PTQCache(
        model, replace(base, keep=(), keep_bits=None), calib_loader, calib_batches, calib_seed, device
    )
    working, rows = float(budget_ms), []
    for r in range(rounds):
        try:
            choice = search(scores, budget_bits, budget_ms=working)
        except ValueError as e:
            raise ValueError(f"no mix can meet budget_ms={budget_ms:.4g} ms; {e}") from None
        predicted = float(sum(df.loc[(n, c), "latency_ms"] for n, c in choice.items()))
        ms = time_mixes(
            cache,
            {"mix": mixed_config(base, choice), "reference": mixed_config(base, ref_choice)},
            inputs,
            repeats,
            threads,
        )
        measured = ms["mix"] * t_ref / ms["reference"]
        rows.append({"round": r, "working_ms": working, "predicted_ms": predicted, "measured_ms": measured,
                     "raw_ms": ms["mix"], "reference_ms": ms["reference"], "meets": measured <= budget_ms,
                     "mix": ", ".join(f"{n}:{c}" for n, c in choice.items())})  # fmt: skip
        if measured <= budget_ms:
            return choice, pd.DataFrame(rows)
        if working <= floor * (1 + 1e-9):  # the fastest mix the table knows was over the budget too
            break
        working = max(min(working, predicted) - (measured - budget_ms), floor)
    raise ValueError(
        f"no mix was measured within budget_ms={budget_ms:.4g} ms in {len(rows)} rounds (measured "
        f"{[round(x['measured_ms'], 4) for x in rows]} ms, in the table's units); raise the budget or rounds"
    )


def frontier(
    model: nn.Module,
    base: QATConfig,
    calib_loader: Iterable,
    eval_loader: Iterable,
    train_loader: Iterable | None = None,
    uniforms: Sequence[str] = ("int8", "int4", "int3", "int2"),
    candidates: Sequence[str] = ("int8", "int4", "int3", "int2"),
    budgets: Mapping[str, float] | None = None,
    budgets_ms: Mapping[str, float] | None = None,
    latency_inputs: Tensor | None = None,
    scores: pd.DataFrame | None = None,
    estimator: str = "fisher",
    seeds: Sequence[int] = (0,),
    qat_steps: int | None = 100,
    lr: float = 5e-4,
    calib_batches: int = 8,
    device: str | torch.device = "cpu",
    progress: bool = True,
    **qat_kwargs: Any,
) -> pd.DataFrame:
    """Accuracy against weight size for uniform precisions and for searched mixes, PTQ and (with a
    ``train_loader``) QAT, one row per (method, point, seed).

    Each uniform precision in ``uniforms`` sets ``base.weight`` everywhere (activations as in ``base``; a layer
    the precision cannot quantize, a group size that does not divide it, gets int8); each
    budget (default: the size of each uniform precision, so mixes and uniforms compare at equal size) gets the
    mix :func:`search` picks from ``candidates`` with ``scores`` (default :func:`candidate_scores` by
    ``estimator``). With ``latency_inputs`` (a batch), every config's PTQ model is exported and timed in ONNX
    Runtime (:func:`time_mixes`, one thread) and each ``budgets_ms`` entry (ms) gets the mix
    :func:`latency_search` picks and measures (``scores`` gain :func:`latency_table`'s ``latency_ms`` when they
    lack it). PTQ is measured with ``calib_seed=seed``; QAT runs :func:`qatlab.experiments.qat_run` on the
    same config (``qat_steps`` steps at ``lr``, ``**qat_kwargs`` passed on) from the calibrated model.

    Returns:
        Columns ``method`` ("uniform PTQ", "PTQ mixed", "uniform QAT", "QAT mixed"), ``point`` (the uniform
        precision, or the budget's name), ``size_kb`` (weights, scales included), ``acc``, ``seed``, ``mix``
        (the per-layer choice, as text); ``latency_ms`` with ``latency_inputs`` (one measurement per config,
        the same for its seeds). ``attrs["latency_rounds"]``: each latency budget's :func:`latency_search`
        rounds.
    """
    from qatlab.experiments import qat_run

    _check_loader("eval_loader", eval_loader)
    model = model.to(device).eval()
    if budgets_ms and latency_inputs is None:
        raise ValueError("budgets_ms needs latency_inputs: the batch ONNX Runtime is timed on")
    configs = {}
    for u in uniforms:
        if u not in CANDIDATES:
            raise ValueError(f"uniforms entry {u!r} is not a candidate; choose from {list(CANDIDATES)}")
        configs[("uniform", u)] = mixed_config(base, _fit_choice(model, u))
    if budgets is None:
        budgets = {f"= {u} size": size_bits(model, configs[("uniform", u)]) for u in uniforms}
    if scores is None:
        scores = candidate_scores(model, base, calib_loader, eval_loader, candidates, estimator,
                                  calib_batches=calib_batches, device=device, progress=progress)  # fmt: skip
    for name, bits in budgets.items():
        configs[("mixed", name)] = mixed_config(base, search(scores, bits))
    latency: dict[str, float] = {}
    searched: dict[str, pd.DataFrame] = {}
    if latency_inputs is not None:
        if budgets_ms:
            if "latency_ms" not in scores.columns:
                table = latency_table(model, base, calib_loader, latency_inputs, list(dict.fromkeys(scores["candidate"])),
                                      calib_batches=calib_batches, device=device)  # fmt: skip
                scores = scores.merge(table, on=["layer", "candidate"])
            for name, ms in budgets_ms.items():
                choice, searched[name] = latency_search(model, base, scores, ms, calib_loader, latency_inputs,
                                                        calib_batches=calib_batches, device=device)  # fmt: skip
                configs[("mixed", name)] = mixed_config(base, choice)
        cache = PTQCache(
            model, replace(base, keep=(), keep_bits=None), calib_loader, calib_batches, 0, device
        )
        latency = time_mixes(cache, {f"{k}|{p}": c for (k, p), c in configs.items()}, latency_inputs)
    rows = []
    work = [(kind, point, seed) for (kind, point) in configs for seed in seeds]
    caches: dict[int, PTQCache] = {}
    done: dict[tuple[QATConfig, int], float] = {}  # a mix equal to a uniform precision is trained once
    for kind, point, seed in progress_bar(work, desc="frontier", progress=progress):
        cfg = configs[(kind, point)]
        size_kb = size_bits(model, cfg) / 8192
        mix = ", ".join(f"{n}:{precision_label(w)}" for n, (w, _) in layer_specs(model, cfg).items())
        if seed not in caches:
            caches[seed] = PTQCache(model, replace(base, keep=(), keep_bits=None), calib_loader, calib_batches,
                                    seed, device)  # fmt: skip
        acc = evaluate(caches[seed].ptq(cfg), eval_loader, device=device)["acc"]
        label = "uniform PTQ" if kind == "uniform" else "PTQ mixed"
        extra = {"latency_ms": latency[f"{kind}|{point}"]} if latency else {}
        rows.append(
            {
                "method": label,
                "point": point,
                "size_kb": size_kb,
                "acc": acc,
                "seed": seed,
                "mix": mix,
                **extra,
            }
        )
        if train_loader is not None and qat_steps != 0:
            key = (replace(cfg, overrides=tuple(sorted(cfg.overrides, key=lambda t: t[0]))), seed)
            if key not in done:
                run = qat_run(model, cfg, train_loader, eval_loader, steps=qat_steps, lr=lr, seed=seed,
                              calib_batches=calib_batches, device=device, validate=False, **qat_kwargs)  # fmt: skip
                done[key] = run["acc"]
            label = "uniform QAT" if kind == "uniform" else "QAT mixed"
            rows.append({"method": label, "point": point, "size_kb": size_kb, "acc": done[key], "seed": seed,
                         "mix": mix, **extra})  # fmt: skip
    out = pd.DataFrame(rows)
    out.attrs["latency_rounds"] = searched
    return out
