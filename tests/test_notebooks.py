"""Every notebook runs in fast mode with its asserts passing; committed notebooks carry no outputs."""

import ast
import functools
import importlib
import re
from pathlib import Path

import nbformat
import pytest

from qatlab.runner import output_defects, run_notebook

_QATLAB_MODULES = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "qatlab").glob("[a-z]*.py"))


@functools.cache
def _package_functions() -> frozenset[str]:
    """Every public function and class name defined in a qatlab module."""
    names = set()
    for stem in _QATLAB_MODULES:
        module = importlib.import_module(f"qatlab.{stem}")
        for name, obj in vars(module).items():
            if (
                not name.startswith("_")
                and getattr(obj, "__module__", None) == module.__name__
                and callable(obj)
            ):
                names.add(name)
    return frozenset(names)


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
    assert "FAST = qatlab.fast()" in first.source
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    assert any("assert " in src or "claims.check(" in src for src in code), "claims are asserted"
    assert any("export_and_check(" in src or "export_onnx(" in src for src in code), "ends with an export"
    # an export is checked two ways: the reference evaluator (any CPU) and ONNX Runtime or its diagnosis
    assert any('report["semantic_passed"]' in src for src in code), f"{path.name}: assert semantic parity"
    # notebooks narrate and call the package: no re-definition of a package function, no private qatlab name
    package_names = _package_functions()
    for src in code:
        tree = ast.parse(
            "\n".join(line for line in src.splitlines() if not line.lstrip().startswith(("%", "!")))
        )
        defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert not defined & package_names, (
            f"{path.name}: defines {defined & package_names}, which qatlab has"
        )
        private = re.findall(r"\b(?:qatlab|" + "|".join(_QATLAB_MODULES) + r")\._[A-Za-z]\w*", src)
        private += re.findall(r"from qatlab[\w.]* import [^\n]*\b_[A-Za-z]\w*", src)
        assert not private, f"{path.name}: calls private qatlab names {private}"
    if any("Claims(" in src for src in code):  # claims are collected, then settled in the last cell
        assert code[-1].strip() == "claims.finish()", f"{path.name}: end with claims.finish()"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_fast_mode(path, tmp_path):
    result = run_notebook(path, tmp_path, timeout=600, fast=True)
    assert result.status == "ok", f"{path.name}: {result.error}"
    assert list(tmp_path.rglob("*.onnx")), f"{path.name} wrote no ONNX file"
    executed = nbformat.read(tmp_path / "notebooks" / path.name, as_version=4)
    assert output_defects(executed) == [], f"{path.name}: outputs a reader should not meet"
