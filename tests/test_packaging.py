"""The set-up files agree with each other: pyproject, environment.yml, Makefile, CI."""

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _names(reqs):
    return {re.split(r"[<>=!~\[ ;]", r.strip(), maxsplit=1)[0].lower() for r in reqs if r.strip()}


def _wanted() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return _names(project["dependencies"]) | _names(project["optional-dependencies"]["dev"])


def _env_pip_lines() -> list[str]:
    pip_lines, in_pip = [], False
    for line in (ROOT / "environment.yml").read_text().splitlines():
        if line.strip() == "- pip:":
            in_pip = True
        elif in_pip and line.strip().startswith("- "):
            pip_lines.append(line.strip()[2:])
    return pip_lines


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"requirements.lock: {line!r} is not an exact pin (name==version)"
            pins[re.sub(r"[-_.]+", "-", name.strip().lower())] = version.strip()
    return pins


def test_environment_yml_matches_pyproject():
    packages = [line for line in _env_pip_lines() if not line.startswith("-")]
    assert _names(packages) == _wanted()


def test_lock_pins_every_dependency_and_the_set_up_files_use_it():
    lock = _lock()
    makefile = (ROOT / "Makefile").read_text()
    extras = set(re.search(r"^EXTRAS\s*:=\s*(.+)$", makefile, re.M).group(1).split())
    nodeps = {m.group(1) for m in re.finditer(r"^NODEPS_\w+\s*:=\s*(\S+)$", makefile, re.M)}
    for name in _wanted() | extras | nodeps | {"torch", "playwright"}:
        assert re.sub(r"[-_.]+", "-", name) in lock, f"{name} is not pinned in requirements.lock (make lock)"
    # the same torch and playwright as the Makefile's pins, no local version label (a CPU build's "+cpu")
    assert lock["torch"] == re.search(r"^TORCH\s*:=\s*torch==(\S+)$", makefile, re.M).group(1)
    assert lock["playwright"] == re.search(r"^PLAYWRIGHT\s*:=\s*playwright==(\S+)$", makefile, re.M).group(1)
    assert not any("+" in v for v in lock.values())
    # every install of make setup is constrained by the lock, and conda users get it too
    assert (
        re.search(r"^PIP\s*:=.*-c \$\(LOCK\)", makefile, re.M) and "LOCK   := requirements.lock" in makefile
    )
    setup = makefile.split("$(STAMP): ")[1].split("\n\n")[0]
    installs = [line for line in setup.splitlines() if "pip install" in line or "$(PIP)" in line]
    assert all("$(PIP)" in line for line in installs if "--upgrade pip" not in line), installs
    assert "-c requirements.lock" in _env_pip_lines()
    assert re.search(r"^lock:", makefile, re.M)  # `make lock` refreshes it (README)


def test_torch_is_pinned_everywhere():
    # an unpinned torch pulls a multi-GB CUDA build: the Makefile and environment.yml pin the CPU build
    assert re.search(r"^TORCH\s*:=\s*torch==2\.13\.0$", (ROOT / "Makefile").read_text(), re.M)
    assert "torch==2.13.0" in (ROOT / "environment.yml").read_text()


def test_ci_calls_make_test_and_readme_names_the_commands():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    for cmd in ("make run", "make test", "make lab"):
        assert cmd in readme, cmd
