"""analysis.py and experiments.py: per-layer tensors, SQNR tables, PTQ sweeps and QAT runs on digits."""

import math

import pytest
import torch

import qatlab
from qatlab import QATConfig, QuantSpec, analysis, experiments
from qatlab.data import digits_loaders
from qatlab.models import build_model
from qatlab.modules import fold_bn


@pytest.fixture(scope="module")
def setup():
    train, test = digits_loaders(batch_size=64, seed=0)
    torch.manual_seed(0)
    model = build_model("cnn", width=8)
    qatlab.fit(model, train, epochs=2, lr=0.05, progress=False)
    return model.eval(), train, test


def test_layer_weights_are_folded(setup):
    model, _, _ = setup
    w = analysis.layer_weights(model)
    assert list(w) == ["features.0", "features.3", "features.6", "features.9", "classifier"]
    expect, _ = fold_bn(model.features[0].weight, None, model.features[1])
    torch.testing.assert_close(w["features.0"], expect.detach())
    raw = analysis.layer_weights(model, fold_bn=False)
    assert torch.equal(raw["features.0"], model.features[0].weight.detach())


def test_layer_inputs_are_the_inputs(setup):
    model, _, test = setup
    acts = analysis.layer_inputs(model, test, num_batches=2)  # test loader: no shuffling
    first_two = torch.cat([x for _, (x, _) in zip(range(2), test, strict=False)])
    assert torch.equal(acts["features.0"], first_two)  # the first conv sees the images
    assert acts["classifier"].shape == (first_two.shape[0], 32)
    assert (acts["features.3"] >= 0).all()  # after ReLU


def test_sqnr_table_and_clipped_fraction():
    x = torch.tensor([0.0, 1.0, 2.0, 3.0, 100.0])
    spec = QuantSpec(bits=2, observer="minmax")  # grid 0, 33.3, 66.7, 100
    table = analysis.sqnr_table({"t": x}, {"mm": spec})
    x_hat, scale, zp = analysis.quantize_tensor(x, spec)
    assert table["sqnr_db"][0] == pytest.approx(qatlab.sqnr(x, x_hat))
    assert table["clipped_frac"][0] == 0.0  # min-max never clips
    # a range [0, 1.5] (scale 0.5): values 3 and 100 are beyond 1.5 + 0.25: clipped; 2.0 too
    frac = analysis.clipped_fraction(x, torch.tensor([0.5]), torch.tensor([0], dtype=torch.int32), spec)
    assert frac == pytest.approx(3 / 5)


def test_ptq_sweep_matches_evaluate(setup):
    model, train, test = setup
    cfgs = {
        "W8A8": QATConfig(),
        "W2A2": QATConfig(weight=QuantSpec(bits=2, symmetric=True), activation=QuantSpec(bits=2)),
    }
    calib = [b for _, b in zip(range(4), train, strict=False)]  # fixed batches: the loader reshuffles
    df = experiments.ptq_sweep(model, calib, test, cfgs, calib_batches=4, progress=False, seed=7)
    assert list(df["config"]) == ["W8A8", "W2A2"] and (df["seed"] == 7).all()
    direct = qatlab.evaluate(qatlab.ptq(model, cfgs["W8A8"], calib), test)["acc"]
    assert df["acc"][0] == pytest.approx(direct)
    assert df["output_sqnr_db"][0] > df["output_sqnr_db"][1] + 12  # 6 bits fewer: much noisier logits
    assert df["acc"][0] > df["acc"][1]


def test_qat_run_row(setup):
    model, train, test = setup
    cfg = QATConfig(weight=QuantSpec(bits=4, symmetric=True), activation=QuantSpec(bits=4))
    r = experiments.qat_run(model, cfg, train, test, steps=10, lr=0.01, seed=3, arm="x")
    assert r["arm"] == "x" and r["seed"] == 3 and len(r["history"]) == 1
    assert r["acc"] == pytest.approx(qatlab.evaluate(r["model"], test)["acc"])
    assert 0 < r["ptq_acc"] <= 1
    raw = experiments.qat_run(model, cfg, train, test, steps=10, lr=0.01, calibrated=False)
    assert math.isnan(raw["ptq_acc"]) and 0 < raw["acc"] <= 1


def test_qat_run_validates_on_the_held_out_split(setup):
    """With val_loader, every epoch is scored on it and ``acc`` on the test loader alone, after training."""
    from qatlab.data import reseed, validation_split

    model, train, test = setup
    val, rest = validation_split(test, 150, seed=0)
    cfg = QATConfig(weight=QuantSpec(bits=4, symmetric=True), activation=QuantSpec(bits=4))
    r = experiments.qat_run(model, cfg, train, rest, steps=8, lr=0.01, seed=1, epochs=2, val_loader=val)
    assert len(r["history"]) == 2
    assert r["val_acc"] == r["history"]["val_acc"].iloc[-1] == qatlab.accuracy(r["model"], val)
    assert r["acc"] == qatlab.accuracy(r["model"], rest)
    # without val_loader, each epoch is validated on the test loader itself
    same = experiments.qat_run(model, cfg, train, rest, steps=8, lr=0.01, seed=1, epochs=2)
    assert same["acc"] == r["acc"] and same["history"]["val_acc"].iloc[-1] == r["acc"]
    assert "val_acc" not in same and "ptq_val_acc" not in same
    reseed(train, 1)  # qat_run calibrates on 8 batches of the train loader reseeded with its seed
    ptq = qatlab.calibrate(qatlab.prepare_qat(model, cfg), train, num_batches=8)
    assert r["ptq_val_acc"] == qatlab.accuracy(ptq, val) and r["ptq_acc"] == qatlab.accuracy(ptq, rest)


def test_qat_run_does_not_depend_on_what_ran_before(setup):
    """The train loader's shuffle generator advances with every pass; qat_run reseeds it (calibration and fit)."""
    model, train, test = setup
    cfg = QATConfig(weight=QuantSpec(bits=4, symmetric=True), activation=QuantSpec(bits=4))
    a = experiments.qat_run(model, cfg, train, test, steps=5, lr=0.01, calib_batches=2, seed=1)
    for _ in train:  # advance the loader's generator, as any other run would
        pass
    b = experiments.qat_run(model, cfg, train, test, steps=5, lr=0.01, calib_batches=2, seed=1)
    assert a["ptq_acc"] == b["ptq_acc"] and a["acc"] == b["acc"]
    for (name, pa), pb in zip(a["model"].state_dict().items(), b["model"].state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name


def test_qat_run_hooks_equal_the_hand_written_run(setup):
    """calib_loader, prepare, wrap, validate=False and test_loader=None give the numbers of the run written out
    by hand (prepare, calibrate on fixed batches, fit, evaluate), as notebooks 03/05 and distributed.run used."""
    model, train, test = setup
    cfg = QATConfig(weight=QuantSpec(bits=4, symmetric=True), activation=QuantSpec(bits=4, ste="lsq"))
    calib = [b for b, _ in zip(train, range(3), strict=False)]
    prepared, wrapped = [], []

    def prepare(m, c):
        prepared.append(c)
        return qatlab.prepare_qat(m, c)

    def wrap(q):
        wrapped.append(q)
        return q

    r = experiments.qat_run(model, cfg, train, test, steps=6, lr=0.01, calib_loader=calib, calib_batches=3,
                            seed=2, prepare=prepare, wrap=wrap, validate=False)  # fmt: skip
    assert prepared == [cfg] and wrapped == [r["model"]]
    assert r["history"]["val_acc"].isna().all()  # validate=False: no evaluation per epoch
    by_hand = qatlab.calibrate(qatlab.prepare_qat(model, cfg), calib)
    assert r["ptq_acc"] == qatlab.accuracy(by_hand, test)
    qatlab.fit(by_hand, train, lr=0.01, max_steps_per_epoch=6, seed=2, progress=False)
    assert r["acc"] == qatlab.accuracy(by_hand, test) == qatlab.evaluate(by_hand, test)["acc"]
    for (name, pa), pb in zip(r["model"].state_dict().items(), by_hand.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    silent = experiments.qat_run(model, cfg, train, None, steps=2, lr=0.01, calib_batches=2)
    assert math.isnan(silent["ptq_acc"]) and math.isnan(silent["acc"]) and len(silent["history"]) == 1


def test_one_thread_restores_the_thread_count():
    before = torch.get_num_threads()
    with experiments.one_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_layer_kind():
    assert analysis.layer_kind(torch.nn.Linear(4, 2)) == "linear"
    assert analysis.layer_kind(torch.nn.Conv2d(4, 4, 3, groups=4)) == "depthwise"
    assert analysis.layer_kind(torch.nn.Conv2d(4, 8, 1)) == "pointwise"
    assert analysis.layer_kind(torch.nn.Conv2d(4, 8, 3)) == "full"
    qat = qatlab.prepare_qat(build_model("dwcnn"), QATConfig())
    kinds = {analysis.layer_kind(m) for m in qat.modules() if hasattr(m, "weight_quant")}
    assert kinds == {"depthwise", "pointwise", "full", "linear"}


@pytest.mark.parametrize("observer", ["ema", "percentile"])
def test_layer_sensitivity_equals_one_ptq_per_layer(observer):
    """One shared calibration gives each layer exactly what its own PTQ (every other layer float) gives."""
    from dataclasses import replace

    from qatlab.data import reseed

    torch.manual_seed(0)
    model = build_model("cnn", in_channels=1, width=8).eval()
    calib = [(torch.randn(16, 1, 12, 12), torch.randint(0, 10, (16,))) for _ in range(3)]
    test = [(torch.randn(32, 1, 12, 12), torch.randint(0, 10, (32,))) for _ in range(2)]
    cfg = QATConfig(weight=QuantSpec(bits=4, symmetric=True, per_channel=True, observer=observer),
                    activation=QuantSpec(bits=4, observer=observer))  # fmt: skip
    df = experiments.layer_sensitivity(model, cfg, calib, test, calib_batches=2, progress=False)
    names = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert sorted(df["layer"]) == sorted(names)
    ref = torch.cat([model(x) for x, _ in test])
    for name in names:
        reseed(calib, 0)
        one = replace(cfg, keep=tuple(n for n in names if n != name))
        q = qatlab.ptq(model, one, calib, num_batches=2)
        with torch.no_grad():
            out = torch.cat([q(x) for x, _ in test])
        row = df.set_index("layer").loc[name]
        # upstream Conv+BN compute folded while calibrating: ranges agree to float rounding, not bit for bit
        assert row["output_sqnr_db"] == pytest.approx(qatlab.quant.sqnr(ref.detach(), out), rel=1e-5)
        assert row["acc"] == pytest.approx(
            float((out.argmax(1) == torch.cat([y for _, y in test])).float().mean())
        )


def test_recovery_share_and_its_noise_floor():
    """(QAT - PTQ) / (FP32 - PTQ) per arm, by hand; no share where PTQ lost under 3 standard errors; the verdict on
    QAT vs PTQ comes from the seeds (paired); a per-row FP32 column works as a single accuracy does."""
    import pandas as pd

    runs = pd.DataFrame(
        {
            "arm": ["a", "a", "a", "b", "b", "b"],
            "seed": [0, 1, 2, 0, 1, 2],
            "ptq_acc": [0.80, 0.82, 0.81, 0.899, 0.900, 0.901],
            "acc": [0.86, 0.87, 0.85, 0.899, 0.901, 0.900],
        }
    )
    rec = experiments.recovery(runs, 0.90, n_test=10_000).set_index("arm")
    # a: PTQ lost 9 points (mean 0.81), QAT won back 5 of them
    assert rec.loc["a", "ptq_drop"] == pytest.approx(9.0) and rec.loc["a", "recovered"] == pytest.approx(
        5 / 9
    )
    assert rec.loc["a", "qat_vs_ptq"] == "held" and rec.loc["a", "qat_gain"] == pytest.approx(5.0)
    # b: 0 points lost, under 3 standard errors (0.9 points at 10,000 examples): nothing to recover
    assert math.isnan(rec.loc["b", "recovered"]) and "3 standard errors (0.90 points)" in rec.loc["b", "note"]
    per_row = experiments.recovery(runs.assign(fp32_acc=0.90), None, n_test=10_000)
    assert per_row["recovered"].equals(rec.reset_index()["recovered"])
    with pytest.raises(ValueError, match="fp32_acc"):
        experiments.recovery(runs, None, n_test=100)
