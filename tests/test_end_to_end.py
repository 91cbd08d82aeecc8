"""End to end on sklearn digits: FP32 training, W8A8 PTQ ~ free, W4A4 QAT beats W4A4 PTQ."""

import pytest
import torch

import qatlab
from qatlab import QATConfig, QuantSpec
from qatlab.data import digits_loaders
from qatlab.models import build_model

W4A4 = QATConfig(
    weight=QuantSpec(bits=4, symmetric=True),  # per tensor, BN folded: the hard case for PTQ
    activation=QuantSpec(bits=4, observer="minmax"),
    bn_mode="fold",
)


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the same numbers on every machine with this torch build
    yield
    torch.set_num_threads(before)


def _run(seed):
    train, test = digits_loaders(batch_size=64, seed=seed)
    torch.manual_seed(seed)
    model = build_model("cnn", width=8)
    qatlab.fit(model, train, epochs=6, lr=0.05, progress=False, seed=seed)
    r = {"fp32": qatlab.evaluate(model, test)}
    r["w8a8_ptq"] = qatlab.evaluate(qatlab.ptq(model, QATConfig(), train), test)
    r["w4a4_ptq"] = qatlab.evaluate(qatlab.ptq(model, W4A4, train), test)
    qat = qatlab.calibrate(qatlab.prepare_qat(model, W4A4), train)  # QAT starts from calibrated PTQ ranges
    hist = qatlab.fit(qat, train, epochs=3, lr=0.01, progress=False, seed=seed)
    r["w4a4_qat"] = qatlab.evaluate(qat, test)
    assert hist["train_loss"].iloc[-1] < hist["train_loss"].iloc[0]
    return r


# The claims are about the test loss (mean cross-entropy over the 450 test images): accuracy on 450 images moves in
# steps of 0.22 points, and one image decided whether "4-bit PTQ costs accuracy" held (a float model trained on
# another CPU lost 0.22 points where 0.5 was demanded). Measured on seeds 0-7 (x86-64 with AVX-512 VNNI): W8A8 PTQ
# loss within 1.5% of FP32; W4A4 PTQ loss 1.08-1.29x FP32's; W4A4 QAT loss 0.64-0.83x W4A4 PTQ's, while QAT's
# accuracy was below PTQ's on 2 of the 8 seeds. The bounds below leave margins beyond those spreads.
@pytest.mark.parametrize("seed", [0, 1])
def test_fp32_ptq_qat(one_thread, seed):
    r = _run(seed)
    loss = {k: v["loss"] for k, v in r.items()}
    assert r["fp32"]["acc"] > 0.94, r
    # 8-bit PTQ is almost free (Krishnamoorthi 2018, Table 4)
    assert abs(loss["w8a8_ptq"] - loss["fp32"]) <= 0.05 * loss["fp32"], r
    assert abs(r["w8a8_ptq"]["acc"] - r["fp32"]["acc"]) <= 0.01, r
    assert loss["w4a4_ptq"] >= 1.03 * loss["fp32"], r  # 4-bit PTQ costs
    assert loss["w4a4_qat"] <= 0.93 * loss["w4a4_ptq"], r  # and QAT wins it back
