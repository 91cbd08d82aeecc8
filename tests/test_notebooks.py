"""Every notebook runs in fast mode with its asserts passing; committed notebooks carry no outputs."""

from pathlib import Path

import nbformat
import pytest

from qatlab.runner import run_notebook

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_committed_clean_and_follows_conventions(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: strip outputs"
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert "parameters" in first.metadata.get("tags", []), f"{path.name}: first code cell must be tagged"
    assert "FAST = qatlab.config.fast()" in first.source
    assert any(c.cell_type == "code" and "assert " in c.source for c in nb.cells), "claims are asserted"
    assert any(c.cell_type == "code" and "export_onnx" in c.source for c in nb.cells), "ends with an export"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_fast_mode(path, tmp_path):
    result = run_notebook(path, tmp_path, timeout=600, fast=True)
    assert result.status == "ok", f"{path.name}: {result.error}"
    assert list(tmp_path.rglob("*.onnx")), f"{path.name} wrote no ONNX file"
