"""Worker for tests/test_distributed.py, started by torchrun: each rank calibrates the same QAT model on its own
data; rank 0 writes every rank's activation ranges to the JSON file named on the command line.

Usage: torchrun --standalone --nproc_per_node=2 tests/ddp_observer_worker.py OUT.json sync|nosync
"""

import json
import sys

import torch
import torch.distributed as dist

from qatlab import QATConfig, QuantSpec, calibrate, prepare_qat
from qatlab.distributed import sync_observers
from qatlab.models import MLP


def rank_data(rank: int) -> torch.Tensor:
    """The batches rank `rank` sees: 3 batches of 8 images (8x8), scaled and shifted per rank."""
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(3, 8, 1, 8, 8, generator=g) * (rank + 1) + rank


def main() -> None:
    out, mode = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    cfg = QATConfig(activation=QuantSpec(bits=8, observer="minmax"))
    qat = prepare_qat(MLP(in_features=64, hidden=(16,)), cfg)
    if mode == "sync":
        sync_observers(qat)
    calibrate(qat, list(rank_data(rank)))
    ranges = {
        name: [m.input_quant.observer.min_val.item(), m.input_quant.observer.max_val.item()]
        for name, m in qat.named_modules()
        if getattr(m, "input_quant", None) is not None
    }
    gathered = [None] * world
    dist.all_gather_object(gathered, ranges)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
