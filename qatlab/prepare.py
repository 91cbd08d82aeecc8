"""Model surgery: turn a float model into a QAT model, calibrate it, freeze it, convert it for deployment.

``prepare_qat`` copies the model, finds Conv2d -> BatchNorm2d (-> ReLU) and Linear (-> ReLU) chains by
tracing it with ``torch.fx`` (falling back to consecutive children of ``nn.Sequential`` when the model does
not trace), and swaps in the layers of :mod:`qatlab.modules`. Everything else (residual additions,
functional ReLUs, pooling) stays as written: each quantized layer quantizes its own input, so whatever
feeds it, a sum or a pooled map, is quantized where it enters.

Example:
    >>> import qatlab
    >>> from qatlab.models import LabCNN
    >>> qat = qatlab.prepare_qat(LabCNN(), qatlab.QATConfig())
    >>> # qatlab.calibrate(qat, loader); qatlab.fit(qat, loader, epochs=1, lr=1e-3)
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from qatlab.config import QATConfig
from qatlab.modules import FakeQuantizer, QuantConv2d, QuantConvBn2d, QuantLinear, fold_bn

QUANTIZABLE = (nn.Conv2d, nn.Linear)
QUANT_LAYERS = (QuantConv2d, QuantLinear)


def _get(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def _set(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


def _fx_graph(model: nn.Module) -> torch.fx.Graph | None:
    """The model's fx graph; None if it does not trace (control flow, HF models)."""
    try:
        return torch.fx.symbolic_trace(model).graph
    except Exception:  # any tracing failure: callers fall back (Sequential chains, no output quantizers)
        return None


def _chains_fx(model: nn.Module, graph: torch.fx.Graph) -> list[list[str]]:
    """Conv->BN(->ReLU) and Linear->ReLU chains from the model's fx graph."""
    mods = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1

    def only_user(node, kind):
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module" and isinstance(mods[users[0].target], kind):
            return users[0]
        return None

    chains = []
    for node in graph.nodes:
        if node.op != "call_module" or calls[node.target] != 1:
            continue
        mod = mods[node.target]
        chain = [node.target]
        if isinstance(mod, nn.Conv2d):
            bn = only_user(node, nn.BatchNorm2d)
            if bn is not None and calls[bn.target] == 1:
                chain.append(bn.target)
                node = bn
        elif not isinstance(mod, nn.Linear):
            continue
        relu = only_user(node, nn.ReLU)
        chain.append(relu.target if relu is not None and calls[relu.target] == 1 else "")
        chains.append(chain)
    return chains


def _chains_sequential(model: nn.Module) -> list[list[str]]:
    """The same chains found as consecutive children of nn.Sequential containers."""
    chains, seen = [], set()
    for prefix, mod in model.named_modules():
        if not isinstance(mod, nn.Sequential):
            continue
        names = list(mod._modules)
        for i, name in enumerate(names):
            child = mod._modules[name]
            if not isinstance(child, QUANTIZABLE):
                continue
            path = f"{prefix}.{name}" if prefix else name
            chain, j = [path], i + 1
            if (
                isinstance(child, nn.Conv2d)
                and j < len(names)
                and isinstance(mod._modules[names[j]], nn.BatchNorm2d)
            ):
                chain.append(f"{prefix}.{names[j]}" if prefix else names[j])
                j += 1
            is_relu = j < len(names) and isinstance(mod._modules[names[j]], nn.ReLU)
            chain.append((f"{prefix}.{names[j]}" if prefix else names[j]) if is_relu else "")
            chains.append(chain)
            seen.add(path)
    for name, mod in model.named_modules():  # quantizable layers outside Sequentials: alone
        if isinstance(mod, QUANTIZABLE) and name not in seen:
            chains.append([name, ""])
    return chains


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        raise ValueError(
            f"model is wrapped in {type(model).__name__}: prepare the QAT model first, then wrap it "
            "(prepare_qat(model.module, config), then DistributedDataParallel(qat_model)); wrapping first "
            "leaves DDP holding the float parameters"
        )
    if any(isinstance(m, FakeQuantizer) for m in model.modules()):
        raise ValueError("model already contains FakeQuantizers (prepared twice?); pass the float model")


def prepare_qat(model: nn.Module, config: QATConfig | None = None) -> nn.Module:
    """A QAT copy of ``model``: Conv2d/Linear layers fake-quantize weights and input activations.

    Conv2d -> BatchNorm2d pairs become :class:`QuantConvBn2d` (``simulate``/``keep``) or a folded
    :class:`QuantConv2d` (``fold``); a ReLU module right after is fused. The float model is not modified.

    Args:
        model: any float ``nn.Module`` (nested Sequentials, residual blocks, functional ops).
        config: the :class:`QATConfig`; default W8A8, per-channel weights, simulated BN folding.

    Returns:
        The QAT model, in the same train/eval mode as ``model``, with observers and fake quant enabled.
    """
    config = QATConfig() if config is None else config
    if not isinstance(config, QATConfig):
        raise TypeError(f"config must be a QATConfig, got {type(config).__name__}")
    _check_model(model)
    qat = copy.deepcopy(model)
    graph = _fx_graph(qat)
    chains = _chains_fx(qat, graph) if graph is not None else _chains_sequential(qat)
    if not chains:
        raise ValueError(
            f"model {type(model).__name__} has no quantizable layers (nn.Conv2d or nn.Linear); nothing to prepare"
        )
    keep = _resolve_keep(config.keep, [c[0] for c in chains], qat)
    open_outputs: set[str] = set()
    if config.quantize_outputs:
        quantized = {c[0] for c in chains if c[0] not in keep or config.keep_bits is not None}
        if graph is None:
            warnings.warn(
                f"quantize_outputs=True: {type(model).__name__} does not trace with torch.fx, so no layer outputs "
                "are quantized; the layer inputs are, as with quantize_outputs=False",
                stacklevel=2,
            )
        else:
            open_outputs = _open_outputs(graph, chains, quantized)
    for chain in chains:
        layer_path, relu_path = chain[0], chain[-1]
        bn_path = chain[1] if len(chain) == 3 else None
        is_kept = layer_path in keep
        wspec, aspec = config.spec_for("weight", is_kept), config.spec_for("activation", is_kept)
        if is_kept and wspec is None and aspec is None:
            continue
        layer = _get(qat, layer_path)
        fuse_relu = bool(relu_path) and config.fuse_relu
        if bn_path is not None:
            bn = _get(qat, bn_path)
            if config.bn_mode == "fold":
                folded = copy.deepcopy(layer)
                with torch.no_grad():
                    w, b = fold_bn(layer.weight, layer.bias, bn)
                    folded.weight.copy_(w)
                    folded.bias = nn.Parameter(b.detach().clone())
                new = QuantConv2d(folded, wspec, aspec, relu=fuse_relu)
            else:
                new = QuantConvBn2d(layer, bn, wspec, aspec, relu=fuse_relu, mode=config.bn_mode)
            _set(qat, bn_path, nn.Identity())
        elif isinstance(layer, nn.Conv2d):
            new = QuantConv2d(layer, wspec, aspec, relu=fuse_relu)
        else:
            new = QuantLinear(layer, wspec, aspec, relu=fuse_relu)
        if config.quantize_outputs and aspec is not None and layer_path in open_outputs:
            new.output_quant = FakeQuantizer(aspec)
        _set(qat, layer_path, new)
        if fuse_relu:
            _set(qat, relu_path, nn.Identity())
    qat.train(model.training)
    return qat


def _open_outputs(graph: torch.fx.Graph, chains: list[list[str]], quantized: set[str]) -> set[str]:
    """Layers (first names of ``chains``) whose output, after the chain's BN/ReLU, goes somewhere other than a
    quantized layer's input and other than the model's output: a pooling, an add, a flatten."""
    last = {(c[-1] or (c[1] if len(c) == 3 else c[0])): c[0] for c in chains}  # chain's last module -> layer
    out = set()
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in last:
            continue
        users = list(node.users)
        to_output = any(u.op == "output" for u in users)
        to_quantized = all(u.op == "call_module" and u.target in quantized for u in users)
        if users and not to_output and not to_quantized:
            out.add(last[node.target])
    return out


def _resolve_keep(keep: Iterable[str], layer_paths: list[str], model: nn.Module) -> set[str]:
    order = [n for n, m in model.named_modules() if n in set(layer_paths)]
    out = set()
    for name in keep:
        if name == "first":
            out.add(order[0])
        elif name == "last":
            out.add(order[-1])
        elif name in layer_paths:
            out.add(name)
        else:
            raise ValueError(
                f"keep entry {name!r} is not a quantizable layer; choose from 'first', 'last', {order}"
            )
    return out


def quantizers(model: nn.Module) -> Iterator[tuple[str, FakeQuantizer]]:
    """(name, FakeQuantizer) for every quantizer in the model."""
    return ((n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantizer))


def _require_prepared(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not any(True for _ in quantizers(model)):
        raise ValueError(
            "model has no FakeQuantizers: prepare it first with qatlab.prepare_qat(model, config)"
        )


def enable_fake_quant(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch fake quantization on/off in every quantizer (off: the QAT model computes in float)."""
    for _, q in quantizers(model):
        q.fake_quant_enabled = enabled
    return model


def enable_observers(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch range estimation on/off in every quantizer."""
    for _, q in quantizers(model):
        q.observer_enabled = enabled
    return model


def freeze_observers(model: nn.Module) -> nn.Module:
    """Stop range estimation: scales and zero points stay fixed (learned scales still train)."""
    return enable_observers(model, False)


def freeze_bn_stats(model: nn.Module) -> nn.Module:
    """BatchNorm uses (and no longer updates) running statistics, also in train mode."""
    for m in model.modules():
        if isinstance(m, QuantConvBn2d):
            m.bn_frozen = True
    return model


@torch.no_grad()
def reestimate_bn(
    model: nn.Module,
    loader: Iterable,
    num_batches: int = 50,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> nn.Module:
    """Recompute every BatchNorm's running statistics with the model's current (quantized) weights.

    BN re-estimation (Nagel et al. 2022, section 4): during QAT the running mean and variance are moving
    averages over many steps, collected while weights oscillated between grid points; the final weights can
    give other statistics. This runs ``num_batches`` training batches in train mode with observers and
    gradients off and replaces each BN's running statistics by their plain average over those batches.
    Quantizer ranges, learned scales and weights are unchanged; the model's mode and BN flags are restored.

    Args:
        model: a QAT model (from :func:`prepare_qat`) or any model with BatchNorm layers.
        loader: training batches, as for :func:`calibrate`.
        num_batches: how many batches to average (positive int).
    """
    from tqdm.auto import tqdm

    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"num_batches={num_batches!r} must be a positive int, e.g. 50")
    bns = [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    if not bns:
        raise ValueError("model has no BatchNorm with running statistics: nothing to re-estimate")
    was_training = model.training
    momenta = [bn.momentum for bn in bns]
    frozen = {m: m.bn_frozen for m in model.modules() if isinstance(m, QuantConvBn2d)}
    observing = {q: q.observer_enabled for _, q in quantizers(model)}
    for q in observing:
        q.observer_enabled = False
    for m in frozen:
        m.bn_frozen = False
    model.train()
    seen = 0
    try:
        for batch in tqdm(
            loader, desc="BN re-estimation", total=num_batches, disable=not progress, leave=False
        ):
            for bn in bns:  # momentum 1/(k+1): the running value becomes the mean over the k+1 batches so far
                bn.momentum = 1.0 / (seen + 1)
            run_batch(model, batch, device)
            seen += 1
            if seen >= num_batches:
                break
    finally:
        for bn, m in zip(bns, momenta, strict=True):
            bn.momentum = m
        for m, f in frozen.items():
            m.bn_frozen = f
        for q, on in observing.items():
            q.observer_enabled = on
        model.train(was_training)
    if seen == 0:
        raise ValueError("loader has no batches: BN re-estimation needs data")
    return model


def run_batch(model: nn.Module, batch: Any, device: torch.device | str) -> Any:
    """Feed one loader batch to the model: (x, y) tuples, bare tensors, or dicts of model kwargs."""
    if isinstance(batch, dict):
        return model(**{k: v.to(device) for k, v in batch.items() if k not in ("labels", "label")})
    if isinstance(batch, (tuple, list)):
        batch = batch[0]
    return model(batch.to(device))


@torch.no_grad()
def calibrate(
    model: nn.Module,
    loader: Iterable,
    num_batches: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> nn.Module:
    """Run data through the model with observers on and fake quant off, then switch fake quant on.

    The model runs in eval mode (BatchNorm uses running statistics); its train/eval mode is restored after.

    Args:
        model: a model from :func:`prepare_qat`.
        loader: batches as (x, y), x, or dicts of keyword arguments.
        num_batches: stop after this many batches (``None``: the whole loader).
        device: where the model and batches run.
    """
    from tqdm.auto import tqdm

    _require_prepared(model)
    if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
        raise ValueError(f"num_batches={num_batches!r} must be a positive int or None (the whole loader)")
    was_training = model.training
    model.eval()
    enable_fake_quant(model, False)
    enable_observers(model, True)
    for _, q in quantizers(model):
        q.calibrating = True
    seen = 0
    try:
        for batch in tqdm(loader, desc="calibrate", total=num_batches, disable=not progress, leave=False):
            run_batch(model, batch, device)
            seen += 1
            if num_batches is not None and seen >= num_batches:
                break
    finally:
        enable_fake_quant(model, True)
        for _, q in quantizers(model):
            q.calibrating = False
        model.train(was_training)
    if seen == 0:
        raise ValueError("loader has no batches: calibration needs data (check the dataset and batch_size)")
    return model


def ptq(
    model: nn.Module,
    config: QATConfig | None,
    calib_loader: Iterable,
    num_batches: int | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Post-training quantization: prepare, calibrate, freeze observers and BN; returned in eval mode."""
    qat = prepare_qat(model, config).to(device)
    calibrate(qat, calib_loader, num_batches=num_batches, device=device)
    freeze_observers(qat)
    freeze_bn_stats(qat)
    return qat.eval()


def convert(model: nn.Module) -> nn.Module:
    """A deployable copy: every Conv+BN folded into a :class:`QuantConv2d`, observers frozen, eval mode.

    The folded weight keeps the weight quantizer's qparams in ``simulate`` mode (it already quantized the
    folded weight); in ``keep`` mode the quantizer re-observes the folded weight, since folding rescales
    every output channel.
    """
    _require_prepared(model)
    out = copy.deepcopy(model).eval()
    for name, m in list(out.named_modules()):
        if not isinstance(m, QuantConvBn2d):
            continue
        w, b = (t.detach() for t in m.folded())
        conv = nn.Conv2d(
            m.in_channels, m.out_channels, w.shape[-2:], m.stride, m.padding, m.dilation, m.groups
        )
        new = QuantConv2d(conv, None, None, relu=m.relu)
        with torch.no_grad():
            new.weight.copy_(w)
            new.bias = nn.Parameter(b.clone())
        new.input_quant, new.weight_quant, new.output_quant = m.input_quant, m.weight_quant, m.output_quant
        if m.mode == "keep" and new.weight_quant is not None:
            new.weight_quant.observer.reset()
            new.weight_quant.observer(new.weight)
            new.weight_quant.update_qparams()
        _set(out, name, new.to(w.device))
    return freeze_observers(out).eval()
