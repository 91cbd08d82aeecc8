"""The ablation runner: cross product, resume after a crash or Ctrl-C without redoing finished runs, readable
results at every moment, same numbers in parallel, determinism, and the command line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from qatlab import ablate as ab
from qatlab.cli import main as cli_main


def square_run(config, seed):
    """Cheap and deterministic; records every call in config['calls'] so tests can count them."""
    calls = Path(config["calls"])
    calls.mkdir(parents=True, exist_ok=True)
    n = len(list(calls.glob("*")))
    (calls / f"{config['x']}-{seed}-{n}").touch()
    if (calls.parent / f"crash-{config['x']}").exists():
        raise RuntimeError(f"simulated crash in run x={config['x']}")
    if (calls.parent / f"interrupt-{config['x']}").exists():
        raise KeyboardInterrupt
    return {"y": config["x"] ** 2 + seed, "half": config["x"] / 2}


def killing_run(config, seed):
    """square_run, but the first run that finds the kill-<x> marker takes its marker and kills its own process:
    on a Dask cluster, a worker lost mid-run."""
    marker = Path(config["calls"]).parent / f"kill-{config['x']}"
    try:
        marker.unlink()
    except FileNotFoundError:
        return square_run(config, seed)
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable")


def _successes(calls: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in calls.glob("*"):
        x, seed, _ = f.name.split("-")
        out[f"{x}-{seed}"] = out.get(f"{x}-{seed}", 0) + 1
    return out


def test_grid_runs_cross_product_and_bad_input():
    runs = ab.grid_runs({"a": [1, 2], "b": ["u", "v", "w"]}, seeds=(0, 1))
    assert len(runs) == 12 and runs[0] == ({"a": 1, "b": "u"}, 0) and runs[-1] == ({"a": 2, "b": "w"}, 1)
    assert len({ab.run_key(c, s) for c, s in runs}) == 12
    with pytest.raises(ValueError, match="non-empty list"):
        ab.grid_runs({"a": []})
    with pytest.raises(ValueError, match="reserved"):
        ab.grid_runs({"seed": [1]})
    with pytest.raises(ValueError, match="seeds"):
        ab.grid_runs({"a": [1]}, seeds=())


def test_crash_inside_a_run_then_resume_runs_each_config_once(tmp_path):
    calls = tmp_path / "calls"
    grid = {"x": [1, 2, 3], "calls": [str(calls)]}
    (tmp_path / "crash-2").touch()
    with pytest.raises(RuntimeError, match="2 of 6 runs failed"):  # x=2 fails with both seeds
        ab.ablate(grid, square_run, tmp_path / "out", seeds=(0, 1), workers=1, progress=False)
    partial = pd.read_csv(tmp_path / "out" / "results.csv")  # readable, with the finished runs
    assert len(partial) == 4 and set(partial["x"]) == {1, 3}
    (tmp_path / "crash-2").unlink()
    (tmp_path / "out" / "runs" / ".stray.json.123.tmp").write_text("{half-writ")  # a write killed midway
    table = ab.ablate(grid, square_run, tmp_path / "out", seeds=(0, 1), workers=1, progress=False)
    assert len(table) == 6 and sorted(table["y"]) == sorted(x * x + s for x in (1, 2, 3) for s in (0, 1))
    counts = _successes(calls)
    assert counts.pop("2-0") == 2 and counts.pop("2-1") == 2  # the crashed runs ran twice (crash, retry) ...
    assert set(counts.values()) == {1}  # ... every other run exactly once
    again = ab.ablate(grid, square_run, tmp_path / "out", seeds=(0, 1), workers=1, progress=False)
    assert len(list(calls.glob("*"))) == 8 and len(again) == 6  # a finished sweep reruns nothing
    assert list(again["x"]) == [1, 1, 2, 2, 3, 3] and list(again["seed"]) == [0, 1] * 3  # the grid's order


def test_ctrl_c_keeps_finished_runs(tmp_path):
    calls = tmp_path / "calls"
    grid = {"x": [1, 2, 3], "calls": [str(calls)]}
    (tmp_path / "interrupt-3").touch()
    with pytest.raises(KeyboardInterrupt):
        ab.ablate(grid, square_run, tmp_path / "out", workers=1, progress=False)
    assert len(pd.read_csv(tmp_path / "out" / "results.csv")) == 2
    (tmp_path / "interrupt-3").unlink()
    assert len(ab.ablate(grid, square_run, tmp_path / "out", workers=1, progress=False)) == 3
    counts = _successes(calls)
    assert counts.pop("3-0") == 2 and set(counts.values()) == {1}  # the interrupted run again, the others not


def test_process_pool_gives_the_same_table(tmp_path):
    grid = {"x": [1, 2, 3, 4], "calls": [str(tmp_path / "calls")]}
    par = ab.ablate(grid, square_run, tmp_path / "par", seeds=(0, 5), workers=2, progress=False)
    seq = ab.ablate(grid, square_run, tmp_path / "seq", seeds=(0, 5), workers=1, progress=False)
    cols = ["x", "seed", "y", "half"]
    assert (
        par.sort_values(cols)[cols]
        .reset_index(drop=True)
        .equals(seq.sort_values(cols)[cols].reset_index(drop=True))
    )
    summary = ab.summarize(par, "y", ["x"])
    assert list(summary["mean"]) == [x * x + 2.5 for x in (1, 2, 3, 4)] and (summary["count"] == 2).all()


def test_digits_run_is_deterministic():
    cfg = {"bits": 4, "steps": 10}
    a, b = ab.digits_qat_run(cfg, 3), ab.digits_qat_run(cfg, 3)
    assert a == b and 0.5 < a["float_acc"] <= 1.0
    with pytest.raises(ValueError, match="unknown config keys"):
        ab.digits_qat_run({"bitz": 4}, 0)


@pytest.mark.parametrize("suffix", [".json", ".toml", ".yaml"])
def test_grid_files(tmp_path, suffix):
    spec = {"run": "qatlab.ablate:digits_qat_run", "seeds": [0], "grid": {"bits": [8, 4], "steps": [5]}}
    text = {
        ".json": json.dumps(spec),
        ".toml": 'run = "qatlab.ablate:digits_qat_run"\nseeds = [0]\n[grid]\nbits = [8, 4]\nsteps = [5]\n',
        ".yaml": "run: qatlab.ablate:digits_qat_run\nseeds: [0]\ngrid:\n  bits: [8, 4]\n  steps: [5]\n",
    }[suffix]
    path = tmp_path / f"grid{suffix}"
    path.write_text(text)
    assert ab.read_grid_file(path) == spec
    assert ab.resolve_run(spec["run"]) is ab.digits_qat_run
    with pytest.raises(ValueError, match="module:function"):
        ab.resolve_run("nocolon")


def test_command_line_writes_table_and_plots(tmp_path):
    grid = tmp_path / "g.json"
    grid.write_text(json.dumps({"run": "qatlab.ablate:digits_qat_run", "seeds": [0, 1],
                                "grid": {"bits": [8, 3], "steps": [5]}}))  # fmt: skip
    assert cli_main(["ablate", str(grid), "--out", str(tmp_path / "out"), "--workers", "1"]) == 0
    table = pd.read_csv(tmp_path / "out" / "results.csv")
    assert len(table) == 4 and {"bits", "seed", "qat_acc", "seconds"} <= set(table.columns)
    assert (tmp_path / "out" / "qat_acc.png").stat().st_size > 1000
    assert cli_main(["nope"]) == 2
    # the installed console script is the same entry point
    proc = subprocess.run([sys.executable, "-m", "qatlab.cli"], capture_output=True, text=True)
    assert proc.returncode == 2 and "qatlab ablate" in proc.stderr


def test_a_list_of_grids_runs_each_once_in_one_table(tmp_path):
    grids = [{"x": [1, 2]}, {"x": [2, 3], "tag": ["b"]}, {"x": [1]}]  # {"x": 1} twice: one run
    runs = ab.grid_runs(grids, seeds=(0,))
    assert [c for c, _ in runs] == [{"x": 1}, {"x": 2}, {"x": 2, "tag": "b"}, {"x": 3, "tag": "b"}]
    with pytest.raises(ValueError, match="empty list"):
        ab.grid_runs([])
    table = ab.ablate([{**g, "calls": [str(tmp_path / "calls")]} for g in grids], square_run, tmp_path / "out",
                      workers=1, progress=False)  # fmt: skip
    assert len(table) == 4 and sorted(table["y"]) == [1, 4, 4, 9]
    assert table["tag"].isna().sum() == 2  # a knob absent from a grid is an empty cell
    assert sum(_successes(tmp_path / "calls").values()) == 4


def test_stale_records_are_run_again(tmp_path, monkeypatch):
    """A record is reused only while the run version holds: a change of the qatlab source that computes numbers
    (store.source_hash), or QATLAB_RECOMPUTE=1, runs every run again; the table has the current runs only."""
    import qatlab.store

    calls = tmp_path / "calls"
    grid = {"x": [1, 2], "calls": [str(calls)]}
    first = ab.ablate(grid, square_run, tmp_path / "out", workers=1, progress=False)
    v0 = ab.run_version(square_run)
    assert {r["version"] for r in ab.load_records(tmp_path / "out")} == {v0}
    assert ab.load_records(tmp_path / "out")[0]["run"] == f"{__name__}:square_run"
    ab.ablate(grid, square_run, tmp_path / "out", workers=1, progress=False)
    assert sum(_successes(calls).values()) == 2  # current: nothing runs
    monkeypatch.setattr(qatlab.store, "source_hash", lambda: "another qatlab source")
    v1 = ab.run_version(square_run)
    assert v1 != v0 and ab.load_results(tmp_path / "out", square_run).empty  # the records are stale now
    again = ab.ablate(grid, square_run, tmp_path / "out", workers=1, progress=False)
    assert set(_successes(calls).values()) == {2}  # every run again, once
    cols = ["x", "seed", "y", "half"]
    assert again[cols].equals(first[cols])
    assert {r["version"] for r in ab.load_records(tmp_path / "out")} == {v1}
    assert ab.run_version(ab.digits_qat_run) != ab.run_version(square_run)  # the function is in the version
    monkeypatch.setenv("QATLAB_RECOMPUTE", "1")
    ab.ablate(grid, square_run, tmp_path / "out", workers=1, progress=False)
    assert set(_successes(calls).values()) == {3}


@pytest.fixture(scope="module")
def dask_cluster():
    """A real Dask cluster on this machine: a scheduler and 2 worker processes (each with a nanny that restarts
    it) on 127.0.0.1."""
    distributed = pytest.importorskip("distributed", reason="Dask's distributed is installed by make setup")
    # Dask's nannies write their workers' settings into this process's environment (OMP_NUM_THREADS=1,
    # MALLOC_TRIM_THRESHOLD_=65536, ...), which every later subprocess would inherit: the notebook tests ran
    # 3x slower after this module. The environment is restored when the cluster closes.
    saved = dict(os.environ)
    try:
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                      dashboard_address=None) as cluster:  # fmt: skip
            yield cluster
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_dask_cluster_same_table_each_run_once_after_a_killed_worker(tmp_path, dask_cluster):
    grid = {"x": [1, 2, 3], "calls": [str(tmp_path / "local" / "calls")]}
    local = ab.ablate(grid, square_run, tmp_path / "local" / "out", seeds=(0, 1), workers=2, progress=False)
    calls = tmp_path / "dask" / "calls"
    calls.mkdir(parents=True)
    (calls.parent / "kill-2").touch()  # the first x=2 run kills its worker mid-run
    table = ab.ablate({"x": [1, 2, 3], "calls": [str(calls)]}, killing_run, tmp_path / "dask" / "out",
                      seeds=(0, 1), scheduler=dask_cluster.scheduler_address, progress=False)  # fmt: skip
    assert not (calls.parent / "kill-2").exists()  # a worker did die
    cols = ["x", "seed", "y", "half"]
    assert table[cols].equals(local[cols])  # the same table as the local pool, in the grid's order
    counts = _successes(calls)
    assert len(counts) == 6 and set(counts.values()) == {1}  # each run finished exactly once
    assert len(pd.read_csv(tmp_path / "dask" / "out" / "results.csv")) == 6

    # resume as with the local pool: a run that fails is saved as missing; the next call runs only it
    (calls.parent / "crash-4").touch()
    grid = {"x": [1, 2, 3, 4, 5], "calls": [str(calls)]}
    with pytest.raises(RuntimeError, match="2 of 4 runs failed"):
        ab.ablate(grid, killing_run, tmp_path / "dask" / "out", seeds=(0, 1),
                  scheduler=dask_cluster.scheduler_address, progress=False)  # fmt: skip
    # x=5 finished, x=1..3 were done before
    assert len(pd.read_csv(tmp_path / "dask" / "out" / "results.csv")) == 8
    (calls.parent / "crash-4").unlink()
    assert len(ab.ablate(grid, killing_run, tmp_path / "dask" / "out", seeds=(0, 1),
                         scheduler=dask_cluster.scheduler_address, progress=False)) == 10  # fmt: skip
    counts = _successes(calls)
    assert counts.pop("4-0") == 2 and counts.pop("4-1") == 2  # the failed runs: failed, then retried
    assert len(counts) == 8 and set(counts.values()) == {1}  # every other run exactly once


def test_dask_command_line_and_bad_input(tmp_path, dask_cluster):
    grid = tmp_path / "g.json"
    grid.write_text(json.dumps({"run": "qatlab.ablate:digits_qat_run", "seeds": [0],
                                "grid": {"bits": [8, 2], "steps": [5]}}))  # fmt: skip
    out = tmp_path / "out"
    assert (
        cli_main(["ablate", str(grid), "--out", str(out), "--scheduler", dask_cluster.scheduler_address]) == 0
    )
    table = pd.read_csv(out / "results.csv")
    here = ab.ablate({"bits": [8, 2], "steps": [5]}, ab.digits_qat_run, tmp_path / "here", workers=1,
                     progress=False)  # fmt: skip
    cols = ["bits", "float_acc", "ptq_acc", "qat_acc"]
    assert table[cols].equals(here[cols])  # a cluster worker computes the numbers this process does
    with pytest.raises(ValueError, match="not both"):
        ab.ablate({"x": [1]}, square_run, tmp_path / "x", executor=object(), scheduler="tcp://127.0.0.1:1")
    with pytest.raises(ValueError, match="scheduler must be"):
        ab.ablate({"x": [1, 2], "calls": [str(tmp_path / "c")]}, square_run, tmp_path / "y",
                  scheduler="localhost", progress=False)  # fmt: skip
