"""Published QAT/PTQ findings, re-tested at lab scale through :func:`qatlab.ablate.ablate`.

Three parts: :func:`run` (one run: float model, PTQ, optional QAT through :func:`qatlab.experiments.qat_run`);
the findings themselves in :mod:`qatlab.findings` (each a claim, where it was published, the published numbers,
our small-scale experiment as a grid of :func:`run` configs, and a rule that turns our numbers into a verdict:
``reproduced``, ``partly`` or ``not reproduced``); and here, the sweep and the tables. :func:`reproduce` runs every finding's grid in one resumable
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

import datetime
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from qatlab import zoo
from qatlab.ablate import ablate, grid_runs, run_key
from qatlab.config import QATConfig, QuantSpec, fast
from qatlab.data import reseed
from qatlab.dynamics import record
from qatlab.experiments import one_thread, qat_run
from qatlab.files import build_dir, write_atomic
from qatlab.findings import FINDINGS, Finding, margin  # noqa: F401 - margin: part of the API
from qatlab.prepare import ptq, quantizers, reestimate_bn
from qatlab.saturation import cpu_int8
from qatlab.train import evaluate

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


@one_thread()
def run_model(config: dict[str, Any], seed: int) -> tuple[Any, dict[str, Any]]:
    """One experiment: float model -> PTQ (-> QAT); ``(quantized model, metrics)``. Keys in :data:`DEFAULTS`.

    The model is None when the QAT loss diverged. Metrics: ``float_acc``, ``ptq_acc`` (NaN for raw init),
    ``qat_acc`` (NaN when ``steps=0`` or the loss diverged), ``diverged`` (0/1), ``acc_first`` (after the first of ``evals`` chunks), ``alpha_ratio`` (learned
    activation scales, end / start, mean over layers), ``oscillating`` and ``flips_per_step`` (mean over weight
    quantizers, with ``record``), ``bnre_acc`` (with ``bn_reestimate``). NaN where a metric does not apply.
    Runs on one torch thread (restored after), so a config and seed give the same numbers in a pool worker,
    in the notebook and on a rerun.
    """
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
    seeds = sorted(int(s) for s in table["seed"].unique()) if len(table) else []
    return (
        f"Generated by notebook 09 on {datetime.date.today().isoformat()}: {platform.machine()} CPU, int8 class "
        f"`{cpu_int8().kind}`; seeds {seeds}, each with its own float model. Float training differs between "
        "CPUs, so another machine gives other numbers; verdicts use paired per-seed differences and a margin of "
        "max(0.5 points, 2 x their std)."
    )
