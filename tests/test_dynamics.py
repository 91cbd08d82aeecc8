"""QAT dynamics recorders on hand-built cases with known answers, and on a short fit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qatlab
from qatlab import QATConfig, QuantSpec, dynamics
from qatlab.data import digits_loaders
from qatlab.models import build_model


def _linear_qat(w: torch.Tensor, act: QuantSpec | None = None) -> nn.Module:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    cfg = QATConfig(weight=QuantSpec(bits=4, symmetric=True), activation=act)
    return qatlab.prepare_qat(nn.Sequential(lin), cfg)


def test_flip_counter_counts_codes_that_cross_a_threshold():
    # 4-bit symmetric per tensor, max |w| = 7 -> scale 1: codes are round(w)
    w = torch.tensor([[0.4, 1.4, 2.6, -7.0], [3.2, -0.6, 5.5, 7.0]])
    qat = _linear_qat(w).train()
    x = torch.ones(2, 4)
    with dynamics.record(qat) as rec:
        qat(x)
        with torch.no_grad():  # move 3 weights across a threshold and 2 within their bucket
            qat[0].weight[0, 0] = 0.6  # 0 -> 1
            qat[0].weight[0, 1] = 1.45  # stays 1
            qat[0].weight[1, 0] = 3.6  # 3 -> 4
            qat[0].weight[1, 1] = -0.4  # -1 -> 0
            qat[0].weight[1, 2] = 5.6  # 6 -> 6 (5.5 rounds half to even: 6)
        qat[0].weight_quant.observer_enabled = False  # keep scale 1
        qat(x)
        with torch.no_grad():
            qat[0].weight[0, 0] = 0.4  # back: 1 -> 0, the same element flips twice
        qat(x)
    flips = rec.flips()
    assert list(flips["step"]) == [2, 3]
    assert flips["flipped"].tolist() == pytest.approx([3 / 8, 1 / 8])
    osc = rec.oscillation().iloc[0]
    assert osc["steps"] == 2 and osc["flips_per_step"] == pytest.approx(4 / 8 / 2)
    assert osc["oscillating"] == pytest.approx(1 / 8)  # only w[0,0] went back and forth


def test_clip_fraction_recorder():
    w = torch.tensor([[1.0, -1.0], [0.5, 0.25]])
    act = QuantSpec(bits=8, observer="minmax")
    qat = _linear_qat(w, act)
    qatlab.calibrate(qat, [torch.tensor([[0.0, 1.0]])])  # activation range [0, 1]
    qatlab.freeze_observers(qat)
    qat.train()
    x = torch.tensor(
        [[-0.5, 0.5], [2.0, 0.9], [0.1, 3.0], [0.2, 0.3]]
    )  # 3 of 8 beyond [0, 1] by > half a step
    with dynamics.record(qat) as rec:
        qat(x)
        qat.eval()(x)  # an eval pass records nothing
    clip = rec.clipping().set_index("kind")["clipped"]
    assert clip["activation"] == pytest.approx(3 / 8) and clip["weight"] == 0.0
    assert rec.clipping()["step"].tolist() == [1, 1]


def test_scales_and_bn_drift_on_a_short_fit():
    train, _ = digits_loaders(batch_size=32, seed=0)
    torch.manual_seed(0)
    model = build_model("cnn", width=8)
    cfg = QATConfig(weight=QuantSpec(bits=4, symmetric=True, per_channel=True, ste="lsq"),
                    activation=QuantSpec(bits=4, ste="lsq"))  # fmt: skip
    qat = qatlab.calibrate(qatlab.prepare_qat(model, cfg), train, num_batches=2)
    with dynamics.record(qat) as rec:
        qatlab.fit(qat, train, epochs=1, lr=0.02, max_steps_per_epoch=6, progress=False)
    assert rec.step == 6
    scales = rec.scales()
    assert set(scales["step"]) == set(range(1, 7)) and scales.groupby("layer")["scale"].nunique().max() > 1
    drift = rec.bn_drift()
    assert len(drift) == 6 * drift["layer"].nunique() and drift["layer"].nunique() == 4
    first, last = drift[drift["step"] == 1], drift[drift["step"] == 6]
    assert (last["mean_drift"].to_numpy() > first["mean_drift"].to_numpy()).all()  # running stats moved on
    assert len(rec.flips()) == 5 * rec.flips()["layer"].nunique()  # flips from the second step on
    # hooks are gone after the block
    qatlab.fit(qat, train, epochs=1, lr=0.02, max_steps_per_epoch=2, progress=False)
    assert rec.step == 6
    with pytest.raises(ValueError, match="no FakeQuantizers"):
        dynamics.record(model)
