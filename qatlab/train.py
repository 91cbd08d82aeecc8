"""QAT training loop: `fit` / `evaluate`, per-step LR, BN / observer freezing, distillation (`Distill`)."""

from __future__ import annotations

import itertools
import math
import numbers
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from qatlab.config import check_choice, progress_bar
from qatlab.data import reseed
from qatlab.prepare import freeze_bn_stats, freeze_observers, quantizers

HISTORY_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "lr_max", "bn_frozen",
                   "observers_frozen", "time_s")  # fmt: skip
_OPTIMIZERS = ("sgd", "adam")
_SCHEDULES = ("cosine", "constant")
_NO_VAL = {"loss": math.nan, "acc": math.nan}
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):  # numpy ints are fine too
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__}); pass e.g. {name}=1")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}; pass e.g. {name}={max(minimum, 1)}")


def _check_lr(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}; pass e.g. {name}=0.01")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value}; pass e.g. {name}=0.01")


def lr_at(step: int, total_steps: int, warmup_steps: int, lr: float, schedule: str = "cosine") -> float:
    """The learning rate that step `step` (0-based) uses: linear warm-up, then cosine decay or constant.

    Warm-up rises as lr * (step + 1) / warmup_steps, so step 0 is small but not wasted and the last warm-up
    step uses `lr`. Cosine then falls from `lr` towards 0 over the remaining steps (the last step is near 0).

    Example:
        >>> lr_at(0, 100, 10, 0.1), lr_at(9, 100, 10, 0.1), round(lr_at(55, 100, 10, 0.1), 6)
        (0.01, 0.1, 0.05)
    """
    check_choice("schedule", schedule, _SCHEDULES)
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Distill:
    """Quantization-aware distillation (QAD): train the student on a teacher's softened outputs.

    The loss is ``alpha * T**2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * label_loss``
    with the KL averaged over the batch (``reduction="batchmean"``) and computed from log-softmaxes for
    stability. ``T**2`` keeps the gradient's size independent of ``T`` (Hinton et al. 2015). ``alpha=1`` is pure
    distillation, the default of NVIDIA ModelOpt's QAD: the float model teaches its own QAT copy.

    Args:
        temperature: ``T``, a finite number > 0; larger values soften both distributions.
        alpha: weight of the distillation term in [0, 1]; ``1 - alpha`` weighs the label loss.

    Example:
        >>> s, t = torch.zeros(2, 3), torch.zeros(2, 3)
        >>> float(Distill(temperature=2.0).loss(s, t, torch.tensor([0, 1])))  # same distributions: KL = 0
        0.0
    """

    temperature: float = 2.0
    alpha: float = 1.0

    def __post_init__(self) -> None:
        for name, example in (("temperature", 2.0), ("alpha", 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(
                    f"{name} must be a number, got {value!r} ({type(value).__name__}); pass e.g. {name}={example}"
                )
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(
                f"temperature must be a finite number > 0, got {self.temperature}; pass e.g. temperature=2.0"
            )
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(
                f"alpha must be in [0, 1] (1 = pure distillation, 0 = labels only), got {self.alpha}; "
                "pass e.g. alpha=1.0 or alpha=0.5"
            )

    def loss(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        targets: torch.Tensor,
        label_loss_fn: LossFn | None = None,
    ) -> torch.Tensor:
        """The distillation objective for one batch (a scalar that backpropagates into ``student_logits``).

        Args:
            student_logits: ``(B, C, ...)`` logits of the model being trained; classes along dim 1.
            teacher_logits: logits of the same shape (no gradient flows into them; cast to the student's dtype).
            targets: labels for ``label_loss_fn``; unused when ``alpha == 1``.
            label_loss_fn: ``fn(logits, targets)`` averaged over the batch; default cross entropy.

        Returns:
            ``alpha * T**2 * KL + (1 - alpha) * label_loss``; a term whose weight is 0 is not computed.

        Example:
            >>> s, t, y = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]]), torch.tensor([0])
            >>> round(float(Distill(temperature=1.0, alpha=1.0).loss(s, t, y)), 4)  # KL = 2 * tanh(1)
            1.5232
        """
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(
                f"student_logits shape {tuple(student_logits.shape)} differs from teacher_logits shape "
                f"{tuple(teacher_logits.shape)}; pass logits of the same shape (a teacher with the same classes)"
            )
        if student_logits.dim() < 2:
            raise ValueError(
                f"student_logits must be (B, C, ...) with classes along dim 1, got shape "
                f"{tuple(student_logits.shape)}; pass batched logits"
            )
        total = student_logits.new_zeros(())
        if self.alpha > 0:
            T = self.temperature
            student = F.log_softmax(student_logits / T, dim=1)
            teacher = F.log_softmax(teacher_logits.detach().to(student_logits.dtype) / T, dim=1)
            kl = F.kl_div(student, teacher, log_target=True, reduction="batchmean")
            total = self.alpha * T * T * kl
        if self.alpha < 1:
            label_loss_fn = label_loss_fn if label_loss_fn is not None else nn.CrossEntropyLoss()
            total = total + (1.0 - self.alpha) * label_loss_fn(student_logits, targets)
        return total


def _check_teacher(model: nn.Module, teacher: Any, distill: Any) -> Distill | None:
    """The Distill to train with (None without a teacher), after checking the pair."""
    if teacher is None:
        if distill is not None:
            raise ValueError(
                f"distill={distill!r} needs a teacher; pass teacher=float_model (e.g. the model given to "
                "prepare_qat) or drop distill"
            )
        return None
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}; pass the float model")
    if teacher is model:
        raise ValueError(
            "teacher is the model being trained; pass a copy of the float model (prepare_qat returns a copy, "
            "so teacher=float_model works), e.g. teacher=copy.deepcopy(model)"
        )
    model_params = {id(p) for p in model.parameters()}
    if any(id(p) in model_params for p in teacher.parameters()):
        raise ValueError(
            "teacher shares parameters with the model, so training would move the teacher too; pass "
            "teacher=copy.deepcopy(teacher)"
        )
    distill = Distill() if distill is None else distill
    if not isinstance(distill, Distill):
        raise TypeError(
            f"distill must be a qatlab.train.Distill or None, got {type(distill).__name__}; pass e.g. "
            "distill=Distill(temperature=2.0, alpha=1.0)"
        )
    return distill


def _unpack(batch: Any, name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(batch, (list, tuple)) and len(batch) == 2):
        raise TypeError(f"{name} must yield (x, y) pairs, got {type(batch).__name__}; use a TensorDataset")
    return batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)


def evaluate(
    model: nn.Module, loader: Iterable, device: str | torch.device = "cpu", loss_fn: LossFn | None = None
) -> dict[str, float]:
    """Mean loss per sample, accuracy and sample count of `model` on `loader`, in eval mode without grad.

    The model is moved to `device`; each module's train/eval flag is restored exactly afterwards (a BatchNorm
    put in eval mode on purpose stays so). `loss_fn(logits, targets)` averages over the batch (default: CE).

    Example:
        >>> sorted(evaluate(nn.Linear(4, 3), [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]))
        ['acc', 'loss', 'n']
    """
    device = torch.device(device)
    loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()
    modes = [(m, m.training) for m in model.modules()]
    total_loss, correct, n = 0.0, 0, 0
    model.to(device).eval()
    try:
        with torch.no_grad():
            for batch in loader:
                x, y = _unpack(batch, "loader", device)
                logits = model(x)
                total_loss += loss_fn(logits, y).item() * len(y)
                correct += int((logits.argmax(dim=1) == y).sum().item())
                n += len(y)
    finally:
        # Set flags directly rather than model.train(): that would recurse and undo per-module choices.
        for module, mode in modes:
            module.training = mode
    if n == 0:
        raise ValueError("loader has no batches (empty data set?); pass a DataLoader over non-empty data")
    return {"loss": total_loss / n, "acc": correct / n, "n": n}


def _steps_per_epoch(loader: Iterable, max_steps: int | None) -> int:
    try:
        n = len(loader)  # type: ignore[arg-type]
    except TypeError:  # an iterable data set: the cap is the only way to plan the LR schedule
        if max_steps is None:
            raise TypeError("train_loader has no len(); pass max_steps_per_epoch=N to plan the LR") from None
        return max_steps
    if n == 0:
        raise ValueError("train_loader has no batches (empty data set?); pass a loader over non-empty data")
    return n if max_steps is None else min(n, max_steps)


def _train_epoch(
    model, loader, opt, sched, loss_fn, device, steps, epoch, progress, teacher=None, distill=None
) -> tuple[float, ...]:
    total_loss, correct, n, lr_used = 0.0, 0, 0, opt.param_groups[0]["lr"]
    lr_max = lr_used
    with progress_bar(
        total=steps, desc=f"epoch {epoch + 1}", unit="batch", leave=False, progress=progress
    ) as bar:
        for step, batch in enumerate(itertools.islice(loader, steps)):
            x, y = _unpack(batch, "train_loader", device)
            if teacher is None:
                logits = model(x)
                loss = loss_fn(logits, y)
            else:
                with torch.no_grad():
                    teacher_logits = teacher(x)
                logits = model(x)
                if teacher_logits.shape != logits.shape:
                    raise ValueError(
                        f"teacher's logits have shape {tuple(teacher_logits.shape)} but the model's have "
                        f"{tuple(logits.shape)}; pass a teacher with the model's outputs (e.g. the float model "
                        "the QAT model was prepared from)"
                    )
                loss = distill.loss(logits, teacher_logits, y, loss_fn)
            value = loss.item()
            lr_used = opt.param_groups[0]["lr"]
            lr_max = max(lr_max, lr_used)
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"training loss became {value} at epoch {epoch + 1} (1-based), step {step + 1} of "
                    f"{steps} with lr={lr_used:g}; use a lower lr (e.g. {lr_used / 10:g}) or warmup_epochs=1"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += value * len(y)
            correct += int((logits.detach().argmax(dim=1) == y).sum().item())
            n += len(y)
            bar.update(1)
            bar.set_postfix(loss=f"{total_loss / n:.4f}", refresh=False)
    if n == 0:
        raise ValueError(f"train_loader has no batches in epoch {epoch + 1}; pass a re-iterable loader")
    return total_loss / n, correct / n, lr_used, lr_max


def freeze_as_fit_left(
    model: nn.Module,
    epochs: int,
    freeze_bn_epoch: int | None = None,
    freeze_observer_epoch: int | None = None,
) -> nn.Module:
    """Freeze BN statistics and observers as :func:`fit` left them after ``epochs`` epochs with these arguments:
    for a model rebuilt from a saved state dict (the flags are not in it)."""
    if freeze_bn_epoch is not None and freeze_bn_epoch < epochs:
        freeze_bn_stats(model)
    if freeze_observer_epoch is not None and freeze_observer_epoch < epochs:
        freeze_observers(model)
    return model


def accuracy(model: nn.Module, loader: Iterable, device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy of ``model`` on ``loader`` (eval mode): ``evaluate(model, loader, device)["acc"]``."""
    return evaluate(model, loader, device)["acc"]


def fit(
    model: nn.Module, train_loader: Iterable, *, epochs: int = 1, lr: float = 0.01, optimizer: str = "sgd",
    momentum: float = 0.9, weight_decay: float = 0.0, schedule: str = "cosine", warmup_epochs: float = 0.0,
    freeze_bn_epoch: int | None = None, freeze_observer_epoch: int | None = None,
    val_loader: Iterable | None = None, device: str | torch.device = "cpu", seed: int = 0,
    progress: bool = True, loss_fn: LossFn | None = None, max_steps_per_epoch: int | None = None,
    on_epoch_start: Callable[[int, nn.Module], None] | None = None,
    on_epoch_end: Callable[[int, nn.Module, dict[str, Any]], None] | None = None,
    teacher: nn.Module | None = None, distill: Distill | None = None, compile: bool = False,
) -> pd.DataFrame:  # fmt: skip
    """Train `model` in place (moved to `device`, left in train mode) and return its history.

    The LR follows `lr_at` per step. At the start of epoch `freeze_bn_epoch` (0-based) it calls
    `qatlab.prepare.freeze_bn_stats(model)`, at the start of `freeze_observer_epoch` `freeze_observers(model)`
    (0 = ranges never update during fit; an epoch beyond the run never fires). `torch.manual_seed(seed)` and
    `qatlab.data.reseed(train_loader, seed)` run first: same seed and loader, same batches and numbers, whatever
    ran before. On KeyboardInterrupt (the notebook's stop button) fit warns and
    returns the finished epochs' history instead of raising; the model keeps the weights of its last step.
    A NaN/inf loss raises FloatingPointError naming the epoch and step.

    `on_epoch_start(epoch, model)` runs at the start of each epoch (0-based), after the freezes: e.g. a pruning
    schedule or `DistributedSampler.set_epoch`. `on_epoch_end(epoch, model, row)` gets the epoch's history row
    (a dict it may update in place, e.g. with a loss averaged over ranks) before it is stored: e.g. a checkpoint.

    Distillation during QAT (QAD): with a `teacher` (usually the float model; `prepare_qat` returns a copy, so
    the float model is free to teach), each step also runs the teacher on the same batch, in eval mode under
    `torch.no_grad`, and the model trains on `distill.loss` (`Distill()` when `distill` is None: pure
    distillation at temperature 2). The teacher is moved to `device`; its parameters are not touched and each of
    its modules' train/eval flags is restored after fit. Validation stays the plain `loss_fn`, so val_loss
    compares across runs with and without a teacher.

    `compile=True` runs the training forward (and so its backward) through `torch.compile` in the epochs where
    every quantizer compiles as one graph: frozen ranges, learned scales (LSQ, PACT) after calibration, and
    live min-max or moving-average observers; epochs with other live observers (percentile, MSE, the
    averaging ones, synced ranks, dynamic or non-integer quantizers) stay eager. Compiling costs 15-20 s for the
    lab's CNNs on a 2-core CPU (about 3 s with a warm compiler cache) and pays back after thousands of steps
    (`bench/bench_train_step.py`); the numbers agree with eager ones up to float rounding (the compiler fuses
    BatchNorm and activations its own way).

    Args:
        teacher: the model to distill from, or None to train on `loss_fn` alone; not `model` itself and
            sharing no parameters with it; its logits must have the model's shape.
        distill: the :class:`Distill` loss settings; only with a teacher.

    Returns:
        One row per finished epoch: epoch (1-based), train_loss (the training objective: `loss_fn`, or the
        distillation loss with a teacher), train_acc (training-mode forward passes, against the labels),
        val_loss (`loss_fn`), val_acc (NaN without val_loader), lr (of the epoch's last step), lr_max (the
        largest LR a step of the epoch used), bn_frozen,
        observers_frozen, time_s.

    Example:
        >>> fit(model, train_loader, epochs=3, lr=0.1, val_loader=test_loader)["val_acc"]  # doctest: +SKIP
        >>> qat = prepare_qat(float_model, QATConfig())  # doctest: +SKIP
        >>> fit(qat, train_loader, teacher=float_model, distill=Distill(temperature=2.0))  # doctest: +SKIP
    """
    _check_int("epochs", epochs, 1)
    _check_lr("lr", lr)
    check_choice("optimizer", optimizer, _OPTIMIZERS)
    check_choice("schedule", schedule, _SCHEDULES)
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}; pass e.g. momentum=0.9")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be finite and >= 0, got {weight_decay}; pass e.g. 1e-4")
    if not (math.isfinite(warmup_epochs) and 0 <= warmup_epochs <= epochs):
        raise ValueError(f"warmup_epochs must be in [0, epochs={epochs}], got {warmup_epochs}; pass e.g. 0.5")
    for name, value, minimum in (
        ("freeze_bn_epoch", freeze_bn_epoch, 0), ("freeze_observer_epoch", freeze_observer_epoch, 0),
        ("max_steps_per_epoch", max_steps_per_epoch, 1), ("seed", seed, 0),
    ):  # fmt: skip
        if value is not None:
            _check_int(name, value, minimum)
    distill = _check_teacher(model, teacher, distill)
    if not isinstance(compile, bool):
        raise ValueError(f"compile must be True or False, got {compile!r}")

    steps = _steps_per_epoch(train_loader, max_steps_per_epoch)
    device = torch.device(device)
    torch.manual_seed(seed)
    reseed(train_loader, seed)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no parameters with requires_grad=True; unfreeze some before calling fit")
    cls, extra = (torch.optim.SGD, {"momentum": momentum}) if optimizer == "sgd" else (torch.optim.Adam, {})
    opt = cls(params, lr=lr, weight_decay=weight_decay, **extra)
    sched = LambdaLR(opt, lambda s: lr_at(s, epochs * steps, round(warmup_epochs * steps), 1.0, schedule))
    loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()
    teacher_modes = [] if teacher is None else [(m, m.training) for m in teacher.modules()]
    if teacher is not None:
        teacher.to(device).eval()

    rows: list[dict[str, Any]] = []
    bn_frozen = observers_frozen = False
    compiled = None  # the model through torch.compile, made at the first epoch that may use it
    bar = progress_bar(range(epochs), desc="fit", unit="epoch", progress=progress)
    try:
        for epoch in bar:
            start = time.perf_counter()
            if epoch == freeze_bn_epoch:
                freeze_bn_stats(model)
                bn_frozen = True
            if epoch == freeze_observer_epoch:
                freeze_observers(model)
                observers_frozen = True
            if on_epoch_start is not None:
                on_epoch_start(epoch, model)
            forward = model
            if compile and all(q.compiles_in_training for _, q in quantizers(model)):
                compiled = compiled if compiled is not None else torch.compile(model)
                forward = compiled
            train_loss, train_acc, lr_used, lr_max = _train_epoch(
                forward, train_loader, opt, sched, loss_fn, device, steps, epoch, progress, teacher, distill
            )
            val = _NO_VAL if val_loader is None else evaluate(model, val_loader, device, loss_fn)
            values = (epoch + 1, train_loss, train_acc, val["loss"], val["acc"], lr_used, lr_max)
            values += (bn_frozen, observers_frozen, time.perf_counter() - start)
            row = dict(zip(HISTORY_COLUMNS, values, strict=True))
            if on_epoch_end is not None:
                on_epoch_end(epoch, model, row)
            rows.append(row)
            bar.set_postfix(train_loss=f"{train_loss:.4f}", val_acc=f"{val['acc']:.4f}", refresh=False)
    except KeyboardInterrupt:
        warnings.warn(
            f"fit interrupted during epoch {len(rows) + 1}; returning the history of the {len(rows)} "
            "finished epoch(s); the model keeps the weights of its last step (call fit again to go on).",
            stacklevel=2,
        )
    finally:
        bar.close()
        for module, mode in teacher_modes:  # flags set directly, as in evaluate: per-module choices survive
            module.training = mode
    return pd.DataFrame(rows, columns=list(HISTORY_COLUMNS))
