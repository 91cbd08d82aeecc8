"""2:4 semi-structured sparsity combined with QAT, mask-based (CPU has no semi-structured sparse tensor type).

2:4 means: in every group of 4 consecutive weights along the reduction (input) dimension, at least 2 are zero
(NVIDIA's pattern, Mishra et al. 2021, arXiv:2104.08378). For a Linear weight (out, in) the groups are 4
consecutive ``in`` entries; for a Conv2d weight (out, in/groups, kh, kw) 4 consecutive input channels at each
(out, kh, kw). A layer is eligible when that dimension is a multiple of 4; the others (a first conv on 1-channel
images, depthwise convs) stay dense and are listed in the reports with the reason.

The staged pipeline TorchAO's maintainers recommend: dense training -> :func:`apply_2to4` (one shot, or
growing with :func:`gradual_schedule` and :class:`GradualPruning`) -> sparse fine-tuning ->
:func:`prepare_sparse_qat` (``prepare_qat`` builds new layers at the same module paths, without the masks; the
masks are put back by name) -> QAT keeping the mask -> :func:`squash` -> ``export_onnx`` ->
:func:`onnx_2to4_report`.

How the mask is kept (``torch.sparse.to_sparse_semi_structured`` is CUDA-only, so it lives beside the weight):

- a bool buffer ``sparse_mask`` (False = pruned) on the layer: in the state dict, kept by deepcopy and ``.to()``;
- a forward pre-hook that re-applies it in place whenever the weight changed since it was last masked;
- a global optimizer step post-hook that re-applies it after every ``optimizer.step()`` of any optimizer that
  holds the weight, so :func:`qatlab.fit`'s own optimizer keeps the pattern exactly at every step (momentum,
  Adam and weight decay move pruned weights; the hook sets them back to 0 before anything reads them).

Example:
    >>> from qatlab.models import LabCNN
    >>> model = LabCNN(width=8)
    >>> report = apply_2to4(model)  # every eligible layer, magnitude-based, one shot
    >>> report.set_index("layer")["is_2to4"].to_dict()
    {'features.0': False, 'features.3': True, 'features.6': True, 'features.9': True, 'classifier': True}
"""

from __future__ import annotations

import numbers
import weakref
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.weak import WeakIdKeyDictionary

from qatlab.config import QATConfig
from qatlab.modules import QuantConv2d, QuantLinear
from qatlab.prepare import prepare_qat

SPARSE_LAYERS = (nn.Conv2d, nn.Linear, QuantConv2d, QuantLinear)  # QuantConvBn2d is a QuantConv2d
MASK = "sparse_mask"
_OWNER: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight Parameter -> weakref to the layer masking it
_STEP_HOOK: Any = None


def _groups(t: Tensor, axis: int = 1) -> Tensor:
    """(out, in, *k) -> (G, 4): groups of 4 consecutive entries along ``axis``, G = numel / 4."""
    return t.movedim(axis, -1).reshape(-1, 4)


def _ungroup(g: Tensor, shape: torch.Size) -> Tensor:
    return g.reshape(shape[0], *shape[2:], shape[1]).movedim(-1, 1)


def _check_weight(weight: Any, name: str = "weight") -> None:
    if not isinstance(weight, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() < 2 or weight.shape[1] % 4:
        raise ValueError(
            f"{name} has shape {tuple(weight.shape)}: 2:4 groups run along dim 1 (the input / reduction "
            "dimension), which must exist and be a multiple of 4; such layers stay dense"
        )


def _check_fraction(fraction: Any) -> None:
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0 <= fraction <= 1:
        raise ValueError(f"fraction={fraction!r} must be a number in [0, 1]: the share of 4-groups to prune")


def _check_mask(mask: Any, shape: torch.Size, name: str) -> Tensor:
    if not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(shape):
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a tensor of the weight's shape {tuple(shape)}, got {got}")
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(
                f"{name} must hold only 0/1 (or be a bool tensor); False/0 marks a pruned weight"
            )
        mask = mask.bool()
    zeros = (~_groups(mask)).sum(1)
    if bool((zeros == 1).any()):
        raise ValueError(
            f"{name} prunes exactly 1 entry in some group of 4: not a 2:4 mask (each group prunes 0 or >= 2); "
            "make masks with masks_2to4(weight)"
        )
    return mask


def masks_2to4(weight: Tensor, fraction: float = 1.0, current: Tensor | None = None) -> Tensor:
    """The magnitude-based 2:4 mask of ``weight``: in each group of 4 along dim 1 the 2 smallest |w| go.

    Args:
        weight: (out, in) or (out, in/groups, kh, kw); dim 1 a multiple of 4.
        fraction: share of the 4-groups to prune, in [0, 1]; the groups whose two smallest |w| sum least (least
            damage) go first, so a growing ``fraction`` is the gradual schedule.
        current: an earlier mask of the same shape; its pruned entries stay pruned and count as damage-free, so
            the groups pruned before are chosen first with the same zeros.

    Returns:
        A bool tensor of ``weight``'s shape, False = pruned. With ``fraction=1`` every group has >= 2 False.

    Example:
        >>> masks_2to4(torch.tensor([[0.1, -3.0, 0.2, 4.0]])).tolist()
        [[False, True, False, True]]
    """
    _check_weight(weight)
    _check_fraction(fraction)
    with torch.no_grad():
        key = _groups(weight.detach().abs().float())  # (G, 4)
        if current is not None:
            current = _check_mask(current, weight.shape, "current").to(key.device)
            key = key.masked_fill(~_groups(current), -1.0)  # pruned before: first in line, no damage
        smallest = key.argsort(dim=1, stable=True)[:, :2]  # (G, 2)
        damage = key.gather(1, smallest).sum(1)  # (G,)
        chosen = damage.argsort(stable=True)[: int(round(float(fraction) * len(damage)))]
        keep = torch.ones_like(key, dtype=torch.bool)
        keep[chosen.unsqueeze(1), smallest[chosen]] = False
        mask = _ungroup(keep, weight.shape).contiguous()
    return mask if current is None else mask & current


def check_2to4(weight: Tensor | np.ndarray, axis: int = 1) -> bool:
    """True when every group of 4 consecutive entries along ``axis`` holds at least 2 exact zeros.

    Args:
        weight: a tensor or array whose ``axis`` dimension is a multiple of 4 (dim 1 for Conv2d/Linear weights).
        axis: the reduction dimension (0 for a MatMul weight stored (in, out)).
    """
    t = torch.as_tensor(weight) if isinstance(weight, np.ndarray) else weight
    if not isinstance(t, Tensor):
        raise TypeError(f"weight must be a torch.Tensor or numpy array, got {type(weight).__name__}")
    if t.dim() < 2 or not -t.dim() <= axis < t.dim() or t.shape[axis] % 4:
        raise ValueError(
            f"weight of shape {tuple(t.shape)} has no axis {axis} that is a multiple of 4: 2:4 groups cannot "
            "be formed (check eligible_layers(model), or pass the reduction axis)"
        )
    return bool(((_groups(t == 0, axis)).sum(1) >= 2).all())


# ---- layers and masks on a model ----------------------------------------------------------------------------


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return {n: m for n, m in model.named_modules() if isinstance(m, SPARSE_LAYERS)}


def _reason(module: nn.Module) -> str:
    """Why a layer cannot take 2:4 sparsity ('' when it can)."""
    k = module.weight.shape[1]
    if k % 4 == 0:
        return ""
    groups = getattr(module, "groups", 1)
    if groups > 1 and k == 1:
        return f"depthwise conv (groups={groups}): 1 input channel per filter"
    what = "in_features" if module.weight.dim() == 2 else "input channels per group"
    return f"reduction dimension ({what}) = {k} is not a multiple of 4"


def eligible_layers(model: nn.Module) -> list[str]:
    """Names of the Conv2d/Linear layers (float or QAT) whose reduction dimension is a multiple of 4."""
    return [n for n, m in _layers(model).items() if not _reason(m)]


def _mask_now(module: nn.Module) -> None:
    with torch.no_grad():
        module.weight.mul_(getattr(module, MASK))
    module._sparse_version = module.weight._version  # unchanged version: the next forward skips the work
    _OWNER[module.weight] = weakref.ref(module)


def _premask(module: nn.Module, args: Any) -> None:
    """Forward pre-hook: re-apply the mask if the weight changed since (e.g. a step of an unhooked update)."""
    # Export traces an already masked weight: an in-place op on a parameter has no place in the graph.
    if torch.compiler.is_compiling():
        return
    w = module.weight
    if w._version != getattr(module, "_sparse_version", None) or w not in _OWNER:
        _mask_now(module)  # re-masks only when needed: an in-place op would break a pending backward


def _remask_after_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Global optimizer step post-hook: re-apply the masks of the weights this optimizer just moved."""
    if not len(_OWNER):
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            ref = _OWNER.get(p)
            module = ref() if ref is not None else None
            if module is not None and module.weight is p and getattr(module, MASK, None) is not None:
                _mask_now(module)


def _attach(module: nn.Module, mask: Tensor) -> None:
    global _STEP_HOOK
    mask = mask.to(device=module.weight.device, dtype=torch.bool)
    if getattr(module, MASK, None) is None:
        module.register_buffer(MASK, mask.clone())
        module.register_forward_pre_hook(_premask)
    else:
        getattr(module, MASK).copy_(mask)
    _mask_now(module)
    if _STEP_HOOK is None:
        _STEP_HOOK = register_optimizer_step_post_hook(_remask_after_step)


def _check_names(names: Any, found: dict[str, nn.Module], arg: str) -> list[str]:
    if isinstance(names, str) or not isinstance(names, Iterable):
        raise TypeError(f"{arg} must be a list of layer names, e.g. {arg}=['features.3'], got {names!r}")
    eligible = [n for n, m in found.items() if not _reason(m)]
    out = []
    for name in names:
        if name not in found:
            raise ValueError(
                f"{arg}: {name!r} is not a Conv2d/Linear layer of the model; eligible layers: {eligible} "
                "(prepare_qat keeps the module paths, so a float model's names fit its QAT model)"
            )
        if _reason(found[name]):
            raise ValueError(
                f"{arg}: layer {name!r} cannot take 2:4 sparsity: {_reason(found[name])}. Leave it out "
                f"(it stays dense), or pass layers=None to prune every eligible layer: {eligible}"
            )
        out.append(name)
    return out


def apply_2to4(
    model: nn.Module,
    fraction: float = 1.0,
    masks: Mapping[str, Tensor] | None = None,
    layers: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Attach 2:4 masks to ``model``'s Conv2d/Linear layers (float or QAT) in place and zero the pruned weights.

    Args:
        model: any module; layers whose reduction dimension is not a multiple of 4 are skipped (listed in the
            report with the reason).
        fraction: share of each layer's 4-groups pruned by magnitude (:func:`masks_2to4`); masks already on
            the model count as pruned, so calling it with a growing fraction grows the same masks.
        masks: ``{layer name: mask}`` to apply instead (e.g. ``masks(sparse_float_model)`` onto its
            ``prepare_qat`` copy); not combined with ``fraction`` or ``layers``.
        layers: names to prune (default: every eligible layer); a name that is not eligible raises.

    Returns:
        :func:`sparsity_report` of the model afterwards.
    """
    found = _layers(model)
    if masks is not None:
        if layers is not None or fraction != 1.0:
            raise ValueError(
                "pass masks= alone: it names its layers and fixes the pattern (no layers=/fraction=)"
            )
        if not isinstance(masks, Mapping):
            raise TypeError(f"masks must be a {{layer name: mask}} dict, got {type(masks).__name__}")
        if not masks:
            raise ValueError(
                "masks is empty; take the masks of a pruned model with masks(sparse_model) after "
                "apply_2to4(sparse_model)"
            )
        names = _check_names(list(masks), found, "masks")
        targets = {n: _check_mask(masks[n], found[n].weight.shape, f"masks[{n!r}]") for n in names}
    else:
        _check_fraction(fraction)
        names = _check_names(layers, found, "layers") if layers is not None else eligible_layers(model)
        if layers is not None and not names:
            raise ValueError("layers is empty; pass layer names, or layers=None for every eligible layer")
        if not names:
            reasons = {n: _reason(m) for n, m in found.items()} or "no Conv2d/Linear layers"
            raise ValueError(f"model has no layer eligible for 2:4 sparsity: {reasons}")
        targets = {
            n: masks_2to4(found[n].weight, fraction, current=getattr(found[n], MASK, None)) for n in names
        }
    for name, mask in targets.items():
        _attach(found[name], mask)
    return sparsity_report(model)


def masks(model: nn.Module) -> dict[str, Tensor]:
    """``{layer name: bool mask}`` (copies) of every masked layer, e.g. to put onto a ``prepare_qat`` copy."""
    return {
        n: getattr(m, MASK).clone() for n, m in _layers(model).items() if getattr(m, MASK, None) is not None
    }


def prepare_sparse_qat(model: nn.Module, config: QATConfig | None = None) -> nn.Module:
    """``prepare_qat(model, config)`` with ``model``'s 2:4 masks put back onto the new QAT layers.

    ``prepare_qat`` builds new layers (with the masked weights, but no mask) at the same module paths; this
    re-attaches each mask by name, so QAT keeps the pattern. The float model is not modified.
    """
    found = masks(model)
    if not found:
        raise ValueError("model has no 2:4 masks: apply_2to4(model) first, or use qatlab.prepare_qat")
    qat = prepare_qat(model, config)
    apply_2to4(qat, masks=found)
    return qat


def _unmask(model: nn.Module, bake: bool, verb: str) -> nn.Module:
    masked = {n: m for n, m in _layers(model).items() if getattr(m, MASK, None) is not None}
    if not masked:
        raise ValueError(f"model has no 2:4 masks, nothing to {verb}: apply_2to4(model) attaches them")
    for m in masked.values():
        if bake:
            _mask_now(m)
        del m._buffers[MASK]
        for key, hook in list(m._forward_pre_hooks.items()):
            if hook is _premask:
                del m._forward_pre_hooks[key]
        _OWNER.pop(m.weight, None)
        m.__dict__.pop("_sparse_version", None)
    return model


def squash(model: nn.Module) -> nn.Module:
    """Bake each mask into its weight (exact zeros), then drop masks and hooks: a plain model, ready to export.

    In place; returns ``model``. Outputs are unchanged (the weights were masked already).
    """
    return _unmask(model, bake=True, verb="squash")


def remove_masks(model: nn.Module) -> nn.Module:
    """Drop masks and hooks, weights as they are: the pruned (zero) weights may grow back in later training.

    In place; returns ``model``. The "sparse then dense again" variant: fine-tune dense after sparse training.
    """
    return _unmask(model, bake=False, verb="remove")


def sparsity_report(model: nn.Module) -> pd.DataFrame:
    """One row per Conv2d/Linear layer (float or QAT): how sparse its weight is and whether 2:4 holds.

    Columns: ``layer``, ``type``, ``shape`` (e.g. "32x16x3x3"), ``params``, ``eligible``, ``masked``,
    ``zeros`` (fraction of exact zeros in the weight), ``pruned_groups`` (fraction of 4-groups with >= 2
    zeros; NaN when not eligible), ``is_2to4`` (every group has >= 2 zeros) and ``note`` (why a layer is not
    eligible).
    """
    rows = []
    for name, m in _layers(model).items():
        w, reason = m.weight.detach(), _reason(m)
        groups_ok = (_groups(w == 0).sum(1) >= 2).float().mean().item() if not reason else float("nan")
        rows.append({
            "layer": name, "type": type(m).__name__, "shape": "x".join(map(str, w.shape)), "params": w.numel(),
            "eligible": not reason, "masked": getattr(m, MASK, None) is not None,
            "zeros": (w == 0).float().mean().item(), "pruned_groups": groups_ok,
            "is_2to4": not reason and groups_ok == 1.0, "note": reason,
        })  # fmt: skip
    return pd.DataFrame(rows)


# ---- gradual pruning (Zhu & Gupta 2017) ---------------------------------------------------------------------


def gradual_schedule(epochs: int, prune_epochs: int | None = None) -> list[float]:
    """Share of 4-groups pruned at the start of each epoch: cubic, Zhu & Gupta 2017 (arXiv:1710.01878).

    ``fraction_k = 1 - (1 - k / K)**3`` at the start of epoch k = 1..K (1-based, K = ``prune_epochs``, default
    ``epochs``), then 1: most groups go early, when the network recovers fastest, the last few gently.

    Example:
        >>> [round(f, 3) for f in gradual_schedule(4, prune_epochs=3)]
        [0.704, 0.963, 1.0, 1.0]
    """
    for name, value in (
        ("epochs", epochs),
        ("prune_epochs", epochs if prune_epochs is None else prune_epochs),
    ):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name}={value!r} must be an int >= 1")
    k_max = epochs if prune_epochs is None else prune_epochs
    if k_max > epochs:
        raise ValueError(f"prune_epochs={k_max} exceeds epochs={epochs}; pass prune_epochs <= epochs")
    return [1.0 - (1.0 - min(e + 1, k_max) / k_max) ** 3 for e in range(epochs)]


class GradualPruning:
    """An ``on_epoch_start`` callback for :func:`qatlab.fit`: prune to ``schedule[epoch]`` at each epoch start.

    Args:
        schedule: share of 4-groups pruned at the start of each epoch (0-based), non-decreasing, e.g.
            :func:`gradual_schedule`; one entry per epoch of the ``fit`` call.
        layers: as in :func:`apply_2to4` (default: every eligible layer).

    ``history`` holds one dict per epoch: ``epoch`` (1-based), ``fraction``, ``zeros`` (fraction of zeros over
    the pruned layers' weights).

    Example:
        >>> pruner = GradualPruning(gradual_schedule(4, prune_epochs=3))
        >>> # qatlab.fit(model, train, epochs=4, lr=0.01, on_epoch_start=pruner)
    """

    def __init__(self, schedule: Sequence[float], layers: Sequence[str] | None = None) -> None:
        schedule = list(schedule)
        if not schedule:
            raise ValueError("schedule is empty; pass one fraction per epoch, e.g. gradual_schedule(epochs)")
        for f in schedule:
            _check_fraction(f)
        if any(b < a for a, b in zip(schedule, schedule[1:], strict=False)):
            raise ValueError(f"schedule {schedule} decreases; pruned weights stay pruned, so it must not")
        self.schedule, self.layers = schedule, layers
        self.history: list[dict[str, float]] = []

    def __call__(self, epoch: int, model: nn.Module) -> None:
        if epoch >= len(self.schedule):
            raise ValueError(
                f"schedule has {len(self.schedule)} entries but fit started epoch {epoch + 1}; pass a schedule "
                "with one entry per epoch, e.g. gradual_schedule(epochs) with fit's epochs"
            )
        report = apply_2to4(model, fraction=self.schedule[epoch], layers=self.layers)
        pruned = report[report["masked"]]
        zeros = float((pruned["zeros"] * pruned["params"]).sum() / pruned["params"].sum())
        self.history.append({"epoch": epoch + 1, "fraction": self.schedule[epoch], "zeros": zeros})


# ---- the exported ONNX file ---------------------------------------------------------------------------------

_CODE_RANGE = {2: (0, 255), 3: (-128, 127), 4: (0, 65535), 5: (-32768, 32767), 21: (0, 15), 22: (-8, 7)}


def _reduction_axis(op: str, index: int, node: Any, ndim: int) -> int | None:
    """Reduction axis of the weight feeding input ``index`` of ``node`` (None for ops not handled)."""
    attrs = {a.name: a.i for a in node.attribute}
    if op == "Conv" and index == 1:
        return 1  # (out, in/groups, kh, kw)
    if op == "Gemm":
        return (1 if attrs.get("transB", 0) else 0) if index == 1 else (0 if attrs.get("transA", 0) else 1)
    if op == "MatMul":
        return ndim - 2 if index == 1 else ndim - 1
    return None


def onnx_2to4_report(path: Any) -> pd.DataFrame:
    """Integer weight codes of an exported QDQ file, checked for the 2:4 pattern.

    For each ``QuantizeLinear`` whose input is a float initializer (a weight): take the initializer, its scale
    and zero point, compute the codes with numpy (``clip(rint(w / scale) + zero_point)``, per axis when the
    scale is), follow the node through ``Clip``/``DequantizeLinear`` to its consumer to find the reduction axis
    (Conv: 1; Gemm: by ``transB``; MatMul: -2), and check that every group of 4 along it has >= 2 codes equal to
    the zero point.

    Returns:
        One row per weight: ``layer`` (initializer name without ``.weight``), ``consumer``, ``shape``,
        ``dtype`` of the codes, ``axis``, ``eligible`` (axis length a multiple of 4), ``zero_codes`` (fraction of
        codes equal to the zero point), ``is_2to4``.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    inits = {i.name: i for i in graph.initializer}
    users: dict[str, list[tuple[Any, int]]] = defaultdict(list)
    for node in graph.node:
        for k, name in enumerate(node.input):
            users[name].append((node, k))
    rows = []
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[0]])
        if not np.issubdtype(w.dtype, np.floating):
            continue
        missing = [v for v in node.input[1:] if v and v not in inits]
        if missing:
            raise ValueError(f"QuantizeLinear of {node.input[0]!r}: {missing} are not initializers; export "
                             "with qatlab.export_onnx, which folds qparams into constants")  # fmt: skip
        scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        has_zp = len(node.input) > 2 and node.input[2]
        zp = numpy_helper.to_array(inits[node.input[2]]) if has_zp else np.zeros((), np.uint8)
        lo, hi = _CODE_RANGE[inits[node.input[2]].data_type] if has_zp else (0, 255)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % w.ndim
        shape = [-1 if d == axis else 1 for d in range(w.ndim)] if scale.size > 1 else [1] * w.ndim
        zp64 = zp.astype(np.int64).reshape(shape)
        codes = np.clip(np.rint(w.astype(np.float32) / scale.reshape(shape)) + zp64, lo, hi)  # ONNX: float32
        consumer, value = None, node.output[0]
        while consumer is None and len(users[value]) == 1:
            nxt, k = users[value][0]
            if nxt.op_type in ("Clip", "DequantizeLinear"):
                value = nxt.output[0]
            else:
                consumer = (nxt, k)
        red = _reduction_axis(consumer[0].op_type, consumer[1], consumer[0], w.ndim) if consumer else None
        eligible = red is not None and w.shape[red] % 4 == 0
        rows.append({
            "layer": node.input[0].removesuffix(".weight"), "consumer": consumer[0].op_type if consumer else "",
            "shape": "x".join(map(str, w.shape)), "dtype": zp.dtype.name, "axis": -1 if red is None else red,
            "eligible": eligible, "zero_codes": float((codes == zp64).mean()),
            "is_2to4": eligible and check_2to4(codes - zp64, axis=red),  # zero where code == zero point
        })  # fmt: skip
    return pd.DataFrame(rows)
