"""Wall time of every notebook: fast mode measured now, full mode read from the last ``make run``.

Fast mode runs each notebook headless into a temporary build folder (``QATLAB_FAST=1``). Full-mode times come
from ``build/summary.csv``, which ``make run`` writes (notebooks not in it are listed as not run). Targets: all
notebooks in full mode within 10 minutes in total, in fast mode within 3. Prints a markdown table, saves
build/bench/notebooks.md. Usage: ``python bench/bench_notebooks.py [--skip-fast]``.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path

from common import save_report

from qatlab.runner import run_notebook

ROOT = Path(__file__).resolve().parents[1]
FULL_TARGET_S, FAST_TARGET_S = 600.0, 180.0


def full_mode_times(summary: Path) -> dict[str, tuple[str, float]]:
    if not summary.is_file():
        return {}
    with summary.open() as f:
        return {row["notebook"]: (row["status"], float(row["seconds"])) for row in csv.DictReader(f)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--skip-fast", action="store_true", help="only report the full-mode times of make run"
    )
    args = parser.parse_args()
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    full = full_mode_times(ROOT / "build" / "summary.csv")
    fast: dict[str, tuple[str, float]] = {}
    if not args.skip_fast:
        with tempfile.TemporaryDirectory() as tmp:
            for nb in notebooks:
                r = run_notebook(nb, Path(tmp), timeout=600, fast=True)
                fast[nb.name] = (r.status, r.seconds)
    lines = ["Notebook wall time (s), this machine", "", "| notebook | fast mode | full mode (last make run) |",
             "|---|---:|---:|"]  # fmt: skip

    def cell(times: dict, name: str) -> str:
        if name not in times:
            return "not run"
        status, s = times[name]
        return f"{s:.1f}" + ("" if status == "ok" else f" ({status})")

    for nb in notebooks:
        lines.append(f"| {nb.stem} | {cell(fast, nb.name)} | {cell(full, nb.name)} |")
    tot_fast = sum(s for _, s in fast.values())
    tot_full = sum(full[nb.name][1] for nb in notebooks if nb.name in full)
    complete = all(nb.name in full for nb in notebooks)
    lines.append(f"| **total** | {tot_fast:.1f} (target {FAST_TARGET_S:.0f}) | {tot_full:.1f}"
                 f"{'' if complete else ' (incomplete)'} (target {FULL_TARGET_S:.0f}) |")  # fmt: skip
    save_report(lines, "notebooks")


if __name__ == "__main__":
    main()
