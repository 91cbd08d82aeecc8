"""What happens inside QAT while it trains: per-layer, per-step recorders as DataFrames.

``with record(qat_model) as rec: fit(qat_model, ...)`` attaches forward hooks (training-mode passes only; an
evaluation pass records nothing) and logs, one row per quantizer (or BatchNorm) and training step:

- ``rec.clipping()``: the fraction of the tensor the clipped STE clips (beyond the grid's ends by more than half
  a step: those values get zero gradient), for weights and activations;
- ``rec.flips()``: for weights, the fraction of integer codes that changed since the previous step; summed over
  steps per element it is the oscillation frequency of Nagel et al. 2022 (``rec.oscillation()``);
- ``rec.scales()``: learned scales (LSQ) and clip values (PACT) per step (mean over channels);
- ``rec.bn_drift()``: how far each BatchNorm's running mean and variance moved from where they were when recording
  started (relative L2 distance).

A step is one training forward pass of the model (one optimizer step in ``fit``).
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn

from qatlab.analysis import clipped_fraction
from qatlab.modules import FakeQuantizer, QuantConvBn2d
from qatlab.quant import quantize


def _rel(now: Tensor, start: Tensor) -> float:
    return float((now.detach() - start).norm() / start.norm().clamp(min=1e-12))


class Recorder:
    """Forward hooks on every FakeQuantizer and BatchNorm of a model; see the module docstring."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.step = 0
        self._rows: dict[str, list[dict[str, Any]]] = {"clip": [], "flip": [], "scale": [], "bn": []}
        self._codes: dict[str, Tensor] = {}
        self._flip_counts: dict[str, Tensor] = {}
        self._bn_start: dict[str, tuple[Tensor, Tensor]] = {}
        self._handles: list[Any] = []
        quantizers = [(n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantizer)]
        if not quantizers:
            raise ValueError("model has no FakeQuantizers: record a model from prepare_qat")
        # the model's own forward counts the steps (its pre-hook runs before any quantizer of that pass)
        self._handles.append(model.register_forward_pre_hook(self._count))
        for name, q in quantizers:
            kind = "weight" if name.endswith("weight_quant") else "activation"
            self._handles.append(q.register_forward_hook(self._quantizer_hook(name, kind)))
        # BatchNorms, read after every training forward of the model (QuantConvBn2d in simulate mode updates
        # its BN's running statistics without calling the BN module, so a hook on the BN would not fire)
        self._bns: dict[str, nn.Module] = {}
        for name, m in model.named_modules():
            bn = m.bn if isinstance(m, QuantConvBn2d) else m
            if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.running_mean is not None:
                if any(b is bn for b in self._bns.values()):
                    continue
                key = name if bn is m else f"{name}.bn"
                self._bns[key] = bn
                self._bn_start[key] = (bn.running_mean.detach().clone(), bn.running_var.detach().clone())
        self._handles.append(model.register_forward_hook(self._bn_hook))

    def _count(self, module: nn.Module, args: Any) -> None:
        if module.training:
            self.step += 1

    def _quantizer_hook(self, name: str, kind: str):
        def hook(q: FakeQuantizer, args: Any, output: Any) -> None:
            if not q.training or not q.fake_quant_enabled or not q.calibrated:
                return
            x = args[0].detach()
            scale, zp = q.scale.detach(), q.zero_point.detach()
            if q.spec.learned:
                scale = scale.clamp(min=torch.finfo(torch.float32).eps)
            step = self.step
            self._rows["clip"].append(
                {"layer": name, "kind": kind, "step": step, "clipped": clipped_fraction(x, scale, zp, q.spec)}
            )
            if q.spec.learned:
                self._rows["scale"].append(
                    {"layer": name, "kind": kind, "step": step, "scale": float(scale.mean())}
                )
            if kind == "weight":
                codes = quantize(x, scale, zp, q.spec)
                before = self._codes.get(name)
                if before is not None and before.shape == codes.shape:
                    changed = before != codes
                    self._flip_counts[name] = (
                        self._flip_counts.get(name, torch.zeros_like(codes)) + changed.int()
                    )
                    self._rows["flip"].append(
                        {"layer": name, "step": step, "flipped": float(changed.float().mean())}
                    )
                self._codes[name] = codes

        return hook

    def _bn_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if not module.training:
            return
        for key, bn in self._bns.items():
            mean0, var0 = self._bn_start[key]
            self._rows["bn"].append({"layer": key, "step": self.step, "mean_drift": _rel(bn.running_mean, mean0),
                                     "var_drift": _rel(bn.running_var, var0)})  # fmt: skip

    def clipping(self) -> pd.DataFrame:
        return pd.DataFrame(self._rows["clip"], columns=["layer", "kind", "step", "clipped"])

    def flips(self) -> pd.DataFrame:
        return pd.DataFrame(self._rows["flip"], columns=["layer", "step", "flipped"])

    def scales(self) -> pd.DataFrame:
        return pd.DataFrame(self._rows["scale"], columns=["layer", "kind", "step", "scale"])

    def bn_drift(self) -> pd.DataFrame:
        return pd.DataFrame(self._rows["bn"], columns=["layer", "step", "mean_drift", "var_drift"])

    def oscillation(self) -> pd.DataFrame:
        """Per weight quantizer: flips per element per step (mean), and the share of elements that flipped at
        least twice (back and forth around a threshold: oscillating, not just moving)."""
        rows = []
        steps = self.flips().groupby("layer")["step"].count()
        for name, counts in self._flip_counts.items():
            n = int(steps.get(name, 0))
            rows.append({"layer": name, "steps": n, "flips_per_step": float(counts.float().mean()) / max(n, 1),
                         "oscillating": float((counts >= 2).float().mean())})  # fmt: skip
        return pd.DataFrame(rows, columns=["layer", "steps", "flips_per_step", "oscillating"])

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def record(model: nn.Module) -> Recorder:
    """Start recording ``model``'s QAT dynamics; use as a context manager (hooks removed on exit)."""
    return Recorder(model)
