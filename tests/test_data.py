"""Tests for qatlab.data: digits always, Fashion-MNIST when its files are installed."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from qatlab import data
from qatlab.data import (
    FASHION_CLASSES,
    digits_loaders,
    fashion_mnist_available,
    fashion_mnist_loaders,
    load_fashion_mnist,
    loaders,
)

needs_fashion = pytest.mark.skipif(
    not fashion_mnist_available(),
    reason="Fashion-MNIST files not found: `apt-get install dataset-fashion-mnist` or set QATLAB_DATA",
)


def _all(loader: torch.utils.data.DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


# ---- digits ----------------------------------------------------------------------------------------------


def test_digits_shapes_dtypes_and_sizes() -> None:
    train, test = digits_loaders(batch_size=32, test_fraction=0.25, seed=0)
    x, y = next(iter(train))
    assert x.shape == (32, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (32,) and y.dtype == torch.int64
    x_tr, y_tr = _all(train)
    x_te, y_te = _all(test)
    assert len(y_tr) + len(y_te) == 1797
    assert len(y_te) == 450  # ceil(0.25 * 1797), sklearn's rounding
    assert int(min(y_tr.min(), y_te.min())) == 0 and int(max(y_tr.max(), y_te.max())) == 9


def test_digits_normalised_on_train_part() -> None:
    train, test = digits_loaders(seed=3)
    x_tr, _ = _all(train)
    assert abs(x_tr.double().mean().item()) < 1e-4
    assert abs(x_tr.double().std(unbiased=False).item() - 1.0) < 1e-4
    x_te, _ = _all(test)
    # Test data uses the train statistics, so it is close to, but not exactly, standardised.
    assert abs(x_te.double().mean().item()) < 0.1


def test_digits_stratified() -> None:
    _, test = digits_loaders(test_fraction=0.3, seed=1)
    _, y_te = _all(test)
    from sklearn.datasets import load_digits

    full = np.bincount(load_digits().target, minlength=10)
    expected = full * len(y_te) / full.sum()
    got = np.bincount(y_te.numpy(), minlength=10)
    assert np.abs(got - expected).max() <= 1.5


def test_digits_seeding() -> None:
    a_train, a_test = digits_loaders(batch_size=16, seed=7)
    b_train, b_test = digits_loaders(batch_size=16, seed=7)
    xa, ya = next(iter(a_train))
    xb, yb = next(iter(b_train))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert torch.equal(a_test.dataset.tensors[0], b_test.dataset.tensors[0])  # same split
    c_train, c_test = digits_loaders(batch_size=16, seed=8)
    assert not torch.equal(next(iter(c_train))[1], ya)  # different order
    assert not torch.equal(c_test.dataset.tensors[1], a_test.dataset.tensors[1])  # different split
    # The test loader does not shuffle: two passes give the same batches.
    assert torch.equal(next(iter(a_test))[0], next(iter(a_test))[0])


def test_digits_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"batch_size=0 .*positive integer"):
        digits_loaders(batch_size=0)
    with pytest.raises(ValueError, match=r"batch_size=2.5"):
        digits_loaders(batch_size=2.5)  # type: ignore[arg-type]
    for bad in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=rf"test_fraction={bad}.*between 0 and 1"):
            digits_loaders(test_fraction=bad)
    with pytest.raises(TypeError, match="test_fraction='0.2'"):
        digits_loaders(test_fraction="0.2")  # type: ignore[arg-type]


def test_validation_split_is_a_seeded_partition() -> None:
    _, test = digits_loaders(batch_size=32)
    x, y = _all(test)
    val, rest = data.validation_split(test, 100, seed=3)
    (xv, yv), (xr, yr) = _all(val), _all(rest)
    assert len(yv) == 100 and len(yr) == len(y) - 100 and val.batch_size == rest.batch_size == 32
    # disjoint and together the whole loader: every image once, in one of the two
    rows = {tuple(r.flatten().tolist()) for r in x}
    assert {tuple(r.flatten().tolist()) for r in torch.cat([xv, xr])} == rows and len(rows) == len(y)
    assert sorted(torch.cat([yv, yr]).tolist()) == sorted(y.tolist())
    again, _ = data.validation_split(test, 100, seed=3)
    other, _ = data.validation_split(test, 100, seed=4)
    assert torch.equal(_all(again)[0], xv) and not torch.equal(_all(other)[0], xv)
    assert torch.equal(_all(val)[0], xv)  # not shuffled: the same batches every pass
    with pytest.raises(ValueError, match=r"size=450 leaves nothing to report.*at most 449"):
        data.validation_split(test, len(y))
    with pytest.raises(ValueError, match="size"):
        data.validation_split(test, 0)
    with pytest.raises(ValueError, match="loader must be a DataLoader"):
        data.validation_split([(x, y)], 10)


def test_loaders_dispatch_and_unknown_name() -> None:
    train, _ = loaders("digits", batch_size=8, seed=0)
    assert next(iter(train))[0].shape == (8, 1, 8, 8)
    with pytest.raises(ValueError, match=r"dataset 'cifar10' is not a known data set; use 'auto' or one of"):
        loaders("cifar10")


def test_auto_is_fashion_mnist_when_installed_else_digits(monkeypatch) -> None:
    monkeypatch.setattr(data, "fashion_mnist_available", lambda root=None: False)
    assert data.resolve_dataset("auto") == "digits"
    train, _ = loaders(batch_size=8, seed=0)  # "auto" by default
    assert next(iter(train))[0].shape == (8, 1, 8, 8)
    monkeypatch.setattr(data, "fashion_mnist_available", lambda root=None: True)
    assert data.resolve_dataset("auto") == "fashion_mnist"
    assert data.resolve_dataset("digits") == "digits"


# ---- Fashion-MNIST: errors (no data needed) ----------------------------------------------------------------


def test_missing_folder_message(tmp_path) -> None:
    assert not fashion_mnist_available(tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        load_fashion_mnist("train", root=tmp_path)
    msg = str(err.value)
    assert "dataset-fashion-mnist" in msg and "QATLAB_DATA" in msg and "t10k-labels-idx1-ubyte.gz" in msg
    assert str(tmp_path) in msg


def test_root_from_env(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("QATLAB_DATA", str(tmp_path))
    assert not fashion_mnist_available()
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_fashion_mnist("test")


def _write_fake_split(folder, prefix: str, n: int, image_magic: bytes = b"\x00\x00\x08\x03") -> None:
    header = image_magic + b"".join(v.to_bytes(4, "big") for v in (n, 28, 28))
    (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + bytes(n * 784)))
    labels = b"\x00\x00\x08\x01" + n.to_bytes(4, "big") + bytes(range(n))
    (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))


def test_corrupt_files(tmp_path) -> None:
    _write_fake_split(tmp_path, "train", 4)
    _write_fake_split(tmp_path, "t10k", 3)
    x, y = load_fashion_mnist("test", root=tmp_path)  # the fake files are valid idx
    assert x.shape == (3, 28, 28) and x.dtype == torch.uint8 and y.tolist() == [0, 1, 2]
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"this is not gzip")
    with pytest.raises(ValueError, match="not a readable gzip file"):
        load_fashion_mnist("train", root=tmp_path)
    _write_fake_split(tmp_path, "train", 4, image_magic=b"\x00\x00\x08\x01")
    with pytest.raises(ValueError, match="is not 0x00000803"):
        load_fashion_mnist("train", root=tmp_path)
    truncated = gzip.compress(b"\x00\x00\x08\x01" + (10).to_bytes(4, "big") + bytes(5))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(truncated)
    data._load_cached.cache_clear()  # the valid test split was cached above
    with pytest.raises(ValueError, match="data bytes do not fill shape"):
        load_fashion_mnist("test", root=tmp_path)


def test_bad_split() -> None:
    with pytest.raises(ValueError, match=r"split='val'.*'train' or 'test'"):
        load_fashion_mnist("val")


# ---- Fashion-MNIST: real data ----------------------------------------------------------------------------


@needs_fashion
def test_fashion_raw() -> None:
    x, y = load_fashion_mnist("train")
    assert x.shape == (60000, 28, 28) and x.dtype == torch.uint8
    assert y.shape == (60000,) and y.dtype == torch.int64
    assert int(x.min()) == 0 and int(x.max()) == 255
    assert torch.bincount(y).tolist() == [6000] * 10
    x_te, y_te = load_fashion_mnist("test")
    assert x_te.shape == (10000, 28, 28) and torch.bincount(y_te).tolist() == [1000] * 10
    assert len(FASHION_CLASSES) == 10
    pixel = int(x[0, 14, 14])
    x[0, 14, 14] = (pixel + 1) % 256  # returned tensors are copies, so the cache stays intact
    assert int(load_fashion_mnist("train")[0][0, 14, 14]) == pixel


@needs_fashion
def test_fashion_loaders_full(monkeypatch) -> None:
    monkeypatch.delenv("QATLAB_FAST", raising=False)
    train, test = fashion_mnist_loaders(batch_size=256)
    assert len(train.dataset) == 60000 and len(test.dataset) == 10000
    x = train.dataset.tensors[0]
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.float32
    assert abs(x.mean().item()) < 0.01 and abs(x.std().item() - 1.0) < 0.01
    xb, yb = next(iter(train))
    assert xb.shape == (256, 1, 28, 28) and yb.dtype == torch.int64


@needs_fashion
def test_fashion_subsets_and_fast_mode(monkeypatch) -> None:
    monkeypatch.setenv("QATLAB_FAST", "1")
    train, test = fashion_mnist_loaders(seed=0)
    assert (len(train.dataset), len(test.dataset)) == (2048, 1024)
    again, _ = fashion_mnist_loaders(seed=0)
    assert torch.equal(train.dataset.tensors[1], again.dataset.tensors[1])  # same subset
    assert torch.equal(next(iter(train))[0], next(iter(again))[0])  # same batch order
    other, _ = fashion_mnist_loaders(seed=1)
    assert not torch.equal(train.dataset.tensors[1], other.dataset.tensors[1])
    small, small_test = fashion_mnist_loaders(train_size=100, test_size=50)  # explicit sizes win
    assert (len(small.dataset), len(small_test.dataset)) == (100, 50)
    with pytest.raises(ValueError, match=r"train_size=60001 exceeds"):
        fashion_mnist_loaders(train_size=60001)
    with pytest.raises(ValueError, match=r"test_size=0 "):
        fashion_mnist_loaders(test_size=0)
    with pytest.raises(ValueError, match=r"batch_size=-1"):
        fashion_mnist_loaders(batch_size=-1)


def test_reseed_restarts_the_shuffle_order() -> None:
    train, _ = digits_loaders(batch_size=16, seed=3)
    first = next(iter(train))[1]
    second = next(iter(train))[1]
    assert not torch.equal(first, second)  # the generator advanced between passes
    assert data.reseed(train, 3) is True
    assert torch.equal(next(iter(train))[1], first)
    assert data.reseed([(torch.zeros(1), torch.zeros(1))], 0) is False  # a plain list: nothing to reseed
