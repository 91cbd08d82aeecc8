"""Tests for qatlab.train: fit / evaluate on sklearn digits, LR schedule, freezing, recipes, errors."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.data import DataLoader, TensorDataset

from qatlab import train
from qatlab.train import HISTORY_COLUMNS, evaluate, fit, lr_at

BATCH = 64


def loaders(digit_sets) -> tuple[DataLoader, DataLoader]:
    train, test = digit_sets
    return DataLoader(train, batch_size=BATCH, shuffle=True), DataLoader(test, batch_size=128)


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))


def test_fit_learns_digits(digit_sets):
    train_loader, test_loader = loaders(digit_sets)
    model = make_model()
    history = fit(model, train_loader, epochs=3, lr=0.1, val_loader=test_loader, progress=False)
    assert list(history.columns) == list(HISTORY_COLUMNS)
    assert list(history["epoch"]) == [1, 2, 3]
    assert history["val_acc"].iloc[-1] > 0.85
    assert evaluate(model, test_loader)["acc"] == pytest.approx(history["val_acc"].iloc[-1])
    assert history["train_loss"].is_monotonic_decreasing
    assert history["train_loss"].iloc[-1] < 0.5 * history["train_loss"].iloc[0]
    assert not history["bn_frozen"].any() and not history["observers_frozen"].any()
    assert (history["time_s"] > 0).all()
    # cosine over 3 epochs: each epoch's largest LR is its first step's, the last step's is lower
    steps = len(train_loader)
    starts = [lr_at(e * steps, 3 * steps, 0, 0.1) for e in range(3)]
    ends = [lr_at((e + 1) * steps - 1, 3 * steps, 0, 0.1) for e in range(3)]
    assert history["lr_max"].tolist() == pytest.approx(starts) and history["lr"].tolist() == pytest.approx(
        ends
    )


def test_fit_without_val_loader_gives_nan(digit_sets):
    train_loader, _ = loaders(digit_sets)
    history = fit(make_model(), train_loader, epochs=1, progress=False, max_steps_per_epoch=3)
    assert math.isnan(history["val_loss"].iloc[0]) and math.isnan(history["val_acc"].iloc[0])


def test_same_seed_same_numbers_different_seed_different(digit_sets):
    def run(seed: int) -> tuple[pd.DataFrame, dict[str, torch.Tensor]]:
        train_loader, test_loader = loaders(digit_sets)
        model = make_model()
        h = fit(model, train_loader, epochs=2, lr=0.05, val_loader=test_loader, seed=seed, progress=False)
        return h.drop(columns="time_s"), model.state_dict()

    h1, w1 = run(seed=1)
    h2, w2 = run(seed=1)
    h3, w3 = run(seed=2)
    pd.testing.assert_frame_equal(h1, h2, check_exact=True)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert not h1["train_loss"].equals(h3["train_loss"])
    assert not torch.equal(w1["1.weight"], w3["1.weight"])


def test_lr_at_hand_computed_values():
    # 10 steps, 2 warm-up steps, lr 0.1: warm-up 0.05, 0.1; then cosine over 8 steps.
    assert lr_at(0, 10, 2, 0.1) == pytest.approx(0.05)
    assert lr_at(1, 10, 2, 0.1) == pytest.approx(0.1)
    assert lr_at(2, 10, 2, 0.1) == pytest.approx(0.1)
    assert lr_at(6, 10, 2, 0.1) == pytest.approx(0.05)  # half-way: cos(pi/2) = 0
    assert lr_at(9, 10, 2, 0.1) == pytest.approx(0.1 * 0.5 * (1 - math.cos(math.pi / 8)))  # 0.0038060
    assert lr_at(10, 10, 2, 0.1) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(0, 10, 2, 0.1, "constant") == pytest.approx(0.05)
    assert lr_at(7, 10, 2, 0.1, "constant") == 0.1
    assert lr_at(0, 10, 0, 0.1) == 0.1


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_fit_per_step_lrs_follow_lr_at(digit_sets, schedule):
    train_loader, _ = loaders(digit_sets)
    seen: list[float] = []
    # A global optimizer hook sees the LR each step of fit really used.
    handle = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: seen.append(opt.param_groups[0]["lr"])
    )
    try:
        fit(make_model(), train_loader, epochs=2, lr=0.2, warmup_epochs=0.5, schedule=schedule,
            max_steps_per_epoch=10, progress=False)  # fmt: skip
    finally:
        handle.remove()
    total, warmup = 20, 5
    assert seen == pytest.approx([lr_at(s, total, warmup, 0.2, schedule) for s in range(total)], rel=1e-12)
    assert seen[0] == pytest.approx(0.2 / 5) and seen[warmup - 1] == pytest.approx(0.2)  # warm-up reaches lr
    assert max(seen) == pytest.approx(0.2)
    if schedule == "cosine":
        assert seen[-1] == pytest.approx(0.2 * 0.5 * (1 - math.cos(math.pi / 15))) and seen[-1] < 0.003
    else:
        assert seen[warmup:] == [0.2] * (total - warmup)


def test_fit_lr_column_matches_schedule(digit_sets):
    train_loader, _ = loaders(digit_sets)
    steps = len(train_loader)  # 22 batches of 64 from 1400 samples
    history = fit(make_model(), train_loader, epochs=3, lr=0.1, warmup_epochs=0.5, progress=False)
    expected = [lr_at((e + 1) * steps - 1, 3 * steps, round(0.5 * steps), 0.1) for e in range(3)]
    assert list(history["lr"]) == pytest.approx(expected, rel=1e-12)
    assert history["lr"].iloc[-1] < 0.01  # cosine ends near 0
    constant = fit(make_model(), train_loader, epochs=2, lr=0.1, schedule="constant", progress=False)
    assert list(constant["lr"]) == pytest.approx([0.1, 0.1])


def test_freeze_epochs_called_once_at_epoch_start(digit_sets, monkeypatch):
    train_loader, _ = loaders(digit_sets)
    steps_done = [0]
    calls: list[tuple[str, int]] = []

    def counting_loss(logits, y):
        steps_done[0] += 1
        return nn.functional.cross_entropy(logits, y)

    monkeypatch.setattr(train, "freeze_bn_stats", lambda m: calls.append(("bn", steps_done[0])) or m)
    monkeypatch.setattr(train, "freeze_observers", lambda m: calls.append(("obs", steps_done[0])) or m)

    history = fit(
        make_model(), train_loader, epochs=4, freeze_bn_epoch=2, freeze_observer_epoch=0,
        max_steps_per_epoch=5, loss_fn=counting_loss, progress=False,
    )  # fmt: skip
    assert calls == [("obs", 0), ("bn", 10)]  # observers before any step, BN after 2 epochs of 5 steps
    assert list(history["bn_frozen"]) == [False, False, True, True]
    assert list(history["observers_frozen"]) == [True, True, True, True]
    calls.clear()
    fit(make_model(), train_loader, epochs=2, freeze_bn_epoch=5, max_steps_per_epoch=2, progress=False)
    assert calls == []  # a freeze epoch beyond the run never fires


def test_evaluate_matches_hand_count_and_restores_mode(digit_sets):
    _, test_loader = loaders(digit_sets)
    x, y = digit_sets[1].tensors
    model = make_model()
    fit(model, loaders(digit_sets)[0], lr=0.1, schedule="constant", max_steps_per_epoch=6, progress=False)
    model.eval()
    with torch.no_grad():
        logits = model(x)
    model.train()
    model[2].eval()  # a per-module choice that evaluate must keep
    result = evaluate(model, test_loader)
    assert result["n"] == len(y)
    correct = sum(int(p) == int(t) for p, t in zip(logits.argmax(1), y, strict=True))
    assert 0.3 < result["acc"] < 0.99  # partly trained, so the count is not trivially 0.1 or 1
    assert result["acc"] == correct / len(y)
    assert result["loss"] == pytest.approx(nn.functional.cross_entropy(logits, y).item(), rel=1e-5)
    assert model.training and not model[2].training and model[1].training
    model.eval()
    evaluate(model, test_loader)
    assert not any(m.training for m in model.modules())


def empty_loader() -> DataLoader:
    return DataLoader(TensorDataset(torch.zeros(0, 8, 8), torch.zeros(0, dtype=torch.long)), batch_size=4)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"lr": 0.0}, ValueError, r"lr must be a positive finite number, got 0\.0"),
        ({"lr": float("nan")}, ValueError, r"lr must be a positive finite number, got nan"),
        ({"epochs": 0}, ValueError, r"epochs must be >= 1, got 0"),
        ({"epochs": 1.5}, TypeError, r"epochs must be an int, got 1\.5"),
        ({"optimizer": "rmsprop"}, ValueError, r"optimizer='rmsprop' is not supported; choose one of 'sgd'"),
        ({"schedule": "step"}, ValueError, r"schedule='step' is not supported; choose one of 'cosine'"),
        ({"warmup_epochs": 3.0}, ValueError, r"warmup_epochs must be in \[0, epochs=1\], got 3\.0"),
        ({"freeze_bn_epoch": -1}, ValueError, r"freeze_bn_epoch must be >= 0, got -1"),
        ({"compile": "yes"}, ValueError, r"compile must be True or False"),
    ],
)
def test_fit_rejects_bad_arguments(digit_sets, kwargs, error, match):
    train_loader, _ = loaders(digit_sets)
    with pytest.raises(error, match=match):
        fit(make_model(), train_loader, progress=False, **kwargs)


def test_fit_accepts_numpy_ints(digit_sets):
    train_loader, _ = loaders(digit_sets)
    history = fit(
        make_model(), train_loader, epochs=np.int64(2), max_steps_per_epoch=np.int64(2), progress=False
    )
    assert list(history["epoch"]) == [1, 2]


def test_empty_loaders_raise():
    with pytest.raises(ValueError, match="train_loader has no batches"):
        fit(make_model(), empty_loader(), progress=False)
    with pytest.raises(ValueError, match="loader has no batches"):
        evaluate(make_model(), empty_loader())


class NaNOutput(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * float("nan")


def test_nan_loss_raises_floating_point_error(digit_sets):
    train_loader, _ = loaders(digit_sets)
    model = nn.Sequential(make_model(), NaNOutput())
    with pytest.raises(
        FloatingPointError, match=r"loss became nan at epoch 1 \(1-based\), step 1 .*lower lr"
    ):
        fit(model, train_loader, lr=0.1, progress=False)


def test_keyboard_interrupt_returns_finished_epochs(digit_sets):
    train_loader, _ = loaders(digit_sets)
    calls = [0]

    def interrupting_loss(logits, y):
        calls[0] += 1
        if calls[0] == 4:  # first step of the 2nd epoch (3 steps per epoch)
            raise KeyboardInterrupt
        return nn.functional.cross_entropy(logits, y)

    with pytest.warns(UserWarning, match=r"interrupted during epoch 2.*1 finished epoch"):
        history = fit(make_model(), train_loader, epochs=3, loss_fn=interrupting_loss, max_steps_per_epoch=3,
                      progress=False)  # fmt: skip
    assert list(history["epoch"]) == [1]
    assert list(history.columns) == list(HISTORY_COLUMNS)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fit_and_evaluate_on_cuda(digit_sets):
    train_loader, test_loader = loaders(digit_sets)
    model = make_model()
    history = fit(
        model, train_loader, epochs=2, lr=0.1, val_loader=test_loader, device="cuda", progress=False
    )
    assert next(model.parameters()).device.type == "cuda"
    assert history["val_acc"].iloc[-1] > 0.8
    assert evaluate(model, test_loader, device=torch.device("cuda"))["n"] == len(digit_sets[1])


def test_epoch_callbacks_see_each_epoch_and_can_update_the_row(digit_sets):
    train_loader, _ = loaders(digit_sets)
    model, calls = make_model(), []

    def start(epoch, m):
        assert m is model
        calls.append(("start", epoch, float(m[1].weight.detach().sum())))

    def end(epoch, m, row):
        calls.append(("end", epoch, row["epoch"]))
        row["train_loss"] = 123.0 + epoch  # e.g. a loss averaged over ranks

    history = fit(model, train_loader, epochs=2, lr=0.1, progress=False, max_steps_per_epoch=3,
                  on_epoch_start=start, on_epoch_end=end)  # fmt: skip
    assert [c[:2] for c in calls] == [("start", 0), ("end", 0), ("start", 1), ("end", 1)]
    assert [c[2] for c in calls if c[0] == "end"] == [1, 2]  # the 1-based epoch of the row
    assert calls[0][2] != calls[2][2]  # epoch 1 starts from the weights epoch 0 trained
    assert list(history["train_loss"]) == [123.0, 124.0]


def test_compiled_epochs_match_eager_and_wait_for_observers_that_cannot_compile(monkeypatch):
    """fit(compile=True) on the simulated-BN QAT CNN: with live moving-average observers it compiles from the
    first epoch, and the losses agree with eager ones up to float rounding; with percentile observers (which do
    not compile) it stays eager, bit for bit, until they freeze."""
    import qatlab
    from qatlab.data import digits_loaders, reseed
    from qatlab.models import build_model

    train_loader, _ = digits_loaders(batch_size=BATCH, seed=0)
    torch.manual_seed(0)
    float_model = build_model("cnn", width=8)
    fit(float_model, train_loader, epochs=1, lr=0.05, progress=False)
    compiled_models = []
    real_compile = torch.compile

    def recording_compile(model, *args, **kwargs):
        compiled_models.append(model)
        return real_compile(model, *args, **kwargs)

    monkeypatch.setattr(torch, "compile", recording_compile)

    def qat_fit(compile, observer, freeze_observer_epoch=None):
        cfg = qatlab.QATConfig(weight=qatlab.QuantSpec(bits=4, symmetric=True, per_channel=True),
                               activation=qatlab.QuantSpec(bits=4, observer=observer))  # fmt: skip
        reseed(train_loader, 0)  # the same calibration batches for every model
        qat = qatlab.calibrate(qatlab.prepare_qat(float_model, cfg), train_loader, num_batches=4)
        history = fit(qat, train_loader, epochs=3, lr=0.01, max_steps_per_epoch=10, compile=compile,
                      freeze_observer_epoch=freeze_observer_epoch, progress=False)  # fmt: skip
        return history["train_loss"].to_numpy(), qat

    eager, _ = qat_fit(False, "ema")
    compiled, qat = qat_fit(True, "ema")
    assert compiled_models == [qat]  # compiled once, from epoch 0, observers live
    np.testing.assert_allclose(compiled, eager, rtol=2e-3)  # float rounding only
    eager, _ = qat_fit(False, "percentile", freeze_observer_epoch=2)
    mixed, qat = qat_fit(True, "percentile", freeze_observer_epoch=2)
    assert compiled_models[1:] == [qat]  # compiled at epoch 2, once the percentile observers froze
    assert np.array_equal(mixed[:2], eager[:2])  # eager epochs: bit for bit
    np.testing.assert_allclose(mixed[2:], eager[2:], rtol=2e-3)
