"""Notebook claims: recorded with their numbers, a failed one lets the notebook finish, and the run still fails."""

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from qatlab.claims import ClaimNotReproduced, Claims
from qatlab.runner import main


def test_claims_record_print_and_settle(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QATLAB_BUILD", str(tmp_path))
    claims = Claims("demo")
    claims.check("two is more than one", 2 > 1, measured="2 vs 1")
    claims.check("one is more than two", 1 > 2, measured="1 vs 2", expected="> 2")
    assert [r.status for r in claims.failed] == ["NOT REPRODUCED"]
    claims.measure("a difference within the noise", "+0.1 points")
    out = capsys.readouterr().out
    assert "claim held: two is more than one (measured 2 vs 1)" in out
    assert "CLAIM NOT REPRODUCED: one is more than two (measured 1 vs 2, expected > 2)" in out
    assert "measured: a difference within the noise: +0.1 points" in out
    table = claims.table()
    assert list(table["status"]) == ["held", "NOT REPRODUCED", "measured"]
    with pytest.raises(
        ClaimNotReproduced,
        match=r"1 claim\(s\) of demo not reproduced.*one is more than two \(measured 1 vs 2\)",
    ):
        claims.finish()
    assert "1 of 2 claims held" in capsys.readouterr().out  # a measurement is not a claim
    written = (tmp_path / "claims" / "demo.csv").read_text()
    assert "NOT REPRODUCED" in written and not list(tmp_path.rglob("*.tmp"))


def test_all_held_returns_the_table(tmp_path, monkeypatch):
    monkeypatch.setenv("QATLAB_BUILD", str(tmp_path))
    claims = Claims("ok")
    claims.check("true", True)
    claims.finish()  # no exception
    assert len(claims.table()) == 1 and not claims.failed


def test_bad_name():
    with pytest.raises(ValueError, match="notebook=''"):
        Claims("")


def test_a_notebook_with_a_failed_claim_runs_to_the_end_and_fails(tmp_path):
    nbs, build = tmp_path / "nbs", tmp_path / "build"
    nbs.mkdir()
    cells = [
        "from qatlab.claims import Claims\nclaims = Claims('03_demo')",
        "claims.check('per-channel wins', 0.3 > 2.0, measured='+0.3 points')",
        "print('the figure after the claim')",
        "claims.finish()",
    ]
    nbformat.write(new_notebook(cells=[new_code_cell(s) for s in cells]), nbs / "03_demo.ipynb")
    assert main([str(nbs), str(build), "--fast"]) == 1  # the run fails ...
    done = nbformat.read(build / "notebooks" / "03_demo.ipynb", as_version=4)
    assert "the figure after the claim" in done.cells[2].outputs[0]["text"]  # ... after every cell ran
    assert "ClaimNotReproduced" in (build / "summary.csv").read_text()
    assert "per-channel wins" in (build / "claims" / "03_demo.csv").read_text()
