"""The set-up files agree with each other: pyproject, environment.yml, Makefile, CI."""

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _names(reqs):
    return {re.split(r"[<>=!~\[ ;]", r.strip(), maxsplit=1)[0].lower() for r in reqs if r.strip()}


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = _names(project["dependencies"]) | _names(project["optional-dependencies"]["dev"])
    pip_lines = []
    in_pip = False
    for line in (ROOT / "environment.yml").read_text().splitlines():
        if line.strip() == "- pip:":
            in_pip = True
        elif in_pip and line.strip().startswith("- "):
            pip_lines.append(line.strip()[2:])
    assert _names(pip_lines) == wanted


def test_torch_is_pinned_everywhere():
    # an unpinned torch pulls a multi-GB CUDA build: the Makefile and environment.yml pin the CPU build
    assert re.search(r"^TORCH\s*:=\s*torch==2\.13\.0$", (ROOT / "Makefile").read_text(), re.M)
    assert "torch==2.13.0" in (ROOT / "environment.yml").read_text()


def test_ci_calls_make_test_and_readme_names_the_commands():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    for cmd in ("make run", "make test", "make lab"):
        assert cmd in readme, cmd
