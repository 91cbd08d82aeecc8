"""One-call experiments that return tidy rows: PTQ sweeps and QAT runs (the notebooks' building blocks).

Example:
    >>> from qatlab import experiments, zoo, QATConfig
    >>> model, (train, test), _ = zoo.trained_cnn()  # doctest: +SKIP
    >>> experiments.qat_run(model, QATConfig(), train, test, steps=200, seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn

from qatlab.config import QATConfig, progress_bar
from qatlab.data import reseed
from qatlab.prepare import calibrate, freeze_bn_stats, freeze_observers, prepare_qat, ptq, quantizers
from qatlab.quant import sqnr
from qatlab.store import RunStore
from qatlab.store import default as default_store
from qatlab.train import Distill, evaluate, fit, freeze_as_fit_left


@torch.no_grad()
def _logits(model: nn.Module, loader: Iterable, device) -> tuple[Tensor, Tensor]:
    outs, labels = [], []
    model.eval()
    for x, y in loader:
        outs.append(model(x.to(device)).float().cpu())
        labels.append(y)
    return torch.cat(outs), torch.cat(labels)


def ptq_sweep(
    model: nn.Module,
    calib_loader: Iterable,
    test_loader: Iterable,
    configs: Mapping[str, QATConfig],
    calib_batches: int = 8,
    device: str | torch.device = "cpu",
    progress: bool = True,
    calib_seed: int = 0,
    after_ptq: Callable[[nn.Module], Any] | None = None,
    **labels: Any,
) -> pd.DataFrame:
    """PTQ accuracy and output SQNR (logits vs the float model's) for each config: one row per config.

    Every config calibrates on the same batches (the loader is reseeded with ``calib_seed`` before each).
    ``after_ptq(model)`` runs on each calibrated model before it is evaluated (e.g. bias correction,
    ``qatlab.equalize.correct_bias``).

    Extra keyword arguments become constant columns (e.g. ``seed=0``).
    """
    ref, y = _logits(model.to(device), test_loader, device)
    rows = []
    for label, cfg in progress_bar(configs.items(), desc="PTQ sweep", progress=progress, leave=False):
        reseed(calib_loader, calib_seed)
        q = ptq(model, cfg, calib_loader, num_batches=calib_batches, device=device)
        if after_ptq is not None:
            after_ptq(q)
        out, _ = _logits(q, test_loader, device)
        w, a = cfg.weight, cfg.activation
        rows.append(
            {
                "config": label,
                "w_bits": w.bits,
                "a_bits": a.bits if a is not None else 32,
                "granularity": "per-channel" if w.per_channel else "per-tensor",
                "observer": w.observer
                if a is None or a.observer == w.observer
                else f"{w.observer}/{a.observer}",
                "acc": float((out.argmax(1) == y).float().mean()),
                "output_sqnr_db": sqnr(ref, out),
                **labels,
            }
        )
    return pd.DataFrame(rows)


def layer_sensitivity(
    model: nn.Module,
    config: QATConfig,
    calib_loader: Iterable,
    test_loader: Iterable,
    layers: Iterable[str] | None = None,
    calib_batches: int = 4,
    device: str | torch.device = "cpu",
    progress: bool = True,
    calib_seed: int = 0,
) -> pd.DataFrame:
    """Quantize one layer at a time (all others float) with ``config``; PTQ accuracy and logit SQNR per layer.

    Calibration runs once, on a copy with every layer quantized: calibration observes with fake quant off, so
    each quantizer sees the float model's tensors, as it would with only its own layer quantized (up to float
    rounding: upstream Conv+BN pairs compute in their folded form, a few ULP from the float model's; Linear
    layers compute exactly as in float). Each single-layer model takes its quantizers' calibrated state from
    that copy (a layer whose quantizers the copy lacks is calibrated on its own).

    Args:
        layers: names of quantizable layers (``nn.Conv2d``/``nn.Linear``) to try; None: all of them.

    Returns:
        One row per layer: ``layer``, ``acc``, ``acc_drop`` (float accuracy minus this one), ``output_sqnr_db``
        (logits vs the float model's), sorted with the most harmful layer first.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    layers = names if layers is None else list(layers)
    unknown = [n for n in layers if n not in names]
    if unknown:
        raise ValueError(
            f"layers {unknown} are not Conv2d/Linear layers of the model; valid names start with {names[:5]}"
        )
    ref, y = _logits(model.to(device), test_loader, device)
    float_acc = float((ref.argmax(1) == y).float().mean())
    reseed(calib_loader, calib_seed)
    every = calibrate(prepare_qat(model, replace(config, keep=(), keep_bits=None)).to(device), calib_loader,
                      num_batches=calib_batches, device=device)  # fmt: skip
    calibrated = dict(quantizers(every))
    rows = []
    for name in progress_bar(layers, desc="one layer at a time", progress=progress, leave=False):
        cfg = replace(config, keep=tuple(n for n in names if n != name), keep_bits=None)
        q = prepare_qat(model, cfg).to(device)
        own = dict(quantizers(q))
        if own and own.keys() <= calibrated.keys():
            for qname, quantizer in own.items():
                quantizer.load_state_dict(calibrated[qname].state_dict())
            freeze_observers(q)
            freeze_bn_stats(q)
            q.eval()
        else:
            reseed(calib_loader, calib_seed)
            q = ptq(model, cfg, calib_loader, num_batches=calib_batches, device=device)
        out, _ = _logits(q, test_loader, device)
        acc = float((out.argmax(1) == y).float().mean())
        rows.append(
            {"layer": name, "acc": acc, "acc_drop": float_acc - acc, "output_sqnr_db": sqnr(ref, out)}
        )
    df = pd.DataFrame(rows)
    return df.sort_values(["output_sqnr_db"]).reset_index(drop=True)


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the block on one torch thread (the thread count is restored after): a run's numbers then do not
    depend on how many threads the machine, a pool worker or the notebook kernel has (float sums are reduced in
    a thread-count-dependent order)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def qat_run(
    model: nn.Module,
    config: QATConfig,
    train_loader: Iterable,
    test_loader: Iterable | None,
    steps: int | None,
    lr: float = 5e-4,
    optimizer: str = "sgd",
    schedule: str = "cosine",
    momentum: float = 0.9,
    calibrated: bool = True,
    calib_batches: int = 8,
    calib_loader: Iterable | None = None,
    freeze_bn_epoch: int | None = None,
    freeze_observer_epoch: int | None = None,
    epochs: int = 1,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
    on_epoch_start: Callable[[int, nn.Module], None] | None = None,
    on_epoch_end: Callable[[int, nn.Module, dict[str, Any]], None] | None = None,
    prepare: Callable[[nn.Module, QATConfig], nn.Module] = prepare_qat,
    wrap: Callable[[nn.Module], nn.Module] | None = None,
    validate: bool = True,
    val_loader: Iterable | None = None,
    teacher: nn.Module | None = None,
    distill: Distill | None = None,
    store: RunStore | None = None,
    **labels: Any,
) -> dict[str, Any]:
    """One QAT run: prepare ``model`` with ``config``, optionally calibrate (PTQ init), fine-tune, evaluate.

    The lab's QAT runs go through here: the notebooks' sweeps, :func:`qatlab.ablate.digits_qat_run`,
    :func:`qatlab.reproduce.run` and :func:`qatlab.distributed.run`.

    ``steps`` optimizer steps per epoch (None: the whole loader) for ``epochs`` epochs. ``calibrated=False``
    starts from raw ranges: the observers first see the first training batch (train-mode BatchNorm), as a QAT
    run that skips calibration does. Calibration reads ``calib_batches`` batches of ``calib_loader`` (default: the
    train loader, reseeded with ``seed`` first; fit reseeds it again), so the result does not depend on what ran
    before. ``on_epoch_start(epoch, qat_model)`` and
    ``on_epoch_end(epoch, qat_model, row)`` are passed to fit (e.g. to attach a :mod:`qatlab.dynamics` recorder,
    change the quantizers after calibration, or checkpoint).

    Hooks for the cases that differ:
        prepare: ``prepare(model, config) -> QAT model``; e.g. :func:`qatlab.sparsity.prepare_sparse_qat` keeps
            the 2:4 masks.
        wrap: ``wrap(qat) -> the module fit trains``, applied after calibration: e.g. DistributedDataParallel
            (quantize first, then wrap). ``model`` in the result stays the unwrapped QAT model.
        test_loader: None skips every evaluation (``ptq_acc`` and ``acc`` NaN), e.g. on the DDP ranks but 0.
        validate: False evaluates once at the end instead of after every epoch (fit's ``val_loader``).
        val_loader: where each epoch is validated (default ``test_loader``); a held-out split
            (:func:`qatlab.data.validation_split`) keeps choices made on it (an epoch, the model to export)
            out of the reported ``acc``, which is then measured once on ``test_loader`` at the end.
        teacher, distill: quantization-aware distillation (fit's ``teacher``/``distill``): train on the
            teacher's softened logits (e.g. ``teacher=model``, the float model this run quantizes).
        store: a :class:`qatlab.store.RunStore`: a run whose inputs (model, config, data, arguments, the qatlab
            source) were stored before is read back, not computed (``seconds`` is the stored run's); a new one is
            stored. Runs with ``wrap`` or epoch hooks cannot be keyed and raise. Without it, the default store
            (:func:`qatlab.store.default`, on when ``QATLAB_STORE=1``) is used for the runs it can key.

    Returns:
        A row: the labels, ``seed``, ``ptq_acc`` (before fine-tuning, NaN when not calibrated), ``acc`` (final
        test accuracy), ``seconds`` (fine-tuning), ``history`` (the fit DataFrame) and ``model``; with a
        ``val_loader``, also ``ptq_val_acc`` and ``val_acc`` (the same on the validation split).
    """
    key = None
    explicit = store is not None
    store = store if explicit else default_store()
    hooks = [n for n, h in (("wrap", wrap), ("on_epoch_start", on_epoch_start), ("on_epoch_end", on_epoch_end))
             if h is not None]  # fmt: skip
    if hooks and explicit:
        raise ValueError(f"store: a run with hooks ({', '.join(hooks)}) cannot be keyed; pass store=None")
    if store is not None and not hooks:
        # a shuffling calib_loader given apart is not reseeded: where its generator stands decides the batches
        gen = getattr(getattr(calib_loader, "sampler", None), "generator", None)
        calib_order = gen.get_state() if isinstance(gen, torch.Generator) else None
        try:
            key = store.key(
                "qat_run", model=model, config=config, train_loader=train_loader, test_loader=test_loader,
                steps=steps, lr=lr, optimizer=optimizer, schedule=schedule, momentum=momentum, calibrated=calibrated,
                calib_batches=calib_batches, calib_loader=calib_loader, freeze_bn_epoch=freeze_bn_epoch,
                freeze_observer_epoch=freeze_observer_epoch, epochs=epochs, seed=seed, device=torch.device(device),
                prepare=prepare, validate=validate, val_loader=val_loader, teacher=teacher, distill=distill,
                calib_order=calib_order,
            )  # fmt: skip
        except TypeError:
            if explicit:
                raise
            key = None  # the default store skips runs it cannot key (e.g. a custom Dataset)
        hit = store.get(key, state=True) if key is not None else None
        if hit is not None:
            return _stored_run(hit, model, config, prepare, device, epochs, freeze_bn_epoch, freeze_observer_epoch,
                               labels)  # fmt: skip
    nan = float("nan")
    torch.manual_seed(seed)
    qat = prepare(model, config).to(device)
    ptq_acc = nan
    extra: dict[str, float] = {}
    if val_loader is not None:
        extra["ptq_val_acc"] = nan
    if calibrated:
        if calib_loader is None:
            calib_loader = train_loader
            reseed(train_loader, seed)
        calibrate(qat, calib_loader, num_batches=calib_batches, device=device)
        if test_loader is not None:
            ptq_acc = evaluate(qat, test_loader, device=device)["acc"]
        if val_loader is not None:
            extra["ptq_val_acc"] = evaluate(qat, val_loader, device=device)["acc"]
    trained = qat if wrap is None else wrap(qat)
    start = time.perf_counter()
    history = fit(
        trained,
        train_loader,
        epochs=epochs,
        lr=lr,
        optimizer=optimizer,
        schedule=schedule,
        momentum=momentum,
        seed=seed,
        max_steps_per_epoch=steps,
        freeze_bn_epoch=freeze_bn_epoch,
        freeze_observer_epoch=freeze_observer_epoch,
        val_loader=(test_loader if val_loader is None else val_loader) if validate else None,
        device=device,
        progress=progress,
        on_epoch_start=on_epoch_start,
        on_epoch_end=on_epoch_end,
        teacher=teacher,
        distill=distill,
    )
    seconds = time.perf_counter() - start
    acc = nan
    validated = bool(validate and len(history))
    if test_loader is not None:
        done = validated and val_loader is None
        acc = float(history["val_acc"].iloc[-1]) if done else evaluate(qat, test_loader, device=device)["acc"]
    if val_loader is not None:
        last = history["val_acc"].iloc[-1] if validated else evaluate(qat, val_loader, device=device)["acc"]
        extra["val_acc"] = float(last)
    row = {
        **labels,
        "seed": seed,
        "ptq_acc": ptq_acc,
        "acc": acc,
        **extra,
        "seconds": seconds,
        "history": history,
    }
    if key is not None:
        # with the global RNG state the run left behind: code after a stored run draws what it would have drawn
        state = {**qat.state_dict(), _RNG_KEY: torch.get_rng_state()}
        store.put(key, {k: v for k, v in row.items() if k not in labels}, state)
    return {**row, "model": qat}


_RNG_KEY = "__torch_rng_state__"


def _stored_run(hit, model, config, prepare, device, epochs, freeze_bn_epoch, freeze_observer_epoch, labels):
    """A stored qat_run, rebuilt: the QAT model from ``prepare`` with the stored state, in train mode as ``fit``
    leaves it, BN statistics and observers frozen where the run froze them."""
    qat = prepare(model, config).to(device)
    state = hit.pop("state")
    rng = state.pop(_RNG_KEY, None)
    qat.load_state_dict(state)
    if rng is not None:
        torch.set_rng_state(rng)
    freeze_as_fit_left(qat, epochs, freeze_bn_epoch, freeze_observer_epoch)
    return {**labels, **hit, "model": qat.train()}


def compare_arms(a: Sequence[float], b: Sequence[float], min_effect: float = 0.002) -> dict[str, Any]:
    """Paired comparison of two arms run with the same seeds (``a[i]`` and ``b[i]`` share seed ``i``).

    The per-seed differences ``a - b`` give a mean and a 95% confidence interval (Student's t over the seeds).
    Verdict: ``"held"`` (a better) when the interval lies above 0 and the mean exceeds ``min_effect``,
    ``"reversed"`` when it lies below 0 and the mean is under ``-min_effect``, ``"no clear difference"``
    otherwise, ``"one seed: no verdict"`` with a single seed. A verdict that needs more seeds to be stable reads
    "no clear difference" rather than flipping between machines.

    Example:
        >>> compare_arms([0.90, 0.91, 0.92], [0.88, 0.89, 0.90])["verdict"]
        'held'
    """
    from scipy import stats

    if len(a) != len(b) or not len(a):
        raise ValueError(f"a and b need the same, non-zero number of seeds; got {len(a)} and {len(b)}")
    diff = pd.Series([float(x) - float(y) for x, y in zip(a, b, strict=True)])
    n, mean = len(diff), float(diff.mean())
    if n < 2:
        return {"mean_diff": mean, "ci95": float("nan"), "seeds": n, "verdict": "one seed: no verdict"}
    half = float(stats.t.ppf(0.975, n - 1) * diff.std(ddof=1) / n**0.5)
    if mean - half > 0 and mean > min_effect:
        verdict = "held"
    elif mean + half < 0 and mean < -min_effect:
        verdict = "reversed"
    else:
        verdict = "no clear difference"
    return {"mean_diff": mean, "ci95": half, "seeds": n, "verdict": verdict}


def recovery(runs: pd.DataFrame, fp32_acc: float | None, n_test: int, by: str = "arm") -> pd.DataFrame:
    """How much of the PTQ loss QAT recovers, per ``by`` group of :func:`qat_run` rows (``ptq_acc``, ``acc``;
    one row per seed), as the QAT literature reports it: ``(QAT - PTQ) / (FP32 - PTQ)``. ``fp32_acc``: the float
    model's accuracy, or None to read it per row from a ``fp32_acc`` column (each seed its own float model).

    Columns: ``ptq_drop`` and ``qat_drop`` (points below FP32, means over seeds), ``qat_gain`` (points, with the
    95% interval over seeds and :func:`compare_arms`' verdict on QAT vs PTQ), and ``recovered``: the fraction
    of the PTQ loss won back, NaN when the PTQ loss is under 3 standard errors of one accuracy on ``n_test``
    examples (nothing measurable to recover; ``note`` says so).
    """
    if not {by, "ptq_acc", "acc"} <= set(runs.columns):
        raise ValueError(
            f"runs needs columns {by!r}, 'ptq_acc' and 'acc' (qat_run rows); got {list(runs.columns)}"
        )
    if fp32_acc is None:
        if "fp32_acc" not in runs.columns:
            raise ValueError(
                "fp32_acc=None reads a 'fp32_acc' column, which runs does not have; pass the accuracy"
            )
    else:
        runs = runs.assign(fp32_acc=float(fp32_acc))
    fp32_mean = float(runs["fp32_acc"].mean())
    std_err = (fp32_mean * (1 - fp32_mean) / n_test) ** 0.5
    rows = []
    for key, part in runs.groupby(by, sort=False):
        ptq, qat = float(part["ptq_acc"].mean()), float(part["acc"].mean())
        fp32 = float(part["fp32_acc"].mean())
        verdict = compare_arms(list(part["acc"]), list(part["ptq_acc"]))
        loss = fp32 - ptq
        measurable = loss > 3 * std_err
        rows.append(
            {
                by: key,
                "seeds": len(part),
                "ptq_drop": 100 * loss,
                "qat_drop": 100 * (fp32 - qat),
                "qat_gain": 100 * verdict["mean_diff"],
                "qat_gain_ci95": 100 * verdict["ci95"],
                "qat_vs_ptq": verdict["verdict"],
                "recovered": (qat - ptq) / loss if measurable else float("nan"),
                "note": ""
                if measurable
                else f"PTQ loss under 3 standard errors ({300 * std_err:.2f} points)",
            }
        )
    return pd.DataFrame(rows)
