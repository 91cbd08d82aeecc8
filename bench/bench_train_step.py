"""Train-step time of QAT vs FP32 for the lab CNN (Fashion-MNIST shapes, batch 64), as ratios in one run.

Interleaves FP32 and QAT steps (so machine load hits both alike) and reports medians. Prints a markdown
table and saves it to build/bench/train_step.md. Usage: ``python bench/bench_train_step.py [--steps N]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import save_report
from torch import nn

import qatlab
from qatlab import QATConfig, QuantSpec
from qatlab.models import build_model


def _step_fn(model, opt, x, y):
    loss_fn = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return step


def measure(model_name: str, threads: int, steps: int, batch: int = 64) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    fp32 = build_model(model_name).train()
    cfg = QATConfig(weight=QuantSpec(bits=8, symmetric=True, per_channel=True), bn_mode="simulate")
    qat = qatlab.prepare_qat(fp32, cfg).train()
    variants = {
        "fp32": _step_fn(fp32, torch.optim.SGD(fp32.parameters(), lr=0.01, momentum=0.9), x, y),
        "qat": _step_fn(qat, torch.optim.SGD(qat.parameters(), lr=0.01, momentum=0.9), x, y),
    }
    times = {k: [] for k in variants}
    for fn in variants.values():  # warm-up
        for _ in range(3):
            fn()
    for _ in range(steps):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "model": model_name,
        "threads": threads,
        "fp32_ms": 1e3 * med["fp32"],
        "qat_ms": 1e3 * med["qat"],
        "ratio": med["qat"] / med["fp32"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    rows = [measure(m, t, args.steps) for m in ("cnn", "dwcnn") for t in (1, 2)]
    lines = [
        "QAT (W8 per-channel, A8 EMA, simulated BN folding) vs FP32 train step, batch 64, medians of "
        f"{args.steps} interleaved steps",
        "",
        "| model | threads | FP32 ms | QAT ms | QAT / FP32 |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['model']} | {r['threads']} | {r['fp32_ms']:.2f} | {r['qat_ms']:.2f} | {r['ratio']:.2f}x |"
        for r in rows
    ]
    save_report(lines, "train_step")


if __name__ == "__main__":
    main()
