"""Published QAT/PTQ findings, re-tested at lab scale through :func:`qatlab.ablate.ablate`.

Each :class:`Finding` holds a claim, where it was published (paper, table), the published numbers, our
small-scale experiment (a grid of :func:`run` configs) and a rule that turns our numbers into a verdict:
``reproduced``, ``partly`` or ``not reproduced``. :func:`reproduce` runs every finding's grid in one resumable
sweep (finished runs are cached under ``build/reproduce/runs`` and never redone), :func:`findings_table`
judges them and :func:`write_findings` writes the markdown table.

Our scale: the lab CNN (or the depthwise-separable CNN) trained in float on Fashion-MNIST (``zoo``), then
quantized. A seed is a whole replicate: its own float model (trained once with that seed and cached, as a float
model trained on another CPU differs), its own calibration batches and QAT batch order. Two arms of a finding share
each seed, so they are compared seed by seed: a difference counts only when the mean of the per-seed differences
exceeds ``max(0.5 points, 2 x their std)`` (:func:`margin` of the paired differences).

Example:
    >>> from qatlab import reproduce
    >>> table = reproduce.reproduce()  # doctest: +SKIP
    >>> reproduce.findings_table(table)  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from qatlab.config import build_dir, fast, write_atomic

# ---- one run: a float model from the zoo, PTQ, optional QAT -------------------------------------------------

DEFAULTS: dict[str, Any] = {
    "finding": None,  # a label only: which finding the run belongs to
    "model": "cnn",  # a zoo model: "cnn" (LabCNN) or "dwcnn" (depthwise-separable)
    "bits": None,  # shorthand: w_bits = a_bits = bits
    "w_bits": 8,
    "a_bits": 8,
    "per_channel": True,
    "observer": None,  # shorthand: the same range estimator for weights and activations
    "w_observer": "minmax",
    "a_observer": "ema",
    "w_ste": "clipped",
    "a_ste": "clipped",
    "bn_mode": "simulate",
    "steps": 300,  # QAT optimizer steps; 0 = PTQ only
    "lr": 2.5e-3,  # QAT start LR (5% of the float LR), cosine decay, SGD + momentum
    "init": "calibrated",  # "calibrated" (PTQ ranges) or "raw" (ranges from the first training batch)
    "lsq_grad_scale": True,  # False: learned scales get the raw gradient (grad_factor 1)
    "evals": 1,  # test evaluations spread over the QAT steps (acc_first is the first)
    "bn_reestimate": False,  # also report accuracy after BN re-estimation (bnre_acc)
    "record": False,  # record weight oscillations (qatlab.dynamics) during QAT
    "float_seed": "run",  # the float model's seed: "run" (the run's own seed) or an int (one float model for all)
}
_MODELS = ("cnn", "dwcnn")
FAST_STEPS = 10  # QAT steps of every QAT run in fast mode
_FLOAT: dict[tuple[str, int], tuple] = {}  # per process: (model name, seed) -> (float model, loaders, info)


def float_model(name: str, seed: int = 0):
    """The zoo's float ``name`` trained with ``seed`` (cached on disk and in this process): ``zoo.trained_cnn``'s
    ``(model, (train, test), info)``."""
    from qatlab import zoo

    if (name, seed) not in _FLOAT:
        _FLOAT[(name, seed)] = zoo.trained_cnn(name, seed=seed, progress=False)
    return _FLOAT[(name, seed)]


def _check_config(config: dict[str, Any]) -> dict[str, Any]:
    unknown = set(config) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"reproduce.run: unknown config keys {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    c = {**DEFAULTS, **config}
    if c["bits"] is not None:
        c["w_bits"] = c["a_bits"] = c["bits"]
    if c["observer"] is not None:
        c["w_observer"] = c["a_observer"] = c["observer"]
    if c["model"] not in _MODELS:
        raise ValueError(f"model={c['model']!r}: use one of {_MODELS}")
    if c["init"] not in ("calibrated", "raw"):
        raise ValueError(f"init={c['init']!r}: use 'calibrated' or 'raw'")
    if c["steps"] == 0 and c["init"] == "raw":
        raise ValueError("steps=0 (PTQ only) needs init='calibrated'")
    if c["steps"] and c["steps"] % c["evals"]:
        raise ValueError(f"steps={c['steps']} must be a multiple of evals={c['evals']}")
    if c["float_seed"] != "run" and (
        isinstance(c["float_seed"], bool) or not isinstance(c["float_seed"], int)
    ):
        raise ValueError(f"float_seed={c['float_seed']!r}: use 'run' (the run's seed) or an int")
    return c


def run(config: dict[str, Any], seed: int) -> dict[str, Any]:
    """One experiment of a finding (the ``run_fn`` of the sweep): the metrics of :func:`run_model`."""
    return run_model(config, seed)[1]


def run_model(config: dict[str, Any], seed: int) -> tuple[Any, dict[str, Any]]:
    """One experiment: float model -> PTQ (-> QAT); ``(quantized model, metrics)``. Keys in :data:`DEFAULTS`.

    The model is None when the QAT loss diverged. Metrics: ``float_acc``, ``ptq_acc`` (NaN for raw init),
    ``qat_acc`` (NaN when ``steps=0`` or the loss diverged), ``diverged`` (0/1), ``acc_first`` (after the first of ``evals`` chunks), ``alpha_ratio`` (learned
    activation scales, end / start, mean over layers), ``oscillating`` and ``flips_per_step`` (mean over weight
    quantizers, with ``record``), ``bnre_acc`` (with ``bn_reestimate``). NaN where a metric does not apply.
    Runs on one torch thread (restored after), so a config and seed give the same numbers in a pool worker,
    in the notebook and on a rerun.
    """
    from qatlab.experiments import one_thread

    with one_thread():
        return _run_model(config, seed)


def _run_model(config: dict[str, Any], seed: int) -> tuple[Any, dict[str, Any]]:
    import torch

    from qatlab.config import QATConfig, QuantSpec
    from qatlab.data import reseed
    from qatlab.dynamics import record
    from qatlab.experiments import qat_run
    from qatlab.prepare import ptq, quantizers, reestimate_bn
    from qatlab.train import evaluate

    c = _check_config(config)
    model, (train, test), info = float_model(
        c["model"], seed if c["float_seed"] == "run" else c["float_seed"]
    )
    cfg = QATConfig(
        weight=QuantSpec(bits=c["w_bits"], symmetric=True, per_channel=c["per_channel"],
                         observer=c["w_observer"], ste=c["w_ste"]),
        activation=QuantSpec(bits=c["a_bits"], observer=c["a_observer"], ste=c["a_ste"]),
        bn_mode=c["bn_mode"],
    )  # fmt: skip
    nan = float("nan")
    out = dict.fromkeys(("ptq_acc", "qat_acc", "acc_first", "alpha_ratio", "oscillating", "flips_per_step",
                         "bnre_acc"), nan)  # fmt: skip
    out.update(float_acc=info["test_acc"], diverged=0)
    if c["steps"] == 0:
        reseed(train, seed)
        torch.manual_seed(seed)
        quantized = ptq(model, cfg, train, num_batches=8)
        out["ptq_acc"] = evaluate(quantized, test)["acc"]
        return quantized, out

    state: dict[str, Any] = {}

    def start(epoch: int, qat) -> None:  # after calibration, before the first QAT step
        if epoch:
            return
        acts = [q for n, q in quantizers(qat) if q.spec.learned and not n.endswith("weight_quant")]
        state["acts"] = [(q, q.scale.detach().clone()) for q in acts]
        if not c["lsq_grad_scale"]:
            for _, q in quantizers(qat):
                q.grad_factor = 1.0
        if c["record"]:
            state["rec"] = record(qat)

    try:
        result = qat_run(model, cfg, train, test, steps=c["steps"] // c["evals"], epochs=c["evals"], lr=c["lr"],
                         calibrated=c["init"] == "calibrated", seed=seed, on_epoch_start=start)  # fmt: skip
    except FloatingPointError:
        out["diverged"] = 1
        return None, out
    finally:
        if "rec" in state:
            state["rec"].remove()
    history = result["history"]
    out.update(ptq_acc=result["ptq_acc"], qat_acc=result["acc"], acc_first=float(history["val_acc"].iloc[0]))
    qat = result["model"]
    if state.get("acts"):
        ratios = [float(q.scale.detach().mean() / s0.mean().clamp(min=1e-12)) for q, s0 in state["acts"]]
        out["alpha_ratio"] = sum(ratios) / len(ratios)
    if "rec" in state:
        osc = state["rec"].oscillation()
        out.update(
            oscillating=float(osc["oscillating"].mean()), flips_per_step=float(osc["flips_per_step"].mean())
        )
    if c["bn_reestimate"]:
        reestimate_bn(qat, train, num_batches=50)
        out["bnre_acc"] = evaluate(qat, test)["acc"]
    return qat, out


# ---- findings: claim, paper, our grid, verdict ------------------------------------------------------------


def margin(*stds: float) -> float:
    """The smallest difference (accuracy, 0..1) we call real: max(0.5 points, 2 x the larger std given)."""
    s = max((x for x in stds if isinstance(x, float) and math.isfinite(x)), default=0.0)
    return max(0.005, 2.0 * s)


def _per_seed(df: pd.DataFrame, metric: str, fill: float | None = None, **where: Any) -> pd.Series:
    """``metric`` by seed in the rows matching ``where`` (column == value); NaN filled with ``fill`` if given."""
    part = df
    for k, v in where.items():
        part = part[part[k] == v]
    if part.empty:
        raise KeyError(f"no runs with {where} in the table")
    values = part.groupby("seed")[metric].mean().astype(float)
    return values.fillna(fill) if fill is not None else values


def _paired(a: pd.Series, b: pd.Series | float) -> tuple[float, float]:
    """``a - b`` seed by seed (the same float model and data order): the mean and its :func:`margin`."""
    d = (a - b).dropna()
    if d.empty:
        raise KeyError("the two arms share no seed")
    return float(d.mean()), margin(float(d.std(ddof=0)) if len(d) > 1 else 0.0)


def _pts(x: float) -> str:
    return f"{100 * x:+.2f}"


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _verdict(parts: Sequence[bool]) -> str:
    held = sum(bool(p) for p in parts)
    return "reproduced" if held == len(parts) else ("not reproduced" if held == 0 else "partly")


Judge = Callable[[pd.DataFrame], tuple[str, str]]
ArmFn = Callable[[pd.Series], list[tuple[str, float]]]


@dataclass(frozen=True)
class Finding:
    """A published claim and our experiment for it.

    ``grid``: :func:`run` configs; ``fast``: what fast mode changes in it (QAT runs also take
    :data:`FAST_STEPS` steps there); ``judge(table) -> (our numbers, verdict)``
    reads this finding's rows; ``arms(row) -> [(label, accuracy)]`` gives the bars of its plot panel.
    """

    key: str
    claim: str
    paper: str
    published: str
    setup: str
    grid: dict[str, list[Any]]
    fast: dict[str, list[Any]]
    judge: Judge
    arms: ArmFn
    seeds: tuple[int, ...] = (0, 1, 2)
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _arm(row: pd.Series, label: str, metric: str) -> list[tuple[str, float]]:
    return [(label, float(row[metric]))]


# 1. bit-width cliff -------------------------------------------------------------------------------------------


def _judge_cliff(df: pd.DataFrame) -> tuple[str, str]:
    fp = float(df["float_acc"].mean())
    bits = sorted(df["bits"].unique(), reverse=True)
    text, ok8, low_drop, recovered = [f"FP32 {_pct(fp)}"], None, 0.0, []
    for b in bits:
        f, p, q = (_per_seed(df, m, bits=b) for m in ("float_acc", "ptq_acc", "qat_acc"))
        loss, loss_margin = _paired(f, p)  # what PTQ costs, each seed against its own float model
        gain, _ = _paired(q, p)
        share = gain / loss if loss > loss_margin else float("nan")
        text.append(f"W{b}A{b}: PTQ {_pts(-loss)}, QAT {_pts(_paired(q, f)[0])}" + ("" if math.isnan(share) else
                    f" ({100 * share:.0f}% of the PTQ loss recovered)"))  # fmt: skip
        if b >= 8:
            ok8 = loss <= loss_margin
        elif b <= 4:
            low_drop = max(low_drop, loss)
            recovered.append(share >= 0.5 if not math.isnan(share) else gain >= 0)
    parts = [bool(ok8), low_drop >= 0.02, bool(recovered) and all(recovered)]
    return "; ".join(text) + " (points vs FP32)", _verdict(parts)


def _arms_cliff(row):
    return [(f"W{row['bits']} PTQ", row["ptq_acc"]), (f"W{row['bits']} QAT", row["qat_acc"])]


# 2. per-channel vs per-tensor, before and after BN folding ------------------------------------------------------


def _judge_channel(df: pd.DataFrame) -> tuple[str, str]:
    text, folded_wins, fold_amplifies = [], [], []
    for model in df["model"].unique():
        gap = {
            bn: _per_seed(df, "ptq_acc", model=model, bn_mode=bn, per_channel=True)
            - _per_seed(df, "ptq_acc", model=model, bn_mode=bn, per_channel=False)
            for bn in ("keep", "fold")
        }  # per seed: per-channel minus per-tensor
        fold, fold_margin = _paired(gap["fold"], 0.0)
        amplified, amp_margin = _paired(gap["fold"], gap["keep"])
        text.append(f"{model}: per-channel minus per-tensor {_pts(fold)} points after folding, "
                    f"{_pts(float(gap['keep'].mean()))} before")  # fmt: skip
        folded_wins.append(fold > fold_margin)
        fold_amplifies.append(amplified > amp_margin)
    return "; ".join(text), _verdict([all(folded_wins), any(fold_amplifies)])


def _arms_channel(row):
    label = f"{row['model']} {'fold' if row['bn_mode'] == 'fold' else 'no fold'} {'ch' if row['per_channel'] else 'tensor'}"
    return _arm(row, label, "ptq_acc")


# 3. range setting matters only at low bits ----------------------------------------------------------------------


def _judge_range(df: pd.DataFrame) -> tuple[str, str]:
    text, parts = [], []
    for b in sorted(df["bits"].unique(), reverse=True):
        acc = {o: _per_seed(df, "ptq_acc", bits=b, observer=o) for o in df["observer"].unique()}
        best = max(acc, key=lambda o: acc[o].mean())
        worst = min(acc, key=lambda o: acc[o].mean())
        spread, thr = _paired(acc[best], acc[worst])
        text.append(f"W{b}A{b}: spread {100 * spread:.2f} points, best {best}")
        parts.append(spread <= thr if b >= 8 else spread > max(thr, 0.01))
    return "; ".join(text), _verdict(parts)


def _arms_range(row):
    return _arm(row, f"W{row['bits']} {row['observer']}", "ptq_acc")


# 4. PACT: the learned clip shrinks and helps most at 2-3 bits --------------------------------------------------


def _judge_pact(df: pd.DataFrame) -> tuple[str, str]:
    text, helps = [], []
    ratio = float(df.loc[df["a_ste"] == "pact", "alpha_ratio"].mean())
    for b in sorted(df["a_bits"].unique()):
        d, m = _paired(
            _per_seed(df, "qat_acc", a_bits=b, a_ste="pact"),
            _per_seed(df, "qat_acc", a_bits=b, a_ste="clipped"),
        )
        text.append(f"A{b}: PACT minus EMA ranges {_pts(d)} points (margin {100 * m:.2f})")
        if b <= 3:
            helps.append(d > m)
    text.append(f"alpha end/start {ratio:.2f}")
    return "; ".join(text), _verdict([ratio < 1.0, any(helps)])


def _arms_pact(row):
    return _arm(row, f"A{row['a_bits']} {'PACT' if row['a_ste'] == 'pact' else 'EMA'}", "qat_acc")


# 5. clipped STE vs identity STE at 2-bit activations ---------------------------------------------------------


def _judge_ste(df: pd.DataFrame) -> tuple[str, str]:
    text, parts = [], []
    for b in sorted(df["a_bits"].unique()):
        cl, idn = (_per_seed(df, "qat_acc", a_bits=b, a_ste=ste) for ste in ("clipped", "identity"))
        d, m = _paired(cl, idn)
        text.append(f"A{b}: clipped {_pct(cl.mean())} vs identity {_pct(idn.mean())} ({_pts(d)} points, margin "
                    f"{100 * m:.2f})")  # fmt: skip
        if b <= 2:
            parts.append(d > m)
    return "; ".join(text), _verdict(parts or [False])


def _arms_ste(row):
    return _arm(row, f"A{row['a_bits']} {row['a_ste']}", "qat_acc")


# 6. LSQ's gradient scale --------------------------------------------------------------------------------------


def _judge_lsq(df: pd.DataFrame) -> tuple[str, str]:
    text, parts = [], []
    for (b, lr), part in df.groupby(["bits", "lr"], sort=True):
        # a diverged run counts at chance level (10 classes)
        acc = {g: _per_seed(part, "qat_acc", fill=0.1, lsq_grad_scale=g) for g in (True, False)}
        unscaled = part[~part["lsq_grad_scale"].astype(bool)]
        diverged = int(unscaled["diverged"].sum())
        note = f" ({diverged} of {len(unscaled)} diverged)" if diverged else ""
        text.append(
            f"W{b}A{b} lr {lr:g}: scaled {_pct(acc[True].mean())} vs unscaled {_pct(acc[False].mean())}{note}"
        )
        d, m = _paired(acc[True], acc[False])
        parts.append(d > m)
    return "; ".join(text), _verdict([any(parts)])


def _arms_lsq(row):
    acc = 0.1 if row["diverged"] else row["qat_acc"]
    return [(f"lr {row['lr']:g} {'g=1/sqrt(NQp)' if row['lsq_grad_scale'] else 'g=1'}", acc)]


# 7. oscillations and BN re-estimation --------------------------------------------------------------------------


def _judge_bnre(df: pd.DataFrame) -> tuple[str, str]:
    text, gains = [], []
    for b in sorted(df["w_bits"].unique()):
        r, q = _per_seed(df, "bnre_acc", w_bits=b), _per_seed(df, "qat_acc", w_bits=b)
        d, m = _paired(r, q)  # the same model before and after
        osc = float(df.loc[df["w_bits"] == b, "oscillating"].mean())
        per_seed = ", ".join(f"{100 * x:+.1f}" for x in (r - q))
        text.append(f"W{b}: {100 * osc:.1f}% of weights oscillate; BN re-estimation {_pts(d)} points "
                    f"({_pct(q.mean())} -> {_pct(r.mean())}; per seed {per_seed})")  # fmt: skip
        gains.append(d > m)
    osc_any = float(df["oscillating"].mean()) > 0.001
    return "; ".join(text), _verdict([osc_any, any(gains)])


def _arms_bnre(row):
    return [(f"W{row['w_bits']} QAT", row["qat_acc"]), (f"W{row['w_bits']} +BN re-est.", row["bnre_acc"])]


# 8. static BN folding vs simulated folding -----------------------------------------------------------------------


def _judge_fold(df: pd.DataFrame) -> tuple[str, str]:
    text, parts = [], []
    for b in sorted(df["bits"].unique(), reverse=True):
        f, sim = (_per_seed(df, "qat_acc", bits=b, bn_mode=mode) for mode in ("fold", "simulate"))
        d, m = _paired(f, sim)
        text.append(
            f"W{b}A{b}: static fold {_pct(f.mean())} vs simulated {_pct(sim.mean())} ({_pts(d)} points)"
        )
        parts.append(d >= -m)  # "about as good": not worse by more than the margin
    return "; ".join(text), _verdict(parts)


def _arms_fold(row):
    return _arm(row, f"W{row['bits']} {'static' if row['bn_mode'] == 'fold' else 'simulated'}", "qat_acc")


# 9. range init: faster start, similar end ------------------------------------------------------------------------


def _judge_init(df: pd.DataFrame) -> tuple[str, str]:
    first = int(df["steps"].iloc[0]) // max(int(df["evals"].iloc[0]), 1)
    gaps, text = {}, []
    for metric, label in (("ptq_acc", "at the start"), ("acc_first", f"after {first} steps"),
                          ("qat_acc", f"after {int(df['steps'].iloc[0])}")):  # fmt: skip
        mse, mm = _per_seed(df, metric, observer="mse"), _per_seed(df, metric, observer="minmax")
        gaps[metric] = _paired(mse, mm)
        text.append(f"{label}: MSE {_pct(mse.mean())} vs min-max {_pct(mm.mean())} ({_pts(gaps[metric][0])})")
    start, end = gaps["ptq_acc"], gaps["qat_acc"]
    return "; ".join(text), _verdict([start[0] > start[1], abs(end[0]) <= end[1]])


def _arms_init(row):
    return [(f"{row['observer']} start", row["ptq_acc"]), (f"{row['observer']} early", row["acc_first"]),
            (f"{row['observer']} end", row["qat_acc"])]  # fmt: skip


FINDINGS: tuple[Finding, ...] = (
    Finding(
        key="bit_cliff",
        claim="PTQ is almost free at 8 bits, falls off a cliff at 4 bits and below, and QAT recovers most of it",
        paper="Krishnamoorthi 2018, Tables 3-6; Nagel et al. 2021, Table 8",
        published=(
            "ImageNet top-1: MobileNet-v2 float 71.9, W8A8 PTQ per-channel 69.7, QAT 71.1; ResNet-v1-50 float "
            "75.2, W8A8 PTQ 75.1; 4-bit weights, ResNet-50: PTQ 54 -> QAT 73.2; 4-bit activations, MobileNet-v2: "
            "PTQ 7 -> QAT 58"
        ),
        setup="LabCNN, per-channel weights, EMA activations; PTQ then 300 QAT steps",
        grid={"bits": [8, 4, 3]},
        fast={"bits": [8, 3]},
        judge=_judge_cliff,
        arms=_arms_cliff,
    ),
    Finding(
        key="per_channel",
        claim="Per-channel weight ranges beat per-tensor ones at low bits, most after BatchNorm folding",
        paper="Krishnamoorthi 2018, Tables 2-3; Nagel et al. 2021, Table 1",
        published=(
            "ImageNet top-1, W8A8 PTQ: MobileNet-v2 per-tensor 0.1 vs per-channel 69.8 (float 71.9), MobileNet-v1"
            " 0.1 vs 70.3; ResNet-v1-50 75.0 vs 75.1: the collapse is blamed on BN-folded weights whose channel "
            "ranges differ"
        ),
        setup="W4A8 PTQ of LabCNN and the depthwise CNN, BN kept separate (no fold) vs folded into the weights",
        grid={
            "model": ["cnn", "dwcnn"],
            "per_channel": [False, True],
            "bn_mode": ["keep", "fold"],
            "w_bits": [4],
            "steps": [0],
        },  # fmt: skip
        fast={"model": ["dwcnn"]},
        judge=_judge_channel,
        arms=_arms_channel,
    ),
    Finding(
        key="range_setting",
        claim="The range estimator (min-max, percentile, MSE) matters little at 8 bits and a lot at 4",
        paper="Nagel et al. 2021, Tables 1-2; Wu et al. 2020",
        published=(
            "MSE and min-max about equal at 8 bits, MSE clearly better at 4 bits and below (claim as summarised; "
            "table numbers not quoted here)"
        ),
        setup="PTQ of LabCNN, per-tensor weights, same estimator for weights and activations",
        grid={
            "observer": ["minmax", "percentile", "mse"],
            "bits": [8, 4],
            "per_channel": [False],
            "steps": [0],
        },  # fmt: skip
        fast={"observer": ["minmax", "mse"]},
        judge=_judge_range,
        arms=_arms_range,
    ),
    Finding(
        key="pact",
        claim="PACT's learned activation clip shrinks during training and helps most at 2-3 bits",
        paper="Choi et al. 2018 (arXiv 1805.06085), Table 1 and the alpha-per-layer figures",
        published=(
            "ResNet-18 ImageNet top-1, weights = activations at 2/3/4 bits: PACT 64.4/68.1/69.2, DoReFa "
            "64.7/67.5/68.1 (as tabulated by later papers); alpha falls during training (figure, not re-checked "
            "here)"
        ),
        setup="LabCNN, 8-bit weights, activations PACT (learned clip) vs EMA ranges with the clipped STE; 300 steps",
        grid={"a_ste": ["clipped", "pact"], "a_bits": [2, 3, 4]},
        fast={"a_bits": [2]},
        judge=_judge_pact,
        arms=_arms_pact,
    ),
    Finding(
        key="clipped_ste",
        claim="The clipped STE beats the identity STE for 2-bit activations",
        paper="Yin et al. 2019 (arXiv 1903.05662), Table 1",
        published=(
            "CIFAR-10 VGG-11 / ResNet-20 at 2- and 4-bit activations: the identity STE trains worse and is "
            "unstable near some minima, ReLU / clipped-ReLU STEs better (table numbers not quoted here)"
        ),
        setup="LabCNN, 8-bit weights, EMA activation ranges; gradient 0 (clipped) or 1 (identity) outside; 300 steps",
        grid={"a_ste": ["identity", "clipped"], "a_bits": [2, 4]},
        fast={"a_bits": [2]},
        judge=_judge_ste,
        arms=_arms_ste,
    ),
    Finding(
        key="lsq_grad_scale",
        claim="LSQ needs its step-size gradient scale (1/sqrt(N Qp)) to train well at low bits",
        paper="Esser et al. 2019 (arXiv 1902.08153), Section 2.2, Table 3",
        published=(
            "ResNet-18 W2A2 ImageNet top-1: g = 1/sqrt(N Qp) 67.6, g = 1/sqrt(N) 67.3, g = 1 did not converge at "
            "lr 0.01 and reached 64.2 at lr 1e-4 (as quoted by secondary sources)"
        ),
        setup="LabCNN W3A3, LSQ weights and activations; gradient scale on vs off (g = 1), at the usual QAT LR "
        "and at 10x; 300 steps",
        grid={
            "w_ste": ["lsq"],
            "a_ste": ["lsq"],
            "bits": [3],
            "lsq_grad_scale": [True, False],
            "lr": [2.5e-3, 2.5e-2],
        },
        fast={"bits": [2], "lr": [2.5e-3]},
        judge=_judge_lsq,
        arms=_arms_lsq,
    ),
    Finding(
        key="oscillation_bn",
        claim="Low-bit weights oscillate around rounding thresholds; re-estimating BN statistics after QAT recovers accuracy",
        paper="Nagel et al. 2022 (arXiv 2203.11086), Section 4",
        published=(
            "oscillations are strongest at <= 4 bits in depthwise-separable nets (MobileNets, EfficientNets) and "
            "cost accuracy through wrong BN statistics; BN re-estimation recovers part of it (table numbers not "
            "quoted here)"
        ),
        setup="Depthwise CNN, W3A8 and W4A8, 300 steps recorded by qatlab.dynamics, then BN re-estimated on 50 batches",
        grid={"model": ["dwcnn"], "w_bits": [3, 4], "record": [True], "bn_reestimate": [True]},
        fast={"w_bits": [3]},
        judge=_judge_bnre,
        arms=_arms_bnre,
    ),
    Finding(
        key="static_fold",
        claim="Static BN folding trains about as well as simulated (batch-statistics) folding in QAT",
        paper="Nagel et al. 2021, Table 7",
        published=(
            "static folding about as accurate as double-forward (simulated) folding, and simpler (claim as "
            "summarised; table numbers not quoted here)"
        ),
        setup="LabCNN, BN folded once before QAT vs simulated folding with batch-statistics correction; 300 steps",
        grid={"bn_mode": ["fold", "simulate"], "bits": [8, 4]},
        fast={"bits": [4]},
        judge=_judge_fold,
        arms=_arms_fold,
    ),
    Finding(
        key="range_init",
        claim="A better range init (MSE vs min-max) gives QAT a better start but changes the final accuracy little",
        paper="Nagel et al. 2021, Section 4.2, Table 8",
        published=(
            "a better range init (MSE) starts QAT far above min-max and the gap shrinks within a few epochs "
            "(claim as summarised; table numbers not quoted here)"
        ),
        setup="LabCNN W4A4 per-tensor, LSQ weights and activations initialised by min-max or MSE calibration; "
        "accuracy at the start, after 60 and after 300 steps",
        grid={
            "observer": ["minmax", "mse"],
            "w_ste": ["lsq"],
            "a_ste": ["lsq"],
            "per_channel": [False],
            "bits": [4],
            "evals": [5],
        },
        fast={"evals": [2]},
        judge=_judge_init,
        arms=_arms_init,
    ),
)


def finding(key: str) -> Finding:
    """The finding named ``key`` (see :data:`FINDINGS`)."""
    for f in FINDINGS:
        if f.key == key:
            return f
    raise KeyError(f"no finding {key!r}; known: {[f.key for f in FINDINGS]}")


# ---- the sweep and the table ------------------------------------------------------------------------------


def grids(
    findings: Sequence[Finding] = FINDINGS, fast_mode: bool | None = None
) -> list[dict[str, list[Any]]]:
    """Each finding's grid (fast or full), labelled with its key, ready for :func:`qatlab.ablate.ablate`."""
    fast_mode = fast() if fast_mode is None else fast_mode
    out = []
    for f in findings:
        g = {
            "finding": [f.key],
            **f.grid,
            "float_seed": ["run"],
        }  # the float model in the seed: a new run key
        if fast_mode:
            g.update({} if g.get("steps") == [0] else {"steps": [FAST_STEPS]}, **f.fast)
        out.append(g)
    return out


def default_out() -> Path:
    """``build/reproduce`` (``build/reproduce_fast`` in fast mode): the sweep's cache."""
    return build_dir() / ("reproduce_fast" if fast() else "reproduce")


def reproduce(
    findings: Sequence[Finding] = FINDINGS,
    out_dir: str | os.PathLike | None = None,
    seeds: Sequence[int] | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Run every finding's grid x seeds in one resumable :func:`~qatlab.ablate.ablate` sweep; the table.

    Finished runs are cached in ``out_dir/runs`` (default :func:`default_out`): a second call (or one after an
    interruption) only runs what is missing. Seeds default to each finding's (one seed in fast mode); fast
    mode runs in this process, full mode on a process pool of ``workers`` (default: CPU count).
    """
    from qatlab.ablate import ablate, grid_runs, run_key

    is_fast = fast()
    out = Path(out_dir) if out_dir is not None else default_out()
    tables = []
    by_seeds: dict[tuple[int, ...], list[Finding]] = {}
    for f in findings:
        s = tuple(seeds) if seeds is not None else ((f.seeds[0],) if is_fast else f.seeds)
        by_seeds.setdefault(s, []).append(f)
    # The float models are trained (or loaded) here first, so that pool workers only load checkpoints.
    for s, group in by_seeds.items():
        models = {name for g in grids(group) for name in g.get("model", [DEFAULTS["model"]])}
        for name, seed in sorted({(m, seed) for m in models for seed in s}):
            float_model(name, seed)
    for s, group in by_seeds.items():
        tables.append(ablate(grids(group), run, out, seeds=s, workers=1 if is_fast else workers,
                             progress=progress))  # fmt: skip
    table = tables[-1] if len(tables) == 1 else pd.concat(tables).drop_duplicates("key")
    # only the runs of the grids asked for (the folder may hold runs of older grids or other seeds)
    current = {run_key(c, s) for s, group in by_seeds.items() for c, s in grid_runs(grids(group), s)}
    return table[table["key"].isin(current)].reset_index(drop=True)


def finding_rows(table: pd.DataFrame, key: str) -> pd.DataFrame:
    """The runs of finding ``key`` in a :func:`reproduce` table, run defaults filled in: what its judge reads."""
    return _rows(table, finding(key))


def _rows(table: pd.DataFrame, f: Finding) -> pd.DataFrame:
    """This finding's rows, with the run defaults filled in where its grid did not set a column."""
    part = table[table["finding"] == f.key].copy()
    for k, v in DEFAULTS.items():
        if k in part.columns:
            part[k] = part[k].where(part[k].notna(), v) if v is not None else part[k]
        elif v is not None:
            part[k] = v
    if "bits" in part.columns:  # the shorthands, as run() applies them
        for k in ("w_bits", "a_bits"):
            part[k] = part["bits"].where(part["bits"].notna(), part[k])
    if "observer" in part.columns:
        for k in ("w_observer", "a_observer"):
            part[k] = part["observer"].where(part["observer"].notna(), part[k])
    for k in ("bits", "w_bits", "a_bits", "steps", "evals"):
        if k in part.columns and part[k].notna().all():
            part[k] = part[k].astype(int)
    for k in ("per_channel", "lsq_grad_scale", "record", "bn_reestimate"):
        if k in part.columns:
            part[k] = part[k].astype(bool)
    return part


def findings_table(table: pd.DataFrame, findings: Sequence[Finding] = FINDINGS) -> pd.DataFrame:
    """One row per finding: claim, paper, published numbers, our setup, our numbers, seeds, verdict."""
    rows = []
    for i, f in enumerate(findings, 1):
        part = _rows(table, f)
        if part.empty:
            ours, verdict, n = "not run", "not run", 0
        else:
            ours, verdict = f.judge(part)
            n = part["seed"].nunique()
        rows.append({"#": i, "claim": f.claim, "paper": f.paper, "published": f.published, "our setup": f.setup,
                     "ours": ours, "seeds": n, "verdict": verdict})  # fmt: skip
    return pd.DataFrame(rows)


def summary(table: pd.DataFrame, key: str) -> pd.DataFrame:
    """One finding's runs, averaged over seeds: its grid columns, then mean and std of each metric it measured."""
    f = finding(key)
    part = _rows(table, f)
    if part.empty:
        raise ValueError(f"no runs of finding {key!r} in the table: run reproduce() first")
    knobs = [k for k in f.grid if k not in ("finding", "steps", "evals", "record", "bn_reestimate")]
    knobs = [k for k in knobs if part[k].nunique() > 1] or knobs[:1]
    metrics = ["float_acc", "ptq_acc", "qat_acc", "acc_first", "bnre_acc", "alpha_ratio", "oscillating",
               "flips_per_step", "diverged"]  # fmt: skip
    metrics = [m for m in metrics if m in part and part[m].notna().any()]
    agg = part.groupby(knobs, sort=False)[metrics].agg(["mean", "std"])
    agg.columns = [f"{m} {s}" for m, s in agg.columns]
    agg = agg.drop(columns=[c for c in agg.columns if c.startswith(("float_acc std", "diverged std"))])
    return agg.reset_index().assign(seeds=part.groupby(knobs, sort=False)["seed"].nunique().to_numpy())


def arms(table: pd.DataFrame, findings: Sequence[Finding] = FINDINGS) -> pd.DataFrame:
    """Long table for the plot: finding, arm (a bar), seed, acc."""
    rows = []
    for f in findings:
        for _, row in _rows(table, f).iterrows():
            for label, acc in f.arms(row):
                rows.append({"finding": f.key, "arm": label, "seed": int(row["seed"]), "acc": float(acc)})
    return pd.DataFrame(rows, columns=["finding", "arm", "seed", "acc"])


def to_markdown(findings: pd.DataFrame) -> str:
    """The findings table as GitHub markdown (pipes in cells escaped)."""
    cols = list(findings.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in findings.iterrows():
        cells = [str(row[c]).replace("|", "\\|").replace("\n", " ") for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_findings(
    findings: pd.DataFrame, path: str | os.PathLike | None = None, title: str = "", note: str = ""
) -> Path:
    """Write the markdown table (atomically) to ``path`` (default ``<sweep folder>/findings.md``), after a
    ``title`` and a ``note`` (say where and how it was measured: the numbers differ between CPUs)."""
    path = Path(path) if path is not None else default_out() / "findings.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    head = (f"# {title}\n\n" if title else "") + (f"{note}\n\n" if note else "")
    return write_atomic(path, head + to_markdown(findings))


def machine_note(table: pd.DataFrame) -> str:
    """Where the sweep ran and with how many replicates: the line that goes above a findings table."""
    import datetime
    import platform

    from qatlab.saturation import cpu_int8

    seeds = sorted(int(s) for s in table["seed"].unique()) if len(table) else []
    return (
        f"Generated by notebook 09 on {datetime.date.today().isoformat()}: {platform.machine()} CPU, int8 class "
        f"`{cpu_int8().kind}`; seeds {seeds}, each with its own float model. Float training differs between "
        "CPUs, so another machine gives other numbers; verdicts use paired per-seed differences and a margin of "
        "max(0.5 points, 2 x their std)."
    )
