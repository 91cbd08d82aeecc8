"""An ablation sweep (``qatlab.ablate``) on 1 worker vs 2 worker processes: wall time and speed-up.

Eight runs of ``digits_qat_run`` (bits x per-channel x 2 seeds; one torch thread per run) into fresh temporary
folders, first in this process, then on a pool of 2; both tables must hold the same numbers (the runs are
deterministic). Prints a markdown table, saves build/bench/ablate.md. Usage: ``python bench/bench_ablate.py``.
"""

from __future__ import annotations

import tempfile
import time

from common import save_report

from qatlab.ablate import ablate, digits_qat_run

GRID = {"bits": [8, 4], "per_channel": [True, False]}
SEEDS = (0, 1)


def main() -> None:
    walls, tables = {}, {}
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            table = ablate(GRID, digits_qat_run, tmp, seeds=SEEDS, workers=workers, progress=False)
            walls[workers] = time.perf_counter() - start
            tables[workers] = table.drop(columns=["seconds"]).sort_values("key").reset_index(drop=True)
    same = tables[1].equals(tables[2])
    runs = len(tables[1])
    lines = [
        f"ablate: {runs} runs of digits_qat_run (1 torch thread each), wall time",
        "",
        "| workers | wall s | speed-up |",
        "|---:|---:|---:|",
        f"| 1 | {walls[1]:.1f} | 1.00x |",
        f"| 2 | {walls[2]:.1f} | {walls[1] / walls[2]:.2f}x |",
        "",
        f"Same metrics in both tables: {same}",
    ]
    save_report(lines, "ablate")
    if not same:
        raise SystemExit("the two sweeps disagree: runs are not deterministic")


if __name__ == "__main__":
    main()
