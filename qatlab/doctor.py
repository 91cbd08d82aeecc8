"""The QAT doctor: "why is my QAT worse than PTQ?" answered by checks, each naming the evidence and the fix.

:func:`diagnose` runs every check its inputs allow on a prepared (calibrated, PTQ'd or QAT-trained) model and
returns one row per check: ``check``, ``status`` (``"ok"``, ``"warn"`` or ``"fail"``), ``evidence`` (the
measured number, in words, naming the layer), ``fix`` (what to do), and ``layer`` (the worst layer, or "").
It works on a deep copy: the model it is given is never changed (not its weights, ranges, BN statistics, nor
its train/eval flags).

The checks and what each needs beside the model and the evaluation loader:

=======================  ===========================================================================================
``mode``                 BatchNorm left in train mode in an eval model (pytorch PR #115715), a model in train mode
``activation_ranges``    the share of each layer's input values the calibrated range clips on ``loader`` (ranges
                         calibrated on differently preprocessed data, or on too few batches)
``bn_statistics``        running statistics against the statistics of ``loader``'s batches, per BatchNorm
``bn_training``          BN statistics still updating in QAT, and the training batch size (``train_batch_size``)
``bn_settings``          momentum and eps against the float model's (``float_model``; torchao#2980)
``learned_scales``       LSQ/PACT scales that collapsed or exploded, against the min-max scale of the same tensor
``oscillation``          weights flipping back and forth during QAT (``dynamics``: a :func:`qatlab.dynamics.record`
                         recorder; ``history``: fit's, for the LR against the weight step)
``responsible_layers``   the loss fake quant adds on ``loader``, and the layers it comes from: one layer at a time
                         in float, or a :func:`qatlab.precision.sensitivity` frame (``sensitivity``)
``convert_gap``          the converted (BN-folded) model's outputs against the QAT model's in eval
``deployment``           an exported file (``onnx_path``): semantic and ONNX Runtime parity, int16 saturation risk
``ddp_ranks``            ranks whose weights, ranges or BN statistics differ (``rank_states``: one
                         :func:`qatlab.distributed.rank_state` per rank; pytorch#85627)
``noise_floor``          is QAT's gain over PTQ larger than the seed spread (``seeds``: accuracies per arm)
=======================  ===========================================================================================

The thresholds (:class:`Thresholds`) come from the lab's healthy models against planted faults, one for every
check (``tests/test_doctor.py``); notebook 12 walks through each fault as a case file. :func:`blame` ranks every
quantized layer by the loss it adds; :func:`diagnose_run` (``qatlab doctor RUN_DIR``) diagnoses a saved
:mod:`qatlab.distributed` run or :mod:`qatlab.ablate` sweep.

Example:
    >>> report = diagnose(qat_model, test_loader, float_model=model)  # doctest: +SKIP
    >>> report[report["status"] != "ok"]  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from qatlab.analysis import clipped_fraction
from qatlab.modules import FakeQuantizer, QuantConvBn2d
from qatlab.prepare import convert, enable_fake_quant, quantizers, reestimate_bn, run_batch

STATUSES = ("ok", "warn", "fail")
COLUMNS = ("check", "status", "evidence", "fix", "layer")


@dataclass(frozen=True)
class Thresholds:
    """Where a measurement turns from ``ok`` to ``warn`` to ``fail``.

    Measured on the sklearn-digits CNN (``tests/test_doctor.py``), healthy (W8A8 and W4A4 PTQ, W4A4 QAT with and
    without LSQ) against planted faults: activation values clipped 0.00-0.04% healthy, 52-90% when calibrated
    on images scaled by 0.25; running variance 1.04-1.13x the evaluation data's healthy, 2.3x after 50 steps of
    batch-1 QAT; running mean within 0.06 batch std healthy; learned scales 0.79-1.09x the min-max scale after
    LSQ QAT; converted vs QAT outputs identical with folded BN, 1.1e-3 of the output range with simulated BN
    (per-tensor 3-bit weights: float rounding at a grid tie), 0.20 with BN kept apart (``bn_mode="keep"``);
    weights oscillating (2+ code flips in 2 epochs of W4A4 QAT, 44 steps) at most 7% of a layer at LR 0.005 (LR /
    weight step 0.06-0.15), 26-30% at LR 0.05-0.07 (0.6-1.5; accuracy 1.1 points lower), 43% at 0.1, 72% at
    0.15; quantization adding -0.002 to 0.001 nats of cross-entropy per sample (W4A4 PTQ, LSQ QAT), 0.044 at W3A3
    PTQ (1.2 points), 0.19-0.70 with one layer's weights at 2 bits (3.5-21 points). On the Fashion CNN (fast
    mode) 20 steps of LSQ QAT with BN frozen left one running variance 1.8x off the data's, yet re-estimating it
    raised the loss by 0.05 nats, while after batch-1 QAT re-estimating lowered it by 0.07: hence ``bn_gain``.
    In full mode 50 batch-1 steps left the statistics only 1.19x off yet cost 6.6 points, and re-estimating
    lowered the loss by 0.24-0.31 nats (W4A4 PTQ 0.16, healthy models -0.02 to 0.01): hence ``bn_gain_warn``.

    Attributes:
        clip_warn, clip_fail: share of a layer input's values beyond the calibrated grid on the loader.
        bn_shift_warn, bn_shift_fail: a BatchNorm's running mean against the loader's batch mean, in batch
            standard deviations (mean over channels).
        bn_var_warn, bn_var_fail: ``|log(running var / batch var)|``, median over channels (log 2 = a factor 2).
        bn_gain: with labels, a mismatch is flagged only if re-estimating the statistics on the loader's batches
            lowers the loss by more than this (nats per sample): a QAT model trained with frozen BN has weights
            that moved under those statistics, and needs them.
        bn_gain_warn: with labels, a small mismatch is still flagged (warn) when re-estimating lowers the loss
            by more than this.
        min_bn_batch: the smallest training batch whose statistics BN may learn from.
        scale_low, scale_high: a learned scale over the min-max scale of its tensor, outside which it has
            collapsed (clips nearly everything) or exploded (uses a few levels of the grid).
        oscillation_warn, oscillation_fail: the share of a layer's weights whose integer code changed twice or
            more during the recorded QAT steps (back and forth across a rounding threshold).
        convert_agreement: the smallest argmax agreement of the converted model with the QAT model.
        convert_rel_diff: the largest output difference of the two, relative to the output's range.
        blame_warn: the loss quantization adds (nats per sample: cross-entropy, or KL divergence from the
            fake-quant-off outputs without labels), above which the layers responsible are named (a ``warn``:
            it says where the loss is; the other checks say why).
    """

    clip_warn: float = 0.01
    clip_fail: float = 0.05
    bn_shift_warn: float = 0.5
    bn_shift_fail: float = 1.0
    bn_var_warn: float = math.log(1.5)
    bn_var_fail: float = math.log(2.0)
    min_bn_batch: int = 16
    scale_low: float = 0.05
    scale_high: float = 4.0
    oscillation_warn: float = 0.15
    oscillation_fail: float = 0.35
    convert_agreement: float = 0.99
    convert_rel_diff: float = 1e-2
    blame_warn: float = 0.05
    bn_gain: float = 0.01
    bn_gain_warn: float = 0.1


THRESHOLDS = Thresholds()


def _row(check: str, status: str, evidence: str, fix: str = "", layer: str = "") -> dict[str, str]:
    assert status in STATUSES, status
    return {
        "check": check,
        "status": status,
        "evidence": evidence,
        "fix": fix if status != "ok" else "",
        "layer": layer,
    }


def _grade(value: float, warn: float, fail: float) -> str:
    return "fail" if value > fail else "warn" if value > warn else "ok"


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _bns(model: nn.Module) -> dict[str, nn.Module]:
    """Modules holding BatchNorm statistics: BatchNorm layers, and Conv+BN layers (their ``.bn`` is inside)."""
    inner = {id(m.bn) for m in model.modules() if isinstance(m, QuantConvBn2d)}
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, QuantConvBn2d) or (isinstance(m, _BatchNorm) and id(m) not in inner)
    }


def _stats_module(m: nn.Module) -> _BatchNorm:
    return m.bn if isinstance(m, QuantConvBn2d) else m


def _run(model: nn.Module, batches: list, device, handles: list) -> None:
    """Run the batches through the model (no gradients), then remove the hooks, also on an error."""
    try:
        with torch.no_grad():
            for batch in batches:
                run_batch(model, batch, device)
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------------------------------------ checks


def _uses_batch_stats(m: nn.Module) -> bool:
    """Whether a BN-holding module in train mode normalises with the batch's statistics."""
    return not (isinstance(m, QuantConvBn2d) and m.bn_frozen)


def check_mode(model: nn.Module) -> list[dict[str, str]]:
    """BatchNorm layers whose train/eval flag differs from the model's: in train mode inside an eval model they
    normalise with each evaluation batch's statistics (unless their statistics are frozen)."""
    odd = [n for n, m in _bns(model).items() if m.training != model.training]
    harmful = [n for n in odd if not model.training and _uses_batch_stats(dict(model.named_modules())[n])]
    if odd:
        where, whole = ("train", "eval") if not model.training else ("eval", "train")
        names = harmful or odd
        effect = ("normalise with each evaluation batch's statistics" if harmful
                  else "have frozen statistics, so evaluation is unaffected; training is not")  # fmt: skip
        return [_row("mode", "fail" if harmful else "warn",
                     f"{len(odd)} BatchNorm layer(s) in {where} mode inside a model in {whole} mode ({effect}): "
                     f"{', '.join(names[:4])}",
                     "call model.eval() on the whole model before evaluating or exporting (a module-level "
                     ".train() or a custom train() override left these behind)", names[0])]  # fmt: skip
    if model.training:
        return [_row("mode", "warn", "the model is in train mode: evaluation would use batch statistics and "
                     "move observer ranges", "call model.eval() before evaluating, converting or exporting")]  # fmt: skip
    return [_row("mode", "ok", "the model and all its BatchNorm layers are in eval mode")]


def _input_quantizers(model: nn.Module) -> dict[str, FakeQuantizer]:
    """Static, integer, enabled activation quantizers with a calibrated (not learned) range: it can clip.
    A learned scale (LSQ/PACT) clips by design; ``learned_scales`` checks those."""
    return {
        n: q
        for n, q in quantizers(model)
        if not q.is_weight
        and not q.dynamic
        and not q.spec.learned
        and q.spec.is_integer
        and q.fake_quant_enabled
        and q.calibrated
    }


def check_activation_ranges(model: nn.Module, batches: list, device, th: Thresholds) -> list[dict[str, str]]:
    qs = _input_quantizers(model)
    if not qs:
        return [
            _row("activation_ranges", "ok", "no calibrated activation ranges (dynamic, learned or float)")
        ]
    clipped = dict.fromkeys(qs, 0.0)
    seen = dict.fromkeys(qs, 0)
    handles = []
    for name, q in qs.items():

        def hook(mod, args, name=name):
            x = args[0].detach()
            clipped[name] += clipped_fraction(x, mod.scale.detach(), mod.zero_point, mod.spec) * x.numel()
            seen[name] += x.numel()

        handles.append(q.register_forward_pre_hook(hook))
    _run(model, batches, device, handles)
    share = {n: clipped[n] / seen[n] if seen[n] else 0.0 for n in qs}
    worst = max(share, key=share.get)
    status = _grade(share[worst], th.clip_warn, th.clip_fail)
    over = [n for n, s in share.items() if s > th.clip_warn]
    evidence = (f"{_pct(share[worst])} of {worst}'s values lie beyond its calibrated range on this data "
                f"({len(over)} of {len(share)} layer inputs over {_pct(th.clip_warn)})")  # fmt: skip
    fix = ("recalibrate (qatlab.calibrate) on data preprocessed exactly as for evaluation, and on enough batches "
           "(16+); if the ranges were learned (LSQ/PACT) or chosen to clip (percentile, MSE), check those")  # fmt: skip
    return [_row("activation_ranges", status, evidence, fix, worst.rsplit(".", 1)[0])]


def _bn_input_stats(model: nn.Module, batches: list, device) -> dict[str, tuple[Tensor, Tensor]]:
    """Per BN-holding module: per-channel mean and variance of its BatchNorm's input over the batches, with fake
    quantization off (the float path: a clipped range upstream is ``activation_ranges``' finding, not BN's)."""
    model = enable_fake_quant(copy.deepcopy(model), False)
    sums: dict[str, tuple[Tensor, Tensor, int]] = {}
    handles = []
    for name, m in _bns(model).items():

        def hook(mod, args, name=name):
            x = args[0].detach()
            if isinstance(mod, QuantConvBn2d):  # BN's input: the conv with the unfolded weight
                x = mod._conv(x, mod.weight, mod.bias)
            x = x.transpose(0, 1).reshape(x.shape[1], -1).double().cpu()  # (C, N*H*W)
            s1, s2, n = sums.get(name, (0.0, 0.0, 0))
            sums[name] = (s1 + x.sum(1), s2 + (x * x).sum(1), n + x.shape[1])

        handles.append(m.register_forward_pre_hook(hook))
    _run(model, batches, device, handles)
    out = {}
    for name, (s1, s2, n) in sums.items():
        mean = s1 / n
        out[name] = (mean, (s2 / n - mean * mean).clamp(min=0))
    return out


def check_bn_statistics(model: nn.Module, batches: list, device, th: Thresholds) -> list[dict[str, str]]:
    mods = _bns(model)
    if not mods:
        return [_row("bn_statistics", "ok", "no BatchNorm left in the model (folded, or none)")]
    stats = _bn_input_stats(model, batches, device)
    worst_name, worst_status, worst_score, worst_text = "", "ok", -1.0, ""
    for name, (mean, var) in stats.items():
        bn = _stats_module(mods[name])
        rm, rv = bn.running_mean.double().cpu(), bn.running_var.double().cpu()
        live = var > 1e-12  # channels that carry a signal on this data
        if not live.any():
            continue
        shift = float(((rm - mean).abs() / (var + bn.eps).sqrt())[live].mean())
        logvar = float(((rv + bn.eps) / (var + bn.eps)).log().abs()[live].median())
        status = max(_grade(shift, th.bn_shift_warn, th.bn_shift_fail), _grade(logvar, th.bn_var_warn, th.bn_var_fail),
                     key=STATUSES.index)  # fmt: skip
        score = max(shift / th.bn_shift_fail, logvar / th.bn_var_fail)
        if score > worst_score:
            worst_name, worst_status, worst_score = name, status, score
            worst_text = (f"{name}: running mean {shift:.2f} batch std from this data's mean, running variance "
                          f"{math.exp(logvar):.2f}x off (median over channels)")  # fmt: skip
    if not worst_name:
        return [_row("bn_statistics", "ok", "no BatchNorm channel carries a signal on this data")]
    if all(_labels(b) is not None for b in batches):
        # A mismatch alone is not a fault: QAT with BN frozen trains the weights through these statistics (a
        # model whose weights moved under them shows the same mismatch). Does re-estimating them help? And a
        # small mismatch spread over channels can still cost: the loss says so.
        fresh = reestimate_bn(copy.deepcopy(model), batches, num_batches=len(batches), device=device).eval()
        gain = _loss(model, batches, device)[0] - _loss(fresh, batches, device)[0]
        if worst_status != "ok" and gain <= th.bn_gain:
            worst_status = "ok"
            worst_text += (f"; re-estimating the statistics on this data changes the loss by {-gain:+.3f} nats per "
                           "sample: the weights were trained through these statistics, leave them")  # fmt: skip
        elif worst_status == "ok" and gain > th.bn_gain_warn:
            worst_status = "warn"
            worst_text += (f"; yet re-estimating them on this data lowers the loss by {gain:.3f} nats per sample: "
                           "they do not fit the quantized model")  # fmt: skip
        else:
            change = f"lowers the loss by {gain:.3f}" if gain > 0 else f"changes the loss by {-gain:+.3f}"
            worst_text += f"; re-estimating them on this data {change} nats per sample"
    fix = ("re-estimate BN statistics on training data (qatlab.prepare.reestimate_bn) with batches of 32+, then "
           "freeze them (freeze_bn_stats); if the data here is preprocessed differently from training, fix that")  # fmt: skip
    return [_row("bn_statistics", worst_status, worst_text, fix, worst_name)]


def check_bn_training(model: nn.Module, train_batch_size: int | None, th: Thresholds) -> list[dict[str, str]]:
    convbn = {n: m for n, m in model.named_modules() if isinstance(m, QuantConvBn2d)}
    plain = {n: m for n, m in _bns(model).items() if not isinstance(m, QuantConvBn2d)}
    updating = [n for n, m in convbn.items() if not m.bn_frozen] + [
        n for n, m in plain.items() if m.track_running_stats and (m.momentum is None or m.momentum > 0)
    ]  # a plain BatchNorm learns statistics whenever it trains
    if not convbn and not plain:
        return [_row("bn_training", "ok", "no BatchNorm left in the model (folded before QAT, or none)")]
    if train_batch_size is not None and updating and train_batch_size < th.min_bn_batch:
        return [_row("bn_training", "fail",
                     f"{len(updating)} BatchNorm layer(s) learn statistics from training batches of "
                     f"{train_batch_size} (< {th.min_bn_batch}): {', '.join(updating[:4])}",
                     "train with larger batches, or freeze BN statistics (QATConfig(bn_mode='fold'), or "
                     "qatlab.freeze_bn_stats before QAT / fit(freeze_bn_epoch=0))", updating[0])]  # fmt: skip
    unfrozen = [n for n, m in convbn.items() if not m.bn_frozen]
    if unfrozen:
        return [_row("bn_training", "warn",
                     f"BN statistics of {len(unfrozen)} Conv+BN layer(s) still update in training: "
                     f"{', '.join(unfrozen[:4])}",
                     "freeze them for the last part of QAT (fit(freeze_bn_epoch=...)); the deployed model folds "
                     "the running statistics, which then stop moving under the quantized weights", unfrozen[0])]  # fmt: skip
    batch = "" if train_batch_size is None else f", training batch {train_batch_size}"
    return [_row("bn_training", "ok", f"BN statistics frozen{batch}")]


def check_bn_settings(model: nn.Module, float_model: nn.Module) -> list[dict[str, str]]:
    ref = [m for m in float_model.modules() if isinstance(m, _BatchNorm)]
    got = {n: _stats_module(m) for n, m in _bns(model).items()}
    if not got:
        return [_row("bn_settings", "ok", "no BatchNorm left in the model (folded, or none)")]
    if len(ref) != len(got):
        return [_row("bn_settings", "warn", f"the float model has {len(ref)} BatchNorm layers, this one "
                     f"{len(got)}: cannot pair them", "pass the float model this one was prepared from")]  # fmt: skip
    bad = []
    for (name, bn), fbn in zip(got.items(), ref, strict=True):
        if bn.eps != fbn.eps or bn.momentum != fbn.momentum:
            bad.append((name, f"eps {bn.eps:g} vs {fbn.eps:g}, momentum {bn.momentum} vs {fbn.momentum}",
                        bn.eps != fbn.eps))  # fmt: skip
    if not bad:
        return [
            _row(
                "bn_settings",
                "ok",
                f"eps and momentum of all {len(got)} BatchNorm layers as in the float model",
            )
        ]
    status = "fail" if any(e for *_, e in bad) else "warn"
    name, text, _ = bad[0]
    return [_row("bn_settings", status, f"{len(bad)} BatchNorm layer(s) differ from the float model; {name}: {text}",
                 "copy eps and momentum from the float model's BatchNorm (a rebuilt BN gets the defaults, "
                 "eps 1e-5 and momentum 0.1): eps changes what folding computes", name)]  # fmt: skip


def _minmax_scale(q: FakeQuantizer, x: Tensor) -> Tensor:
    """The min-max scale of ``x`` under the quantizer's grid, per channel where the quantizer is."""
    spec = q.spec
    if spec.per_channel:
        flat = x.detach().transpose(0, spec.ch_axis).reshape(x.shape[spec.ch_axis], -1)
        lo, hi = flat.min(1).values, flat.max(1).values
    else:
        lo, hi = x.detach().min().reshape(1), x.detach().max().reshape(1)
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    if spec.symmetric:
        return torch.maximum(-lo, hi) / max(spec.qmax, -spec.qmin)
    return (hi - lo) / (spec.qmax - spec.qmin)


def check_learned_scales(model: nn.Module, batches: list, device, th: Thresholds) -> list[dict[str, str]]:
    learned = {n: q for n, q in quantizers(model) if q.spec.learned}
    if not learned:
        return [_row("learned_scales", "ok", "no learned scales (no LSQ/PACT quantizer)")]
    seen: dict[str, Tensor] = {}
    handles = []
    for name, q in learned.items():
        if q.is_weight:
            continue

        def hook(mod, args, name=name):
            x = args[0].detach()
            s = _minmax_scale(mod, x)
            seen[name] = s if name not in seen else torch.maximum(seen[name], s)

        handles.append(q.register_forward_pre_hook(hook))
    _run(model, batches, device, handles)
    mods = dict(model.named_modules())
    ratios = {}
    for name, q in learned.items():
        if q.is_weight:  # the tensor it quantizes: the folded weight in a simulated Conv+BN
            layer = mods[name.rsplit(".", 1)[0]]
            simulated = isinstance(layer, QuantConvBn2d) and layer.mode == "simulate"
            seen[name] = _minmax_scale(q, layer.folded()[0] if simulated else layer.weight)
        if name not in seen:
            continue
        scale = q.scale.detach().abs().cpu()
        ref = seen[name].cpu().clamp(min=1e-12)
        if not torch.isfinite(q.scale.detach()).all():
            return [_row("learned_scales", "fail", f"{name}: the learned scale is not finite",
                         "lower the scale's learning rate, or clip its gradient; restart from calibration", name)]  # fmt: skip
        r = scale / ref
        ratios[name] = (float(r.min()), float(r.max()))
    if not ratios:
        return [_row("learned_scales", "ok", "the learned activation scales saw no data")]
    low = min(ratios, key=lambda n: ratios[n][0])
    high = max(ratios, key=lambda n: ratios[n][1])
    if ratios[low][0] < th.scale_low:
        return [_row("learned_scales", "fail",
                     f"{low}: learned scale collapsed to {ratios[low][0]:.3g}x the min-max scale of its tensor "
                     f"(< {th.scale_low}): nearly every value clips",
                     "restart from calibrated scales with a smaller scale learning rate (LSQ's gradient scale), "
                     "or freeze the scales", low)]  # fmt: skip
    if ratios[high][1] > th.scale_high:
        return [_row("learned_scales", "fail",
                     f"{high}: learned scale exploded to {ratios[high][1]:.3g}x the min-max scale of its tensor "
                     f"(> {th.scale_high}): only a few levels of the grid are used",
                     "restart from calibrated scales with a smaller scale learning rate, or freeze the scales", high)]  # fmt: skip
    lo_all = min(v[0] for v in ratios.values())
    hi_all = max(v[1] for v in ratios.values())
    return [_row("learned_scales", "ok", f"learned scales {lo_all:.2f}x to {hi_all:.2f}x the min-max scale of "
                 f"their tensors ({len(ratios)} quantizers)")]  # fmt: skip


def check_oscillation(
    model: nn.Module, dynamics: Any, history: pd.DataFrame | None, th: Thresholds
) -> list[dict[str, str]]:
    """Weights flipping back and forth across a rounding threshold during QAT (Nagel et al. 2022), from a
    :func:`qatlab.dynamics.record` recorder (or its ``oscillation()`` frame); with ``fit``'s history, the
    largest LR against the layer's weight grid step."""
    osc = dynamics.oscillation() if hasattr(dynamics, "oscillation") else pd.DataFrame(dynamics)
    if not {"layer", "steps", "oscillating"} <= set(osc.columns):
        raise ValueError(
            "dynamics must be a qatlab.dynamics recorder or its oscillation() frame (layer, steps, oscillating)"
        )
    osc = osc[osc["steps"] > 1]
    if not len(osc):
        return [
            _row("oscillation", "ok", "no weight flips recorded (fewer than two recorded training steps)")
        ]
    worst = osc.loc[osc["oscillating"].idxmax()]
    name, share = str(worst["layer"]), float(worst["oscillating"])
    text = f"{_pct(share)} of {name}'s weights flipped back and forth (2+ code changes) in {int(worst['steps'])} steps"
    if history is not None and "lr" in history.columns and len(history):
        q = dict(model.named_modules()).get(name)
        if isinstance(q, FakeQuantizer) and q.spec.stored_scale:
            step = float(q.scale.detach().abs().median())
            lr = float(history["lr_max" if "lr_max" in history.columns else "lr"].max())
            text += f"; the largest LR ({lr:g}) is {lr / max(step, 1e-12):.2f}x its median weight step"
    status = _grade(share, th.oscillation_warn, th.oscillation_fail)
    fix = ("lower the QAT learning rate (start near 1% of the float LR, cosine decay), or freeze weights that "
           "keep oscillating (Nagel et al. 2022); a finer grid (more bits, per-channel scales) also helps")  # fmt: skip
    return [_row("oscillation", status, text, fix, name.rsplit(".", 1)[0])]


def _logits(y: Any) -> Tensor:
    """A model's output as a float tensor: the first of a tuple, or a Hugging Face output's ``logits``."""
    return (y[0] if isinstance(y, (tuple, list)) else getattr(y, "logits", y)).detach().float()


def _labels(batch: Any) -> Tensor | None:
    if isinstance(batch, dict):
        return batch.get("labels", batch.get("label"))
    if isinstance(batch, (tuple, list)) and len(batch) > 1 and torch.is_tensor(batch[1]):
        return batch[1]
    return None


def _loss(
    model: nn.Module, batches: list, device, reference: list[Tensor] | None = None
) -> tuple[float, float]:
    """Mean cross-entropy per sample and accuracy against the batches' labels; without labels, the KL divergence
    from ``reference`` (the same model's outputs with fake quant off) and the argmax agreement with it."""
    loss, hits, n = 0.0, 0, 0
    with torch.no_grad():
        for i, batch in enumerate(batches):
            y = _logits(run_batch(model, batch, device))
            t = _labels(batch)
            if t is not None:
                t = t.to(y.device)
                loss += float(nn.functional.cross_entropy(y, t, reduction="sum"))
            else:
                ref = reference[i].to(y.device)
                t = ref.argmax(-1)
                loss += float(
                    nn.functional.kl_div(
                        y.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="sum"
                    )
                )
            hits += int((y.argmax(-1) == t).sum())
            n += len(t)
    return loss / n, hits / n


def _quant_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(getattr(m, "weight_quant", None), FakeQuantizer)
        or isinstance(getattr(m, "input_quant", None), FakeQuantizer)
    }


def _sensitivity_ranking(frame: pd.DataFrame) -> tuple[str, pd.Series]:
    for col, sign in (("acc_drop", 1), ("loss_increase", 1), ("hessian", 1), ("fisher", 1), ("sqnr_db", -1)):
        if "layer" in frame.columns and col in frame.columns and frame[col].notna().any():
            return col, (sign * frame[col]).groupby(frame["layer"]).max().sort_values(ascending=False)
    raise ValueError(
        "sensitivity must be a qatlab.precision.sensitivity frame: a 'layer' column and one of acc_drop, "
        f"loss_increase, hessian, fisher, sqnr_db; got columns {list(frame.columns)}"
    )


def _loss_gap(model: nn.Module, batches: list, device) -> dict[str, Any]:
    """The model (a copy, eval) with fake quant off and on: loss, accuracy, and the float outputs (no labels)."""
    work = copy.deepcopy(model).eval()
    enable_fake_quant(work, False)
    reference = None
    if any(_labels(b) is None for b in batches):
        with torch.no_grad():
            reference = [_logits(run_batch(work, b, device)) for b in batches]
    loss_f, acc_f = _loss(work, batches, device, reference)
    enable_fake_quant(work, True)
    loss_q, acc_q = _loss(work, batches, device, reference)
    kind = "cross-entropy" if reference is None else "KL divergence from the float outputs"
    return {"work": work, "reference": reference, "loss_f": loss_f, "acc_f": acc_f, "loss_q": loss_q,
            "acc_q": acc_q, "kind": kind}  # fmt: skip


def _recovered(g: dict[str, Any], batches: list, device) -> dict[str, float]:
    """Per quantized layer: the loss removed by computing that layer alone in float."""
    out = {}
    for name, layer in _quant_layers(g["work"]).items():
        enable_fake_quant(layer, False)
        out[name] = g["loss_q"] - _loss(g["work"], batches, device, g["reference"])[0]
        enable_fake_quant(layer, True)
    return out


def blame(
    model: nn.Module, loader: Iterable, batches: int = 4, device: str | torch.device = "cpu"
) -> pd.DataFrame:
    """Per quantized layer, most responsible first: ``recovered``, the loss (nats per sample) that computing that
    layer alone in float removes on ``batches`` batches of ``loader``, and ``share``, its part of the loss fake
    quantization adds (NaN when it adds none). Cross-entropy against the batches' labels; without labels, the KL
    divergence from the model's own fake-quant-off outputs. ``attrs`` hold ``loss_quantized``, ``loss_float``,
    ``acc_quantized``, ``acc_float`` and ``loss``. The model is not changed."""
    data = _batches(loader, batches)
    if not data:
        raise ValueError("loader has no batches (an empty data set?); pass a loader over the evaluation data")
    g = _loss_gap(model, data, device)
    rec = _recovered(g, data, device)
    gap = g["loss_q"] - g["loss_f"]
    df = pd.DataFrame({"layer": list(rec), "recovered": list(rec.values())})
    df["share"] = df["recovered"] / gap if gap > 0 else float("nan")
    df = df.sort_values("recovered", ascending=False, ignore_index=True)
    df.attrs.update(loss_quantized=g["loss_q"], loss_float=g["loss_f"], acc_quantized=g["acc_q"],
                    acc_float=g["acc_f"], loss=g["kind"])  # fmt: skip
    return df


def check_responsible_layers(
    model: nn.Module, batches: list, device, th: Thresholds, sensitivity: pd.DataFrame | None = None
) -> list[dict[str, str]]:
    """Which layers the quantization loss comes from: the loss of the model as it is against the same model with
    fake quant off, and, one layer at a time, how much of that gap computing the layer in float recovers (see
    :func:`blame`; or, given a :func:`qatlab.precision.sensitivity` frame, its ranking)."""
    g = _loss_gap(model, batches, device)
    gap = g["loss_q"] - g["loss_f"]
    text = (f"quantization adds {gap:+.3f} nats of {g['kind']} per sample ({g['loss_f']:.3f} with fake quant off, "
            f"{g['loss_q']:.3f} on); accuracy {_pct(g['acc_q'])} vs {_pct(g['acc_f'])}")  # fmt: skip
    status = "warn" if gap > th.blame_warn else "ok"
    if status == "ok" and sensitivity is None:
        return [_row("responsible_layers", "ok", text + ": no layer to blame")]
    if sensitivity is not None:
        col, ranking = _sensitivity_ranking(sensitivity)
        top = list(ranking.index[:3])
        text += f"; precision.sensitivity ranks by {col}: " + ", ".join(
            f"{n} ({ranking[n]:.3g})" for n in top
        )
    else:
        recovered = _recovered(g, batches, device)
        top = sorted(recovered, key=recovered.get, reverse=True)[:3]
        share = ", ".join(f"{n} {100 * recovered[n] / gap:.0f}%" for n in top)
        text += f"; computing one layer in float recovers, of that gap: {share}"
    fix = (f"keep {top[0]} at a higher precision: float (a QATConfig override mapping it to None) or more bits; "
           "qatlab.precision.fallback finds the smallest set of such layers; or QAT, if this is PTQ")  # fmt: skip
    return [_row("responsible_layers", status, text, fix, top[0])]


def _outputs(model: nn.Module, batches: list, device) -> Tensor:
    with torch.no_grad():
        return torch.cat([_logits(run_batch(model, b, device)).cpu() for b in batches])


def check_convert_gap(model: nn.Module, batches: list, device, th: Thresholds) -> list[dict[str, str]]:
    qat = copy.deepcopy(model).eval()
    deployed = convert(model)
    a, b = _outputs(qat, batches, device), _outputs(deployed, batches, device)
    span = float((a.max() - a.min()).clamp(min=1e-12))
    rel = float((a - b).abs().max()) / span
    agree = float((a.argmax(-1) == b.argmax(-1)).float().mean()) if a.dim() > 1 else float("nan")
    text = f"converted vs QAT model in eval: max output difference {rel:.2e} of the output range"
    text += "" if math.isnan(agree) else f", argmax agreement {_pct(agree)}"
    bad = rel > th.convert_rel_diff or (not math.isnan(agree) and agree < th.convert_agreement)
    if not bad:
        return [_row("convert_gap", "ok", text)]
    keep = [n for n, m in model.named_modules() if isinstance(m, QuantConvBn2d) and m.mode == "keep"]
    fix = ("train with bn_mode='simulate' (the QAT model quantizes the folded weight the deployed model uses)"
           if keep else "compare layer by layer (export.verify_onnx(..., layerwise=True)) to find where it starts")  # fmt: skip
    if keep:
        text += (
            f"; {len(keep)} Conv+BN layer(s) in bn_mode 'keep' quantize the unfolded weight in QAT: {keep[0]}"
        )
    return [_row("convert_gap", "fail", text, fix, keep[0] if keep else "")]


def check_deployment(model: nn.Module, onnx_path: str | Path, batches: list) -> list[dict[str, str]]:
    from qatlab.export import verify_onnx

    x = torch.cat([b[0] if isinstance(b, (tuple, list)) else b for b in batches])
    r = verify_onnx(model, onnx_path, x)
    rows = []
    if not r["semantic_passed"]:
        rows.append(_row("deployment", "fail",
                         f"the file does not compute what the model computes: {r['semantic_diff_in_lsb']:.1f} output "
                         f"LSB off under the ONNX reference evaluator (argmax agreement "
                         f"{_pct(r['semantic_argmax_agreement'])})",
                         "export again from this model (the file is stale, or the model changed after export)"))  # fmt: skip
    elif not r["passed"]:
        cause = r["diagnosis"] or "no saturation explains it"
        rows.append(_row("deployment", "fail" if r["diagnosis"] is None else "warn",
                         f"ONNX Runtime here is {r['diff_in_lsb']:.1f} output LSB off (agreement "
                         f"{_pct(r['argmax_agreement'])}); {cause}",
                         "QuantSpec(reduce_range=True) for the layers named (int16 pair sums saturate on AVX2 "
                         "without VNNI); else export.verify_onnx(..., layerwise=True)"))  # fmt: skip
    elif r["layers_at_risk"]:
        rows.append(_row("deployment", "warn",
                         f"parity holds on this CPU ({r['cpu_int8']}), but {len(r['layers_at_risk'])} layer(s) can "
                         f"saturate int16 pair sums on x86-64 CPUs without VNNI: {', '.join(r['layers_at_risk'][:4])}",
                         "QuantSpec(reduce_range=True) for those layers' weights (7-bit codes cannot overflow)",
                         r["layers_at_risk"][0]))  # fmt: skip
    else:
        rows.append(_row("deployment", "ok", f"reference evaluator {r['semantic_diff_in_lsb']:.2f} and ONNX Runtime "
                         f"{r['diff_in_lsb']:.2f} output LSB off; no layer at risk of int16 saturation"))  # fmt: skip
    return rows


def check_ddp_ranks(rank_states: Sequence[Mapping[str, Tensor]]) -> list[dict[str, str]]:
    if len(rank_states) < 2:
        return [_row("ddp_ranks", "ok", "one rank: nothing to compare")]
    kinds = {"weight": "weights", "bias": "weights", "min_val": "observer ranges", "max_val": "observer ranges",
             "scale": "quantizer scales", "zero_point": "quantizer zero points", "running_mean": "BN statistics",
             "running_var": "BN statistics"}  # fmt: skip
    worst: dict[str, tuple[float, str, int]] = {}
    ref = rank_states[0]
    for rank, other in enumerate(rank_states[1:], start=1):
        for name, t in ref.items():
            kind = kinds.get(name.rsplit(".", 1)[-1])
            if kind is None or name not in other or not t.numel():
                continue
            d = float((other[name].double() - t.double()).abs().max())
            if d > worst.get(kind, (0.0, "", 0))[0]:
                worst[kind] = (d, name, rank)
    if not worst:
        return [_row("ddp_ranks", "ok", f"{len(rank_states)} ranks hold identical weights, ranges, scales and BN "
                     "statistics")]  # fmt: skip
    kind, (d, name, rank) = max(worst.items(), key=lambda kv: kv[1][0])
    return [_row("ddp_ranks", "fail",
                 f"{', '.join(worst)} differ between ranks; largest: {name} on rank {rank} vs rank 0 by {d:.3g}",
                 "sync observers across ranks (qatlab.distributed.sync_observers, before DDP wrapping) and use "
                 "SyncBatchNorm or freeze BN statistics; prepare the model before wrapping it in DDP",
                 name.rsplit(".", 2)[0])]  # fmt: skip


def _check_seeds(seeds: Mapping[str, Sequence[float]]) -> None:
    if not isinstance(seeds, Mapping) or not {"QAT", "PTQ"} <= set(seeds):
        got = list(seeds) if isinstance(seeds, Mapping) else type(seeds).__name__
        raise ValueError(f"seeds needs 'QAT' and 'PTQ' accuracies (same seeds, same order); got {got}")
    if len(seeds["QAT"]) != len(seeds["PTQ"]) or not len(seeds["QAT"]):
        raise ValueError(
            f"seeds['QAT'] ({len(seeds['QAT'])}) and seeds['PTQ'] ({len(seeds['PTQ'])}) need one accuracy per "
            "seed each, the same seeds in the same order"
        )


def check_noise_floor(seeds: Mapping[str, Sequence[float]]) -> list[dict[str, str]]:
    from qatlab.experiments import compare_arms

    _check_seeds(seeds)
    v = compare_arms(list(seeds["QAT"]), list(seeds["PTQ"]))
    text = f"QAT - PTQ = {100 * v['mean_diff']:+.2f}"
    text += (
        f" +- {100 * v['ci95']:.2f} points over {v['seeds']} seeds" if v["seeds"] > 1 else " points, one seed"
    )
    if v["verdict"] == "held":
        return [_row("noise_floor", "ok", text + ": QAT's gain is beyond the seed spread")]
    if v["verdict"] == "reversed":
        return [_row("noise_floor", "fail", text + ": QAT is worse than PTQ beyond the seed spread",
                     "look at the other checks (BN, ranges, learned scales, LR): a real defect, not noise")]  # fmt: skip
    if v["seeds"] < 2:
        return [_row("noise_floor", "warn", text + ": no seed spread to compare it with",
                     "run more seeds (5+) before concluding QAT did or did not help")]  # fmt: skip
    return [_row("noise_floor", "warn", text + ": the difference is within the seed spread",
                 "run more seeds (5+) before concluding QAT did or did not help")]  # fmt: skip


# ---------------------------------------------------------------------------------------------------- diagnose


def _batches(loader: Iterable, n: int) -> list:
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) >= n:
            break
    return out


def diagnose(
    model: nn.Module,
    loader: Iterable,
    float_model: nn.Module | None = None,
    onnx_path: str | Path | None = None,
    train_batch_size: int | None = None,
    rank_states: Sequence[Mapping[str, Tensor]] | None = None,
    seeds: Mapping[str, Sequence[float]] | None = None,
    dynamics: Any = None,
    history: pd.DataFrame | None = None,
    sensitivity: pd.DataFrame | None = None,
    batches: int = 4,
    device: str | torch.device = "cpu",
    thresholds: Thresholds = THRESHOLDS,
) -> pd.DataFrame:
    """Run every check the inputs allow; one row per check (see the module docstring).

    Args:
        model: a prepared model (``prepare_qat``/``ptq``, calibrated or trained); never changed.
        loader: the data the model is evaluated on (its first ``batches`` batches are used).
        float_model: the float model it was prepared from (unlocks ``bn_settings``).
        onnx_path: an exported file of this model (unlocks ``deployment``).
        train_batch_size: the batch size QAT trained with (sharpens ``bn_training``).
        rank_states: :func:`qatlab.distributed.rank_state` of every DDP rank (unlocks ``ddp_ranks``).
        seeds: ``{"QAT": [acc per seed], "PTQ": [acc per seed]}`` (unlocks ``noise_floor``).
        dynamics: a :func:`qatlab.dynamics.record` recorder of the QAT run (unlocks ``oscillation``).
        history: ``fit``'s history of that run (adds the LR against the weight step to ``oscillation``).
        sensitivity: a :func:`qatlab.precision.sensitivity` frame (``responsible_layers`` ranks by it instead of
            measuring one layer at a time).

    Raises:
        ValueError: a float model (no quantizers), an empty loader, or a batch the model cannot run.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not any(True for _ in quantizers(model)):
        raise ValueError(
            "model has no FakeQuantizers: diagnose a model from qatlab.prepare_qat / qatlab.ptq (a float model "
            "goes in float_model=)"
        )
    if batches < 1:
        raise ValueError(f"batches={batches} must be >= 1")
    if seeds is not None:
        _check_seeds(seeds)
    data = _batches(loader, batches)
    if not data:
        raise ValueError("loader has no batches (an empty data set?); pass a loader over the evaluation data")
    th = thresholds
    rows = check_mode(model)  # on the model as given: its flags are the evidence
    work = copy.deepcopy(model).eval()
    try:
        with torch.no_grad():
            run_batch(work, data[0], device)
    except (RuntimeError, ValueError, TypeError) as exc:
        shape = tuple(data[0][0].shape) if isinstance(data[0], (tuple, list)) else "?"
        raise ValueError(f"the model cannot run loader's batches (input shape {shape}): {exc}") from exc
    rows += check_activation_ranges(work, data, device, th)
    rows += check_bn_statistics(work, data, device, th)
    rows += check_bn_training(model, train_batch_size, th)
    if float_model is not None:
        rows += check_bn_settings(model, float_model)
    rows += check_learned_scales(work, data, device, th)
    if dynamics is not None:
        rows += check_oscillation(model, dynamics, history, th)
    rows += check_responsible_layers(work, data, device, th, sensitivity)
    rows += check_convert_gap(work, data, device, th)
    if onnx_path is not None:
        rows += check_deployment(work, onnx_path, data)
    if rank_states is not None:
        rows += check_ddp_ranks(rank_states)
    if seeds is not None:
        rows += check_noise_floor(seeds)
    return pd.DataFrame(rows, columns=list(COLUMNS))


# ------------------------------------------------------------------------------------------- saved runs, CLI


def _diagnose_sweep(out: Path) -> pd.DataFrame:
    from qatlab.ablate import load_records

    groups: dict[str, dict[str, list[float]]] = {}
    for rec in load_records(out):
        m = rec["metrics"]
        qat = m.get("qat_acc", m.get("acc"))
        if "ptq_acc" not in m or qat is None:
            raise ValueError(
                f"{rec['key']}.json: the sweep's runs hold metrics {sorted(m)}; the doctor needs 'ptq_acc' and 'qat_acc' "
                "per run (as qatlab.ablate.digits_qat_run returns) to compare QAT with PTQ over seeds"
            )
        label = ", ".join(f"{k}={v}" for k, v in sorted(rec["config"].items())) or "(no config)"
        arms = groups.setdefault(label, {"QAT": [], "PTQ": []})
        arms["QAT"].append(float(qat))
        arms["PTQ"].append(float(m["ptq_acc"]))
    rows = []
    for label, arms in groups.items():
        for row in check_noise_floor(arms):
            rows.append({**row, "layer": label})
    return pd.DataFrame(rows, columns=list(COLUMNS))


def diagnose_run(run_dir: str | Path, batches: int = 4, device: str | torch.device = "cpu") -> pd.DataFrame:
    """:func:`diagnose` a saved run: a :mod:`qatlab.distributed` run directory (one process, i.e. ``fit``, or
    several: ``run.json``, ``qat_model.pt``, ``result.json``, ``rank_states.pt``, ``oscillation.csv``) gets
    every check its files allow (the float model, the export, the rank states, the weight oscillation with the
    run's LR, the training batch per rank, QAT vs PTQ of the one seed); a :mod:`qatlab.ablate` sweep
    (``runs/*.json``) gets the noise floor of QAT over PTQ per config, its config in the ``layer`` column."""
    out = Path(run_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"run_dir {str(out)!r} is not a directory")
    if (out / "run.json").exists():
        from qatlab.distributed import load_run

        run = load_run(out)
        cfg, result = run["config"], run["result"]
        onnx = Path(result.get("onnx", {}).get("path", out / "model.onnx"))
        return diagnose(
            run["model"], run["test"], float_model=run["float_model"],
            onnx_path=onnx if onnx.exists() else None,
            train_batch_size=cfg.global_batch // int(result.get("world_size", 1)),
            rank_states=run["rank_states"],
            seeds={"QAT": [result["acc"]], "PTQ": [result["ptq_acc"]]},
            dynamics=run["oscillation"], history=pd.DataFrame(result.get("history", [])),
            batches=batches, device=device,
        )  # fmt: skip
    if any((out / "runs").glob("*.json")):
        return _diagnose_sweep(out)
    raise FileNotFoundError(
        f"{out} holds no saved run: expected run.json and qat_model.pt (qatlab.distributed, 1 or more processes) "
        "or runs/*.json (qatlab.ablate)"
    )


def main(argv: list[str] | None = None) -> int:
    """``qatlab doctor RUN_DIR [--batches N] [--device D] [--csv FILE]``: print the table; exit 1 on a fail."""
    import argparse

    parser = argparse.ArgumentParser(prog="qatlab doctor", description=__doc__.splitlines()[0])
    parser.add_argument(
        "run_dir", type=Path, help="a qatlab.distributed run directory or a qatlab.ablate output"
    )
    parser.add_argument(
        "--batches", type=int, default=4, help="evaluation batches the checks use (default 4)"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    parser.add_argument("--csv", type=Path, help="also write the table here (atomically)")
    args = parser.parse_args(argv)
    try:
        report = diagnose_run(args.run_dir, batches=args.batches, device=args.device)
    except (FileNotFoundError, ValueError) as exc:
        print(f"qatlab doctor: {exc}", file=sys.stderr)
        return 2
    with pd.option_context("display.max_colwidth", 160, "display.width", 250):
        print(report.to_string(index=False))
    if args.csv is not None:
        from qatlab.files import write_atomic

        write_atomic(args.csv, report.to_csv(index=False))
    return 1 if (report["status"] == "fail").any() else 0
