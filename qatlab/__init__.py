"""qatlab: a notebook-driven lab for quantization-aware training (QAT) in PyTorch.

Where things live: the STE and quantization math in ``quant.py`` (when it runs as a compiled kernel:
``fused.py``), range estimation in ``observers.py``, fake-quant layers and BatchNorm folding in ``modules.py``,
model surgery in ``prepare.py``, training and distillation (QAD) in ``train.py``, one QAT run and PTQ sweeps in
``experiments.py``, per-layer sensitivity, accuracy fallback and mixed precision in ``precision.py``, number
formats in ``formats.py``, ONNX export in ``export.py``.
"""

from qatlab.config import QATConfig, QuantSpec, fast
from qatlab.prepare import (
    calibrate,
    convert,
    enable_fake_quant,
    enable_observers,
    freeze_bn_stats,
    freeze_observers,
    prepare_qat,
    ptq,
    reestimate_bn,
)
from qatlab.quant import dequantize, fake_quant, qparams, quantize, sqnr

__all__ = [
    "Distill",
    "QATConfig",
    "QuantSpec",
    "accuracy",
    "calibrate",
    "convert",
    "dequantize",
    "enable_fake_quant",
    "enable_observers",
    "evaluate",
    "export_onnx",
    "fake_quant",
    "fast",
    "fit",
    "freeze_bn_stats",
    "freeze_observers",
    "prepare_qat",
    "ptq",
    "qparams",
    "reestimate_bn",
    "quantize",
    "sqnr",
    "verify_onnx",
]
__version__ = "0.1.0"


_LAZY = {
    "Distill": "train",
    "accuracy": "train",
    "fit": "train",
    "evaluate": "train",
    "export_onnx": "export",
    "verify_onnx": "export",
}


def __getattr__(name: str):
    # train.py (pandas, tqdm) and export.py (onnx, onnxruntime) load when first asked for: `import qatlab`
    # stays light.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"qatlab.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'qatlab' has no attribute {name!r}")
