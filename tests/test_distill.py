"""Tests for quantization-aware distillation: qatlab.train.Distill and fit(..., teacher=, distill=)."""

from __future__ import annotations

import copy
import dataclasses

import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import qatlab
from qatlab.train import HISTORY_COLUMNS, Distill, evaluate, fit

BATCH = 64


def loaders(digit_sets) -> tuple[DataLoader, DataLoader]:
    train, test = digit_sets
    gen = torch.Generator().manual_seed(0)
    return DataLoader(train, batch_size=BATCH, shuffle=True, generator=gen), DataLoader(test, batch_size=512)


def mlp(seed: int = 0, out: int = 10) -> nn.Sequential:
    """No BatchNorm or dropout: train and eval mode compute the same logits."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, out))


def bn_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))


@pytest.fixture(scope="module")
def trained_teacher(digit_sets) -> nn.Sequential:
    teacher = bn_model(seed=3)
    fit(teacher, loaders(digit_sets)[0], epochs=1, lr=0.1, progress=False)
    return teacher


def kl_reference(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t / T) || softmax(s / T)) averaged over the batch, with explicit softmax and log in float64."""
    s, t = student.double() / temperature, teacher.double() / temperature
    p_s = torch.exp(s) / torch.exp(s).sum(dim=1, keepdim=True)
    p_t = torch.exp(t) / torch.exp(t).sum(dim=1, keepdim=True)
    return (p_t * (torch.log(p_t) - torch.log(p_s))).sum() / len(s)


def ce_reference(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    z = logits.double()
    log_p = z - torch.log(torch.exp(z).sum(dim=1, keepdim=True))
    return -log_p[torch.arange(len(z)), targets].mean()


def kl_to_teacher(student: nn.Module, teacher: nn.Module, loader: DataLoader) -> float:
    """KL(teacher || student) at T=1 over the whole loader, both in eval mode (their flags restored after)."""
    modes = [(m, m.training) for net in (student, teacher) for m in net.modules()]
    student.eval(), teacher.eval()
    with torch.no_grad():
        x = torch.cat([batch[0] for batch in loader])
        value = kl_reference(student(x), teacher(x), 1.0).item()
    for module, mode in modes:
        module.training = mode
    return value


@pytest.fixture
def logits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    s = 3 * torch.randn(6, 7, generator=gen)
    t = 3 * torch.randn(6, 7, generator=gen)
    y = torch.randint(0, 7, (6,), generator=gen)
    return s, t, y


# --- Distill.loss against hand-computed references ---


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.5])
def test_loss_alpha1_is_t_squared_times_kl(logits, temperature):
    s, t, y = logits
    expected = temperature**2 * kl_reference(s, t, temperature)
    assert expected > 0.1  # the distributions differ: the check is not 0 == 0
    loss = Distill(temperature=temperature, alpha=1.0).loss(s, t, y, None)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss64 = Distill(temperature=temperature, alpha=1.0).loss(s.double(), t.double(), y, None)
    assert loss64.item() == pytest.approx(expected.item(), rel=1e-12)


def test_loss_alpha0_is_the_label_loss(logits):
    s, t, y = logits
    loss = Distill(temperature=2.0, alpha=0.0).loss(s.double(), t.double(), y, nn.CrossEntropyLoss())
    assert loss.item() == pytest.approx(ce_reference(s, y).item(), rel=1e-12)
    assert Distill(alpha=0.0).loss(s, t, y, None).item() == pytest.approx(ce_reference(s, y).item(), rel=1e-6)


def test_loss_alpha_half_mixes_both_terms(logits):
    s, t, y = logits
    d = Distill(temperature=2.0, alpha=0.5)
    expected = 0.5 * 4.0 * kl_reference(s, t, 2.0) + 0.5 * ce_reference(s, y)
    assert d.loss(s.double(), t.double(), y, None).item() == pytest.approx(expected.item(), rel=1e-12)
    # label_loss_fn is the one given: a constant 3 contributes 0.5 * 3.
    constant = d.loss(
        s.double(), t.double(), y, lambda logits, targets: torch.tensor(3.0, dtype=torch.float64)
    )
    assert constant.item() == pytest.approx((0.5 * 4.0 * kl_reference(s, t, 2.0) + 1.5).item(), rel=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_loss_gradient_is_softmax_difference(logits, temperature):
    # d/ds T^2 KL(softmax(t/T) || softmax(s/T)) / B = T * (softmax(s/T) - softmax(t/T)) / B  (T=1: p_s - p_t)
    s, t, y = (v.double() for v in logits)
    s.requires_grad_(True)
    t.requires_grad_(True)
    Distill(temperature=temperature, alpha=1.0).loss(s, t, y.long(), None).backward()
    expected = temperature * (torch.softmax(s / temperature, 1) - torch.softmax(t / temperature, 1)) / len(s)
    torch.testing.assert_close(s.grad, expected.detach(), rtol=1e-10, atol=1e-12)
    assert t.grad is None  # the teacher is a target, not a parameter


def test_loss_of_identical_logits_is_zero(logits):
    s, _, y = logits
    assert Distill(temperature=2.0).loss(s, s.clone(), y, None).item() == 0.0


# --- fit with a teacher ---


def test_fit_with_identical_teacher_has_zero_train_loss(digit_sets):
    train_loader, test_loader = loaders(digit_sets)
    student = mlp()
    teacher = copy.deepcopy(student)
    history = fit(
        student, train_loader, epochs=1, lr=1e-9, teacher=teacher, max_steps_per_epoch=1,
        val_loader=test_loader, progress=False,
    )  # fmt: skip
    assert list(history.columns) == list(HISTORY_COLUMNS)
    assert history["train_loss"].iloc[0] == pytest.approx(0.0, abs=1e-7)
    # Validation stays the plain label loss (cross entropy), not the distillation loss.
    assert history["val_loss"].iloc[0] == pytest.approx(evaluate(student, test_loader)["loss"], rel=1e-12)
    assert history["val_loss"].iloc[0] > 1.0  # an untrained 10-class model: CE near log(10)


def test_fit_with_alpha0_teacher_matches_plain_fit_exactly(digit_sets):
    def run(**kwargs) -> tuple[pd.DataFrame, dict[str, torch.Tensor]]:
        train_loader, test_loader = loaders(digit_sets)
        model = mlp()
        h = fit(model, train_loader, epochs=2, lr=0.05, val_loader=test_loader, max_steps_per_epoch=8,
                progress=False, **kwargs)  # fmt: skip
        return h.drop(columns="time_s"), model.state_dict()

    h_plain, w_plain = run()
    h_teacher, w_teacher = run(teacher=mlp(seed=5), distill=Distill(alpha=0.0))
    pd.testing.assert_frame_equal(h_plain, h_teacher, check_exact=True)
    assert all(torch.equal(w_plain[k], w_teacher[k]) for k in w_plain)


def test_fit_moves_student_towards_teacher_and_leaves_teacher_alone(digit_sets, trained_teacher):
    train_loader, test_loader = loaders(digit_sets)
    teacher = copy.deepcopy(trained_teacher).train()
    teacher[2].eval()  # a per-module choice that fit must restore exactly
    before_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    modes_before = [m.training for m in teacher.modules()]
    student = mlp(seed=1)
    kl_before = kl_to_teacher(student, teacher, test_loader)

    history = fit(student, train_loader, epochs=1, lr=0.02, optimizer="adam", teacher=teacher,
                  distill=Distill(temperature=2.0), max_steps_per_epoch=30, progress=False)  # fmt: skip
    assert [m.training for m in teacher.modules()] == modes_before
    after_state = teacher.state_dict()
    assert all(torch.equal(before_state[k], after_state[k]) for k in before_state)  # BN buffers included
    assert all(p.grad is None for p in teacher.parameters())
    kl_after = kl_to_teacher(student, teacher, test_loader)
    assert kl_before > 0.5 and kl_after < 0.3 * kl_before, (kl_before, kl_after)  # measured: 0.76 -> 0.12
    assert history["train_acc"].iloc[0] > 0.3  # accuracy is still measured against the labels


def test_qad_on_a_qat_student_lowers_the_loss(digit_sets, trained_teacher):
    float_model = copy.deepcopy(trained_teacher).eval()
    qat = qatlab.prepare_qat(float_model, qatlab.QATConfig(weight=qatlab.QuantSpec(bits=3, symmetric=True)))
    x, y = next(iter(DataLoader(digit_sets[0], batch_size=256)))
    batch = [(x, y)]  # one fixed batch: each epoch is the same step, so the loss falls deterministically
    history = fit(qat, batch, epochs=6, lr=0.02, schedule="constant", teacher=float_model, progress=False)
    losses = history["train_loss"].tolist()
    assert losses[0] > 0.0
    assert losses[-1] < 0.8 * losses[0], losses  # measured: 0.1375 -> 0.0901
    assert not float_model.training  # the float model's eval mode is kept


def test_qad_with_default_qat_config_runs(digit_sets, trained_teacher):
    float_model = copy.deepcopy(trained_teacher)
    qat = qatlab.prepare_qat(float_model, qatlab.QATConfig())
    train_loader, test_loader = loaders(digit_sets)
    history = fit(qat, train_loader, epochs=3, lr=0.02, teacher=float_model, max_steps_per_epoch=5,
                  val_loader=test_loader, progress=False)  # fmt: skip
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    assert history["val_acc"].iloc[-1] > 0.8
    assert float_model.training  # mode restored


# --- errors ---


def test_distill_without_teacher_raises(digit_sets):
    with pytest.raises(ValueError, match=r"distill=.*needs a teacher.*teacher="):
        fit(mlp(), loaders(digit_sets)[0], distill=Distill(), progress=False)


def test_teacher_is_model_raises(digit_sets):
    model = mlp()
    with pytest.raises(ValueError, match=r"teacher is the model.*copy"):
        fit(model, loaders(digit_sets)[0], teacher=model, progress=False)


def test_teacher_sharing_parameters_raises(digit_sets):
    model = mlp()
    with pytest.raises(ValueError, match=r"teacher shares parameters.*deepcopy"):
        fit(model, loaders(digit_sets)[0], teacher=nn.Sequential(*model), progress=False)


def test_bad_teacher_or_distill_types_raise(digit_sets):
    with pytest.raises(TypeError, match="teacher must be an nn.Module"):
        fit(mlp(), loaders(digit_sets)[0], teacher=lambda x: x, progress=False)
    with pytest.raises(TypeError, match="distill must be"):
        fit(mlp(), loaders(digit_sets)[0], teacher=mlp(1), distill={"temperature": 2.0}, progress=False)


def test_teacher_shape_mismatch_raises_and_restores_mode(digit_sets):
    teacher = mlp(seed=1, out=5)
    with pytest.raises(ValueError, match=r"teacher's logits have shape \(64, 5\).*\(64, 10\)"):
        fit(mlp(), loaders(digit_sets)[0], teacher=teacher, progress=False)
    assert teacher.training
    with pytest.raises(ValueError, match=r"student_logits shape \(2, 3\).*teacher_logits shape \(2, 4\)"):
        Distill().loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), None)


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature_raises(value):
    with pytest.raises(ValueError, match=rf"temperature must be .* got {value}; pass e.g. temperature="):
        Distill(temperature=value)


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan")])
def test_bad_alpha_raises(value):
    with pytest.raises(ValueError, match=rf"alpha must be in \[0, 1\].* got {value}; pass e.g. alpha="):
        Distill(alpha=value)


@pytest.mark.parametrize("field", ["temperature", "alpha"])
def test_non_numeric_settings_raise_type_error(field):
    with pytest.raises(TypeError, match=rf"{field} must be a number"):
        Distill(**{field: "1"})
    with pytest.raises(TypeError, match=rf"{field} must be a number"):
        Distill(**{field: True})


def test_distill_is_frozen_and_exported():
    d = Distill(temperature=4, alpha=0.25)  # ints are fine
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.alpha = 0.5  # type: ignore[misc]
    assert qatlab.Distill is Distill and "Distill" in qatlab.__all__
    assert (Distill().temperature, Distill().alpha) == (2.0, 1.0)
