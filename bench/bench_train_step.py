"""Train-step time of QAT vs FP32 (lab CNN and depthwise CNN, batch 64), as ratios measured in one run.

qatlab at W8A8 (per-channel symmetric weights, moving-average activation ranges) with simulated BN folding
(the default) and with BN folded once before QAT, and the simulated-BN step through ``torch.compile`` (what
``fit(compile=True)`` runs; FP32 compiled too, for reference; the compiling first step is timed apart); and, as
references, the same QAT with other tools
(``bench/references.py``: torch.ao eager and FX, torchao PT2E, Brevitas; those not installed are listed as
missing). Every variant's steps are interleaved (so machine load hits all alike) and the medians reported,
at 1 and 2 threads. Prints a markdown table and saves it to build/bench/train_step.md.
Usage: ``python bench/bench_train_step.py [--steps N] [--no-references]``.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
from common import save_report, steady_allocator
from torch import nn

import qatlab
from qatlab import QATConfig, QuantSpec
from qatlab.models import build_model

# the steady state of a long run: fake_quant's compiled kernels from the first step, not after the
# core-op warm-up a process otherwise starts with (fused.FUSED_AFTER_ELEMENTS)
os.environ.setdefault("QATLAB_COMPILE", "1")


COMPILE_SECONDS: dict[str, float] = {}  # variant -> seconds its first (compiling) step took


def _step_fn(model, x, y, compiled: str | None = None):
    """One SGD step; ``compiled``: the variant's name, its forward through ``torch.compile`` (as
    ``fit(compile=True)`` runs it), compiled here by a first step whose time is recorded."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    forward = torch.compile(model) if compiled else model

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(forward(x), y).backward()
        opt.step()

    if compiled:
        t0 = time.perf_counter()
        step()
        COMPILE_SECONDS[compiled] = time.perf_counter() - t0
    return step


def variants(model_name: str, x, y, references: bool) -> tuple[dict, dict]:
    """name -> step function, and name -> note for the variants that could not run."""
    torch.manual_seed(0)
    fp32 = build_model(model_name).train()
    steps = {"FP32": _step_fn(fp32, x, y)}
    for bn_mode in ("simulate", "fold"):
        cfg = QATConfig(weight=QuantSpec(bits=8, symmetric=True, per_channel=True), bn_mode=bn_mode)
        qat = qatlab.calibrate(qatlab.prepare_qat(fp32, cfg), [x]).train()
        steps[f"qatlab (BN {bn_mode})"] = _step_fn(qat, x, y)
    # fit(compile=True): the same QAT model (live observers), its step through torch.compile
    cfg = QATConfig(weight=QuantSpec(bits=8, symmetric=True, per_channel=True))
    qat = qatlab.calibrate(qatlab.prepare_qat(fp32, cfg), [x]).train()
    name = "qatlab (BN simulate), compiled"
    steps[name] = _step_fn(qat, x, y, compiled=f"{model_name}: {name}")
    steps["FP32 compiled"] = _step_fn(copy.deepcopy(fp32), x, y, compiled=f"{model_name}: FP32 compiled")
    missing = {}
    if references:
        from references import reference_steps

        for name, (step, note) in reference_steps(model_name, x, y).items():
            if step is None:
                missing[name] = note
            else:
                steps[name] = step
    return steps, missing


def measure(steps: dict, threads: int, n: int) -> dict[str, float]:
    torch.set_num_threads(threads)
    times = {k: [] for k in steps}
    for fn in steps.values():  # warm-up (compiles the fused kernels, fills caches)
        for _ in range(3):
            fn()
    for _ in range(n):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--no-references", action="store_true", help="qatlab and FP32 only")
    args = parser.parse_args()
    steady_allocator()
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    lines = [
        f"QAT vs FP32 train step (W8A8: per-channel weights, moving-average activation ranges), batch 64, "
        f"medians of {args.steps} interleaved steps",
        "",
        "| model | threads | variant | ms | / FP32 |",
        "|---|---:|---|---:|---:|",
    ]
    notes = {}
    for model_name in ("cnn", "dwcnn"):
        steps, missing = variants(model_name, x, y, not args.no_references)
        notes.update(missing)
        for threads in (1, 2):
            med = measure(steps, threads, args.steps)
            for name, t in med.items():
                lines.append(
                    f"| {model_name} | {threads} | {name} | {1e3 * t:.2f} | {t / med['FP32']:.2f}x |"
                )
    lines += ["", "First (compiling) step of the compiled variants, s: "
              + "; ".join(f"{k} {v:.1f}" for k, v in COMPILE_SECONDS.items())]  # fmt: skip
    if notes:
        lines += ["", "Not measured:"] + [f"- {k}: {v}" for k, v in notes.items()]
    save_report(lines, "train_step")


if __name__ == "__main__":
    main()
