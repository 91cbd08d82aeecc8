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
import operator
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from qatlab.config import QATConfig, QuantSpec, progress_bar
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
    if config.quantize_adds:
        if graph is None:
            raise ValueError(
                f"quantize_adds=True needs a model that traces with torch.fx; {type(model).__name__} does not "
                "(pass quantize_adds=False)"
            )
        qat = _insert_add_quantizers(qat, config.activation)
        graph = qat.graph
    chains = _chains_fx(qat, graph) if graph is not None else _chains_sequential(qat)
    if not chains:
        raise ValueError(
            f"model {type(model).__name__} has no quantizable layers (nn.Conv2d or nn.Linear); nothing to prepare"
        )
    layer_paths = [c[0] for c in chains]
    keep = _resolve_keep(config.keep, layer_paths, qat)
    # per-layer overrides, by resolved name ("first"/"last" allowed); an override wins over keep
    overrides: dict[str, list] = {}
    for name, *specs in config.overrides:
        (path,) = _resolve_keep((name,), layer_paths, qat, what="overrides entry")
        if path in overrides:
            raise ValueError(
                f"overrides names layer {path!r} twice (as {name!r} and as another name, e.g. 'first'/'last'); "
                "give each layer one entry"
            )
        overrides[path] = specs
    open_outputs: set[str] = set()
    quantized = {
        p
        for p in layer_paths
        if (
            any(s is not None for s in overrides[p])
            if p in overrides
            else p not in keep or config.keep_bits is not None
        )
    }
    if config.quantize_outputs:
        if graph is None:
            warnings.warn(
                f"quantize_outputs=True: {type(model).__name__} does not trace with torch.fx, so no layer outputs "
                "are quantized; the layer inputs are, as with quantize_outputs=False",
                stacklevel=2,
            )
        else:
            open_outputs = _open_outputs(graph, chains, quantized)
    # quantize_adds: layers whose input is already codes read them as they are (one quantizer per tensor)
    reads_codes = _reads_codes(graph, chains, open_outputs & quantized) if config.quantize_adds else set()
    for chain in chains:
        layer_path, relu_path = chain[0], chain[-1]
        bn_path = chain[1] if len(chain) == 3 else None
        is_kept = layer_path in keep
        if layer_path in overrides:
            wspec, aspec = overrides[layer_path]
        else:
            wspec, aspec = config.spec_for("weight", is_kept), config.spec_for("activation", is_kept)
        if wspec is None and aspec is None:
            continue
        in_spec = None if layer_path in reads_codes else aspec
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
                new = QuantConv2d(folded, wspec, in_spec, relu=fuse_relu)
            else:
                new = QuantConvBn2d(layer, bn, wspec, in_spec, relu=fuse_relu, mode=config.bn_mode)
            _set(qat, bn_path, nn.Identity())
        elif isinstance(layer, nn.Conv2d):
            new = QuantConv2d(layer, wspec, in_spec, relu=fuse_relu)
        else:
            new = QuantLinear(layer, wspec, in_spec, relu=fuse_relu)
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


_ADDS = (operator.add, torch.add)
_RELUS = (torch.relu, torch.nn.functional.relu)


def _insert_add_quantizers(model: nn.Module, spec: QuantSpec) -> torch.fx.GraphModule:
    """A GraphModule of ``model`` with a FakeQuantizer after every tensor + tensor addition (after the ReLU
    that is its only user, if any), held in ``add_quant`` (a ModuleDict keyed by the add's node name)."""
    if hasattr(model, "add_quant"):
        raise ValueError(
            f"{type(model).__name__} already has an attribute 'add_quant'; quantize_adds needs the name"
        )
    gm = torch.fx.symbolic_trace(model)
    graph = gm.graph
    mods = dict(gm.named_modules())

    def is_relu(node: torch.fx.Node) -> bool:
        if node.op == "call_module":
            return isinstance(mods.get(node.target), nn.ReLU)
        return (node.op == "call_function" and node.target in _RELUS) or (
            node.op == "call_method" and node.target == "relu"
        )

    adds = [
        n
        for n in graph.nodes
        if ((n.op == "call_function" and n.target in _ADDS) or (n.op == "call_method" and n.target == "add"))
        and len(n.args) >= 2
        and all(isinstance(a, torch.fx.Node) for a in n.args[:2])
    ]
    gm.add_quant = nn.ModuleDict()
    for add in adds:
        users = list(add.users)
        tail = users[0] if len(users) == 1 and is_relu(users[0]) else add
        if any(u.op == "output" for u in tail.users):  # the model's own output stays float
            continue
        gm.add_quant[add.name] = FakeQuantizer(spec)
        with graph.inserting_after(tail):
            q = graph.call_module(f"add_quant.{add.name}", (tail,))
        tail.replace_all_uses_with(q, delete_user_cb=lambda user, q=q: user is not q)
    graph.lint()
    gm.recompile()
    return gm


def _reads_codes(graph: torch.fx.Graph, chains: list[list[str]], open_outputs: set[str]) -> set[str]:
    """Layers (first names of ``chains``) whose input is already quantized: an ``add_quant`` quantizer's
    output, or the output of a layer in ``open_outputs`` (which gets an output quantizer)."""
    last = {(c[-1] or (c[1] if len(c) == 3 else c[0])): c[0] for c in chains}  # chain's last module -> layer
    first = {c[0] for c in chains}
    out = set()
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in first or not node.args:
            continue
        src = node.args[0]
        if not isinstance(src, torch.fx.Node) or src.op != "call_module":
            continue
        if src.target.startswith("add_quant.") or last.get(src.target) in open_outputs:
            out.add(node.target)
    return out


def _resolve_keep(
    keep: Iterable[str], layer_paths: list[str], model: nn.Module, what: str = "keep entry"
) -> set[str]:
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
                f"{what} {name!r} is not a quantizable layer; choose from 'first', 'last', {order}"
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
    keep_codes: bool = True,
    sequential: bool = True,
) -> nn.Module:
    """Recompute every BatchNorm's running statistics with the model's current (quantized) weights.

    BN re-estimation (Nagel et al. 2022, section 4): during QAT the running mean and variance are moving
    averages over many steps, collected while weights oscillated between grid points; the final weights can
    give other statistics. Each BN's running statistics become the plain average of its batch statistics over
    ``num_batches`` training batches (observers and gradients off). Weights are unchanged; the model's mode and
    BN flags are restored.

    ``sequential=True`` (default) re-estimates one BN at a time in execution order, with every BN before it
    already re-estimated and in eval mode: each layer's statistics are then measured on the inputs the deployed
    network gives it. ``sequential=False`` runs the whole model in train mode once, as usually described: each
    BN is then measured while the layers before it normalise with *batch* statistics, and where the network's
    behaviour hangs on those (3-bit depthwise weights), the statistics do not fit the deployed network: on the
    W3A4 depthwise CNN of notebook 08 the one-pass procedure lost up to 19 points on one seed and gained 22 on
    another, while the sequential one gained on every seed and reached the accuracy the model has with batch
    statistics (notebook 08 measures both). It costs one pass over the batches per BN.

    With simulated folding (``bn_mode="simulate"``) the quantized weight is the folded one, ``w * gamma / sigma``
    with the running ``sigma``: new statistics would move every folded weight on a grid whose scale QAT tuned
    for the old ``sigma``. With ``keep_codes=True`` the folding keeps the old ``sigma`` while the statistics are
    collected, and a per-channel weight scale is then multiplied by ``sigma_old / sigma_new``: the integer weight
    codes stay exactly what QAT left and only BN's statistics change. (A per-tensor weight scale cannot follow
    each channel; it is left as it is.) ``keep_codes=False`` lets the folding follow the new statistics.

    Args:
        model: a QAT model (from :func:`prepare_qat`) or any model with BatchNorm layers.
        loader: training batches, as for :func:`calibrate`.
        num_batches: how many batches to average (positive int).
        keep_codes: keep the integer weight codes of simulated-folding layers (see above).
        sequential: one BN at a time, the ones before it in eval mode (see above).
    """
    from itertools import islice

    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"num_batches={num_batches!r} must be a positive int, e.g. 50")
    bns = [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    if not bns:
        raise ValueError("model has no BatchNorm with running statistics: nothing to re-estimate")
    batches = list(islice(iter(loader), num_batches))
    if not batches:
        raise ValueError("loader has no batches: BN re-estimation needs data")
    # each BN with the module whose train flag decides how it normalises (a QuantConvBn2d holds its own)
    owners = {m.bn: m for m in model.modules() if isinstance(m, QuantConvBn2d)}
    units = [owners.get(bn, bn) for bn in bns]
    if sequential:
        units = _execution_order(model, units, batches[0], device)
    flags = [(m, m.training) for m in model.modules()]
    momenta = [bn.momentum for bn in bns]
    frozen = {m: m.bn_frozen for m in owners.values()}
    observing = {q: q.observer_enabled for _, q in quantizers(model)}
    simulated = [m for m in frozen if m.mode == "simulate"] if keep_codes else []
    for m in simulated:  # fold with the statistics QAT ended with while new ones are collected
        m.fold_var = m.bn.running_var.clone()
    for q in observing:
        q.observer_enabled = False
    for m in frozen:
        m.bn_frozen = False
    rounds = [[u] for u in units] if sequential else [units]
    bar = progress_bar(
        total=len(rounds) * len(batches), desc="BN re-estimation", progress=progress, leave=False
    )
    try:
        model.eval()
        for active in rounds:
            for unit in active:
                unit.train()
            for k, batch in enumerate(batches):
                for (
                    unit
                ) in active:  # momentum 1/(k+1): the running value becomes the mean over the k+1 batches
                    (unit.bn if isinstance(unit, QuantConvBn2d) else unit).momentum = 1.0 / (k + 1)
                run_batch(model, batch, device)
                bar.update()
            for unit in active:  # done: eval mode, and its weight codes kept under the new statistics
                unit.eval()
                if unit in simulated:
                    _keep_weight_codes(unit, unit.fold_var)
                    unit.fold_var = None
    finally:
        bar.close()
        for bn, m in zip(bns, momenta, strict=True):
            bn.momentum = m
        for m, f in frozen.items():
            m.bn_frozen = f
        for q, on in observing.items():
            q.observer_enabled = on
        for m, t in flags:  # per module, as evaluate does: a BN left in eval on purpose stays so
            m.training = t
        for m in simulated:  # interrupted: finish the ones still collecting
            if m.fold_var is not None:
                _keep_weight_codes(m, m.fold_var)
                m.fold_var = None
    return model


def _execution_order(model: nn.Module, units: list[nn.Module], batch: Any, device) -> list[nn.Module]:
    """``units`` in the order one eval-mode forward pass calls them (module order can differ: a residual
    downsample is often registered after the convs it runs beside)."""
    order: list[nn.Module] = []
    hooks = [
        u.register_forward_pre_hook(lambda m, _: order.append(m) if m not in order else None) for u in units
    ]
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        run_batch(model, batch, device)
    finally:
        for h in hooks:
            h.remove()
        for m, t in modes:
            m.training = t
    return order + [u for u in units if u not in order]


@torch.no_grad()
def _keep_weight_codes(layer: QuantConvBn2d, old_var: torch.Tensor) -> None:
    """Rescale a simulated-folding layer's per-channel weight scale after BN's variance changed from
    ``old_var``: ``round(w gamma / (sigma S))`` is unchanged when ``S`` follows ``sigma_old / sigma_new``."""
    q = layer.weight_quant
    if q is None or not q.spec.per_channel:
        return
    ratio = torch.sqrt(old_var + layer.bn.eps) / torch.sqrt(layer.bn.running_var + layer.bn.eps)  # (C,)
    q.scale.data.mul_(ratio.to(q.scale.dtype))


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
        for batch in progress_bar(
            loader, desc="calibrate", total=num_batches, progress=progress, leave=False
        ):
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
