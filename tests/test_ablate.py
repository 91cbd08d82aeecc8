"""The ablation runner: cross product, resume after a crash or Ctrl-C without redoing finished runs, readable
results at every moment, same numbers in parallel, determinism, and the command line."""

from __future__ import annotations

import json
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
