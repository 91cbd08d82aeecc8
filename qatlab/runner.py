"""Execute every notebook headless and write the rendered copies and a summary (``make run``).

``python -m qatlab.runner NOTEBOOK_DIR BUILD_DIR [--fast] [--timeout S]`` runs each ``*.ipynb`` in
``NOTEBOOK_DIR`` (sorted by name) with its working directory set to ``BUILD_DIR``, so the ONNX files and
checkpoints a notebook writes land there, and saves the executed notebook and an HTML copy to
``BUILD_DIR/notebooks/``.
``BUILD_DIR/summary.md`` and ``summary.csv`` list each notebook's status and wall time. Files are written
atomically (temporary file, then rename): an interrupted run never leaves a half-written notebook.

A notebook that ran ok is not run again while nothing it depends on changed (:func:`notebook_key`: its cells,
every qatlab module, the mode, the versions of Python and the numeric packages, ``QATLAB_DATA``): its rendered
copy, claims and files are kept, and the summary says ``reused``. ``QATLAB_RECOMPUTE=1`` runs every notebook
(and every QAT run) again. Within a notebook that does run, QAT runs come from the run store (:mod:`qatlab.store`).

The saved copies are read without a kernel (the HTML offline, the .ipynb in viewers without widget support), where
an explorer would show as ``VBox(...)``: :func:`static_widget_fallback` gives each explorer's output the text
it printed and its figure as plain text and PNG, and the HTML copy shows those.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from qatlab.files import write_atomic

# glibc's malloc thresholds for the kernels: large tensors from the heap instead of a fresh mmap each (page faults
# on every step otherwise), freed memory kept for the next step. Notebook 03 in fast mode: 52-55 s without,
# 46-48 s with. Memory placement only, the numbers do not change; a value already in the environment wins.
STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


@dataclass
class NotebookResult:
    notebook: str
    status: str
    seconds: float
    error: str = ""
    reused: bool = False  # not run: nothing it depends on changed since the run that took ``seconds``


def _describe(exc: Exception) -> str:
    """The failing line and the exception, without ANSI colours: what a summary row needs."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    arrows = [line.strip() for line in text.splitlines() if line.lstrip().startswith("---->")]
    where = arrows[-1].replace("---->", "line").strip() if arrows else ""
    what = f"{getattr(exc, 'ename', type(exc).__name__)}: {getattr(exc, 'evalue', '')}".strip()
    return f"{what} at {where}"[:400] if where else what[:400]


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


def _widget_outputs(state: dict, model_id: str, seen: set) -> list[dict]:
    """The outputs the Output widgets inside ``model_id`` (depth first, children in order) held when saved."""
    if model_id in seen or model_id not in state:
        return []
    seen.add(model_id)
    model = state[model_id]["state"]
    found = list(model.get("outputs", [])) if state[model_id].get("model_name") == "OutputModel" else []
    for child in model.get("children", []):
        if isinstance(child, str) and child.startswith("IPY_MODEL_"):
            found += _widget_outputs(state, child[len("IPY_MODEL_") :], seen)
    return found


def static_widget_fallback(nb) -> int:
    """Give each widget output of ``nb`` a static copy of what it showed: ``text/plain`` becomes the text its
    Output widgets printed (an explorer's caption line) and ``image/png`` their first image. A live JupyterLab
    still renders the widget (its MIME type ranks first); the HTML copy and kernel-less viewers show the copy.
    Returns how many outputs got one (widgets that printed nothing keep their repr)."""
    state = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    done = 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            view = out.get("data", {}).get(WIDGET_VIEW)
            if not view:
                continue
            held = _widget_outputs(state, view.get("model_id", ""), set())
            text = "".join(o.get("text", "") for o in held if o.get("output_type") == "stream").strip()
            pngs = [o["data"]["image/png"] for o in held if "image/png" in o.get("data", {})]
            if text or pngs:
                out["data"]["text/plain"] = text or "(figure)"
                if pngs:
                    out["data"]["image/png"] = pngs[0]
                done += 1
    return done


# What a reader should not meet in a saved notebook: a progress bar frozen where the kernel left it, numpy's
# scalar reprs, a dict printed raw (a table or a sentence says it better).
OUTPUT_DEFECTS = {
    "frozen progress bar": re.compile(r"\d+%\|.*\|\s*\d+/\d+ \["),
    "numpy scalar repr": re.compile(r"\bnp\.(?:float|int|uint|bool|complex)\w*\("),
    "raw dict": re.compile(r"\{(?:'[^'\n]{1,80}'|-?\d+): "),
}


def output_defects(nb) -> list[str]:
    """``"cell N: <defect>: <text>"`` for each text output (streams, plain-text results, widget placeholders)
    of an executed notebook that matches :data:`OUTPUT_DEFECTS`; HTML, images and errors are not checked."""
    found = []
    for i, cell in enumerate(nb["cells"]):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                text = out.get("text", "")
            elif "data" in out and "text/html" not in out["data"]:
                text = out["data"].get("text/plain", "")
            else:
                continue
            text = "".join(text) if isinstance(text, list) else text
            for what, pattern in OUTPUT_DEFECTS.items():
                if m := pattern.search(text):
                    found.append(f"cell {i}: {what}: {text[max(0, m.start() - 20) : m.end() + 40].strip()!r}")
    return found


def run_notebook(src: Path, build_dir: Path, timeout: int = 1800, fast: bool = False) -> NotebookResult:
    """Execute one notebook; the executed copy goes to ``build_dir/notebooks/`` even when a cell fails."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(src, as_version=4)
    out_dir = build_dir / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    # the kernel's environment, not ours; no progress bars: a saved notebook would keep them frozen at 0%
    env = {
        **STEADY_MALLOC,
        **os.environ,
        "QATLAB_BUILD": str(build_dir.resolve()),
        "TQDM_DISABLE": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    if fast:
        env["QATLAB_FAST"] = "1"
    env.setdefault("QATLAB_STORE", "1")  # QAT runs go through build/runs: a second make run reads them back
    start = time.perf_counter()
    status, error = "ok", ""
    try:
        client = NotebookClient(
            nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(build_dir)}}
        )
        client.execute(env=env)
    except CellExecutionError as exc:
        status, error = "failed", _describe(exc)
    except Exception as exc:  # kernel died, timeout: report it, keep going with the next notebook
        status, error = "failed", f"{type(exc).__name__}: {exc}"[:300]
    seconds = time.perf_counter() - start
    static_widget_fallback(nb)
    write_atomic(out_dir / src.name, nbformat.writes(nb))
    try:  # an HTML copy for reading without Jupyter: static figures, no widget JavaScript from a CDN
        from nbconvert import HTMLExporter
        from traitlets.config import Config

        priority = HTMLExporter().default_config.NbConvertBase.display_data_priority
        config = Config(
            {"NbConvertBase": {"display_data_priority": [t for t in priority if t != WIDGET_VIEW]}}
        )
        html, _ = HTMLExporter(config=config).from_notebook_node(nb)
        write_atomic(out_dir / (src.stem + ".html"), html)
    except Exception as exc:  # nbconvert missing or a template problem: the .ipynb is still there
        print(f"  (no HTML for {src.name}: {type(exc).__name__}: {exc})")
    return NotebookResult(src.name, status, round(seconds, 1), error)


# the packages whose versions change what a notebook computes or shows
KEY_PACKAGES = (
    "torch",
    "numpy",
    "onnx",
    "onnxruntime",
    "transformers",
    "matplotlib",
    "pandas",
    "scikit-learn",
)


def notebook_key(src: Path, fast: bool) -> str:
    """What a notebook's rendered output depends on, as a SHA-256: its cells (not their outputs), every qatlab
    module (:func:`qatlab.store.source_hash` with presentation), fast or full mode, Python's and the numeric
    packages' versions, and ``QATLAB_DATA``. Data set files and checkpoints are fixed by those."""
    from importlib import metadata

    import nbformat

    from qatlab.store import source_hash

    nb = nbformat.read(src, as_version=4)
    versions = {}
    for name in KEY_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    payload = {
        "cells": [(c.cell_type, c.source) for c in nb.cells],
        "qatlab": source_hash(presentation=True),
        "fast": fast,
        "python": sys.version,
        "versions": versions,
        "data": os.environ.get("QATLAB_DATA", ""),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _stamp_path(build_dir: Path, src: Path) -> Path:
    return build_dir / "notebooks" / f"{src.stem}.run.json"


def reusable(src: Path, build_dir: Path, key: str) -> NotebookResult | None:
    """The last ok run of ``src`` in ``build_dir`` when it had this :func:`notebook_key` and its rendered copy
    is there; None when it must run (or ``QATLAB_RECOMPUTE=1``)."""
    from qatlab.store import recompute

    stamp = _stamp_path(build_dir, src)
    if recompute() or not stamp.is_file() or not (build_dir / "notebooks" / src.name).is_file():
        return None
    try:
        last = json.loads(stamp.read_text())
    except json.JSONDecodeError:
        return None
    if last.get("key") != key:
        return None
    return NotebookResult(src.name, "ok", float(last["seconds"]), reused=True)


def write_summary(results: list[NotebookResult], build_dir: Path) -> Path:
    """``summary.md`` (a table a person reads) and ``summary.csv`` (for tools)."""
    lines = ["| notebook | status | seconds | error |", "|---|---|---:|---|"]
    csv = ["notebook,status,seconds,error,reused"]
    for r in results:
        status = "ok (reused: unchanged)" if r.reused else r.status
        lines.append(f"| {r.notebook} | {status} | {r.seconds:.1f} | {r.error.replace('|', '/')} |")
        csv.append(
            f'{r.notebook},{r.status},{r.seconds:.1f},"{r.error.replace(chr(34), chr(39))}",{int(r.reused)}'
        )
    ran = [r for r in results if not r.reused]
    lines.append(
        f"\n{sum(r.status == 'ok' for r in results)}/{len(results)} notebooks ok; {len(ran)} ran, in "
        f"{sum(r.seconds for r in ran):.1f} s; {len(results) - len(ran)} reused (their last runs took "
        f"{sum(r.seconds for r in results if r.reused):.1f} s)."
    )
    write_atomic(build_dir / "summary.csv", "\n".join(csv) + "\n")
    path = build_dir / "summary.md"
    write_atomic(path, "\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qatlab.runner", description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", type=Path, help="folder with the .ipynb files")
    parser.add_argument("build", type=Path, help="output folder (created)")
    parser.add_argument("--fast", action="store_true", help="run in fast mode (QATLAB_FAST=1)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell before giving up")
    args = parser.parse_args(argv)
    if not args.notebooks.is_dir():
        print(f"error: notebook folder {args.notebooks} does not exist", file=sys.stderr)
        return 2
    sources = sorted(p for p in args.notebooks.glob("*.ipynb") if not p.name.startswith("."))
    args.build.mkdir(parents=True, exist_ok=True)
    if not sources:
        print(f"no notebooks found in {args.notebooks}; nothing to run")
        write_summary([], args.build)
        return 0
    results = []
    for src in sources:
        key = notebook_key(src, args.fast)  # before it runs: an edit during the run makes the next one rerun
        r = reusable(src, args.build, key)
        if r is not None:
            print(f"{src.name}: unchanged since its last ok run ({r.seconds:.1f} s), reused", flush=True)
            results.append(r)
            continue
        print(f"running {src.name} ...", flush=True)
        stamp = _stamp_path(args.build, src)
        stamp.unlink(missing_ok=True)
        r = run_notebook(src, args.build, timeout=args.timeout, fast=args.fast)
        print(f"  {r.status} in {r.seconds:.1f} s {r.error}", flush=True)
        if r.status == "ok":
            write_atomic(stamp, json.dumps({"key": key, "seconds": r.seconds, "finished": time.time()}))
        import nbformat

        for defect in output_defects(nbformat.read(args.build / "notebooks" / src.name, as_version=4)):
            print(f"  note: {defect}", flush=True)
        results.append(r)
    summary = write_summary(results, args.build)
    print(summary.read_text())
    print(f"executed notebooks and HTML in {args.build / 'notebooks'}; summary in {summary}")
    return 0 if all(r.status == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
