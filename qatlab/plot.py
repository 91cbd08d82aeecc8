"""Every matplotlib figure of the lab (the only module that imports matplotlib).

Each function takes data (tensors, DataFrames) and returns the ``matplotlib.figure.Figure`` it drew, so a
notebook shows it, a widget redraws it, and a test reads its data (``fig.axes[i].lines[j].get_ydata()``).
Sections follow the notebooks.

Conventions every figure follows (helpers below; ``tests/test_plot_conventions.py`` checks them): integer ticks
on bit and epoch axes; axis labels in words, not column names; dots, not bars, wherever the value axis does not
start at 0; legends outside the data; past 8 groups, a distinct colour *and* line style per group.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from qatlab import analysis


def _new(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (6.0, 3.5), **kw):
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False, **kw)
    return fig, axes


# ---- the conventions ----------------------------------------------------------------------------------------

# Column names as a reader says them; a name not listed loses its underscores.
WORDS = {
    "w_bits": "weight bits",
    "a_bits": "activation bits",
    "acc": "test accuracy",
    "val_acc": "test accuracy",
    "train_acc": "training accuracy",
    "train_loss": "training loss",
    "val_loss": "test loss",
    "sqnr_db": "SQNR (dB)",
    "step": "QAT step",
}
LINESTYLES = ("-", "--", ":", "-.")


def words(name: str) -> str:
    """The axis label for column ``name``: ``"w_bits"`` -> ``"weight bits"``."""
    return WORDS.get(name, name.replace("_", " "))


def integer_ticks(ax, values, axis: str = "x") -> None:
    """Ticks only at integers on an axis of whole numbers (bits, epochs): at each value when there are at most
    12 of them, else wherever matplotlib puts integer ticks. Other axes are left alone."""
    from matplotlib.ticker import MaxNLocator

    v = np.unique(np.asarray(values, dtype=float))
    if not (len(v) and np.all(np.isfinite(v)) and np.all(v == np.round(v))):
        return
    target = ax.xaxis if axis == "x" else ax.yaxis
    if len(v) <= 12:
        (ax.set_xticks if axis == "x" else ax.set_yticks)(v, [str(int(t)) for t in v])
    else:
        target.set_major_locator(MaxNLocator(integer=True))


def group_styles(n: int) -> list[tuple[str, str]]:
    """(colour, line style) for ``n`` groups: solid lines in 8 colours up to 8 groups, then every pair of
    colour and style distinct (8 colours x 4 styles)."""
    if n > 8 * len(LINESTYLES):
        raise ValueError(f"n={n} groups is more than a figure can tell apart; split the figure (at most 32)")
    return [(f"C{k % 8}", LINESTYLES[k // 8] if n > 8 else "-") for k in range(n)]


def legend_outside(ax, **kwargs) -> None:
    """The legend right of the axes, where it hides no data."""
    kwargs.setdefault("fontsize", 8)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, **kwargs)


# ---- 01 fake quantization and the STE ---------------------------------------------------------------------

# The estimators plot_ste draws, top to bottom: true rounding first (what autograd gives without an STE).
STE_ROWS = ("round", "clipped", "identity", "lsq", "pact")
_STE_TITLES = {
    "round": "torch.round, no STE",
    "clipped": "clipped STE (Bengio et al. 2013)",
    "identity": "identity STE",
    "lsq": "LSQ (Esser et al. 2019)",
    "pact": "PACT (Choi et al. 2018)",
}


def _grid_range(scale: float, zero_point: int, spec) -> tuple[float, float]:
    """The real values of the smallest and largest code: ``S (qmin - Z)``, ``S (qmax - Z)``."""
    return scale * (spec.qmin - zero_point), scale * (spec.qmax - zero_point)


def plot_fake_quant(x, scale: float, zero_point: int, spec, gradients: bool = True) -> Figure:
    """The quantization grid: staircase, error and (optionally) the STE's gradients, against ``x``.

    Axes (in ``fig.axes`` order): 0 the staircase (line 0: ``fake_quant(x)``, line 1: the identity ``y = x``);
    1 the error ``x - fake_quant(x)`` (line 0; dotted +-S/2 bounds are a collection, not lines); with
    ``gradients``: 2 ``d out / d x`` of ``spec.ste`` (line 0), 3 ``d out / d S`` (LSQ; line 0) or
    ``d out / d alpha`` (PACT; line 0), empty with a note when the STE leaves S fixed. The shaded band is
    the grid's range ``[S (qmin - Z), S (qmax - Z)]``.
    """
    df = analysis.ste_curves(x, scale, zero_point, spec)
    lo, hi = _grid_range(scale, zero_point, spec)
    fig, axes = _new(2 if gradients else 1, 2, size=(5.2, 3.2))
    ax = axes[0, 0]
    ax.plot(df.x, df.fake_quant, color="tab:blue", lw=1.6, label="fake_quant(x)")
    ax.plot(df.x, df.x, color="0.5", ls="--", lw=0.8, label="y = x")
    ax.hlines(np.unique(df.fake_quant), df.x.min(), df.x.max(), color="0.85", lw=0.5, zorder=0)
    grid = "symmetric" if spec.symmetric else "asymmetric"
    ax.set(title=f"{spec.bits}-bit {grid} grid: S = {scale:.4g}, Z = {zero_point}", xlabel="x", ylabel="q(x)")
    ax.legend(loc="upper left", fontsize=8)
    ax = axes[0, 1]
    ax.plot(df.x, df.error, color="tab:red", lw=1.0)
    ax.hlines([-scale / 2, scale / 2], df.x.min(), df.x.max(), color="0.4", ls=":", lw=0.8)
    ax.set(title="error x - q(x): rounding inside, clipping outside", xlabel="x", ylabel="x - q(x)")
    if gradients:
        ax = axes[1, 0]
        ax.plot(df.x, df.grad_x, color="tab:purple", lw=1.4, drawstyle="steps-mid")
        ax.set(title=f"STE '{spec.ste}': d q / d x", xlabel="x", ylim=(-0.15, 1.15))
        ax = axes[1, 1]
        if spec.ste == "lsq":
            ax.plot(df.x, df.grad_scale, color="tab:orange", lw=1.0)
            ax.set(title="LSQ: d q / d S (grad factor 1)", xlabel="x")
        elif spec.ste == "pact":
            ax.plot(df.x, df.grad_alpha, color="tab:orange", lw=1.4, drawstyle="steps-mid")
            ax.set(title=f"PACT: d q / d alpha, alpha = {hi:.3g}", xlabel="x")
        else:
            ax.text(
                0.5,
                0.5,
                f"'{spec.ste}' STE: S is fixed\n(set by an observer), no d q / d S",
                ha="center",
                va="center",
                transform=ax.transAxes,
                color="0.4",
            )
            ax.set(title="d q / d S", xlabel="x")
    for ax in fig.axes:
        ax.axvspan(lo, hi, color="tab:green", alpha=0.07, lw=0)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_ste(x, scale: float, zero_point: int, spec, rows: tuple[str, ...] = STE_ROWS) -> Figure:
    """One forward pass, many backward passes: the gradient each estimator gives, against ``x``.

    Axes (in ``fig.axes`` order): 0 the forward pass (line 0: ``fake_quant(x)``, the same for every
    estimator; line 1: ``y = x``), then two per row of ``rows``: ``d out / d x`` (line 0) and the gradient
    w.r.t. the quantizer's parameter (line 0): ``d out / d S`` for ``"round"`` (autograd, no STE) and
    ``"lsq"``, ``d out / d alpha`` for ``"pact"``; for ``"clipped"``/``"identity"`` (S fixed) no line.
    ``spec.ste`` is ignored: each row uses its own estimator.
    """
    fig = plt.figure(figsize=(10.5, 1.6 * (len(rows) + 1.4)))
    mosaic = [["fwd", "fwd"]] + [[f"{r}_x", f"{r}_p"] for r in rows]
    axd = fig.subplot_mosaic(mosaic, height_ratios=[1.4] + [1.0] * len(rows))
    base = analysis.ste_curves(x, scale, zero_point, spec.with_(ste="clipped"))
    lo, hi = _grid_range(scale, zero_point, spec)
    ax = axd["fwd"]
    ax.plot(base.x, base.fake_quant, color="tab:blue", lw=1.6, label="forward: fake_quant(x), every row")
    ax.plot(base.x, base.x, color="0.5", ls="--", lw=0.8, label="y = x")
    ax.set(
        title=f"{spec.bits}-bit grid, S = {scale:.4g}, Z = {zero_point}: one forward pass, five backward passes",
        ylabel="q(x)",
    )
    ax.legend(loc="upper left", fontsize=8)
    for r in rows:
        df = base if r == "round" else analysis.ste_curves(x, scale, zero_point, spec.with_(ste=r))
        ax_x, ax_p = axd[f"{r}_x"], axd[f"{r}_p"]
        gx = df.grad_round_x if r == "round" else df.grad_x
        ax_x.plot(df.x, gx, color="tab:red" if r == "round" else "tab:purple", lw=1.4, drawstyle="steps-mid")
        ax_x.set_ylim(-0.2, 1.2)
        ax_x.set_title(f"{_STE_TITLES[r]}: d q / d x", fontsize=9, loc="left")
        if r in ("round", "lsq"):
            gp = df.grad_round_scale if r == "round" else df.grad_scale
            ax_p.plot(df.x, gp, color="tab:orange", lw=1.0)
            ax_p.set_title(f"{_STE_TITLES[r]}: d q / d S", fontsize=9, loc="left")
        elif r == "pact":
            ax_p.plot(df.x, df.grad_alpha, color="tab:orange", lw=1.4, drawstyle="steps-mid")
            ax_p.set_title(f"{_STE_TITLES[r]}: d q / d alpha, alpha = {hi:.3g}", fontsize=9, loc="left")
        else:
            ax_p.set_title(f"{_STE_TITLES[r]}: d q / d S", fontsize=9, loc="left")
            ax_p.text(
                0.5,
                0.5,
                "S is fixed (set by an observer): no gradient",
                ha="center",
                va="center",
                transform=ax_p.transAxes,
                color="0.5",
                fontsize=8,
            )
            ax_p.set_yticks([])
    axd[f"{rows[-1]}_x"].set_xlabel("x")
    axd[f"{rows[-1]}_p"].set_xlabel("x")
    for ax in axd.values():
        ax.axvspan(lo, hi, color="tab:green", alpha=0.07, lw=0)
        ax.grid(alpha=0.3)
        ax.set_xlim(float(base.x.min()), float(base.x.max()))
    fig.tight_layout()
    return fig


def plot_oscillation(history: pd.DataFrame, w_star: float, threshold: float, zoom: int = 40) -> Figure:
    """A latent weight oscillating across a rounding threshold under QAT (Nagel et al. 2022).

    ``history``: one row per step with columns ``step``, ``latent`` and ``quantized``. Axes: 0 the whole run
    and 1 its last ``zoom`` steps, each with the latent weight (line 0), its quantized value (line 1), the
    threshold (line 2) and the target ``w*`` (line 3); 2 the running mean of the quantized value (line 0),
    which settles on ``w*`` (line 1) although neither grid point equals it.
    """
    fig, axes = _new(1, 3, size=(4.6, 3.4))
    last = history.iloc[-zoom:]
    for ax, part, title in (
        (axes[0, 0], history, "latent weight and its quantized value"),
        (axes[0, 1], last, f"the last {len(last)} steps"),
    ):
        ax.plot(part.step, part.latent, color="tab:blue", lw=1.2, zorder=3, label="latent weight w")
        ax.plot(
            part.step,
            part.quantized,
            color="tab:orange",
            lw=0.9,
            alpha=0.6,
            drawstyle="steps-post",
            label="quantized q(w)",
        )
        ax.axhline(threshold, color="k", ls="--", lw=0.8, label=f"rounding threshold {threshold:.3g}")
        ax.axhline(w_star, color="tab:green", ls=":", lw=1.2, label=f"target w* = {w_star:.3g}")
        ax.set(title=title, xlabel="SGD step", ylabel="weight")
    axes[0, 0].legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=8)
    ax = axes[0, 2]
    running = history.quantized.expanding().mean()
    ax.plot(history.step, running, color="tab:orange", lw=1.2, label="running mean of q(w)")
    ax.axhline(w_star, color="tab:green", ls=":", lw=1.2, label="w*")
    ax.set(title="the oscillation averages to w*", xlabel="SGD step", ylabel="mean q(w) so far")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=8)
    for ax in fig.axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_oscillation_sweep(sweep: pd.DataFrame, scale: float) -> Figure:
    """Where ``w*`` sits between two grid points sets how often the weight flips (Nagel et al. 2022).

    ``sweep``: one row per target with columns ``w_star``, ``frac_upper`` (fraction of steps at the upper
    grid point), ``predicted_frac_upper``, ``flips_per_step`` and optionally ``predicted_flips_per_step``.
    Axes: 0 measured (line 0, markers) and predicted (line 1) fraction at the upper point; 1 measured flips
    per step (line 0) and, if given, the prediction (line 1).
    """
    fig, axes = _new(1, 2, size=(4.8, 3.2))
    ax = axes[0, 0]
    ax.plot(sweep.w_star, sweep.frac_upper, "o", color="tab:orange", label="measured")
    ax.plot(sweep.w_star, sweep.predicted_frac_upper, "-", color="0.4", lw=1.0, label="(w* - lower) / S")
    ax.set(title="time at the upper grid point", xlabel="target w*", ylabel="fraction of steps")
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    ax.plot(sweep.w_star, sweep.flips_per_step, "o", color="tab:red", label="measured")
    if "predicted_flips_per_step" in sweep:
        ax.plot(
            sweep.w_star,
            sweep.predicted_flips_per_step,
            "-",
            color="0.4",
            lw=1.0,
            label="noise-free: 2 min(p, 1 - p)",
        )
        ax.legend(fontsize=8)
    ax.set(title="flips of q(w) per step", xlabel="target w*", ylabel="flips / step")
    for ax in fig.axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_formatter(lambda v, _: f"{v:.3g}")
    fig.suptitle(f"grid step S = {scale:.3g}", fontsize=9)
    fig.tight_layout()
    return fig


# ---- end 01 ------------------------------------------------------------------------------------------------


# ---- 02 quantization error ---------------------------------------------------------------------------------


def quant_histogram(
    x: torch.Tensor, x_hat: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec, title: str = ""
) -> Figure:
    """Left: histogram of ``x`` with the clipping range (red) and, for coarse grids, the grid levels (grey).
    Right: histogram of the quantization error ``x - x_hat``. Per channel, the widest channel's range is drawn.
    """
    fig, axes = _new(1, 2, size=(5.5, 3.2))
    ax, ax_err = axes[0]
    values = x.detach().flatten().float().numpy()
    ax.hist(values, bins=120, color="C0", alpha=0.8)
    s = scale.detach().float().flatten()
    z = zero_point.detach().float().flatten()
    i = int(torch.argmax(s * (spec.qmax - spec.qmin)))  # the channel with the widest range
    lo, hi = float(s[i] * (spec.qmin - z[i])), float(s[i] * (spec.qmax - z[i]))
    if spec.qmax - spec.qmin <= 64:
        for level in np.arange(spec.qmin, spec.qmax + 1):
            ax.axvline(float(s[i] * (level - z[i])), color="0.6", lw=0.5, zorder=0)
    ax.axvline(lo, color="C3", lw=1.5, label="clipping range")
    ax.axvline(hi, color="C3", lw=1.5)
    ax.set_yscale("log")
    ax.set_xlabel("value")
    ax.set_ylabel("count (log)")
    ax.set_title(title or "values and the quantization grid")
    ax.legend(loc="upper right", fontsize=8)
    err = (x - x_hat).detach().flatten().float().numpy()
    ax_err.hist(err, bins=120, color="C1", alpha=0.8)
    ax_err.set_yscale("log")
    ax_err.set_xlabel("error x - q(x)")
    ax_err.set_title(f"error: rounding within +-S/2, clipping beyond ({spec.bits} bits)")
    fig.tight_layout()
    return fig


def pair_sums(tables: dict[str, pd.DataFrame], title: str = "") -> Figure:
    """One panel per exported file: histogram, per layer, of how far each pair of neighbouring weight codes can
    take an int16 pair sum (``saturation.pair_sums``: ``reach``, in units of 32767). The red line is int16's
    limit: pairs beyond it saturate on x86-64 CPUs with AVX2 but no VNNI."""
    fig, axes = _new(1, len(tables), size=(5.0, 3.2), sharey=True)
    top = max([float(t["reach"].max()) for t in tables.values() if len(t)] + [1.0])
    bins = np.linspace(0.0, top * 1.02, 60)
    for ax, (label, table) in zip(axes[0], tables.items(), strict=True):
        for layer, part in table.groupby("layer", sort=False):
            over = int((part["reach"] > 1.0).sum())
            ax.hist(part["reach"], bins=bins, histtype="step", lw=1.4, label=f"{layer} ({over} over)")
        ax.axvline(1.0, color="C3", lw=1.5)
        ax.text(
            1.0, 0.98, " int16 limit", color="C3", transform=ax.get_xaxis_transform(), va="top", fontsize=8
        )
        ax.set_yscale("log")
        ax.set_xlabel("largest pair sum / 32767")
        ax.set_title(label, fontsize=10)
        ax.legend(fontsize=7, loc="upper left")
    axes[0][0].set_ylabel("weight pairs (log)")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def requantization(
    acc: np.ndarray, multiplier: np.ndarray, y_range: tuple[int, int] = (0, 255), title: str = ""
) -> Figure:
    """Histogram of one layer's int32 accumulators times their channel's multiplier ``M``: where each output
    lands on the output grid before the clamp. Left of 0 the clamp is the ReLU; right of the grid's top the
    output saturates. The shares of each are in the legend."""
    scaled = (np.asarray(acc, np.float64) * np.asarray(multiplier, np.float64).reshape(1, -1, 1, 1)).reshape(
        -1
    )
    lo, hi = y_range
    fig, axes = _new(size=(6.5, 3.2))
    ax = axes[0][0]
    below, above = float((scaled < lo - 0.5).mean()), float((scaled > hi + 0.5).mean())
    ax.hist(scaled, bins=120, color="C0", alpha=0.8)
    ax.axvspan(scaled.min(), lo - 0.5, color="0.85", zorder=0, label=f"clamped to {lo} (ReLU): {below:.0%}")
    if scaled.max() > hi + 0.5:
        n_above = int((scaled > hi + 0.5).sum())
        ax.axvspan(
            hi + 0.5,
            scaled.max(),
            color="C3",
            alpha=0.2,
            zorder=0,
            label=f"above {hi}: {n_above:,} ({above:.2%})",
        )
    ax.axvline(hi + 0.5, color="C3", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("accumulator x M (output codes, before rounding and clamping)")
    ax.set_ylabel("outputs (log)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def grouped_bars(
    df: pd.DataFrame, x: str, y: str, hue: str, title: str = "", ylabel: str | None = None
) -> Figure:
    """Bars of ``y`` per ``x`` category, one colour per ``hue`` value (e.g. SQNR per layer per config). A
    category shows only the hues it has, centred on its tick (no empty slots); the value axis starts at 0."""
    table = df.pivot_table(index=x, columns=hue, values=y, sort=False)
    fig, axes = _new(1, 1, size=(max(6.0, 0.9 * len(table)), 3.5))
    ax = axes[0][0]
    width = 0.8 / max(len(table.columns), 1)
    present = table.notna().to_numpy()
    for k, col in enumerate(table.columns):
        xs, hs = [], []
        for i, row in enumerate(present):
            if row[k]:
                slot = int(row[:k].sum())  # this hue's place among the hues the category has
                xs.append(i + (slot - (row.sum() - 1) / 2) * width)
                hs.append(table.iloc[i, k])
        ax.bar(xs, hs, width, color=f"C{k % 10}", label=str(col))
    ax.set_xticks(np.arange(len(table)), table.index, rotation=30, ha="right")
    ax.set_ylim(bottom=min(0.0, float(np.nanmin(table.to_numpy()))))
    ax.set_ylabel(ylabel or words(y))
    ax.set_title(title)
    legend_outside(ax)
    fig.tight_layout()
    return fig


def metric_lines(
    df: pd.DataFrame,
    x: str,
    y: str,
    hue: str,
    title: str = "",
    reference: float | None = None,
    reference_label: str = "FP32",
    ylabel: str | None = None,
    err: str | None = None,
    style: str | None = None,
    xlabel: str | None = None,
    symlog: float | None = None,
) -> Figure:
    """One line of ``y`` against ``x`` per ``hue`` value (its colour); ``style``, a second column, picks the line
    style (e.g. colour = observer, style = granularity). Optional error bars (column ``err``) and a horizontal
    reference line (e.g. the float accuracy). Integer ``x`` (bits, epochs) gets integer ticks. ``symlog``: a
    symmetric log y axis, linear within +-``symlog`` (spreads lines that crowd near 0, keeps negatives)."""
    fig, axes = _new(1, 1, size=(7.0, 3.8))
    ax = axes[0][0]
    keys = [hue] if style is None else [hue, style]
    groups = list(df.groupby(keys, sort=False))
    if style is None:
        styles = group_styles(len(groups))
    else:
        colours = {h: f"C{k % 10}" for k, h in enumerate(dict.fromkeys(df[hue]))}
        lines = {s_: LINESTYLES[k % len(LINESTYLES)] for k, s_ in enumerate(dict.fromkeys(df[style]))}
        styles = [(colours[key[0]], lines[key[1]]) for key, _ in groups]
    for (key, part), (colour, ls) in zip(groups, styles, strict=True):
        part = part.sort_values(x)
        yerr = part[err].to_numpy() if err else None
        label = ", ".join(map(str, key)) if isinstance(key, tuple) else str(key)
        ax.errorbar(
            part[x].to_numpy(), part[y].to_numpy(), yerr=yerr, marker="o", capsize=3, color=colour, ls=ls,
            label=label,
        )  # fmt: skip
    if reference is not None:
        ax.axhline(reference, color="k", ls="--", lw=1, label=reference_label)
    if symlog is not None:
        ax.set_yscale("symlog", linthresh=symlog)
    integer_ticks(ax, df[x])
    ax.set_xlabel(xlabel or words(x))
    ax.set_ylabel(ylabel or words(y))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    legend_outside(ax)
    fig.tight_layout()
    return fig


# ---- end 02 ------------------------------------------------------------------------------------------------


# ---- 03 BatchNorm folding ----------------------------------------------------------------------------------

BN_KIND_COLORS = {"depthwise": "C3", "pointwise": "C0", "full": "C2"}


def bn_channel_ranges(
    before, after, sqnr_per_tensor, sqnr_per_channel, bits: int = 8, title: str = ""
) -> Figure:
    """One conv layer, channel by channel. Left: max|w| of each output channel before and after folding BN
    (log scale). Right: the SQNR of each channel of the folded weight, quantized with one scale for the
    whole tensor vs one scale per channel.

    Args:
        before, after: per-channel max|w| (C,) of the conv weight and of the BN-folded weight.
        sqnr_per_tensor, sqnr_per_channel: per-channel SQNR (dB) of the folded weight, (C,) each.
        bits: the bit width the SQNRs were measured at (for the labels).

    Lines in order: ``axes[0].lines`` = before, after; ``axes[1].lines`` = per tensor, per channel.
    """
    before, after = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
    pt, pc = np.asarray(sqnr_per_tensor, dtype=float), np.asarray(sqnr_per_channel, dtype=float)
    ch = np.arange(len(before))
    fig, axes = _new(1, 2, size=(5.6, 3.4))
    ax, ax_q = axes[0]
    style = {"ls": "none", "marker": ".", "ms": 4 if len(ch) > 200 else 6}
    ax.plot(
        ch, before, color="0.55", label=f"conv weight (spread {before.max() / before.min():.0f}x)", **style
    )
    ax.plot(ch, after, color="C3", label=f"BN folded (spread {after.max() / after.min():.0f}x)", **style)
    ax.set_yscale("log")
    ax.set_xlabel("output channel", labelpad=1)
    ax.set_ylabel("max |w| of the channel (log)")
    ax.set_title("per-channel weight range")
    ax_q.plot(ch, pt, color="C1", label=f"per-tensor scale (median {np.nanmedian(pt):.1f} dB)", **style)
    ax_q.plot(ch, pc, color="C0", label=f"per-channel scales (median {np.nanmedian(pc):.1f} dB)", **style)
    ax_q.axhline(0.0, color="k", lw=0.8)
    ax_q.set_xlabel("output channel", labelpad=1)
    ax_q.set_ylabel("SQNR of the channel (dB)")
    ax_q.set_title(f"folded weight at {bits} bits")
    for axis in (ax, ax_q):  # legends below the axes: every marker stays visible
        axis.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def bn_layer_stats(df: pd.DataFrame, title: str = "") -> Figure:
    """Layer by layer (rows of ``df`` in execution order), shaded by layer kind.

    Top: the spread of per-channel ranges (max/min of the per-channel max|w|) before and after folding
    (columns ``spread_before``, ``spread_after``; log scale). Column ``kind`` colours the background
    ("depthwise", "pointwise", "full"). Bottom: 8-bit SQNR (dB) of the folded weight quantized
    per tensor and per channel (columns ``sqnr_per_tensor``, ``sqnr_per_channel``), and, when the column
    ``sqnr_per_tensor_unfolded`` is there, the unfolded weight per tensor as a dashed reference.

    Lines in order: ``axes[0].lines`` = spread before, after; ``axes[1].lines`` = per tensor, per channel[,
    per tensor before folding].
    """
    x = np.arange(len(df))
    fig, axes = _new(2, 1, size=(10.0, 2.8), sharex=True)
    ax, ax_q = axes[0][0], axes[1][0]
    for i, kind in enumerate(df["kind"]):
        for a in (ax, ax_q):
            a.axvspan(i - 0.5, i + 0.5, color=BN_KIND_COLORS.get(kind, "0.8"), alpha=0.12, lw=0)
    ax.plot(x, df["spread_before"].to_numpy(float), "o-", color="0.55", ms=3, lw=1, label="conv weight")
    ax.plot(x, df["spread_after"].to_numpy(float), "o-", color="C3", ms=3, lw=1, label="BN folded")
    ax.set_yscale("log")
    ax.set_ylabel("max / min of per-channel max|w|")
    ax.set_title(title or "range spread across output channels")
    ax_q.plot(x, df["sqnr_per_tensor"].to_numpy(float), "o-", color="C1", ms=3, lw=1, label="per tensor")
    ax_q.plot(x, df["sqnr_per_channel"].to_numpy(float), "o-", color="C0", ms=3, lw=1, label="per channel")
    if "sqnr_per_tensor_unfolded" in df:  # the reference: the conv weight before folding, per tensor
        ax_q.plot(x, df["sqnr_per_tensor_unfolded"].to_numpy(float), "--", color="0.55", lw=1,
                  label="per tensor, before folding")  # fmt: skip
    ax_q.set_ylabel("8-bit weight SQNR (dB)")
    ax_q.set_xlabel("conv layer (execution order)")
    from matplotlib.patches import Patch

    kinds = [k for k in BN_KIND_COLORS if k in set(df["kind"])]
    patches = [Patch(color=BN_KIND_COLORS[k], alpha=0.3, label=k) for k in kinds]
    legend_outside(ax, handles=ax.get_lines() + patches)  # outside: a spike of one layer stays visible
    legend_outside(ax_q)
    fig.tight_layout()
    return fig


def bn_batch_curves(df: pd.DataFrame, x: str = "images", title: str = "") -> Figure:
    """Training curves of several runs (column ``run``): ``train_loss`` (left) and ``val_acc`` (right)
    against ``x`` (e.g. training images seen), one line per run in order of appearance."""
    fig, axes = _new(1, 2, size=(5.2, 3.4))
    for k, (run, part) in enumerate(df.groupby("run", sort=False)):
        for ax, col in zip(axes[0], ("train_loss", "val_acc"), strict=True):
            ax.plot(part[x].to_numpy(float), part[col].to_numpy(float), "o-", color=f"C{k}", label=str(run))
    axes[0][0].set_ylabel("training loss (train-mode forward)")
    axes[0][1].set_ylabel("test accuracy (eval mode)")
    for ax in axes[0]:
        ax.set_xlabel(x)
    axes[0][1].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


# ---- end 03 ------------------------------------------------------------------------------------------------


# ---- 04 PTQ vs QAT -----------------------------------------------------------------------------------------


def hypothesis_dots(df: pd.DataFrame, title: str = "", reference: float | None = None) -> Figure:
    """Each hypothesis (column ``hypothesis``) as one panel, one column of dots per arm (``arm``): each seed's
    ``acc`` a small dot, the mean over seeds a diamond with a +-1 standard deviation bar (ddof=1). Dots, not bars:
    the accuracy axis zooms to the values and does not start at 0."""
    hyps = list(dict.fromkeys(df["hypothesis"]))
    fig, axes = _new(1, len(hyps), size=(2.6, 3.4), sharey=True)
    for ax, hyp in zip(axes[0], hyps, strict=True):
        part = df[df["hypothesis"] == hyp]
        arms = list(dict.fromkeys(part["arm"]))
        for k, arm in enumerate(arms):
            accs = part.loc[part["arm"] == arm, "acc"].to_numpy(dtype=float)
            ax.plot(np.full(len(accs), k - 0.12), accs, "k.", ms=5)
            ax.errorbar(
                k + 0.12, accs.mean(), yerr=accs.std(ddof=1) if len(accs) > 1 else None, fmt="D", ms=7,
                capsize=4, color=f"C{k}",
            )  # fmt: skip
        if reference is not None:
            ax.axhline(reference, color="k", ls="--", lw=1)
        ax.set_xticks(range(len(arms)), arms, rotation=20, ha="right", fontsize=8)
        ax.set_xlim(-0.6, len(arms) - 0.4)
        ax.set_title(hyp, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("test accuracy")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# ---- end 04 ------------------------------------------------------------------------------------------------


# ---- notebook 05: 2:4 sparsity + QAT -----------------------------------------------------------------------


def _group_rows(t: torch.Tensor, rows: int, cols: int) -> np.ndarray:
    """(out, in, *k) -> (out * prod(k), in): one row per (out, kh, kw), input channels along the row; a corner."""
    return t.movedim(1, -1).reshape(-1, t.shape[1])[:rows, :cols].cpu().numpy()


def mask_pattern(weight, mask, rows: int = 8, cols: int = 32, title: str = "") -> Figure:
    """A corner of a weight before and after 2:4 pruning, laid out as the groups run.

    The weight (out, in) or (out, in, kh, kw) is shown as a matrix with one row per (out, kh, kw) position and
    one column per input channel, so each group of 4 is 4 neighbouring cells in a row (thin lines mark the
    groups). Axes: 0 ``|w|`` of the first ``rows`` x ``cols`` entries (``images[0]``); 1 the same after
    masking, pruned entries blank (``images[0]`` is a masked array whose mask is the pruned entries).
    """
    w = torch.as_tensor(weight).detach().float()
    m = torch.as_tensor(mask).bool()
    dense = np.abs(_group_rows(w, rows, cols))
    keep = _group_rows(m, rows, cols)
    fig, axes = _new(1, 2, size=(0.22 * dense.shape[1] + 1.2, 0.3 * dense.shape[0] + 1.2))
    vmax = float(dense.max()) or 1.0
    for ax, data, name in (
        (axes[0, 0], dense, "|w| dense"),
        (axes[0, 1], np.ma.masked_array(dense, mask=~keep), "|w| after 2:4 (blank = pruned)"),
    ):
        ax.imshow(data, cmap="viridis", vmin=0.0, vmax=vmax, aspect="equal", interpolation="nearest")
        for x in np.arange(3.5, dense.shape[1] - 1, 4):
            ax.axvline(x, color="w", lw=1.2)
        ax.set(title=name, xlabel="input channel (groups of 4)", ylabel="output row")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def stage_dots(
    df: pd.DataFrame, x: str = "stage", y: str = "acc", color: str | None = None, reference: float | None = None,
    title: str = "", ylabel: str = "test accuracy",
) -> Figure:  # fmt: skip
    """One dot of ``y`` per row of ``df`` (in order), labelled by column ``x``, its value (in points) beside it.

    ``color``: a column whose values pick the colour (e.g. "FP32" / "W4A4"), with a legend; ``reference``: a
    dashed horizontal line (e.g. the dense FP32 accuracy). Dots, not bars: the y axis zooms to the values.
    """
    values = df[y].to_numpy(dtype=float)
    fig, axes = _new(1, 1, size=(max(6.0, 1.0 * len(df)), 3.8))
    ax = axes[0][0]
    groups = list(dict.fromkeys(df[color])) if color else [None]
    pos = np.arange(len(df))
    for k, g in enumerate(groups):
        rows = (df[color] == g).to_numpy() if color else np.ones(len(df), bool)
        ax.plot(pos[rows], values[rows], "o", ms=8, color=f"C{k}", label=str(g) if color else None)
    for p, v in zip(pos, values, strict=True):
        ax.annotate(
            f"{100 * v:.2f}", (p, v), xytext=(7, 0), textcoords="offset points", va="center", fontsize=8
        )
    if reference is not None:
        ax.axhline(reference, color="k", ls="--", lw=1, label="dense FP32")
    if color or reference is not None:
        legend_outside(ax)
    ax.set_xticks(pos, df[x], rotation=20, ha="right", fontsize=8)
    ax.set_xlim(-0.5, len(df) - 0.2)
    ax.set(ylabel=ylabel, title=title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def layer_sparsity(df: pd.DataFrame, columns: tuple[str, ...] = ("zeros",), title: str = "") -> Figure:
    """Per layer (column ``layer``, rows in order), one bar per entry of ``columns`` (fractions in [0, 1]).

    The dashed line at 0.5 is the 2:4 level. With a column ``eligible``, layers that cannot take 2:4 get
    "(dense)" in their tick label. ``axes[0].patches`` are the bars, column by column.
    """
    fig, axes = _new(1, 1, size=(max(6.0, 1.1 * len(df)), 3.6))
    ax = axes[0][0]
    pos = np.arange(len(df))
    width = 0.8 / len(columns)
    for k, col in enumerate(columns):
        ax.bar(pos + (k - (len(columns) - 1) / 2) * width, df[col].to_numpy(dtype=float), width, label=col)
    ax.axhline(0.5, color="k", ls="--", lw=1, label="2:4 (half of each group)")
    dense = ~df["eligible"].to_numpy(dtype=bool) if "eligible" in df else np.zeros(len(df), dtype=bool)
    labels = [f"{name}\n(dense)" if d else name for name, d in zip(df["layer"], dense, strict=True)]
    ax.set_xticks(pos, labels, fontsize=8)
    ax.set(ylim=(0.0, 1.0), ylabel="fraction of weights", title=title or "zeros per layer")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def pruning_curves(df: pd.DataFrame, reference: float | None = None, title: str = "") -> Figure:
    """Sparse fine-tuning runs per epoch (column ``run``; rows with ``epoch``, ``fraction``, ``val_acc``).

    Axes: 0 the share of 4-groups pruned at each epoch (line k: run k); 1 the test accuracy after each epoch
    (line k: run k; then the ``reference`` line, e.g. dense FP32). Epoch 0 is the model before fine-tuning.
    """
    from matplotlib.ticker import MaxNLocator

    fig, axes = _new(1, 2, size=(5.0, 3.4))
    ax_f, ax_a = axes[0]
    for k, (run, part) in enumerate(df.groupby("run", sort=False)):
        ep = part["epoch"].to_numpy(dtype=float)
        ax_f.plot(ep, part["fraction"].to_numpy(dtype=float), "o-", color=f"C{k}", label=str(run))
        ax_a.plot(ep, part["val_acc"].to_numpy(dtype=float), "o-", color=f"C{k}", label=str(run))
    if reference is not None:
        ax_a.axhline(reference, color="k", ls="--", lw=1, label="dense FP32")
    ax_f.set(xlabel="epoch", ylabel="share of 4-groups pruned", ylim=(-0.05, 1.05), title="pruning schedule")
    ax_a.set(xlabel="epoch", ylabel="test accuracy", title="accuracy while fine-tuning")
    for ax in (ax_f, ax_a):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


# ---- end 05 ------------------------------------------------------------------------------------------------


# ---- notebook 07: transformer QAT


def sensitivity_bars(
    df: pd.DataFrame, value: str = "output_sqnr_db", top: int | None = None, title: str = ""
) -> Figure:
    """Horizontal bars of ``value`` per ``layer`` in the frame's order (most harmful first); ``top`` keeps the
    first rows. Lower logit SQNR = the layer hurts more when it alone is quantized."""
    part = df if top is None else df.head(top)
    fig, axes = _new(1, 1, size=(6.5, 0.28 * len(part) + 1.2))
    ax = axes[0][0]
    pos = np.arange(len(part))
    ax.barh(pos, part[value].to_numpy(), color="C3", alpha=0.8)
    ax.set_yticks(pos, part["layer"], fontsize=7)
    ax.invert_yaxis()  # the first row (most harmful) on top
    ax.set_xlabel(value)
    ax.set_title(title)
    fig.tight_layout()
    return fig


# ---- notebook 08: QAT dynamics ------------------------------------------------------------------------------


def step_lines(
    df: pd.DataFrame, y: str, hue: str = "layer", smooth: int = 1, title: str = "", ylabel: str | None = None,
    logy: bool = False, dashed: pd.Series | None = None,
) -> Figure:  # fmt: skip
    """``y`` against ``step``, one line per ``hue`` value (e.g. per layer), a centred rolling mean of
    ``smooth`` steps (1 = raw); ``dashed`` maps hue values to True for dashed lines (e.g. weight quantizers)."""
    fig, axes = _new(1, 1, size=(6.5, 3.6))
    ax = axes[0][0]
    groups = list(df.groupby(hue, sort=False))
    styles = group_styles(len(groups))
    # dashed: colour = the layer (a quantizer's name without its last part), style = dashed or solid
    owners = [str(label).rsplit(".", 1)[0] for label, _ in groups]
    if dashed is not None and len(set(owners)) <= 10:
        colours = {o: f"C{k}" for k, o in enumerate(dict.fromkeys(owners))}
        styles = [
            (colours[o], "--" if bool(dashed.get(label, False)) else "-")
            for o, (label, _) in zip(owners, groups, strict=True)
        ]
    for (label, part), (colour, ls) in zip(groups, styles, strict=True):
        part = part.sort_values("step")
        values = part[y].astype(float)
        if smooth > 1:
            values = values.rolling(smooth, center=True, min_periods=1).mean()
        ax.plot(part["step"].to_numpy(), values.to_numpy(), ls, color=colour, lw=1.2, label=str(label))
    if logy:
        ax.set_yscale("symlog", linthresh=1e-4)
    integer_ticks(ax, df["step"])
    ax.set(xlabel="QAT step", ylabel=ylabel or words(y), title=title)
    ax.grid(alpha=0.3)
    legend_outside(ax, fontsize=7, ncol=2 if len(groups) > 12 else 1)
    fig.tight_layout()
    return fig


# ---- notebook 09: paper findings ---------------------------------------------------------------------------


def finding_panels(df: pd.DataFrame, reference: dict[str, float] | None = None, title: str = "") -> Figure:
    """One panel per ``finding``: a bar per ``arm`` (mean ``acc`` over seeds, +-1 std) with each seed as a dot,
    and the finding's float accuracy (``reference[finding]``) as a dashed line. Each panel has its own y axis."""
    keys = list(dict.fromkeys(df["finding"]))
    cols = min(3, max(len(keys), 1))
    rows = -(-len(keys) // cols)
    fig, axes = _new(rows, cols, size=(4.4, 3.2))
    for ax in axes.flat[len(keys) :]:
        ax.set_visible(False)
    for ax, key in zip(axes.flat, keys, strict=False):
        part = df[df["finding"] == key]
        arms = list(dict.fromkeys(part["arm"]))
        means = []
        for k, arm in enumerate(arms):
            accs = part.loc[part["arm"] == arm, "acc"].to_numpy(dtype=float)
            means.append(accs.mean())
            ax.bar(k, accs.mean(), yerr=accs.std() if len(accs) > 1 else None, capsize=3, color=f"C{k % 10}",
                   alpha=0.7)  # fmt: skip
            ax.plot(np.full(len(accs), k), accs, "k.", ms=4)
        ref = (reference or {}).get(key)
        if ref is not None:
            ax.axhline(ref, color="k", ls="--", lw=1)
        lo = min(float(np.nanmin(part["acc"])), ref if ref is not None else 1.0)
        hi = max(float(np.nanmax(part["acc"])), ref if ref is not None else 0.0)
        pad = max(0.01, 0.08 * (hi - lo))
        ax.set_ylim(max(0.0, lo - pad), min(1.0, hi + pad))
        ax.set_xticks(range(len(arms)), arms, rotation=35, ha="right", fontsize=7)
        ax.set_title(key, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    for row in axes:
        row[0].set_ylabel("test accuracy")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


# ---- notebook 10: number formats ---------------------------------------------------------------------------


def format_lattices(names: tuple[str, ...] = ("int4", "e2m1", "e4m3", "e5m2")) -> Figure:
    """The non-negative values of each element format, scaled so its largest is 1: an integer grid is evenly
    spaced, a floating-point one dense near 0 and coarse near its maximum. ``"intN"`` is the symmetric N-bit
    grid (0..2**(N-1)-1); the others are ``qatlab.formats`` element names. Left: linear axis; right: log axis
    (zero left out), where a float format's binades are evenly spaced."""
    from qatlab import formats
    from qatlab.config import QuantSpec

    fig, axes = _new(1, 2, size=(5.5, 0.55 * len(names) + 1.2))
    labels = []
    for k, name in enumerate(names):
        if name.startswith("int"):
            values = formats.lattice(QuantSpec(bits=int(name[3:]), symmetric=True)).numpy()
        else:
            values = formats.lattice(name).numpy()
        labels.append(f"{name} ({len(values)} values)")
        pos = values[values >= 0]
        pos = pos / pos.max()
        for ax, v in ((axes[0][0], pos), (axes[0][1], pos[pos > 0])):
            ax.plot(v, np.full(len(v), k), "|", color=f"C{k % 10}", ms=12, mew=1.2)
    for ax, scale in zip(axes[0], ("linear", "log"), strict=True):
        ax.set_xscale(scale)
        ax.set_yticks(range(len(names)), labels)
        ax.set_ylim(-0.6, len(names) - 0.4)
        ax.set_xlabel("value / largest value" + (" (log)" if scale == "log" else ""))
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_title("representable values, linear")
    axes[0][1].set_title("the same, log axis")
    fig.tight_layout()
    return fig


def block_scale_row(
    row: torch.Tensor, quantized: dict[str, torch.Tensor], block: int = 32, title: str = ""
) -> Figure:
    """One weight row and what each format makes of it: top, the values (grey) and each format's quantized
    values (dots), block boundaries every ``block`` elements; bottom, the error per element. A block scale
    follows the local magnitude, so a block of small values keeps its resolution next to a block with an
    outlier."""
    fig, axes = _new(2, 1, size=(10.0, 2.8), sharex=True)
    ax, ax_err = axes[0][0], axes[1][0]
    x = np.arange(row.numel())
    values = row.detach().float().numpy()
    ax.plot(x, values, color="0.6", lw=1.0, label="float")
    for k, (name, q) in enumerate(quantized.items()):
        qv = q.detach().float().numpy()
        ax.plot(x, qv, ".", ms=3, color=f"C{k % 10}", label=name)
        ax_err.plot(x, qv - values, ".", ms=3, color=f"C{k % 10}", label=name)
    for a in (ax, ax_err):
        for b in range(block, row.numel(), block):
            a.axvline(b - 0.5, color="0.85", lw=0.8, zorder=0)
    ax.set_ylabel("value")
    ax_err.set_ylabel("error q(w) - w")
    ax_err.set_xlabel(f"element along the row (grey lines: blocks of {block})")
    ax.set_title(title)
    legend_outside(ax)
    fig.tight_layout()
    return fig


def format_error_histograms(x: torch.Tensor, quantized: dict[str, torch.Tensor], title: str = "") -> Figure:
    """Histograms of the error ``q(x) - x`` of each format on one tensor, overlaid (log count), the error axis in
    units of the tensor's standard deviation."""
    fig, axes = _new(1, 1, size=(7.0, 3.4))
    ax = axes[0][0]
    std = float(x.detach().float().std()) or 1.0
    errs = {k: ((q - x).detach().float().flatten() / std).numpy() for k, q in quantized.items()}
    span = max(float(np.abs(e).max()) for e in errs.values()) or 1.0
    bins = np.linspace(-span, span, 121)
    for (name, e), (colour, ls) in zip(errs.items(), group_styles(len(errs)), strict=True):
        ax.hist(e, bins=bins, histtype="step", color=colour, ls=ls, lw=1.3, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("error q(x) - x, in standard deviations of x")
    ax.set_ylabel("count (log)")
    ax.set_title(title)
    legend_outside(ax)
    fig.tight_layout()
    return fig


# ---- notebook 11: accuracy-aware mixed precision -----------------------------------------------------------


def _require(df: pd.DataFrame, columns, who: str, arg: str = "df") -> None:
    """A ValueError naming the columns ``df`` lacks and what to pass instead."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(
            f"{who}: {arg} lacks column(s) {missing}; it has {list(df.columns)}. Pass a frame with columns "
            f"{list(columns)} (one row per point)"
        )


_TRUTH_LABELS = {"acc_drop": "accuracy drop (points)", "acc": "accuracy (%)"}


def _score_scale(values: np.ndarray) -> tuple[str, dict]:
    """The x scale for sensitivity scores: log when every score is positive; with a score <= 0, symlog when the
    non-zero magnitudes span more than two decades (linear up to the smallest of them), else linear."""
    if not len(values):
        return "linear", {}
    if (values > 0).all():
        return "log", {}
    nonzero = np.abs(values[values != 0])
    if len(nonzero) and nonzero.max() / nonzero.min() > 100:
        return "symlog", {"linthresh": float(nonzero.min())}
    return "linear", {}


def _rho_text(row: pd.Series) -> str:
    rho, ci = float(row["spearman"]), float(row.get("spearman_ci95", np.nan))
    if not np.isfinite(rho):
        return "ρ n/a"
    return f"ρ = {rho:.2f}" + (f" ± {ci:.2f}" if np.isfinite(ci) else "")


def estimator_scatter(
    df: pd.DataFrame, truth: str = "acc_drop", corr: pd.DataFrame | None = None, title: str = ""
) -> Figure:
    """How well each sensitivity estimator predicts the measured damage: one panel per estimator, each layer's
    score against the accuracy drop of quantizing that layer alone.

    Args:
        df: one row per (model, seed, layer, estimator) (and candidate precision, if any): ``estimator``,
            ``score`` (larger = more harmful; may span decades, may be <= 0, e.g. ``-sqnr_db``), the ``truth``
            column and, optionally, ``model`` (the colour; legend right of the panels), ``seed``, ``layer``.
            ``qatlab.precision.long_scores`` returns it.
        truth: the measured column on the y axis. An accuracy column (name starting with ``acc``, e.g.
            ``acc_drop``, a fraction in [-1, 1]) is drawn in points (x 100); any other (``loss_increase``) as is.
        corr: optional ``qatlab.precision.rank_correlation`` table (``estimator``, ``spearman``,
            ``spearman_ci95`` (may be NaN), optionally ``model``): each panel's title then carries
            "ρ = 0.82 ± 0.05" per model.
        title: the figure's title.

    Panels (``fig.axes``, visible ones first) follow the estimators' order of first appearance; in each, line k
    holds model k's points (``get_xdata()`` = score, ``get_ydata()`` = truth, x 100 for accuracy). The x axis is
    log when every score of the panel is positive, else symlog (non-zero magnitudes over two decades) or linear.
    Points with a non-finite score or truth are left out, and the panel title says how many.

    Example:
        >>> fig = estimator_scatter(precision.long_scores(sens), corr=precision.rank_correlation(sens))  # doctest: +SKIP
    """
    _require(df, ["estimator", "score", truth], "estimator_scatter")
    if not len(df):
        raise ValueError(
            "estimator_scatter: df is empty; pass qatlab.precision.long_scores(...) of a sensitivity run"
        )
    if corr is not None:
        _require(corr, ["estimator", "spearman"], "estimator_scatter", arg="corr")
    scale_y = 100.0 if truth.startswith("acc") else 1.0  # accuracy fractions in points
    estimators = list(dict.fromkeys(df["estimator"]))
    models = list(dict.fromkeys(df["model"])) if "model" in df.columns else [None]
    styles = group_styles(len(models))
    cols = min(3, len(estimators))
    rows = -(-len(estimators) // cols)
    fig, axes = _new(rows, cols, size=(4.2, 3.6), sharey=True)
    for ax in axes.flat[len(estimators) :]:
        ax.set_visible(False)
    for ax, est in zip(axes.flat, estimators, strict=False):
        part = df[df["estimator"] == est]
        score = part["score"].to_numpy(dtype=float)
        y = scale_y * part[truth].to_numpy(dtype=float)
        ok = np.isfinite(score) & np.isfinite(y)
        for m, (colour, _) in zip(models, styles, strict=True):
            rows_m = ok & ((part["model"] == m).to_numpy() if m is not None else True)
            ax.plot(score[rows_m], y[rows_m], "o", ls="none", ms=4, alpha=0.75, color=colour,
                    label=str(m) if m is not None else None)  # fmt: skip
        scale, kw = _score_scale(score[ok])
        ax.set_xscale(scale, **kw)
        ax.set_xlabel(f"{words(str(est))} score" + ("" if scale == "linear" else f" ({scale})"))
        lines = [str(est)]
        if corr is not None:
            c = corr[corr["estimator"] == est]
            if "model" in c.columns and len(c) > 1:
                lines += [f"{r['model']}: {_rho_text(r)}" for _, r in c.iterrows()]
            elif len(c):
                lines[0] += f": {_rho_text(c.iloc[0])}"
        if (~ok).any():
            lines.append(f"({int((~ok).sum())} not finite, left out)")
        ax.set_title("\n".join(lines), fontsize=9)
        ax.grid(alpha=0.3)
    ylabel = _TRUTH_LABELS.get(truth, f"{words(truth)}" + (" (points)" if scale_y == 100.0 else ""))
    for row in axes:
        row[0].set_ylabel(ylabel)
    if models != [None]:
        legend_outside(axes.flat[cols - 1], title="model")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


# Weight precision labels (``qatlab.precision.precision_label``) -> colour, most bits first: greys for float,
# blues for 8 bits, greens for 6/5, oranges/reds/purples for the 4-bit formats, browns/pinks below. The legend
# follows this order; a label not listed gets a colour of its own from tab20b, in order of appearance.
PRECISION_COLORS = {
    "float": "#d9d9d9",
    "fp16": "#bdbdbd",
    "bf16": "#a3a3a3",
    "int8": "#1f77b4",
    "fp8": "#4292c6",
    "fp8_e4m3": "#6baed6",
    "fp8_e5m2": "#9ecae1",
    "mxfp8": "#17becf",
    "int6": "#2ca02c",
    "int5": "#98df8a",
    "int4": "#ff7f0e",
    "int4 g128": "#e6550d",
    "int4 g64": "#fdae6b",
    "int4 g32": "#ffbb78",
    "mxfp4": "#d62728",
    "nvfp4": "#9467bd",
    "int3": "#8c564b",
    "int3 g32": "#c49c94",
    "int2": "#e377c2",
}


def precision_colors(labels) -> dict[str, str]:
    """Colour per precision label, in legend order: the listed ones (:data:`PRECISION_COLORS`) in its order,
    then the others in order of appearance."""
    seen = list(dict.fromkeys(str(v) for v in labels))
    known = [k for k in PRECISION_COLORS if k in seen]
    extra = [v for v in seen if v not in PRECISION_COLORS]
    palette = plt.get_cmap("tab20b").colors
    out = {k: PRECISION_COLORS[k] for k in known}
    out.update({v: palette[(4 * i + i // 5) % len(palette)] for i, v in enumerate(extra)})
    return out


def precision_map(df: pd.DataFrame, title: str = "") -> Figure:
    """The per-layer precision map drawn over the model: one row of boxes per map, one box per layer, coloured by
    the layer's weight precision.

    Args:
        df: one row per (map, layer): ``map`` (a label, e.g. "fallback 1%" or "budget 4.5 bits"), ``layer``
            (qualified module name; the order of first appearance is the model's order), ``precision`` (a short
            label, "float", "int8", "int4 g32", "mxfp4", ...; colours in :data:`PRECISION_COLORS`) and optionally
            ``params`` (weights in the layer). ``qatlab.precision.precision_map`` returns it.
        title: the axes' title.

    With ``params``, a box's width is proportional to the square root of its weight count (widths scaled to a
    mean of 1): layers span orders of magnitude (a first conv of a few hundred weights, a classifier of a
    million), so linear widths would hide the small layers that often matter most, while square-root widths
    still make big layers look big. Without it every box has width 1. A layer a map lacks is left blank.

    Drawn as: ``axes[0].patches``, map by map in order, one Rectangle per layer present (x: the layer's slot, y:
    the map's row, the first map on top); y tick labels the maps, x tick labels the layers (every k-th past 20
    layers); the legend, right of the axes, one entry per precision present.

    Example:
        >>> fig = precision_map(precision.precision_map(model, {"fallback 1%": cfg, "uniform int4": base}))  # doctest: +SKIP
    """
    from matplotlib.patches import Patch

    _require(df, ["map", "layer", "precision"], "precision_map")
    if not len(df):
        raise ValueError("precision_map: df is empty; pass qatlab.precision.precision_map(model, configs)")
    dup = df.duplicated(["map", "layer"])
    if dup.any():
        first = df.loc[dup, ["map", "layer"]].iloc[0].tolist()
        raise ValueError(
            f"precision_map: (map, layer) {first} appears more than once; one row per (map, layer)"
        )
    maps = list(dict.fromkeys(df["map"]))
    layers = list(dict.fromkeys(df["layer"]))
    if "params" in df.columns:
        per_layer = df.groupby("layer", sort=False)["params"].agg(["min", "max"]).loc[layers]
        bad = per_layer[~(np.isfinite(per_layer["min"].astype(float)) & (per_layer["min"] > 0))]
        if len(bad):
            raise ValueError(f"precision_map: params must be positive counts; layer {bad.index[0]!r} has "
                             f"{bad['min'].iloc[0]}")  # fmt: skip
        differ = per_layer[per_layer["min"] != per_layer["max"]]
        if len(differ):
            raise ValueError(f"precision_map: layer {differ.index[0]!r} has different params in different maps; "
                             "one model per figure")  # fmt: skip
        widths = np.sqrt(per_layer["min"].to_numpy(dtype=float))
        widths = widths / widths.mean()
    else:
        widths = np.ones(len(layers))
    lefts = np.concatenate([[0.0], np.cumsum(widths)[:-1]])
    slot = {name: k for k, name in enumerate(layers)}
    colours = precision_colors(df["precision"])
    fig, axes = _new(1, 1, size=(float(np.clip(0.32 * len(layers) + 3.0, 6.0, 16.0)), 0.45 * len(maps) + 2.2))
    ax = axes[0][0]
    for k, name in enumerate(maps):
        part = df[df["map"] == name]
        idx = np.array([slot[layer] for layer in part["layer"]])
        ax.barh(np.full(len(idx), len(maps) - 1 - k), widths[idx], left=lefts[idx], height=0.8,
                color=[colours[str(p)] for p in part["precision"]], edgecolor="white", lw=0.8)  # fmt: skip
    every = -(-len(layers) // 20)
    ticks = np.arange(0, len(layers), every)
    ax.set_xticks(lefts[ticks] + widths[ticks] / 2, [layers[i] for i in ticks],
                  rotation=90 if len(ticks) > 6 else 30, ha="center" if len(ticks) > 6 else "right",
                  fontsize=7)  # fmt: skip
    ax.set_yticks(np.arange(len(maps))[::-1], maps)
    ax.set_xlim(0.0, float(lefts[-1] + widths[-1]))
    ax.set_ylim(-0.5, len(maps) - 0.5)
    ax.set_xlabel("layer, in model order" + (" (box width ~ square root of its weights)" if "params" in df else "")
                  + (f"; one name in {every} shown" if every > 1 else ""))  # fmt: skip
    legend_outside(ax, handles=[Patch(color=c, label=p) for p, c in colours.items()], title="weights")
    ax.set_title(title)
    fig.tight_layout()
    return fig


_X_LABELS = {
    "size_kb": "model size (KB)",
    "size_mb": "model size (MB)",
    "latency_ms": "ONNX Runtime latency (ms)",
    "bits": "average bits per weight",
    "avg_bits": "average bits per weight",
}
_MARKERS = ("o", "s", "D", "^", "v", "P", "X", "*")


def frontier(df: pd.DataFrame, x: str = "size_kb", reference: float | None = None, title: str = "") -> Figure:
    """Accuracy against model size (or latency) per method: the accuracy-size frontier of mixed precision.

    Args:
        df: one row per (method, point, seed): ``method`` (e.g. "uniform", "PTQ mixed", "QAT mixed"), ``point``
            (an id of the budget or config), the ``x`` column and ``acc`` (a fraction, drawn in %); ``seed`` is
            not read (each row of a (method, point) is one seed).
        x: the cost column: ``"size_kb"`` (model size, KB), ``"latency_ms"`` (ONNX Runtime latency, ms), ...
        reference: the float (FP32) accuracy, a fraction: a dashed horizontal line, labelled in the legend.
        title: the axes' title.

    Per method (colour, marker and line style its own, order of first appearance), ``ax.containers[k]`` is an
    errorbar whose line (``.lines[0]``) runs through the points sorted by ``x``: x = the point's mean ``x``
    over seeds, y = its mean accuracy in %, vertical bars = the standard deviation over seeds (ddof=1; none
    with one seed), horizontal bars the same for ``x`` where it varies over seeds (a measured latency).

    Example:
        >>> fig = frontier(points, x="size_kb", reference=float_acc)  # doctest: +SKIP
    """
    _require(df, ["method", "point", x, "acc"], "frontier")
    if not len(df):
        raise ValueError("frontier: df is empty; pass one row per (method, point, seed)")
    methods = list(dict.fromkeys(df["method"]))
    fig, axes = _new(1, 1, size=(7.0, 4.0))
    ax = axes[0][0]
    for k, (method, (colour, ls)) in enumerate(zip(methods, group_styles(len(methods)), strict=True)):
        part = df[df["method"] == method]
        g = part.groupby("point", sort=False)
        stats = pd.DataFrame({
            "x": g[x].mean(), "acc": g["acc"].mean(), "n": g["acc"].count(),
            "acc_std": g["acc"].std(ddof=1), "x_std": g[x].std(ddof=1),
        }).sort_values("x")  # fmt: skip
        yerr = 100.0 * stats["acc_std"].to_numpy(dtype=float) if (stats["n"] > 1).any() else None
        xstd = stats["x_std"].fillna(0.0).to_numpy(dtype=float)
        ax.errorbar(
            stats["x"].to_numpy(dtype=float), 100.0 * stats["acc"].to_numpy(dtype=float),
            yerr=None if yerr is None else np.nan_to_num(yerr), xerr=xstd if (xstd > 0).any() else None,
            marker=_MARKERS[k % len(_MARKERS)], capsize=3, color=colour, ls=ls, label=str(method),
        )  # fmt: skip
    if reference is not None:
        ax.axhline(100.0 * reference, color="k", ls="--", lw=1, label=f"FP32 ({100.0 * reference:.2f}%)")
    if x in ("bits", "w_bits", "a_bits"):
        integer_ticks(ax, df[x])
    ax.set_xlabel(_X_LABELS.get(x, words(x)))
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    legend_outside(ax)
    fig.tight_layout()
    return fig


# ---- notebook 12: the QAT doctor ---------------------------------------------------------------------------

STATUS_COLORS = {"ok": "C2", "warn": "C1", "fail": "C3"}


def doctor_cases(df: pd.DataFrame, title: str = "") -> Figure:
    """One row per case file (column ``case``): the symptom's metric on the faulty model (``faulty``, a cross),
    after the fix the doctor named (``fixed``, a dot) joined by an arrow, and the healthy reference (``healthy``,
    a bar). The case label carries the check that flagged it (``check``, coloured by ``status``) and the metric
    (``metric``). Every metric is a fraction (accuracy, agreement), on one axis from 0 to 1."""
    _require(df, ("case", "check", "status", "metric", "faulty", "fixed", "healthy"), "doctor_cases")
    fig, axes = _new(1, 1, size=(9.0, 0.45 * len(df) + 1.4))
    ax = axes[0][0]
    pos = np.arange(len(df))[::-1]
    for p, (_, r) in zip(pos, df.iterrows(), strict=True):
        a, b = float(r["faulty"]), float(r["fixed"])
        if abs(b - a) > 1e-9:
            ax.annotate("", (b, p), (a, p), arrowprops={"arrowstyle": "->", "color": "0.5", "lw": 1})
    ax.plot(df["faulty"].to_numpy(float), pos, "x", color="C3", ms=8, mew=2, ls="none", label="faulty")
    ax.plot(df["fixed"].to_numpy(float), pos, "o", color="C2", ms=7, ls="none", label="after the fix")
    ax.plot(
        df["healthy"].to_numpy(float),
        pos,
        "|",
        color="k",
        ms=12,
        mew=1.5,
        ls="none",
        label="healthy reference",
    )
    labels = [f"{r['case']}  [{r['check']}: {r['status']}]\n{r['metric']}" for _, r in df.iterrows()]
    ax.set_yticks(pos, labels, fontsize=7)
    for tick, (_, r) in zip(ax.get_yticklabels(), df.iterrows(), strict=True):
        tick.set_color(STATUS_COLORS.get(str(r["status"]), "k"))
    ax.set_xlim(0, 1.02)
    ax.set_xlabel("metric of the symptom (fraction)")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    legend_outside(ax)
    fig.tight_layout()
    return fig
