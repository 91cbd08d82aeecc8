"""The published QAT/PTQ findings that notebook 09 re-tests, each in one place: its judge (our numbers -> a
verdict), its arms (the bars of its plot panel) and its record (claim, paper, published numbers, our grid).

A run of a grid is :func:`qatlab.reproduce.run`; the sweep and the tables are in :mod:`qatlab.reproduce`. A
difference counts only when the mean of the per-seed differences exceeds ``max(0.5 points, 2 x their std)``
(:func:`margin`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

# ---- what a finding is, and the arithmetic its judges share ------------------------------------------------


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

    ``grid``: :func:`qatlab.reproduce.run` configs; ``fast``: what fast mode changes in it (QAT runs also
    take ``qatlab.reproduce.FAST_STEPS`` steps there); ``judge(table) -> (our numbers, verdict)``
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


BIT_CLIFF = Finding(
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
)


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


PER_CHANNEL = Finding(
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
)


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


RANGE_SETTING = Finding(
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
)


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


PACT = Finding(
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
)


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


CLIPPED_STE = Finding(
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
)


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


LSQ_GRAD_SCALE = Finding(
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
)


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


OSCILLATION_BN = Finding(
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
)


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


STATIC_FOLD = Finding(
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
)


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


RANGE_INIT = Finding(
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
)


FINDINGS: tuple[Finding, ...] = (
    BIT_CLIFF,
    PER_CHANNEL,
    RANGE_SETTING,
    PACT,
    CLIPPED_STE,
    LSQ_GRAD_SCALE,
    OSCILLATION_BN,
    STATIC_FOLD,
    RANGE_INIT,
)
