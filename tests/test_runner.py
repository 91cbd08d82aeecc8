"""`make run`'s executor: rendered notebooks, summary, failures reported, empty folder handled."""

import os

import nbformat
from nbformat.v4 import new_code_cell, new_notebook

from qatlab.runner import main


def _write(path, *sources):
    nbformat.write(new_notebook(cells=[new_code_cell(s) for s in sources]), path)


def test_runs_notebooks_and_writes_summary(tmp_path):
    nbs, build = tmp_path / "nbs", tmp_path / "build"
    nbs.mkdir()
    _write(
        nbs / "01_ok.ipynb",
        "import os\nx = 6 * 7",
        "open('made.txt', 'w').write(os.environ['QATLAB_FAST'])\nx",
    )
    _write(nbs / "02_bad.ipynb", "assert 1 + 1 == 3, 'claim failed'")
    env_before = dict(os.environ)
    assert main([str(nbs), str(build), "--fast"]) == 1  # one notebook failed
    assert dict(os.environ) == env_before  # the kernel got its own environment; ours is untouched
    done = nbformat.read(build / "notebooks" / "01_ok.ipynb", as_version=4)
    assert done.cells[1].outputs[0]["data"]["text/plain"] == "42"
    assert (build / "made.txt").read_text() == "1"  # ran in build/, in fast mode
    assert "42" in (build / "notebooks" / "01_ok.html").read_text()
    summary = (build / "summary.csv").read_text().splitlines()
    assert summary[1].startswith("01_ok.ipynb,ok,")
    assert summary[2].startswith("02_bad.ipynb,failed,") and "claim failed" in summary[2]
    assert "1/2 notebooks ok" in (build / "summary.md").read_text()
    assert not list(build.rglob("*.tmp"))


def test_no_notebooks_is_not_an_error(tmp_path, capsys):
    (tmp_path / "nbs").mkdir()
    assert main([str(tmp_path / "nbs"), str(tmp_path / "build")]) == 0
    assert "no notebooks found" in capsys.readouterr().out
    assert main([str(tmp_path / "missing"), str(tmp_path / "build")]) == 2
