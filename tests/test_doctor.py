"""The QAT doctor: every check flags its planted fault (naming the layer or the number), passes the healthy
model, and the fix it names brings the accuracy back. Everything on the sklearn digits (8x8), one torch thread."""

from __future__ import annotations

import copy
import dataclasses

import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import qatlab
from qatlab import QATConfig, QuantSpec, doctor, dynamics
from qatlab.config import lab_config
from qatlab.distributed import rank_state
from qatlab.experiments import one_thread
from qatlab.export import export_onnx
from qatlab.modules import QuantConvBn2d
from qatlab.prepare import reestimate_bn

W4A4 = QATConfig(weight=QuantSpec(bits=4, symmetric=True, per_channel=True), activation=QuantSpec(bits=4))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def digits(digits_cnn):
    return digits_cnn[1]


@pytest.fixture(scope="module")
def cnn(digits_cnn):
    return digits_cnn[0]


@pytest.fixture(scope="module")
def healthy(cnn, digits):
    """W4A4 PTQ with simulated Conv+BN (BN statistics present, frozen)."""
    return qatlab.ptq(cnn, W4A4, digits[0])


@pytest.fixture(scope="module")
def healthy_lsq(cnn, digits):
    """The lab's W4A4 QAT (LSQ activation scales), 2 epochs, BN frozen after the first."""
    qat = qatlab.calibrate(qatlab.prepare_qat(cnn, lab_config(4)), digits[0])
    qatlab.fit(qat, digits[0], epochs=2, lr=0.005, freeze_bn_epoch=1, progress=False)
    return qat.eval()


def _status(report: pd.DataFrame) -> dict[str, str]:
    return dict(zip(report["check"], report["status"], strict=True))


def _only(report: pd.DataFrame, check: str, status: str = "fail") -> pd.Series:
    """The row of ``check``, which has ``status``; every other check is not a fail."""
    st = _status(report)
    assert st[check] == status, report.to_string()
    others = {c: s for c, s in st.items() if c != check}
    assert "fail" not in others.values(), report.to_string()
    row = report.set_index("check").loc[check]
    assert row["fix"], "a flagged check names its fix"
    return row


def _acc(model, loader) -> float:
    return qatlab.evaluate(model, loader)["acc"]


# ------------------------------------------------------------------------------------------------ healthy


@pytest.mark.parametrize("which", ["healthy", "healthy_lsq"])
def test_healthy_models_get_no_fail(which, request, cnn, digits):
    model = request.getfixturevalue(which)
    report = doctor.diagnose(model, digits[1], float_model=cnn, train_batch_size=64)
    assert list(report.columns) == ["check", "status", "evidence", "fix", "layer"]
    assert set(report["status"]) <= {"ok"}, report.to_string()
    assert list(report["check"]) == ["mode", "activation_ranges", "bn_statistics", "bn_training", "bn_settings",
                                     "learned_scales", "responsible_layers", "convert_gap"]  # fmt: skip
    assert (report["fix"] == "").all()


def test_diagnose_changes_nothing(healthy_lsq, digits, cnn):
    model = copy.deepcopy(healthy_lsq).train()  # train mode: the doctor says so, and leaves it so
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: m.training for n, m in model.named_modules()}
    report = doctor.diagnose(model, digits[1], float_model=cnn)
    assert _status(report)["mode"] == "warn"
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    assert flags == {n: m.training for n, m in model.named_modules()}


def test_errors(cnn, healthy, digits):
    with pytest.raises(
        ValueError, match="model has no FakeQuantizers: diagnose a model from qatlab.prepare_qat"
    ):
        doctor.diagnose(cnn, digits[1])
    empty = DataLoader(TensorDataset(torch.zeros(0, 8, 8), torch.zeros(0, dtype=torch.long)), batch_size=8)
    with pytest.raises(ValueError, match="loader has no batches"):
        doctor.diagnose(healthy, empty)
    wrong = DataLoader(TensorDataset(torch.zeros(16, 3, 28), torch.zeros(16, dtype=torch.long)), batch_size=8)
    with pytest.raises(
        ValueError, match=r"the model cannot run loader's batches \(input shape \(8, 3, 28\)\)"
    ):
        doctor.diagnose(healthy, wrong)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        doctor.diagnose("model.pt", digits[1])
    with pytest.raises(ValueError, match="seeds needs 'QAT' and 'PTQ'"):
        doctor.diagnose(healthy, digits[1], seeds={"QAT": [0.9]})
    with pytest.raises(ValueError, match=r"seeds\['QAT'\] \(2\) and seeds\['PTQ'\] \(1\) need one accuracy"):
        doctor.diagnose(healthy, digits[1], seeds={"QAT": [0.9, 0.8], "PTQ": [0.9]})
    with pytest.raises(ValueError, match="sensitivity must be a qatlab.precision.sensitivity frame"):
        doctor.diagnose(healthy, digits[1], sensitivity=pd.DataFrame({"layer": ["features.0"], "x": [1.0]}))


# --------------------------------------------------------------------------------------------- planted faults


def test_bn_left_in_train_mode(cnn, digits):
    # pytorch PR #115715: Conv+BN layers left in train mode inside an eval model (a custom train() override); their
    # statistics are not frozen (a QAT model mid-training), so evaluation normalises with each batch's statistics
    healthy = qatlab.calibrate(qatlab.prepare_qat(cnn, W4A4), digits[0]).eval()
    model = copy.deepcopy(healthy)
    for m in model.modules():
        if isinstance(m, QuantConvBn2d):
            m.train()
    small = DataLoader(digits[1].dataset, batch_size=2)  # evaluation batches of 2: their statistics are noise
    acc_bad = _acc_as_is(copy.deepcopy(model), small)  # (on a copy: train mode also moves running statistics)
    row = _only(doctor.diagnose(model, digits[1]), "mode")
    assert row["layer"] == "features.0" and "4 BatchNorm layer(s) in train mode" in row["evidence"]
    assert "features.0, features.3, features.6, features.9" in row["evidence"]
    assert "model.eval()" in row["fix"]
    model.eval()  # the fix named
    assert _status(doctor.diagnose(model, digits[1]))["mode"] == "ok"
    assert _acc_as_is(model, small) == _acc(healthy, digits[1])
    assert acc_bad < _acc(healthy, digits[1]) - 0.1  # the fault cost accuracy (measured: 72% vs 97%)
    # the same flag on frozen statistics is harmless for evaluation: a warning, not a failure
    frozen = qatlab.freeze_bn_stats(copy.deepcopy(healthy))
    frozen.features[0].train()
    assert _status(doctor.diagnose(frozen, digits[1]))["mode"] == "warn"
    assert _acc_as_is(copy.deepcopy(frozen), small) == _acc(frozen, digits[1])


def _acc_as_is(model, loader) -> float:
    """Accuracy without qatlab.evaluate's model.eval(): how a user who forgot it would measure."""
    correct = n = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((model(x).argmax(1) == y).sum())
            n += len(y)
    return correct / n


def _scaled(loader, factor: float) -> DataLoader:
    x = torch.cat([b[0] for b in loader]) * factor
    y = torch.cat([b[1] for b in loader])
    return DataLoader(TensorDataset(x, y), batch_size=64)


def test_activation_ranges_calibrated_on_other_preprocessing(cnn, digits):
    # calibrated on images scaled to [0, 0.25] (another preprocessing), evaluated on [0, 1]
    model = qatlab.ptq(cnn, W4A4, _scaled(digits[0], 0.25))
    row = _only(doctor.diagnose(model, digits[1]), "activation_ranges")
    share = float(row["evidence"].split("%")[0])
    assert share > 100 * doctor.THRESHOLDS.clip_fail and row["layer"] in dict(model.named_modules())
    assert "recalibrate" in row["fix"]
    fixed = qatlab.ptq(cnn, W4A4, digits[0])  # the fix: calibrate on data preprocessed as for evaluation
    assert _status(doctor.diagnose(fixed, digits[1]))["activation_ranges"] == "ok"
    assert _acc(fixed, digits[1]) > _acc(model, digits[1]) + 0.05


def test_bn_statistics_learned_from_batches_of_one(cnn, digits):
    # QAT with batch 1 and BN statistics updating (momentum 0.1): the running statistics follow single images
    qat = qatlab.calibrate(qatlab.prepare_qat(cnn, W4A4), digits[0])
    ones = DataLoader(digits[0].dataset, batch_size=1, shuffle=True)
    qatlab.fit(qat, ones, epochs=1, lr=1e-9, max_steps_per_epoch=50, progress=False)  # lr ~0: only BN moves
    qat.eval()
    report = doctor.diagnose(qat, digits[1], train_batch_size=1)
    st = _status(report)
    assert st["bn_statistics"] == "fail" and st["bn_training"] == "fail", report.to_string()
    rows = report.set_index("check")
    assert rows.loc["bn_statistics", "layer"] in {
        n for n, m in qat.named_modules() if isinstance(m, QuantConvBn2d)
    }
    assert "batch std" in rows.loc["bn_statistics", "evidence"]
    assert "re-estimating them on this data lowers the loss by" in rows.loc["bn_statistics", "evidence"]
    assert "batches of 1" in rows.loc["bn_training", "evidence"]
    # the fix named: re-estimate BN statistics with larger batches, then freeze them
    reestimate_bn(qat, digits[0])
    qatlab.freeze_bn_stats(qat)
    qat.eval()
    st = _status(doctor.diagnose(qat, digits[1], train_batch_size=64))
    assert st["bn_statistics"] == "ok" and st["bn_training"] == "ok"


def test_bn_mismatch_the_weights_were_trained_through_is_left_alone(healthy, digits):
    # running variance x4 and gamma x2: BN computes exactly what it did (as if the weights had been trained
    # through these statistics), yet the statistics are 4x off the data's; re-estimating them would double
    # features.3's output, so the doctor leaves them (with labels to measure that), and flags them without labels
    model = copy.deepcopy(healthy)
    bn = model.features[3].bn
    with torch.no_grad():
        bn.running_var.add_(bn.eps).mul_(4.0).sub_(bn.eps)
        bn.weight.mul_(2.0)
    assert _acc(model, digits[1]) == _acc(healthy, digits[1])
    row = doctor.diagnose(model, digits[1]).set_index("check").loc["bn_statistics"]
    assert row["status"] == "ok" and row["layer"] == "features.3" and "leave them" in row["evidence"]
    assert "running variance 4." in row["evidence"] or "running variance 3.9" in row["evidence"]
    unlabelled = DataLoader(TensorDataset(digits[1].dataset.tensors[0]), batch_size=64)
    assert _status(doctor.diagnose(model, unlabelled))["bn_statistics"] == "fail"


def test_bn_statistics_that_cost_loss_without_a_large_mismatch(healthy, digits):
    # W4A4 PTQ on digits: statistics within 1.1x of the data's, and re-estimating them changes the loss by 0.002
    # nats (measured here; its sign may differ elsewhere): ok. Under a bar below that gain the same measurement is
    # a warning, naming the gain.
    ok = doctor.diagnose(healthy, digits[1]).set_index("check").loc["bn_statistics"]
    assert ok["status"] == "ok"
    said = ok["evidence"].split("re-estimating them on this data ")[1]
    value = float(said.split(" by ")[1].split(" nats")[0])
    gain = value if said.startswith("lowers") else -value
    assert abs(gain) < doctor.THRESHOLDS.bn_gain_warn
    strict = dataclasses.replace(doctor.THRESHOLDS, bn_gain_warn=gain - 0.01)
    row = doctor.diagnose(healthy, digits[1], thresholds=strict).set_index("check").loc["bn_statistics"]
    assert row["status"] == "warn" and f"lowers the loss by {gain:.3f}" in row["evidence"]
    assert "do not fit the quantized model" in row["evidence"] and "reestimate_bn" in row["fix"]


def test_bn_settings_reset_to_defaults(cnn, digits):
    # torchao#2980: the float model's BN has eps 1e-3 and momentum 0.01; the prepared model's were reset
    model = copy.deepcopy(cnn)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps, m.momentum = 1e-3, 0.01
    ptq = qatlab.ptq(model, W4A4, digits[0])
    assert _status(doctor.diagnose(ptq, digits[1], float_model=model))["bn_settings"] == "ok"
    bad = copy.deepcopy(ptq)
    convbn = [m for m in bad.modules() if isinstance(m, QuantConvBn2d)]
    convbn[1].bn.eps, convbn[1].bn.momentum = 1e-5, 0.1
    row = _only(doctor.diagnose(bad, digits[1], float_model=model), "bn_settings")
    assert "eps 1e-05 vs 0.001" in row["evidence"] and row["layer"] == "features.3"


@pytest.mark.parametrize("factor", [1e-3, 50.0])
def test_learned_scale_collapsed_or_exploded(healthy_lsq, digits, factor):
    model = copy.deepcopy(healthy_lsq)
    with torch.no_grad():
        model.features[3].input_quant.scale.mul_(factor)
    row = _only(doctor.diagnose(model, digits[1]), "learned_scales")
    assert row["layer"] == "features.3.input_quant"
    assert ("collapsed" if factor < 1 else "exploded") in row["evidence"]
    assert _acc(model, digits[1]) < _acc(healthy_lsq, digits[1])


def test_convert_gap_of_bn_keep_mode(cnn, digits):
    # bn_mode="keep" with per-tensor 3-bit weights: QAT quantizes the unfolded weight, deployment the folded one
    cfg = QATConfig(weight=QuantSpec(bits=3, symmetric=True), activation=QuantSpec(bits=8), bn_mode="keep")
    model = qatlab.ptq(cnn, cfg, digits[0])
    row = _only(doctor.diagnose(model, digits[1]), "convert_gap")
    assert "bn_mode 'keep'" in row["evidence"] and "simulate" in row["fix"]
    fixed = qatlab.ptq(cnn, dataclasses.replace(cfg, bn_mode="simulate"), digits[0])
    assert _status(doctor.diagnose(fixed, digits[1]))["convert_gap"] == "ok"


def test_deployment_stale_export(healthy, digits, tmp_path):
    x = next(iter(digits[1]))[0]
    path = export_onnx(healthy, tmp_path / "m.onnx", x[:1])
    ok = doctor.diagnose(healthy, digits[1], onnx_path=path, batches=1)
    assert _status(ok)["deployment"] in ("ok", "warn")  # warn: a layer at risk on CPUs without VNNI
    changed = copy.deepcopy(healthy)
    with torch.no_grad():
        changed.classifier.weight.mul_(-1.0)  # the model changed after export
    row = _only(doctor.diagnose(changed, digits[1], onnx_path=path, batches=1), "deployment")
    assert "reference evaluator" in row["evidence"] and "export again" in row["fix"]


def test_ddp_ranks_with_unsynced_observers(healthy):
    states = [rank_state(healthy), rank_state(healthy)]
    assert _status_of(doctor.check_ddp_ranks(states)) == "ok"
    bad = copy.deepcopy(states)
    key = next(k for k in bad[1] if k.endswith("input_quant.observer.max_val"))
    bad[1][key] = bad[1][key] + 0.5
    rows = doctor.check_ddp_ranks(bad)
    assert rows[0]["status"] == "fail" and key in rows[0]["evidence"] and "rank 1" in rows[0]["evidence"]
    assert "0.5" in rows[0]["evidence"] and "sync_observers" in rows[0]["fix"]


def _status_of(rows) -> str:
    assert len(rows) == 1
    return rows[0]["status"]


def test_noise_floor():
    held = doctor.check_noise_floor({"QAT": [0.90, 0.91, 0.92], "PTQ": [0.85, 0.86, 0.87]})
    assert _status_of(held) == "ok" and "+5.00 +- 0.00 points over 3 seeds" in held[0]["evidence"]
    noise = doctor.check_noise_floor({"QAT": [0.90, 0.86, 0.92], "PTQ": [0.88, 0.89, 0.88]})
    assert _status_of(noise) == "warn" and "more seeds" in noise[0]["fix"]
    worse = doctor.check_noise_floor({"QAT": [0.80, 0.81, 0.82], "PTQ": [0.85, 0.86, 0.87]})
    assert _status_of(worse) == "fail"


def _qat_recorded(cnn, digits, lr):
    qat = qatlab.calibrate(qatlab.prepare_qat(cnn, W4A4), digits[0])
    with dynamics.record(qat) as rec:
        hist = qatlab.fit(qat, digits[0], epochs=2, lr=lr, freeze_bn_epoch=1, progress=False)
    return qat.eval(), rec, hist


@pytest.fixture(scope="module")
def calm(cnn, digits):
    """W4A4 QAT at the lab's QAT LR (0.005), recorded: at most 7% of a layer's weights oscillate."""
    return _qat_recorded(cnn, digits, 0.005)


@pytest.mark.parametrize("lr, status", [(0.05, "warn"), (0.1, "fail")])
def test_oscillation_from_a_recorder(cnn, digits, calm, lr, status):
    # W4A4 QAT at 10x and 20x the lab's QAT LR: measured 26% and 43% of the first conv's weights flip back and forth
    bad, rec, hist = _qat_recorded(cnn, digits, lr)
    report = doctor.diagnose(bad, digits[1], dynamics=rec, history=hist, train_batch_size=64)
    if status == "fail":
        # at 20x the weights also move far under the BN statistics frozen after epoch 1: measured 2.05x off on
        # features.9, a second, true finding (re-estimating BN fixes that one), so it is left out of the "only"
        assert _status(report)["bn_statistics"] in ("ok", "fail")
        report = report[report["check"] != "bn_statistics"]
    row = _only(report, "oscillation", status=status)
    share = float(row["evidence"].split("%")[0]) / 100
    th = doctor.THRESHOLDS
    assert (
        th.oscillation_warn < share <= th.oscillation_fail
        if status == "warn"
        else share > th.oscillation_fail
    )
    assert row["layer"] in {"features.0", "features.3", "features.6", "features.9", "classifier"}
    assert "its median weight step" in row["evidence"] and "learning rate" in row["fix"]
    frame = doctor.check_oscillation(bad, rec.oscillation(), None, doctor.THRESHOLDS)
    assert frame[0]["status"] == status and frame[0]["layer"] == row["layer"]
    good, rec, hist = calm  # the fix named: a lower LR
    assert _status(doctor.diagnose(good, digits[1], dynamics=rec, history=hist))["oscillation"] == "ok"
    assert _acc(good, digits[1]) > _acc(bad, digits[1])
    with pytest.raises(ValueError, match="dynamics must be a qatlab.dynamics recorder"):
        doctor.diagnose(good, digits[1], dynamics={"x": [1]})


def _two_bit(layer: str) -> QATConfig:
    w8a8 = QATConfig(weight=QuantSpec(bits=8, symmetric=True, per_channel=True), activation=QuantSpec(bits=8))
    return dataclasses.replace(
        w8a8, overrides={layer: (QuantSpec(bits=2, symmetric=True), QuantSpec(bits=8))}
    )


@pytest.mark.parametrize("labels", [True, False])
def test_responsible_layers_names_the_two_bit_layer(cnn, digits, labels):
    # W8A8 with one layer's weights at 2 bits (a typo in an override): measured +0.67 nats, 14.5 points lost
    model = qatlab.ptq(cnn, _two_bit("features.3"), digits[0])
    loader = digits[1] if labels else DataLoader(TensorDataset(digits[1].dataset.tensors[0]), batch_size=64)
    row = _only(doctor.diagnose(model, loader), "responsible_layers", status="warn")
    assert row["layer"] == "features.3" and "features.3" in row["fix"]
    assert ("cross-entropy" if labels else "KL divergence from the float outputs") in row["evidence"]
    recovered = int(row["evidence"].split("of that gap: features.3 ")[1].split("%")[0])
    assert 90 <= recovered <= 110  # that layer alone carries the loss
    added = float(row["evidence"].split("quantization adds ")[1].split(" nats")[0])
    assert added > doctor.THRESHOLDS.blame_warn
    if labels:  # doctor.blame: the same measurement as a table, against qatlab.evaluate's loss by hand
        frame = doctor.blame(model, loader)
        assert frame["layer"].iloc[0] == "features.3" and frame["share"].iloc[0] == pytest.approx(
            recovered / 100, abs=0.01
        )
        batches = [b for _, b in zip(range(4), loader, strict=False)]
        by_hand = copy.deepcopy(model)
        loss_q = qatlab.evaluate(by_hand, batches)["loss"]
        qatlab.prepare.enable_fake_quant(by_hand.features[3], False)
        assert frame["recovered"].iloc[0] == pytest.approx(
            loss_q - qatlab.evaluate(by_hand, batches)["loss"], rel=1e-6
        )
        assert frame.attrs["loss_quantized"] == pytest.approx(loss_q, rel=1e-6)
    # the fix named: that layer at a higher precision (here the others' 8 bits)
    fixed = qatlab.ptq(cnn, dataclasses.replace(_two_bit("features.3"), overrides={}), digits[0])
    assert _status(doctor.diagnose(fixed, loader))["responsible_layers"] == "ok"
    assert _acc(fixed, digits[1]) > _acc(model, digits[1]) + 0.05


def test_responsible_layers_from_a_sensitivity_frame(healthy, digits):
    scores = pd.DataFrame({"candidate": ["W2A8"] * 3 + ["W4A4"] * 3, "layer": ["features.0", "features.6", "classifier"] * 2,
                           "acc_drop": [0.05, 0.20, 0.01, 0.01, 0.02, 0.30]})  # fmt: skip
    rows = doctor.check_responsible_layers(healthy, [next(iter(digits[1]))], "cpu", doctor.THRESHOLDS, scores)
    assert rows[0]["status"] == "ok"  # W4A4 PTQ adds little loss; the ranking is reported anyway
    assert "ranks by acc_drop: classifier (0.3), features.6 (0.2), features.0 (0.05)" in rows[0]["evidence"]
    assert rows[0]["layer"] == "classifier"
    sqnr = scores.drop(columns="acc_drop").assign(sqnr_db=[10.0, 3.0, 20.0, 12.0, 15.0, 30.0])
    rows = doctor.check_responsible_layers(healthy, [next(iter(digits[1]))], "cpu", doctor.THRESHOLDS, sqnr)
    assert "ranks by sqnr_db: features.6 (-3), features.0 (-10), classifier (-20)" in rows[0]["evidence"]


# ------------------------------------------------------------------------------------------------ saved runs


def _sweep_run(config, seed):
    # QAT 5 points over PTQ at 8 bits (a spread of 0.2 points), 5 points under at 2 bits
    ptq = 0.80 + 0.001 * seed
    return {"ptq_acc": ptq, "qat_acc": ptq + (0.05 if config["bits"] == 8 else -0.05) + 0.002 * (seed % 2)}


def test_doctor_command_on_an_ablate_sweep(tmp_path, capsys):
    from qatlab.ablate import ablate
    from qatlab.cli import main

    ablate({"bits": [8, 2]}, _sweep_run, tmp_path / "sweep", seeds=(0, 1, 2), workers=1, progress=False)
    report = doctor.diagnose_run(tmp_path / "sweep")
    assert list(report["check"]) == ["noise_floor"] * 2
    st = dict(zip(report["layer"], report["status"], strict=True))
    assert st == {"bits=8": "ok", "bits=2": "fail"}
    assert "over 3 seeds" in report["evidence"].iloc[0]
    assert main(["doctor", str(tmp_path / "sweep"), "--csv", str(tmp_path / "t.csv")]) == 1  # a fail: exit 1
    out = capsys.readouterr().out
    assert "noise_floor" in out and "bits=2" in out and "QAT is worse than PTQ" in out
    assert pd.read_csv(tmp_path / "t.csv")["status"].tolist() == report["status"].tolist()
    # bad input: not a directory, no saved run, runs without the metrics the check needs
    assert main(["doctor", str(tmp_path / "nowhere")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no saved run: expected run.json"):
        doctor.diagnose_run(tmp_path / "empty")
    ablate({"x": [1]}, lambda c, s: {"loss": 1.0}, tmp_path / "other", workers=1, progress=False)
    with pytest.raises(ValueError, match="the doctor needs 'ptq_acc' and 'qat_acc'"):
        doctor.diagnose_run(tmp_path / "other")
