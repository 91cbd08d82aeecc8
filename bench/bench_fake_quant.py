"""``fake_quant`` forward + backward throughput vs torch's core fake-quant op and a memory-bound floor.

For activation-sized tensors (per tensor, 8-bit asymmetric, clipped STE) and a weight-sized one (per channel):
qatlab's ``fake_quant`` (fused compiled kernels for large tensors), the same with ``QATLAB_COMPILE=0`` (torch's
core ops), torch's core op called directly with autograd, and two references: the floor, two plain copies of the
tensor (one for the forward, one for the backward: the least memory traffic a forward and a backward can make),
and ``x * 1`` through autograd (the least any differentiable elementwise op pays: a fresh output, the engine's
gradient buffer, the fixed cost of a call and of ``backward``). Interleaved
repetitions, medians; ratios are to the floor. Prints a markdown table, saves build/bench/fake_quant.md.
Usage: ``python bench/bench_fake_quant.py [--reps N]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from common import save_report, steady_allocator

from qatlab import QuantSpec
from qatlab.quant import fake_quant, qparams


def variants(shape: tuple[int, ...], per_channel: bool) -> dict:
    torch.manual_seed(0)
    x = torch.randn(shape)
    up = torch.randn(shape)
    spec = QuantSpec(bits=8, symmetric=per_channel, per_channel=per_channel)
    if per_channel:
        amax = x.abs().amax(dim=(1, 2, 3))
        s, z = qparams(-amax, amax, spec)
    else:
        s, z = qparams(x.min(), x.max(), spec)
    out = torch.empty_like(x)
    grad = torch.empty_like(x)

    def floor():
        out.copy_(x)
        grad.copy_(up)

    def autograd_floor():  # the least any differentiable elementwise op pays: a multiply through autograd
        xi = x.detach().requires_grad_(True)
        (xi * 1.0).backward(up)

    def ours():
        xi = x.detach().requires_grad_(True)
        fake_quant(xi, s, z, spec).backward(up)

    def core():
        xi = x.detach().requires_grad_(True)
        if per_channel:
            y = torch.fake_quantize_per_channel_affine(xi, s, z, 0, spec.qmin, spec.qmax)
        else:
            y = torch.fake_quantize_per_tensor_affine(xi, s, z, spec.qmin, spec.qmax)
        y.backward(up)

    def ours_no_compile():
        os.environ["QATLAB_COMPILE"] = "0"
        try:
            ours()
        finally:
            os.environ["QATLAB_COMPILE"] = "1"

    return {"floor (2 copies)": floor, "x * 1 through autograd": autograd_floor, "qatlab": ours, "qatlab, QATLAB_COMPILE=0": ours_no_compile,
            "torch core op": core, "_bytes": x.numel() * 4}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=50)
    args = parser.parse_args()
    steady_allocator()
    os.environ["QATLAB_COMPILE"] = "1"  # the steady state: compiled from the first call, not after warm-up
    torch.set_num_threads(1)
    cases = [((64, 16, 28, 28), False), ((64, 32, 14, 14), False), ((256, 256, 3, 3), True)]
    lines = [
        f"fake_quant forward + backward, 8-bit, clipped STE, 1 thread, medians of {args.reps} interleaved reps",
        "",
        "| tensor | granularity | variant | ms | GB/s of x | / floor |",
        "|---|---|---|---:|---:|---:|",
    ]
    for shape, per_channel in cases:
        fns = variants(shape, per_channel)
        nbytes = fns.pop("_bytes")
        for fn in fns.values():
            for _ in range(3):
                fn()
        times = {k: [] for k in fns}
        for _ in range(args.reps):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        floor = med["floor (2 copies)"]
        for name, t in med.items():
            lines.append(f"| {'x'.join(map(str, shape))} | {'channel' if per_channel else 'tensor'} | {name} | "
                         f"{1e3 * t:.3f} | {nbytes / t / 1e9:.2f} | {t / floor:.2f}x |")  # fmt: skip
    save_report(lines, "fake_quant")


if __name__ == "__main__":
    main()
