"""The README's quick start runs as written and its claims hold."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs(tmp_path, monkeypatch, capsys):
    code = re.search(r"## Quick start\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert len(code.strip().splitlines()) <= 16
    monkeypatch.chdir(tmp_path)  # the ONNX file lands here
    namespace: dict = {}
    exec(compile(code, "README quick start", "exec"), namespace)
    ptq_acc = namespace["qatlab"].evaluate(namespace["ptq"], namespace["test"])["acc"]
    qat_acc = namespace["qatlab"].evaluate(namespace["qat"], namespace["test"])["acc"]
    assert 0.8 < ptq_acc <= 1.0 and 0.8 < qat_acc <= 1.0
    assert (tmp_path / "qat_w4a4.onnx").exists()
    assert "'passed': True" in capsys.readouterr().out


def test_findings_table_is_linked_and_lists_every_finding_with_a_verdict():
    from qatlab.reproduce import FINDINGS

    assert "(docs/findings.md)" in README.read_text()
    table = (README.parent / "docs" / "findings.md").read_text()
    rows = [line for line in table.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(rows) == len(FINDINGS) >= 8
    for row, finding in zip(rows, FINDINGS, strict=True):
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        assert cells[1] == finding.claim and cells[2] == finding.paper
        assert cells[-1] in ("reproduced", "partly", "not reproduced") and cells[-2] == "2"


def test_readme_images_exist():
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README.read_text())
    assert len(images) >= 3
    for path in images:
        png = (README.parent / path).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n", path
