"""ONNX Runtime inference time, QDQ int8 vs FP32, for the lab CNN at batch 1 and 64 (ratios in one run).

Exports the Fashion-MNIST CNN twice (FP32, and W8A8 after PTQ calibration with BN folded), times both in
ONNX Runtime with one intra-op thread, interleaved, and reports medians, the int8/FP32 ratio and which
integer kernels ORT ran. Prints a markdown table and saves it to build/bench/ort.md.
Usage: ``python bench/bench_ort.py [--repeats N]``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from common import save_report

import qatlab
from qatlab import QATConfig
from qatlab.data import fashion_mnist_available, fashion_mnist_loaders
from qatlab.export import (
    INTEGER_KERNELS,
    export_float_onnx,
    export_onnx,
    ort_integer_kernels,
    time_ort,
    verify_onnx,
)
from qatlab.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    torch.manual_seed(0)
    if fashion_mnist_available():
        calib, test = fashion_mnist_loaders(batch_size=64, train_size=1024, test_size=256, seed=0)
        data = "Fashion-MNIST"
    else:  # the timing does not depend on the data; random images keep the script usable anywhere
        calib = [(torch.randn(64, 1, 28, 28), None) for _ in range(8)]
        test = [(torch.randn(64, 1, 28, 28), None) for _ in range(4)]
        data = "random images (Fashion-MNIST not installed)"
    x64 = torch.cat([x for x, _ in test])[:64]
    rows, notes = [], []
    for width in (16, 64):  # the lab's default CNN, and a 4x wider one: int8 pays off with more channels
        model = build_model("cnn", width=width).eval()
        with tempfile.TemporaryDirectory() as tmp:
            fp32 = export_float_onnx(model, Path(tmp) / "fp32.onnx", x64[:1])
            paths = {}
            for outputs in (False, True):  # True: the last conv's output is quantized too (QLinearConv)
                qat = qatlab.ptq(model, QATConfig(quantize_outputs=outputs), calib)
                paths[outputs] = export_onnx(qat, Path(tmp) / f"int8_{outputs}.onnx", x64[:1])
                parity = verify_onnx(qat, paths[outputs], x64)
                counts = ort_integer_kernels(paths[outputs])
                kernels = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()) if k in INTEGER_KERNELS)
                float_convs = counts.get("Conv", 0) + counts.get("FusedConv", 0)
                notes.append(
                    f"- width {width}, quantize_outputs={outputs}: integer kernels after ORT optimization: "
                    f"{kernels or 'none'}, float convs: {float_convs}; parity: max abs diff "
                    f"{parity['max_abs_diff']:.2e} ({parity['diff_in_lsb']:.3f} output LSB), argmax agreement "
                    f"{parity['argmax_agreement']:.4f}"
                )
            for batch in (1, 64):
                t = time_ort({"fp32": fp32, "int8": paths[False], "int8_out": paths[True]}, x64[:batch],
                             repeats=args.repeats)  # fmt: skip
                rows.append((width, batch, t["fp32"], t["int8"], t["int8_out"]))
    lines = [
        f"ORT QDQ int8 (W8A8, BN folded) vs FP32, lab CNN, 1 intra-op thread, medians of {args.repeats} "
        f"interleaved runs; calibration data: {data}. int8: qatlab's default placement (layer inputs); "
        "int8, outputs: QATConfig(quantize_outputs=True), which also quantizes the last conv's output",
        "",
        "| CNN width | batch | FP32 ms | int8 ms | int8 / FP32 | int8, outputs ms | int8, outputs / FP32 |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        *[
            f"| {w} | {b} | {f:.3f} | {i:.3f} | {i / f:.2f}x | {o:.3f} | {o / f:.2f}x |"
            for w, b, f, i, o in rows
        ],
        "",
        *notes,
    ]
    save_report(lines, "ort")


if __name__ == "__main__":
    main()
