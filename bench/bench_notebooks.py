"""Wall time of ``make run``: a fresh clone's first run, a second run, and fast mode, against the issue's targets.

A fresh clone's run is the notebook runner (``python -m qatlab.runner``, what ``make run`` calls) into an empty
build folder: the float models are trained, nothing is cached. The second run is the same command again on that
folder: unchanged notebooks are reused (``runner.notebook_key``), and a notebook that does run reads its QAT runs
from the run store. Targets: fresh full mode <= 20 minutes, a second run <= 5 minutes, fast mode <= 180 s.

By default the fast-mode pair is measured now and the full mode is read from ``build/summary.csv`` (the last
``make run``); ``--full`` measures the full-mode pair too (on a 2-core machine about two hours: 6,890 s on
5 December). Prints a markdown table, saves build/bench/notebooks.md.
Usage: ``python bench/bench_notebooks.py [--full] [--skip-fast]``.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import save_report

ROOT = Path(__file__).resolve().parents[1]
FRESH_TARGET_S, SECOND_TARGET_S, FAST_TARGET_S = 1200.0, 300.0, 180.0


def read_summary(summary: Path) -> dict[str, tuple[str, float, bool]]:
    """notebook -> (status, seconds, reused) from a runner's summary.csv ({} when there is none)."""
    if not summary.is_file():
        return {}
    with summary.open() as f:
        return {
            row["notebook"]: (row["status"], float(row["seconds"]), row.get("reused", "0") == "1")
            for row in csv.DictReader(f)
        }


def make_run(build: Path, fast: bool) -> tuple[float, dict[str, tuple[str, float, bool]]]:
    """The runner over notebooks/ into ``build`` (what ``make run`` does): wall seconds and its summary."""
    env = {**os.environ, "QATLAB_FAST": "1" if fast else "0"}
    env.pop("QATLAB_RECOMPUTE", None)
    cmd = [
        sys.executable,
        "-m",
        "qatlab.runner",
        str(ROOT / "notebooks"),
        str(build),
        *(["--fast"] if fast else []),
    ]
    start = time.perf_counter()
    subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, check=False)
    return time.perf_counter() - start, read_summary(build / "summary.csv")


def pair(fast: bool) -> tuple[float, float, dict, dict]:
    """A fresh run into an empty build folder, then a second run on it."""
    with tempfile.TemporaryDirectory(prefix="qatlab-bench-") as tmp:
        first, s1 = make_run(Path(tmp), fast)
        second, s2 = make_run(Path(tmp), fast)
    return first, second, s1, s2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="also measure a fresh and a second full-mode run")
    parser.add_argument("--skip-fast", action="store_true", help="do not measure fast mode")
    args = parser.parse_args()
    notebooks = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
    cols: dict[str, dict] = {}  # column -> a runner summary
    totals: dict[str, tuple[float | None, float | None]] = {}  # column -> (wall seconds, target)
    if not args.skip_fast:
        first, second, s1, s2 = pair(fast=True)
        cols["fast, fresh"], totals["fast, fresh"] = s1, (first, FAST_TARGET_S)
        cols["fast, second run"], totals["fast, second run"] = s2, (second, SECOND_TARGET_S)
    if args.full:
        first, second, s1, s2 = pair(fast=False)
        cols["full, fresh clone"], totals["full, fresh clone"] = s1, (first, FRESH_TARGET_S)
        cols["full, second run"], totals["full, second run"] = s2, (second, SECOND_TARGET_S)
    else:
        last = read_summary(ROOT / "build" / "summary.csv")
        complete = all(nb in last for nb in notebooks)
        ran = sum(s for _, s, reused in last.values() if not reused)
        cols["full (last make run)"], totals["full (last make run)"] = last, (ran if complete else None, None)

    def cell(summary: dict, name: str) -> str:
        if name not in summary:
            return "not run"
        status, s, reused = summary[name]
        return "reused" if reused else f"{s:.1f}" + ("" if status == "ok" else f" ({status})")

    lines = [f"Notebook wall time (s), this machine ({os.cpu_count()} CPUs)", "",
             "| notebook | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]  # fmt: skip
    for nb in notebooks:
        lines.append(
            f"| {nb.removesuffix('.ipynb')} | " + " | ".join(cell(c, nb) for c in cols.values()) + " |"
        )
    row = []
    for name in cols:
        wall, target = totals[name]
        text = "incomplete" if wall is None else f"**{wall:.1f}**"
        if wall is not None and target is not None:
            text += f" (target {target:.0f}: {'met' if wall <= target else f'{wall / target:.2f}x over'})"
        row.append(text)
    lines.append("| **wall, whole run** | " + " | ".join(row) + " |")
    save_report(lines, "notebooks")


if __name__ == "__main__":
    main()
