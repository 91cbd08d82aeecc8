"""Fixtures several test modules share."""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys

import pytest


@pytest.fixture
def on_haswell():
    """``run(script, *args) -> stdout``: ``python -c script args`` on qemu's emulated Haswell CPU (x86-64 with
    AVX2 but no VNNI, whose ONNX Runtime int8 kernels saturate). Skips without qemu-x86_64 on an x86-64 host."""
    qemu = shutil.which("qemu-x86_64")
    if qemu is None or platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip(
            "needs qemu-x86_64 on an x86-64 machine to run ONNX Runtime on an emulated AVX2 CPU without VNNI "
            "(Debian: apt-get install qemu-user; make test installs it when it can)"
        )

    def run(script: str, *args: object, timeout: int = 600) -> str:
        cmd = [qemu, "-cpu", "Haswell", sys.executable, "-c", script, *map(str, args)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    return run


@pytest.fixture(scope="session")
def digit_sets():
    """sklearn digits as (train, test) TensorDatasets of (N, 8, 8) images in [0, 1]: 1,400 / 397, a fixed split."""
    import torch
    from sklearn.datasets import load_digits
    from torch.utils.data import TensorDataset

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 8, 8) / 16.0  # (N, 8, 8)
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


@pytest.fixture(scope="session")
def digits_cnn():
    """``(model, (train, test))``: the lab CNN trained 3 epochs on sklearn digits (batch 64, seed 0, one torch
    thread), in eval mode; shared read-only by the modules that diagnose or quantize it."""
    import torch

    import qatlab
    from qatlab.data import digits_loaders
    from qatlab.experiments import one_thread
    from qatlab.models import build_model

    loaders = digits_loaders(batch_size=64, seed=0)
    with one_thread():
        torch.manual_seed(0)
        model = build_model("cnn")
        qatlab.fit(model, loaders[0], epochs=3, lr=0.05, progress=False)
    return model.eval(), loaders
