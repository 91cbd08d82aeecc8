"""When ``fake_quant`` runs as one compiled elementwise kernel: the ``torch.compile`` heuristics.

torch's core CPU fake-quant kernels spend most of their time writing a bool clipping mask per element, which the
forward pass computes even when nobody asks for it. For large tensors ``qatlab.quant`` instead hands its own
elementwise functions (the fake-quant formula, the clipped STE) to :func:`call`, which compiles them once per
process with ``torch.compile``; forward plus backward then read and write the tensor about 5 times instead of 4
for two plain copies (``bench/bench_fake_quant.py`` measures it). This module holds only the when and how of
compiling; the math lives in ``quant.py``.

- Small tensors (below ``FUSED_MIN_NUMEL``: weights, mostly), non-float32 or non-contiguous tensors, and code
  that is itself being compiled use torch's core ops.
- Compiling costs each process a few seconds of start-up, so a process first runs the core ops and compiles only
  after ``FUSED_AFTER_ELEMENTS`` elements have gone through them (rent, then buy: never more than about twice the
  better choice's cost). Short runs (fast mode, the ranks of a small DDP job) then never pay for the compiler.
- ``QATLAB_COMPILE=0`` forces the core ops, ``QATLAB_COMPILE=1`` compiles at the first large tensor.
- A failure to compile (no C++ compiler, an unsupported backend) warns once and falls back to the core ops for
  good: the numbers are the same, only slower.
"""

from __future__ import annotations

import functools
import math
import os
import warnings

import torch
from torch import Tensor

# below this many elements the fixed cost of a compiled call outweighs the memory traffic it saves
FUSED_MIN_NUMEL = 1 << 15
# a process runs the core ops until this many elements of large tensors have gone through them, then compiles
FUSED_AFTER_ELEMENTS = 1 << 30
_SEEN = [0]  # elements of large float32 tensors fake-quantized by the core ops in this process so far
_COMPILED: dict[str, object] = {}  # function name -> its compiled version
_FAILED = [False]  # compiling failed once in this process: core ops from then on


def compile_mode() -> str:
    """``QATLAB_COMPILE``: "0" never compile, "1" compile at the first large tensor, else (unset) "auto"."""
    value = os.environ.get("QATLAB_COMPILE", "").strip().lower()
    if value in ("0", "false", "no", "off"):
        return "0"
    return "1" if value in ("1", "true", "yes", "on") else "auto"


def _enabled() -> bool:
    mode = compile_mode()
    return mode == "1" or (mode == "auto" and _SEEN[0] >= FUSED_AFTER_ELEMENTS)


def use_fused(x: Tensor, count: bool = False) -> bool:
    """Whether ``x`` goes through the compiled kernels; ``count``: a forward call, which counts towards
    ``FUSED_AFTER_ELEMENTS`` while the core ops still run."""
    if not (
        x.numel() >= FUSED_MIN_NUMEL
        and x.dtype == torch.float32
        and x.is_contiguous()
        and not torch.compiler.is_compiling()
    ):
        return False
    if _enabled():
        return True
    if count:
        _SEEN[0] += x.numel()
    return False


def call(fn, *args) -> Tensor | None:
    """``fn(*args)`` through its compiled version (compiled at the first call); None when compiling is off or has
    failed, so the caller uses the core ops. The first failure warns once and turns compiling off for good."""
    name = fn.__name__
    if _FAILED[0] or not _enabled():
        return None
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn, dynamic=True, fullgraph=True)
    try:
        return _COMPILED[name](*args)
    except Exception as exc:  # noqa: BLE001 - any compile failure: the core ops still give the exact result
        _FAILED[0] = True
        warnings.warn(
            f"torch.compile is unavailable here ({type(exc).__name__}: {str(exc)[:120]}); fake_quant falls "
            "back to torch's core fake-quant ops (same numbers, slower). Set QATLAB_COMPILE=0 to skip the attempt.",
            stacklevel=3,
        )
        return None


@functools.lru_cache(maxsize=64)
def _grid_bounds(quant_min: int, quant_max: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """0-d float tensors of the grid's ends (tensors, so the compiled kernels are not specialised per grid)."""
    return torch.tensor(float(quant_min), device=device), torch.tensor(float(quant_max), device=device)


def flat_args(
    x: Tensor, scale: Tensor, zero_point: Tensor, axis: int, quant_min: int, quant_max: int
) -> tuple[Tensor, ...]:
    """``(x, 1 / S, S, Z, qmin, qmax)`` as flat views and 0-d / broadcastable tensors, so the compiled kernels
    see only two layouts (a few compiled graphs in all): per tensor, ``x`` as 1-D; per channel, (outer, C, inner).
    """
    # detached: the kernels compute no gradients, and a requires_grad flag would be one more compiled variant
    x, scale, zero_point = x.detach(), scale.detach(), zero_point.detach()
    if axis < 0:
        view = x.reshape(-1)
        s = scale.to(torch.float32).reshape(())
        z = zero_point.to(torch.float32).reshape(())
    else:
        c = x.shape[axis]
        view = x.reshape(math.prod(x.shape[:axis]), c, -1)
        s = scale.to(torch.float32).reshape(1, c, 1)
        z = zero_point.to(torch.float32).reshape(1, c, 1)
    qmin, qmax = _grid_bounds(quant_min, quant_max, x.device)
    return view, 1.0 / s, s, z, qmin, qmax  # 1 / S as torch's kernels compute it (a float32 reciprocal)
