"""QAT under DDP (gloo, 2 CPU processes via torchrun): ranks hold identical parameters and ranges, synced ranges
are the min/max over the data of both ranks, 2 ranks equal 1 process at the same global batch, and the wrong
wrap order raises."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import qatlab
from qatlab import QATConfig, QuantSpec, doctor
from qatlab.distributed import RunConfig, launch, load_run, rank_differences, sync_observers
from qatlab.models import MLP

HERE = Path(__file__).parent
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _torchrun(tmp_path: Path, mode: str) -> list[dict[str, list[float]]]:
    out = tmp_path / f"ranges_{mode}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "ddp_observer_worker.py"), str(out), mode]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_synced_ranges_are_the_min_max_over_both_ranks(tmp_path):
    sys.path.insert(0, str(HERE))
    try:
        from ddp_observer_worker import rank_data
    finally:
        sys.path.remove(str(HERE))
    data = [rank_data(r) for r in range(2)]
    synced = _torchrun(tmp_path, "sync")
    assert synced[0] == synced[1]  # every rank holds the same ranges
    lo, hi = synced[0]["features.1"]  # the first layer sees the raw inputs
    assert lo == pytest.approx(min(float(d.min()) for d in data), abs=1e-6)
    assert hi == pytest.approx(max(float(d.max()) for d in data), abs=1e-6)
    # Without the sync each rank keeps the range of its own data (what torch.ao's observers do).
    alone = _torchrun(tmp_path, "nosync")
    for rank in range(2):
        lo, hi = alone[rank]["features.1"]
        assert lo == pytest.approx(float(data[rank].min()), abs=1e-6)
        assert hi == pytest.approx(float(data[rank].max()), abs=1e-6)
    assert alone[0]["features.1"] != alone[1]["features.1"]


def _cfg(**changes) -> RunConfig:
    qat = QATConfig(weight=QuantSpec(bits=4, symmetric=True, per_channel=True),
                    activation=QuantSpec(bits=8, observer="ema"))  # fmt: skip
    base = dict(model="mlp", model_kwargs={"hidden": [32]}, dataset="digits", global_batch=32, epochs=2,
                steps_per_epoch=8, lr=0.05, calib_batches=2, qat=qat.to_dict())  # fmt: skip
    return RunConfig(**{**base, **changes})


def test_two_ranks_equal_one_process_at_the_same_global_batch(tmp_path):
    two = launch(_cfg(record_dynamics=True), tmp_path / "two", nproc=2, echo=False)
    one = launch(_cfg(export=False), tmp_path / "one", nproc=1, echo=False)
    # the doctor on both directories: the synced ranks agree, the export holds, the reloaded model is the run's
    for name, n_ranks in (("two", 2), ("one", 1)):
        run = load_run(tmp_path / name)
        assert qatlab.evaluate(run["model"], run["test"])["acc"] == run["result"]["acc"]
        report = doctor.diagnose_run(tmp_path / name).set_index("check")
        assert "fail" not in set(report["status"]), report.to_string()
        assert ("ddp_ranks" in report.index) == (n_ranks == 2) and ("deployment" in report.index) == (
            n_ranks == 2
        )
        assert "one seed" in report.loc["noise_floor", "evidence"]
        assert ("oscillation" in report.index) == (n_ranks == 2)  # recorded in the 2-rank run only
    osc = load_run(tmp_path / "two")[
        "oscillation"
    ]  # rank 0's flips over the 16 QAT steps, per weight quantizer
    assert (
        set(osc["layer"]) == {"features.1.weight_quant", "classifier.weight_quant"}
        and (osc["steps"] == 15).all()
    )
    row = doctor.diagnose_run(tmp_path / "two").set_index("check").loc["oscillation"]
    assert "in 15 steps" in row["evidence"] and "the largest LR (0.05)" in row["evidence"]
    assert (
        "2 ranks hold identical"
        in doctor.diagnose_run(tmp_path / "two").set_index("check").loc["ddp_ranks", "evidence"]
    )
    assert two["world_size"] == 2 and two["backend"] == "gloo" and one["world_size"] == 1
    assert two["rank_differences"] == {"param": 0.0, "range": 0.0, "qparams": 0.0, "bn": 0.0}
    a = torch.load(tmp_path / "two" / "qat_model.pt", weights_only=True)
    b = torch.load(tmp_path / "one" / "qat_model.pt", weights_only=True)
    assert a.keys() == b.keys()
    for name in a:  # the same sums in another order: float rounding only
        torch.testing.assert_close(a[name].double(), b[name].double(), atol=1e-6, rtol=0, msg=name)
    assert two["acc"] == one["acc"] and two["acc"] > two["ptq_acc"]
    assert [h["epoch"] for h in two["history"]] == [1, 2]
    assert two["history"][-1]["train_loss"] == pytest.approx(one["history"][-1]["train_loss"], abs=1e-5)
    assert two["onnx"]["passed"] and two["onnx"]["argmax_agreement"] == 1.0
    for f in ("checkpoint.pt", "history.csv", "model.onnx", "result.json", "run.json"):
        assert (tmp_path / "two" / f).exists(), f
    ckpt = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=False)
    assert len(ckpt["history"]) == 2 and ckpt["config"]["global_batch"] == 32


def test_unsynced_ranks_end_with_different_ranges(tmp_path):
    # DDP broadcasts rank 0's buffers before each forward, so the ranks differ after their last forward:
    # the last batch updated each rank's range with its own data only.
    r = launch(_cfg(sync_observers=False, export=False, epochs=1), tmp_path / "nosync", nproc=2, echo=False)
    d = r["rank_differences"]
    assert d["range"] > 0 and d["param"] == 0.0
    # the doctor reads the run directory back and names the observer that differs (pytorch#85627)
    report = doctor.diagnose_run(tmp_path / "nosync")
    row = report.set_index("check").loc["ddp_ranks"]
    assert row["status"] == "fail" and "observer ranges" in row["evidence"] and "max_val" in row["evidence"]
    assert "sync_observers" in row["fix"]
    assert "bn_training" in set(report["check"]) and "deployment" not in set(
        report["check"]
    )  # nothing exported


def test_prepare_after_wrapping_in_ddp_raises(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped = nn.parallel.DistributedDataParallel(MLP(in_features=64, hidden=(8,)))
        with pytest.raises(ValueError, match="prepare the QAT model first, then wrap it"):
            qatlab.prepare_qat(wrapped)
    finally:
        dist.destroy_process_group()


def test_rank_differences_and_bad_input():
    s = {"a.weight": torch.zeros(3), "a.input_quant.observer.min_val": torch.zeros(1)}
    t = {"a.weight": torch.tensor([0.0, 0.5, 0.0]), "a.input_quant.observer.min_val": torch.tensor([-2.0])}
    assert rank_differences([s, t]) == {"param": 0.5, "range": 2.0, "qparams": 0.0, "bn": 0.0}
    with pytest.raises(ValueError, match="global_batch"):
        RunConfig(global_batch=0)
    with pytest.raises(ValueError, match="device"):
        RunConfig(device="tpu")
    with pytest.raises(ValueError, match="no activation quantizers"):
        sync_observers(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="nproc"):
        launch(RunConfig(), "unused", nproc=0)


def test_run_config_json_round_trip(tmp_path):
    cfg = _cfg(lr=0.01)
    assert RunConfig.from_json(cfg.to_json(tmp_path / "run.json")) == cfg
    (tmp_path / "bad.json").write_text(json.dumps({"modle": "cnn"}))
    with pytest.raises(ValueError, match="modle"):
        RunConfig.from_json(tmp_path / "bad.json")


def test_frozen_bn_makes_two_ranks_one_process_for_a_cnn(tmp_path):
    """With BatchNorm each rank normalises with its own half batch; frozen from the start, it does not, and two
    ranks compute what one process computes (float rounding only)."""
    cnn = dict(model="cnn", model_kwargs={"width": 8}, export=False, epochs=1)
    frozen = {
        n: launch(_cfg(**cnn, freeze_bn_epoch=0), tmp_path / n, nproc=p, echo=False)
        for n, p in (("f2", 2), ("f1", 1))
    }
    live = launch(_cfg(**cnn), tmp_path / "l2", nproc=2, echo=False)
    launch(_cfg(**cnn), tmp_path / "l1", nproc=1, echo=False)

    def largest_weight_difference(a, b):
        sa, sb = (torch.load(tmp_path / x / "qat_model.pt", weights_only=True) for x in (a, b))
        return max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa if k.endswith("weight"))

    assert largest_weight_difference("f2", "f1") < 1e-5
    assert largest_weight_difference("l2", "l1") > 100 * largest_weight_difference("f2", "f1")
    assert frozen["f2"]["acc"] == frozen["f1"]["acc"] and live["rank_differences"]["bn"] > 0
    with pytest.raises(ValueError, match="freeze_bn_epoch=-1"):
        RunConfig(freeze_bn_epoch=-1)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_through_the_c10d_rendezvous_equal_two_processes_on_one(tmp_path):
    """Multi-node as on a cluster: two torchrun launches (2 nodes x 1 process, --rdzv-backend=c10d on
    127.0.0.1), each with its own output folder. The ranks hold identical weights and scales, and the run is
    the 2-process --standalone run, bit for bit."""
    from concurrent.futures import ThreadPoolExecutor

    cfg = _cfg(export=False, epochs=1)
    standalone = launch(cfg, tmp_path / "standalone", nproc=2, threads=1, echo=False)
    endpoint = f"127.0.0.1:{_free_port()}"
    with ThreadPoolExecutor(2) as pool:
        nodes = list(pool.map(lambda node: launch(cfg, tmp_path / node, nproc=1, threads=1, echo=False, nnodes=2,
                                                  rdzv_endpoint=endpoint, rdzv_id="test", local_addr="127.0.0.1"),
                              ("node_a", "node_b")))  # fmt: skip
    assert sum(r is not None for r in nodes) == 1  # rank 0 ran on one node; its folder has the run
    result = next(r for r in nodes if r is not None)
    home = tmp_path / ("node_a" if nodes[0] is not None else "node_b")
    assert result["world_size"] == 2 and result["backend"] == "gloo"
    assert result["rank_differences"] == {"param": 0.0, "range": 0.0, "qparams": 0.0, "bn": 0.0}
    a = torch.load(home / "qat_model.pt", weights_only=True)
    b = torch.load(tmp_path / "standalone" / "qat_model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert result["acc"] == standalone["acc"] and result["ptq_acc"] == standalone["ptq_acc"]
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        launch(cfg, tmp_path / "x", nproc=1, nnodes=2)
