"""Number formats: fake-quant forward + backward time against the per-channel int8 path, and ONNX Runtime time of
int4 weights (QDQ vs ``MatMulNBits``) against FP32.

Part 1, ``qatlab.formats.fake_quant`` (clipped STE) on a 256x1024 weight and a 64x512 activation: MXFP4, NVFP4,
int4 g32, MXFP8, FP8 per tensor, 8-bit per-token, each as a ratio to the lab's per-channel int8 path
(``qatlab.fake_quant`` with per-channel scales; per-tensor for the activation) timed in the same run, interleaved,
medians. The goal: within 2x for MXFP4, NVFP4 and int4 g32.

Part 2, ONNX Runtime (1 thread, batch 64): an MLP of Linear layers (Fashion-MNIST sized: 784-512-512-10) and
MiniLM-L6 (when installed, sequence 64, batch 8), FP32 vs int4 g32 weights exported as QDQ vs as MatMulNBits
(accuracy levels 0 and 4). Prints markdown tables, saves build/bench/formats.md.
Usage: ``python bench/bench_formats.py [--reps N]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import save_report, steady_allocator
from torch import nn

from qatlab import QATConfig, QuantSpec, formats, ptq
from qatlab import export as ex
from qatlab.quant import fake_quant, qparams

FORMAT_SPECS = {
    "mxfp4": QuantSpec(format="mxfp4"),
    "nvfp4": QuantSpec(format="nvfp4"),
    "int4 g32": QuantSpec(bits=4, symmetric=True, group_size=32),
    "mxfp8": QuantSpec(format="mxfp8"),
    "fp8_e4m3 per tensor": QuantSpec(format="fp8_e4m3"),
    "int8 per token": QuantSpec(bits=8, symmetric=True, observer="dynamic", per_token=True),
}


def _interleaved(fns: dict, reps: int) -> dict[str, float]:
    for fn in fns.values():
        for _ in range(3):
            fn()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def fake_quant_table(reps: int) -> list[str]:
    lines = [
        f"fake quant forward + backward, clipped STE, 1 thread, medians of {reps} interleaved reps; ratio to the "
        "per-channel int8 path (per tensor for the activation)",
        "",
        "| tensor | format | ms | / int8 path |",
        "|---|---|---:|---:|",
    ]
    for label, shape, per_channel in (
        ("weight 256x1024", (256, 1024), True),
        ("activation 64x512", (64, 512), False),
    ):
        torch.manual_seed(0)
        x, up = torch.randn(shape), torch.randn(shape)
        spec8 = QuantSpec(bits=8, symmetric=per_channel, per_channel=per_channel)
        if per_channel:
            amax = x.abs().amax(1)
            s, z = qparams(-amax, amax, spec8)
        else:
            s, z = qparams(x.min(), x.max(), spec8)

        def int8_path(x=x, s=s, z=z, spec8=spec8, up=up):
            xi = x.detach().requires_grad_(True)
            fake_quant(xi, s, z, spec8).backward(up)

        fns = {"int8 path": int8_path}
        for name, spec in FORMAT_SPECS.items():

            def run(spec=spec, x=x, up=up):
                xi = x.detach().requires_grad_(True)
                formats.fake_quant(xi, spec).backward(up)

            fns[name] = run
        med = _interleaved(fns, reps)
        base = med["int8 path"]
        for name, t in med.items():
            lines.append(f"| {label} | {name} | {1e3 * t:.3f} | {t / base:.2f}x |")
    return lines


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    ).eval()


def ort_table(reps: int) -> list[str]:
    lines = [
        "",
        f"ONNX Runtime 1 thread, medians of {reps} runs; per-group int4 symmetric weights, float activations",
        "",
        "| model | export | ms | vs FP32 |",
        "|---|---|---:|---:|",
    ]
    # 784 inputs: groups of 16 (32 does not divide 784); MiniLM's 384 and 1536: groups of 32
    cases = [("MLP 784-512-512-10, batch 64, g16", _mlp(), torch.randn(64, 1, 28, 28), {}, 16)]
    minilm = _minilm()
    if minilm is not None:
        cases.append(("MiniLM-L6, batch 8 x 64 tokens, g32", *minilm, 32))
    with tempfile.TemporaryDirectory() as tmp:
        for label, model, x, kw, group in cases:
            cfg = QATConfig(weight=QuantSpec(bits=4, symmetric=True, group_size=group), activation=None)
            q = ptq(model, cfg, [(x, None)])
            paths = {
                "FP32": ex.export_float_onnx(model, Path(tmp) / "fp32.onnx", x, **kw),
                "QDQ (DequantizeLinear + MatMul)": ex.export_onnx(q, Path(tmp) / "qdq.onnx", x, **kw),
            }
            for level in (0, 4):
                path = ex.export_onnx(q, Path(tmp) / f"nbits{level}.onnx", x, **kw)
                ex.to_matmul_nbits(path, accuracy_level=level)
                paths[f"MatMulNBits, accuracy_level={level}"] = path
            times = ex.time_ort(paths, x, repeats=reps)
            for name, t in times.items():
                lines.append(f"| {label} | {name} | {t:.2f} | {t / times['FP32']:.2f}x |")
    return lines


def _minilm():
    """MiniLM-L6 (when its package is installed) on random token ids: speed only."""
    from qatlab import transformer

    if not transformer.minilm_available():
        return None
    model, tokenizer = transformer.load_minilm(num_labels=2)
    x = torch.randint(1000, tokenizer.vocab_size, (8, 64))
    return model, x, {"dynamic_dims": {1: "sequence"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=50)
    args = parser.parse_args()
    steady_allocator()
    torch.set_num_threads(1)
    save_report(fake_quant_table(args.reps) + ort_table(args.reps), "formats")


if __name__ == "__main__":
    main()
