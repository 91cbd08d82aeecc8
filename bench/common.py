"""Shared by the benchmark scripts: print a markdown report and save it under build/bench/."""

from pathlib import Path


def save_report(lines: list[str], name: str) -> Path:
    """Print the report and write it to ``build/bench/NAME.md`` (the folder is created)."""
    text = "\n".join(lines)
    print(text)
    out = Path("build/bench")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.md"
    path.write_text(text + "\n")
    return path


# glibc's malloc serves a large block with a fresh mmap until a freed one raises its threshold; a benchmark that
# interleaves several models (many tensor sizes) keeps it there, and every step then pays thousands of page
# faults (measured: 2,600 per FP32 step of the lab CNN, about 5 ms) that a training loop on one model does not.
# A fixed threshold (glibc's maximum, 32 MiB) and a high trim threshold give the benchmark the allocator state of
# a real training run (0 to 8 faults per step in qatlab.fit, with or without these settings).
# (the notebook runner gives its kernels the same settings)
from qatlab.runner import STEADY_MALLOC  # noqa: E402


def steady_allocator() -> None:
    """Re-run this script with :data:`STEADY_MALLOC` in its environment (glibc reads it only at start-up)."""
    import os
    import sys

    if all(os.environ.get(k) == v for k, v in STEADY_MALLOC.items()):
        return
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **STEADY_MALLOC})
