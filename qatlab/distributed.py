"""QAT under DistributedDataParallel: prepare first, then wrap; observers in sync across ranks; a torchrun entry.

The order matters (AIMET's lesson): :func:`qatlab.prepare_qat` builds a new model with new parameters, so it
must run before ``DistributedDataParallel`` wraps the model; passing a DDP-wrapped model to ``prepare_qat``
raises an error that says so. DDP keeps the parameters (and so the weight ranges and learned scales) equal
across ranks by averaging gradients, but activation observers see only their rank's batch: torch.ao's
observers keep per-rank ranges. :func:`sync_observers` makes every activation observer combine each batch's
range over all ranks (min of mins, max of maxes), so every rank holds the range of the global batch.

Launch (gloo on CPU, nccl on GPU)::

    torchrun --standalone --nproc_per_node=2 -m qatlab.distributed --config run.json --out build/ddp

    # several machines: the same command on each node, all naming one node's address (c10d rendezvous)
    torchrun --nnodes=2 --nproc_per_node=1 --rdzv-backend=c10d --rdzv-endpoint=10.0.0.1:29400 --rdzv-id=qat1 \
        -m qatlab.distributed --config run.json --out build/ddp

``run.json`` holds a :class:`RunConfig` (``RunConfig().to_json()`` writes one); :func:`launch` does all of it
from Python and returns the result, and ``world_size=1`` (plain ``python -m qatlab.distributed``) is the
single-process run at the same global batch, for comparison. Rank 0 shows progress, writes a checkpoint and the
history after every epoch, exports ONNX and writes ``result.json``; all files are written atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from qatlab import dynamics
from qatlab.config import QATConfig
from qatlab.data import loaders, resolve_dataset
from qatlab.experiments import qat_run
from qatlab.export import export_onnx, verify_onnx
from qatlab.files import save_atomic, write_atomic
from qatlab.models import build_model
from qatlab.modules import QuantConv2d, QuantConvBn2d, QuantLinear
from qatlab.prepare import prepare_qat
from qatlab.train import evaluate, freeze_as_fit_left


@dataclass
class RunConfig:
    """One QAT run, the same for 1 or N processes (JSON-ready).

    Args:
        model, model_kwargs: a :func:`qatlab.models.build_model` name and its arguments.
        dataset: "auto" (Fashion-MNIST when installed, else digits), "fashion_mnist" or "digits".
        train_size, test_size: Fashion-MNIST subset sizes (None: full, or the fast-mode default).
        float_checkpoint: a float state dict to start from (e.g. ``zoo.trained_cnn(...)[2]["checkpoint"]``).
        qat: a :class:`QATConfig` or its ``to_dict()`` (stored as the dict).
        global_batch: examples per optimizer step over all ranks; each rank takes ``global_batch / world``.
        epochs, steps_per_epoch, lr, optimizer, schedule, momentum: as in :func:`qatlab.fit`.
        calib_batches: batches per rank for PTQ calibration before QAT (0: start from the first batch's ranges).
        sync_observers: combine activation ranges over ranks (see :func:`sync_observers`).
        freeze_bn_epoch: freeze BatchNorm statistics from this epoch on, as in :func:`qatlab.fit` (0: from the
            start; then N ranks and one process at the same global batch compute the same thing up to the
            order of float sums, since no rank normalises with its own share of the batch).
        export: export the final model to ONNX from rank 0 and check it in ONNX Runtime.
        record_dynamics: record rank 0's weight flips during QAT (:func:`qatlab.dynamics.record`) and save the
            per-layer oscillation as ``oscillation.csv`` (the doctor's ``oscillation`` check reads it).
        device: "auto" (the rank's GPU when CUDA is there, else CPU), "cpu" or "cuda".
    """

    model: str = "cnn"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    dataset: str = "auto"
    train_size: int | None = None
    test_size: int | None = None
    float_checkpoint: str | None = None
    qat: dict[str, Any] = field(default_factory=lambda: QATConfig().to_dict())
    global_batch: int = 64
    epochs: int = 1
    steps_per_epoch: int | None = None
    lr: float = 2.5e-3
    optimizer: str = "sgd"
    schedule: str = "cosine"
    momentum: float = 0.9
    calib_batches: int = 8
    seed: int = 0
    sync_observers: bool = True
    freeze_bn_epoch: int | None = None
    export: bool = True
    record_dynamics: bool = False
    device: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.global_batch, int) or self.global_batch < 1:
            raise ValueError(f"global_batch={self.global_batch!r} must be a positive int, e.g. 64")
        if not isinstance(self.calib_batches, int) or self.calib_batches < 0:
            raise ValueError(f"calib_batches={self.calib_batches!r} must be an int >= 0 (0: no calibration)")
        if self.freeze_bn_epoch is not None and (
            isinstance(self.freeze_bn_epoch, bool)
            or not isinstance(self.freeze_bn_epoch, int)
            or self.freeze_bn_epoch < 0
        ):
            raise ValueError(
                f"freeze_bn_epoch={self.freeze_bn_epoch!r} must be None or an int >= 0 (0: from the start)"
            )
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device={self.device!r} must be 'auto', 'cpu' or 'cuda'")
        if isinstance(self.qat, QATConfig):
            self.qat = self.qat.to_dict()
        # validated, and in its JSON form (lists, not tuples) so a config equals itself read back
        self.qat = json.loads(json.dumps(QATConfig.from_dict(self.qat).to_dict()))

    def to_json(self, path: str | os.PathLike) -> Path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return write_atomic(path, json.dumps(asdict(self), indent=1))

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> RunConfig:
        d = json.loads(Path(path).read_text())
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown RunConfig fields {sorted(unknown)}")
        return cls(**d)


def sync_observers(model: nn.Module, enabled: bool = True) -> int:
    """Make the activation observers of ``model`` combine every batch's range over all ranks.

    Weight observers are left alone: DDP keeps the weights equal on every rank, so their ranges are equal
    without communication. Returns the number of observers switched. Call it on the prepared model, on every
    rank, before calibration; outside a process group it changes nothing.
    """
    n = 0
    for m in model.modules():
        if isinstance(m, (QuantConv2d, QuantLinear, QuantConvBn2d)) and m.input_quant is not None:
            m.input_quant.observer.sync_ranks = enabled
            n += 1
    if n == 0:
        raise ValueError("model has no activation quantizers to sync; pass a model from prepare_qat")
    return n


def rank_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's parameters, BN statistics and quantizer ranges/qparams (CPU copies), keyed by name."""
    model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    keep = ("weight", "bias", "scale", "zero_point", "min_val", "max_val", "running_mean", "running_var")
    return {
        k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] in keep
    }


def rank_differences(states: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Largest |difference| between ranks, per kind: ``param`` (weights, biases, learned scales), ``range``
    (observer min/max), ``qparams`` (scale, zero point) and ``bn`` (running statistics)."""
    kinds = {"weight": "param", "bias": "param", "min_val": "range", "max_val": "range", "scale": "qparams",
             "zero_point": "qparams", "running_mean": "bn", "running_var": "bn"}  # fmt: skip
    out = {k: 0.0 for k in ("param", "range", "qparams", "bn")}
    for name, ref in states[0].items():
        kind = kinds[name.rsplit(".", 1)[-1]]
        for other in states[1:]:
            diff = (other[name].double() - ref.double()).abs().max().item() if ref.numel() else 0.0
            out[kind] = max(out[kind], diff)
    return out


def _setup() -> tuple[int, int, int]:
    """(rank, world size, local rank); initialises the process group when torchrun started several."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
        dist.init_process_group(backend=backend)
    return rank, world, local


def _device(choice: str, local_rank: int) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device='cuda' but CUDA is not available; use device='auto' or 'cpu'")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _datasets(cfg: RunConfig):
    name = resolve_dataset(cfg.dataset)
    kwargs: dict[str, Any] = {"seed": cfg.seed}
    if name == "fashion_mnist":
        kwargs.update(train_size=cfg.train_size, test_size=cfg.test_size)
    train, test = loaders(name, **kwargs)
    return name, train.dataset, test.dataset


def _float_model(cfg: RunConfig, dataset: str) -> nn.Module:
    kwargs = dict(cfg.model_kwargs)
    if cfg.model == "mlp" and dataset == "digits":
        kwargs.setdefault("in_features", 64)
    model = build_model(cfg.model, **kwargs)
    if cfg.float_checkpoint:
        model.load_state_dict(torch.load(cfg.float_checkpoint, map_location="cpu", weights_only=True))
    return model


def load_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """A finished run's directory, read back: ``config`` (the :class:`RunConfig`), ``model`` (the QAT model in
    eval mode, BN statistics frozen if the run froze them), ``float_model``, ``test`` (its evaluation loader),
    ``result`` (``result.json``), ``rank_states`` (one :func:`rank_state` per rank; None for one process) and
    ``oscillation`` (``oscillation.csv`` of ``record_dynamics``; None without)."""
    out = Path(run_dir)
    missing = [f for f in ("run.json", "qat_model.pt", "result.json") if not (out / f).exists()]
    if missing:
        raise FileNotFoundError(
            f"{out} lacks {', '.join(missing)}: not a finished qatlab.distributed run (it writes run.json, and "
            "qat_model.pt and result.json when it ends)"
        )
    cfg = RunConfig.from_json(out / "run.json")
    dataset, _, test_set = _datasets(cfg)
    float_model = _float_model(cfg, dataset).eval()
    model = prepare_qat(float_model, QATConfig.from_dict(cfg.qat))
    model.load_state_dict(torch.load(out / "qat_model.pt", map_location="cpu", weights_only=True))
    freeze_as_fit_left(model, cfg.epochs, cfg.freeze_bn_epoch)
    states = out / "rank_states.pt"
    return {
        "config": cfg, "model": model.eval(), "float_model": float_model,
        "test": DataLoader(test_set, batch_size=256), "result": json.loads((out / "result.json").read_text()),
        "rank_states": torch.load(states, weights_only=True) if states.exists() else None,
        "oscillation": pd.read_csv(out / "oscillation.csv") if (out / "oscillation.csv").exists() else None,
    }  # fmt: skip


def run(cfg: RunConfig, out_dir: str | os.PathLike) -> dict[str, Any] | None:
    """Run QAT with ``cfg`` on every rank of this job (or alone); rank 0 returns the result, others None.

    Steps: build the float model (and load ``float_checkpoint``), :func:`qatlab.prepare_qat`, sync the
    observers, calibrate on each rank's shard (synced: the ranges of the union), then wrap in DDP and
    :func:`qatlab.fit` with a ``DistributedSampler`` (``set_epoch`` every epoch). After every epoch rank 0
    saves ``checkpoint.pt`` (QAT state dict + history so far) and ``history.csv``. At the end every rank's
    parameters and ranges are gathered and compared (``rank_states.pt``), and rank 0 evaluates, exports and writes
    ``result.json``. :func:`load_run` reads the directory back; ``qatlab doctor DIR`` diagnoses it.
    """
    out = Path(out_dir)
    rank, world, local = _setup()
    device = _device(cfg.device, local)
    if cfg.global_batch % world:
        raise ValueError(f"global_batch={cfg.global_batch} is not divisible by the {world} processes; "
                         f"use a multiple of {world}")  # fmt: skip
    start = time.perf_counter()
    dataset, train_set, test_set = _datasets(cfg)
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed,
                                 drop_last=True)  # fmt: skip
    train = DataLoader(train_set, batch_size=cfg.global_batch // world, sampler=sampler, drop_last=True)
    test = DataLoader(test_set, batch_size=256)

    torch.manual_seed(cfg.seed)
    model = _float_model(cfg, dataset)
    float_acc = evaluate(model.to(device), test, device=device)["acc"] if rank == 0 else float("nan")

    recorder: list[Any] = []

    def prepare(m: nn.Module, config: QATConfig) -> nn.Module:
        qat = prepare_qat(m, config)
        if cfg.sync_observers:
            sync_observers(qat)  # calibration on each rank's shard then gives the ranges of the union
        # DDP keeps the weights equal: one rank's flips are every rank's
        if cfg.record_dynamics and rank == 0:
            recorder.append(dynamics.record(qat))
        return qat

    def wrap(qat: nn.Module) -> nn.Module:  # quantize first, then wrap
        if world == 1:
            return qat
        return nn.parallel.DistributedDataParallel(qat, device_ids=[local] if device.type == "cuda" else None)

    def on_epoch_start(epoch: int, _model: nn.Module) -> None:
        sampler.set_epoch(epoch)

    def on_epoch_end(epoch: int, _model: nn.Module, row: dict[str, Any]) -> None:
        if world > 1:  # the loss and accuracy of the global batch, not rank 0's share
            t = torch.tensor([row["train_loss"], row["train_acc"]], dtype=torch.float64, device=device)
            dist.all_reduce(t)
            row["train_loss"], row["train_acc"] = (t / world).tolist()
        if rank == 0:
            history.append(dict(row))
            inner = getattr(_model, "module", _model)  # the QAT model inside DDP
            save_atomic({"qat_state_dict": inner.state_dict(), "history": history, "config": asdict(cfg)},
                        out / "checkpoint.pt")  # fmt: skip
            write_atomic(out / "history.csv", pd.DataFrame(history).to_csv(index=False))

    history: list[dict[str, Any]] = []
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    sampler.set_epoch(0)  # calibration reads the shard of epoch 0
    # only rank 0 evaluates, on the unwrapped model: a DDP forward on one rank alone would wait for the others
    run_ = qat_run(model, QATConfig.from_dict(cfg.qat), train, test if rank == 0 else None,
                   steps=cfg.steps_per_epoch, lr=cfg.lr, optimizer=cfg.optimizer, schedule=cfg.schedule,
                   momentum=cfg.momentum, calibrated=cfg.calib_batches > 0, calib_batches=cfg.calib_batches,
                   epochs=cfg.epochs, seed=cfg.seed, device=device, progress=rank == 0,
                   freeze_bn_epoch=cfg.freeze_bn_epoch,
                   on_epoch_start=on_epoch_start, on_epoch_end=on_epoch_end, prepare=prepare, wrap=wrap,
                   validate=False)  # fmt: skip
    qat, ptq_acc = run_["model"], run_["ptq_acc"]

    state = rank_state(qat)
    if world > 1:
        states: list[Any] = [None] * world
        dist.all_gather_object(states, state)
    else:
        states = [state]
    result = None
    if rank == 0:
        result = {
            "world_size": world, "backend": dist.get_backend() if world > 1 else "none", "device": str(device),
            "dataset": dataset, "float_acc": float_acc, "ptq_acc": ptq_acc,
            "acc": run_["acc"], "history": history,
            "rank_differences": rank_differences(states), "seconds": time.perf_counter() - start,
            "config": asdict(cfg),
        }  # fmt: skip
        save_atomic(qat.state_dict(), out / "qat_model.pt")
        if world > 1:  # every rank's weights, ranges and BN statistics, for qatlab.doctor's ddp_ranks check
            save_atomic(states, out / "rank_states.pt")
        if recorder:
            recorder[0].remove()
            write_atomic(out / "oscillation.csv", recorder[0].oscillation().to_csv(index=False))
        if cfg.export:
            result["onnx"] = _export(qat, test, out / "model.onnx")
        write_atomic(out / "result.json", json.dumps(result, indent=1))
    if world > 1:
        dist.barrier()
    return result


def _export(qat: nn.Module, test: DataLoader, path: Path) -> dict[str, Any]:
    x = next(iter(test))[0][:256].cpu()
    model = qat.to("cpu").eval()
    export_onnx(model, path, x[:1])
    parity = verify_onnx(model, path, x)
    return {"path": str(path), **{k: v for k, v in parity.items() if k != "layers"}}


def launch(
    cfg: RunConfig,
    out_dir: str | os.PathLike,
    nproc: int = 2,
    timeout: float = 1800,
    threads: int | None = None,
    echo: bool = True,
    nnodes: int = 1,
    rdzv_endpoint: str | None = None,
    rdzv_id: str = "qatlab",
    local_addr: str | None = None,
) -> dict[str, Any] | None:
    """Run :func:`run` in ``nproc`` processes with ``torchrun`` (``nproc=1``: one plain process) and return
    ``result.json``.

    The output is streamed (rank 0's progress); on failure the error carries the last lines of the log.
    ``threads`` per process defaults to the CPU count divided by ``nproc`` (at least 1), so that N processes
    on a small machine do not fight over cores.

    Several machines: call it on each of ``nnodes`` nodes with the same ``rdzv_endpoint`` (``"host:port"`` of
    one of them, which hosts torchrun's c10d rendezvous) and ``rdzv_id``; ``local_addr`` is the address this
    node is reached at (default: its host name). Ranks are given out at the rendezvous; the node that gets
    rank 0 writes the run's files to its ``out_dir`` and returns the result, the others return None (on a
    shared folder, every node returns it).
    """
    if not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc={nproc!r} must be a positive int (processes to start)")
    if not isinstance(nnodes, int) or nnodes < 1:
        raise ValueError(f"nnodes={nnodes!r} must be a positive int (machines taking part)")
    if nnodes > 1 and (not isinstance(rdzv_endpoint, str) or not rdzv_endpoint.rpartition(":")[2].isdigit()):
        raise ValueError(
            f"nnodes={nnodes} needs rdzv_endpoint='host:port' (one node's address, the same on every node), "
            f"got {rdzv_endpoint!r}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").unlink(missing_ok=True)
    config_path = cfg.to_json(out / "run.json")
    entry = ["-m", "qatlab.distributed", "--config", str(config_path), "--out", str(out)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    if nnodes > 1:
        cmd = [*torchrun, f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}",
               f"--rdzv-id={rdzv_id}", *([f"--local-addr={local_addr}"] if local_addr else []), *entry]  # fmt: skip
    elif nproc > 1:
        cmd = [*torchrun, "--standalone", *entry]
    else:
        cmd = [sys.executable, *entry]
    threads = threads or max(1, (os.cpu_count() or 1) // nproc)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    lines: list[str] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        deadline = time.monotonic() + timeout
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if echo and not line.startswith(("[W", "W1", "*****")):
                print(line, end="", flush=True)
            if time.monotonic() > deadline:
                proc.kill()
                raise TimeoutError(f"distributed run exceeded {timeout} s; log tail:\n{''.join(lines[-30:])}")
        code = proc.wait()
    if code != 0 or (nnodes == 1 and not (out / "result.json").exists()):
        raise RuntimeError(f"distributed run failed (exit {code}): {' '.join(cmd)}\n{''.join(lines[-40:])}")
    if not (out / "result.json").exists():
        return None  # rank 0 ran on another node
    return json.loads((out / "result.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qatlab.distributed", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", type=Path, required=True, help="RunConfig JSON (RunConfig().to_json(path))"
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (created)")
    args = parser.parse_args(argv)
    try:
        result = run(RunConfig.from_json(args.config), args.out)
        if result is not None:
            keep = ("world_size", "float_acc", "ptq_acc", "acc", "rank_differences", "seconds")
            print(json.dumps({k: result[k] for k in keep}))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
