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
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    assert any("assert " in src or "claims.check(" in src for src in code), "claims are asserted"
    assert any("export_and_check(" in src or "export_onnx(" in src for src in code), "ends with an export"
    # an export is checked two ways: the reference evaluator (any CPU) and ONNX Runtime or its diagnosis
    assert any('report["semantic_passed"]' in src for src in code), f"{path.name}: assert semantic parity"
    if any("Claims(" in src for src in code):  # claims are collected, then settled in the last cell
        assert code[-1].strip() == "claims.finish()", f"{path.name}: end with claims.finish()"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_fast_mode(path, tmp_path):
    result = run_notebook(path, tmp_path, timeout=600, fast=True)
    assert result.status == "ok", f"{path.name}: {result.error}"
    assert list(tmp_path.rglob("*.onnx")), f"{path.name} wrote no ONNX file"
