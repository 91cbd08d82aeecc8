"""qatlab: a notebook-driven lab for quantization-aware training (QAT) in PyTorch.

Where things live: the STE and quantization math in ``quant.py``, range estimation in ``observers.py``,
fake-quant layers and BatchNorm folding in ``modules.py``, model surgery in ``prepare.py``, training in
``train.py``, ONNX export in ``export.py``.
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
)
from qatlab.quant import dequantize, fake_quant, qparams, quantize, sqnr

__all__ = [
    "QATConfig",
    "QuantSpec",
    "calibrate",
    "convert",
    "dequantize",
    "enable_fake_quant",
    "enable_observers",
    "evaluate",
    "fake_quant",
    "fast",
    "fit",
    "freeze_bn_stats",
    "freeze_observers",
    "prepare_qat",
    "ptq",
    "qparams",
    "quantize",
    "sqnr",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # train.py pulls in pandas and tqdm; import it when first asked for, so `import qatlab` stays light.
    if name in ("fit", "evaluate"):
        from qatlab import train

        return getattr(train, name)
    raise AttributeError(f"module 'qatlab' has no attribute {name!r}")
