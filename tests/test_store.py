"""The run store: a stored run reads back the identical numbers without being computed again, a change of any
field its numbers depend on misses, QATLAB_RECOMPUTE ignores it, and nothing half-written is ever read."""

from __future__ import annotations

import copy
import dataclasses

import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

import qatlab
from qatlab import QATConfig, QuantSpec, experiments, store
from qatlab.experiments import one_thread
from qatlab.store import RunStore

W4A4 = QATConfig(weight=QuantSpec(bits=4, symmetric=True, per_channel=True), activation=QuantSpec(bits=4))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture
def runs(tmp_path, monkeypatch):
    monkeypatch.delenv("QATLAB_RECOMPUTE", raising=False)
    return RunStore(tmp_path / "runs")


def _run(cnn, digits, runs, **changes):
    kwargs = dict(steps=5, lr=0.005, calib_batches=2, seed=0, validate=False, store=runs)
    kwargs.update(changes)
    return experiments.qat_run(cnn, kwargs.pop("config", W4A4), digits[0], digits[1], **kwargs)


def test_a_stored_run_reads_back_identical_numbers_without_training(digits_cnn, runs, monkeypatch):
    cnn, digits = digits_cnn
    first = _run(cnn, digits, runs)
    assert len(runs) == 1

    def no_training(*args, **kwargs):
        raise AssertionError("a stored run was computed again")

    monkeypatch.setattr(experiments, "fit", no_training)
    monkeypatch.setattr(experiments, "calibrate", no_training)
    again = _run(cnn, digits, runs)
    for k in ("ptq_acc", "acc", "seed", "seconds"):
        assert again[k] == first[k], k
    pd.testing.assert_frame_equal(again["history"], first["history"], check_exact=True)
    a, b = first["model"].state_dict(), again["model"].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the rebuilt model computes what the trained one computes, and is left as fit leaves it (train mode)
    assert again["model"].training and first["model"].training
    x = next(iter(digits[1]))[0]
    with torch.no_grad():
        assert torch.equal(first["model"].eval()(x), again["model"].eval()(x))
    assert qatlab.evaluate(again["model"], digits[1])["acc"] == first["acc"]


def test_a_stored_run_leaves_the_global_rng_where_the_run_left_it(digits_cnn, runs):
    cnn, digits = digits_cnn
    _run(cnn, digits, runs)
    after_computing = torch.rand(3)
    torch.manual_seed(123)  # elsewhere
    _run(cnn, digits, runs)  # read back
    assert torch.equal(torch.rand(3), after_computing)


def _subset(loader, n):
    return DataLoader(Subset(loader.dataset, range(n)), batch_size=loader.batch_size)


def _perturbed(cnn):
    m = copy.deepcopy(cnn)
    with torch.no_grad():
        m.classifier.weight[0, 0] += 1e-6
    return m


CHANGES = {
    "config": lambda cnn, d: {"config": dataclasses.replace(W4A4, weight=QuantSpec(bits=3, symmetric=True))},
    "seed": lambda cnn, d: {"seed": 1},
    "steps": lambda cnn, d: {"steps": 6},
    "lr": lambda cnn, d: {"lr": 0.0051},
    "calib_batches": lambda cnn, d: {"calib_batches": 3},
    "freeze_bn_epoch": lambda cnn, d: {"freeze_bn_epoch": 0},
    "model weights": lambda cnn, d: {"model": _perturbed(cnn)},
    "training data subset": lambda cnn, d: {"train_loader": _subset(d[0], 1000)},
    "test data subset": lambda cnn, d: {"test_loader": _subset(d[1], 300)},
}


def test_a_shuffling_calibration_loader_keys_its_order(digits_cnn, runs, monkeypatch):
    cnn, digits = digits_cnn
    x, y = digits[0].dataset.tensors
    calib = DataLoader(
        TensorDataset(x, y), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(5)
    )
    keys = []
    monkeypatch.setattr(runs, "get", lambda key, state=False: keys.append(key))
    monkeypatch.setattr(runs, "put", lambda *a, **k: None)
    for _ in range(2):
        _run(cnn, digits, runs, calib_loader=calib, steps=1)  # the first pass moves the generator
    assert keys[0] != keys[1]
    calib.generator.manual_seed(5)
    _run(cnn, digits, runs, calib_loader=calib, steps=1)
    assert keys[2] == keys[0]


def _key(runs, cnn, digits, **changes):
    args = dict(model=cnn, config=W4A4, train_loader=digits[0], test_loader=digits[1], steps=5, lr=0.005,
                calib_batches=2, seed=0, freeze_bn_epoch=None)  # fmt: skip
    args.update(changes)
    return runs.key("qat_run", **args)


@pytest.mark.parametrize("field", list(CHANGES))
def test_a_change_of_any_key_field_misses(digits_cnn, runs, field):
    cnn, digits = digits_cnn
    base = _key(runs, cnn, digits)
    assert _key(runs, cnn, digits) == base  # the same inputs, the same key
    assert _key(runs, cnn, digits, **CHANGES[field](cnn, digits)) != base


def test_a_changed_source_misses(digits_cnn, runs, monkeypatch):
    cnn, digits = digits_cnn
    base = _key(runs, cnn, digits)
    monkeypatch.setattr(store, "source_hash", lambda: "0" * 64)
    assert _key(runs, cnn, digits) != base


def test_source_hash_covers_number_code_not_figures():
    names = {p.stem for p in (store.Path(store.__file__).parent).glob("*.py")}
    assert {"quant", "train", "modules", "observers", "experiments"} <= names - store.PRESENTATION
    assert {"plot", "widgets", "runner"} <= store.PRESENTATION
    assert len(store.source_hash()) == 64


def test_an_identical_model_copy_and_an_equal_loader_hit(digits_cnn, runs):
    cnn, digits = digits_cnn
    base = _key(runs, cnn, digits)
    x, y = digits[0].dataset.tensors
    same = DataLoader(TensorDataset(x.clone(), y.clone()), batch_size=digits[0].batch_size, shuffle=True)
    assert _key(runs, copy.deepcopy(cnn), digits) == base
    assert _key(runs, cnn, (same, digits[1])) == base


def test_recompute_ignores_the_store(digits_cnn, runs, monkeypatch):
    cnn, digits = digits_cnn
    first = _run(cnn, digits, runs)
    monkeypatch.setenv("QATLAB_RECOMPUTE", "1")
    calls = []
    real_fit = experiments.fit
    monkeypatch.setattr(experiments, "fit", lambda *a, **k: calls.append(1) or real_fit(*a, **k))
    again = _run(cnn, digits, runs)
    assert calls == [1] and again["acc"] == first["acc"]  # computed again: the same numbers (one thread)


def test_nothing_half_written_is_read(runs, monkeypatch):
    key = runs.key("demo", x=1)

    def crash(obj, path):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        runs.put(key, {"acc": 0.5}, {"w": torch.ones(2)})
    assert runs.get(key) is None and len(runs) == 0
    assert not list(runs.root.rglob("*.tmp"))


def test_a_tensor_changed_in_place_gets_a_new_digest():
    t = torch.zeros(4)
    before = store.fingerprint(t)
    assert store.fingerprint(t) == before
    t[0] = 1.0
    assert store.fingerprint(t) != before and store.fingerprint(torch.ones(4)) != store.fingerprint(
        torch.zeros(4)
    )


def test_records_round_trip_exactly_and_bad_input(runs):
    key = runs.key("demo", x=2)
    hist = pd.DataFrame({"epoch": [1, 2], "loss": [0.1 + 0.2, 1 / 3], "frozen": [False, True]})
    runs.put(key, {"acc": 0.1 + 0.2, "nan": float("nan"), "history": hist}, {"w": torch.arange(3.0)})
    got = runs.get(key, state=True)
    assert got["acc"] == 0.1 + 0.2 and got["nan"] != got["nan"]
    pd.testing.assert_frame_equal(got["history"], hist, check_exact=True)
    assert torch.equal(got["state"]["w"], torch.arange(3.0))
    assert runs.get(runs.key("demo", x=3)) is None
    with pytest.raises(TypeError, match="cannot fingerprint a object"):
        runs.key("demo", thing=object())
    with pytest.raises(TypeError, match="not a lambda or closure"):
        runs.key("demo", prepare=lambda m, c: m)
    with pytest.raises(ValueError, match="is not a RunStore key"):
        runs.get("../../etc")
    with pytest.raises(ValueError, match="cannot be keyed"):
        experiments.qat_run(torch.nn.Linear(2, 2), W4A4, [], None, steps=1, store=runs, wrap=lambda m: m)


def test_the_default_store_follows_qatlab_store_and_skips_what_it_cannot_key(
    digits_cnn, tmp_path, monkeypatch
):
    cnn, digits = digits_cnn
    monkeypatch.setenv("QATLAB_BUILD", str(tmp_path))
    monkeypatch.delenv("QATLAB_STORE", raising=False)
    assert store.default() is None
    _run(cnn, digits, None)
    assert not (tmp_path / "runs").exists()  # off unless asked for
    monkeypatch.setenv("QATLAB_STORE", "1")
    assert store.default().root == tmp_path / "runs"
    first = _run(cnn, digits, None)
    assert len(RunStore(tmp_path / "runs")) == 1
    assert _run(cnn, digits, None)["acc"] == first["acc"]
    # a run it cannot key (a closure as prepare) is computed, not refused, and not stored
    _run(cnn, digits, None, prepare=lambda m, c: qatlab.prepare_qat(m, c))
    assert len(RunStore(tmp_path / "runs")) == 1
