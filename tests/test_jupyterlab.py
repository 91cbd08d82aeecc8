"""The lab as its users see it: JupyterLab in headless Chromium, driven by Playwright.

A JupyterLab server starts on 127.0.0.1 (a free port, a random token, a temporary home, copies of the notebooks),
each notebook with an explorer widget is opened, run with Run > Run All Cells in fast mode, and every control of
its explorer is moved the way a user moves it (slider handles with the keyboard, buttons and dropdowns with the
mouse). Each test fails unless the explorer's text line and its figure both change, and the text line states the
new value. Screenshots of each explorer after the interactions go to ``build/screenshots/``.

Needs Debian's ``chromium`` and the ``playwright`` package (``make test`` installs both when apt runs as root);
without them the browser tests skip and say what is missing. The ``make lab`` check needs neither.
Requests that leave 127.0.0.1 are blocked in the browser; the server's news and update checks are off.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from qatlab.files import write_atomic

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = ROOT / "build" / "screenshots"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
RUN_ALL_TIMEOUT_S = 480  # 02 and 03 take minutes in fast mode; the margin is for a loaded machine
REDRAW_TIMEOUT_S = 30


@dataclass(frozen=True)
class Control:
    """One control of an explorer: its CSS class suffix, what the user does, what the text line then says.

    ``action``: ``"key K"`` (focus the slider handle, press key K), ``"click"`` (the widget itself, or its
    checkbox), ``"click LABEL"`` (the button with that label), ``"select LABEL"`` or ``"select #I"`` (a
    dropdown option by label or index). ``expect``: a substring of the new text line; ``"{selected}"``
    stands for the label of the option just selected (the line then starts with it).
    """

    name: str
    action: str
    expect: str | None


@dataclass(frozen=True)
class Explorer:
    notebook: str
    prefix: str  # CSS class prefix of the explorer's widgets (qatlab/widgets.py)
    controls: tuple[Control, ...]


EXPLORERS = (
    Explorer(
        "01_fake_quant_and_ste",
        "qatlab-fq",
        (
            Control("bits", "key ArrowRight", "5-bit asymmetric grid"),
            Control("scale", "key ArrowRight", None),  # the log slider's next value; the line must change
            Control("zero-point", "key ArrowRight", "Z = 9"),
            Control("ste", "click lsq", "STE: lsq"),
            Control("symmetric", "click", "symmetric grid: S"),
        ),
    ),
    Explorer(
        "02_quantization_error",
        "qatlab-qe",
        (
            Control("bits", "key ArrowRight", "5 bits"),
            Control("observer", "select mse", "5 bits, mse"),
            Control("per-channel", "click", "mse, per-channel"),
            Control("kind", "click activation", " activation: "),
            Control("layer", "select #1", "{selected}"),
        ),
    ),
    Explorer(
        "03_bn_folding",
        "qatlab-bn",
        (
            Control("bits", "key ArrowLeft", " at 7 bits: "),  # the explorer opens at 8 bits, the maximum
            Control("layer", "select #0", "{selected}"),
        ),
    ),
    Explorer(
        "10_number_formats",
        "qatlab-fmt",
        (
            Control("format", "select nvfp4", ", nvfp4: SQNR"),
            Control("kind", "click activation", " activation, "),
            Control("layer", "select #1", "{selected}"),
        ),
    ),
)
CASES = [(e, c) for e in EXPLORERS for c in e.controls]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, token: str, method: str = "GET", timeout: float = 5.0):
    """(status, parsed JSON or None) of a request to the local server."""
    req = urllib.request.Request(url, method=method, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        body = r.read()
        return r.status, (json.loads(body) if body else None)


def isolated_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a server that reads and writes nothing of the user's: Jupyter's and JupyterLab's
    config, data, runtime, settings and workspaces all under ``home``; news and update checks off."""
    settings = home / "lab-settings"
    note = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    note.parent.mkdir(parents=True, exist_ok=True)
    note.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    dirs = {
        "JUPYTER_CONFIG_DIR": "config",
        "JUPYTER_DATA_DIR": "data",
        "JUPYTER_RUNTIME_DIR": "runtime",
        "JUPYTERLAB_WORKSPACES_DIR": "workspaces",
    }
    env = {**os.environ, "HOME": str(home), "JUPYTERLAB_SETTINGS_DIR": str(settings)}
    env.update({k: str(home / v) for k, v in dirs.items()})
    env.update(extra)
    return env


def lab_options(port: int, token: str) -> list[str]:
    return [
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]


def wait_ready(proc: subprocess.Popen, base: str, token: str, log: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if http(f"{base}/api/status", token, timeout=2)[0] == 200:
                return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    pytest.fail(f"the server did not answer /api/status within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen, base: str, token: str) -> None:
    """Shut the server down through its API (which shuts its kernels down); kill its process group if that
    does not end it within 30 s."""
    try:
        http(f"{base}/api/shutdown", token, method="POST")
        proc.wait(timeout=30)
    except (urllib.error.URLError, OSError, subprocess.TimeoutExpired):
        pass
    if proc.poll() is None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=10)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue


def comms_over_subshells(base: str, token: str) -> str:
    """The value JupyterLab runs with (no user setting here, so the default the overrides set)."""
    _, body = http(f"{base}/lab/api/settings/@jupyterlab/apputils-extension:kernels-settings", token)
    return body["settings"].get(
        "commsOverSubshells", body["schema"]["properties"]["commsOverSubshells"]["default"]
    )


# ---- make lab ----------------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_lab_serves_the_notebooks(tmp_path):
    port, token = free_port(), secrets.token_hex(16)
    base, log = f"http://127.0.0.1:{port}", tmp_path / "lab.log"
    args = " ".join(lab_options(port, token))
    env = isolated_env(tmp_path / "home")
    env.pop("MAKEFLAGS", None)  # run as a user would, not as a sub-make of `make test`
    with log.open("w") as out:
        proc = subprocess.Popen(
            ["make", "--no-print-directory", "lab", f"LAB_ARGS={args}"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_ready(proc, base, token, log)
        status, body = http(f"{base}/api/status", token)
        assert status == 200 and "started" in body
        _, listing = http(f"{base}/api/contents/", token)
        served = sorted(item["name"] for item in listing["content"] if item["type"] == "notebook")
        assert served == sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
        with urllib.request.urlopen(f"{base}/lab?token={token}", timeout=10) as page:
            assert page.status == 200 and b"JupyterLab" in page.read()
        # widget messages stay on the kernel's main thread (config/jupyterlab-overrides.json, installed by setup)
        assert comms_over_subshells(base, token) == "disabled"
    finally:
        stop_server(proc, base, token)
    assert proc.returncode is not None


# ---- the browser -------------------------------------------------------------------------------------------


def _missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the Python package playwright is missing (make test installs it; or pip install playwright)"
    if not CHROMIUM.exists():
        return f"no Chromium at {CHROMIUM} (make test installs Debian's chromium when apt-get runs as root)"
    return None


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on 127.0.0.1 in fast mode over copies of the notebooks that have explorers."""
    missing = _missing()
    if missing:
        pytest.skip(f"browser tests skipped: {missing}")
    tmp = tmp_path_factory.mktemp("jupyterlab")
    root, build = tmp / "notebooks", tmp / "build"
    root.mkdir()
    # copies: JupyterLab autosaves what it runs, and the repo's notebooks stay as they are
    for e in EXPLORERS:
        shutil.copy(ROOT / "notebooks" / f"{e.notebook}.ipynb", root)
    port, token = free_port(), secrets.token_hex(16)
    base, log = f"http://127.0.0.1:{port}", tmp / "lab.log"
    env = isolated_env(tmp / "home", QATLAB_FAST="1", QATLAB_BUILD=str(build))
    cmd = [
        str(Path(sys.executable).parent / "jupyter-lab"),
        *lab_options(port, token),
        f"--ServerApp.root_dir={root}",
    ]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_ready(proc, base, token, log)
        if comms_over_subshells(base, token) != "disabled":
            pytest.fail("JupyterLab would run widget callbacks on a kernel subshell thread: run make setup")
        yield {"base": base, "token": token}
    finally:
        stop_server(proc, base, token)


@pytest.fixture(scope="module")
def browser(lab):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


# JavaScript: has Run All finished? The execution indicator is idle, no cell waits ([*]) and either the last
# code cell has its number or a cell failed (JupyterLab then leaves the cells after it unrun).
RUN_ALL_DONE = """() => {
  const indicator = document.querySelector('.jp-Notebook-ExecutionIndicator');
  const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')].map(p => p.textContent);
  const failed = document.querySelector('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.error"]');
  const last = prompts.length > 0 && /\\[\\d+\\]/.test(prompts[prompts.length - 1]);
  return indicator && indicator.dataset.status === 'idle' && !prompts.some(p => p.includes('*')) && (last || failed);
}"""

# JavaScript: the explorer's output shows a text line and a decoded image, and they differ from ``before``.
REDRAWN = """([sel, before]) => {
  const out = document.querySelector(sel);
  if (!out) return false;
  const img = out.querySelector('img');
  const text = out.querySelector('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stdout"]');
  return img !== null && text !== null && img.complete && img.naturalWidth > 0
    && img.src !== before.src && text.textContent !== before.text;
}"""


# JavaScript: the share of pixels with ink (not near-white) below the top fifth of the explorer's image, where
# the axes are; a figure that rendered only its titles scores ~0.
INK = """img => {
  const c = document.createElement('canvas');
  c.width = img.naturalWidth; c.height = img.naturalHeight;
  const g = c.getContext('2d');
  g.drawImage(img, 0, 0);
  const top = Math.floor(c.height / 5);
  const d = g.getImageData(0, top, c.width, c.height - top).data;
  let ink = 0;
  for (let i = 0; i < d.length; i += 4) if (d[i] < 200 || d[i + 1] < 200 || d[i + 2] < 200) ink++;
  return ink / (d.length / 4);
}"""
MIN_INK = 0.02  # the explorers' figures measure 0.036-0.25 here (axes, grid, data); blank ones 0.000


class Notebook:
    """One notebook open in its own browser page, run with Run > Run All Cells."""

    def __init__(self, browser, lab, explorer: Explorer):
        self.explorer = explorer
        self.blocked: list[str] = []
        self.context = browser.new_context(viewport={"width": 1400, "height": 1000})
        self.context.route(re.compile(r"^(?!http://127\.0\.0\.1:)"), self._block)  # nothing leaves the host
        self.page = self.context.new_page()
        url = f"{lab['base']}/lab/tree/{explorer.notebook}.ipynb?reset&token={lab['token']}"
        start = time.monotonic()
        self.page.goto(url)
        # idle alone can come before the kernel is chosen (and a "Select Kernel" dialog): wait for both
        self.page.wait_for_selector(".jp-Toolbar-kernelName:has-text('Python 3')", timeout=90_000)
        self.page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=90_000)
        self.page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
        self.page.locator("[data-command='runmenu:run-all']").click()
        self.page.wait_for_function(RUN_ALL_DONE, timeout=RUN_ALL_TIMEOUT_S * 1000, polling=500)
        self.seconds = time.monotonic() - start
        # textContent, not innerText: cells scrolled out of view are not rendered (content-visibility)
        errors = self.texts(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']")
        prompts = self.texts(".jp-CodeCell .jp-InputArea-prompt")
        self.unrun = sum(not re.search(r"\[\d+\]", p) for p in prompts)
        self.errors = [e[-1500:] for e in errors]
        self.box = self.page.locator(f".{explorer.prefix}-explorer")

    def texts(self, selector: str) -> list[str]:
        return self.page.locator(selector).evaluate_all("els => els.map(e => e.textContent)")

    def _block(self, route) -> None:
        self.blocked.append(route.request.url)
        route.abort()

    def widget(self, name: str):
        return self.box.locator(f".{self.explorer.prefix}-{name}")

    def output_state(self) -> dict[str, str]:
        out = self.widget("output")
        return {
            "src": out.locator("img").get_attribute("src") or "",
            "text": out.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stdout']")
            .text_content()
            .strip(),
        }

    def ink(self) -> float:
        return self.widget("output").locator("img").evaluate(INK)

    def act(self, control: Control) -> str | None:
        """Do what the user does to ``control``; returns the selected option's label for dropdowns."""
        w = self.widget(control.name)
        w.scroll_into_view_if_needed()
        verb, _, arg = control.action.partition(" ")
        if verb == "key":
            w.locator(".noUi-handle").focus()
            self.page.keyboard.press(arg)
        elif verb == "click" and arg:
            w.locator("button", has_text=re.compile(rf"^{re.escape(arg)}$")).click()
        elif verb == "click":
            box = w.locator("input[type=checkbox]")
            (box if box.count() else w).click()
        elif verb == "select":
            select = w.locator("select")
            if arg.startswith("#"):
                index = int(arg[1:])
                if select.evaluate("s => s.selectedIndex") == index:  # already there: take the next one
                    index += 1
                select.select_option(index=index)
            else:
                select.select_option(label=arg)
            return select.evaluate("s => s.options[s.selectedIndex].text")
        else:
            raise ValueError(f"unknown action {control.action!r}")
        return None

    def close(self) -> None:
        self.context.close()


@pytest.fixture(scope="module")
def notebooks(lab, browser):
    """Opens each notebook once (on first use) and keeps it open for its controls' tests; at the end, a
    screenshot of each explorer goes to build/screenshots/<notebook>.png and the pages close."""
    opened: dict[str, Notebook] = {}

    def get(explorer: Explorer) -> Notebook:
        if explorer.notebook not in opened:
            opened[explorer.notebook] = Notebook(browser, lab, explorer)
        return opened[explorer.notebook]

    yield get
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    try:
        for name, nb in opened.items():
            if nb.box.count():
                nb.box.scroll_into_view_if_needed()
                nb.box.locator("img").evaluate("img => img.decode()")  # drawn in full, not half-decoded
                write_atomic(SCREENSHOTS / f"{name}.png", nb.box.screenshot())
    finally:
        for nb in opened.values():
            nb.close()


@pytest.mark.parametrize("explorer", EXPLORERS, ids=[e.notebook for e in EXPLORERS])
def test_notebook_runs_in_the_browser(notebooks, explorer):
    nb = notebooks(explorer)
    assert not nb.errors, f"{explorer.notebook}: a cell failed in the browser:\n" + "\n".join(nb.errors)
    assert nb.unrun == 0, f"{explorer.notebook}: {nb.unrun} code cell(s) did not run"
    assert nb.box.count() == 1, (
        f"{explorer.notebook}: the explorer (.{explorer.prefix}-explorer) is not shown"
    )
    state = nb.output_state()
    assert state["src"].startswith("data:image/png;base64,"), "the explorer shows no figure"
    size = nb.widget("output").locator("img").evaluate("img => img.decode().then(() => img.naturalWidth)")
    assert size > 300, f"the explorer's figure did not decode (width {size})"
    ink = nb.ink()
    assert ink > MIN_INK, f"the explorer's figure is blank ({ink:.3f} of its pixels drawn)"
    assert state["text"], "the explorer shows no text line"
    assert not nb.blocked, f"the page tried to leave 127.0.0.1: {nb.blocked[:5]}"
    print(f"{explorer.notebook}: opened and ran in {nb.seconds:.1f} s")


@pytest.mark.parametrize("explorer, control", CASES, ids=[f"{e.notebook[:2]}-{c.name}" for e, c in CASES])
def test_control_changes_what_the_user_sees(notebooks, explorer, control):
    nb = notebooks(explorer)
    if nb.errors or nb.box.count() != 1:
        pytest.fail(
            f"{explorer.notebook} did not run to its explorer (see test_notebook_runs_in_the_browser)"
        )
    before = nb.output_state()
    readout = nb.widget(control.name).locator(".widget-readout")
    value_before = readout.inner_text() if readout.count() else None
    selected = nb.act(control)
    nb.page.wait_for_function(
        REDRAWN, arg=[f".{explorer.prefix}-output", before], timeout=REDRAW_TIMEOUT_S * 1000, polling=100
    )
    after = nb.output_state()
    assert after["src"] != before["src"] and after["text"] != before["text"]
    ink = nb.ink()
    assert ink > MIN_INK, f"the new figure is blank ({ink:.3f} of its pixels drawn): {after['text']}"
    print(f"{explorer.notebook[:2]} {control.name}: {after['text']} (ink {ink:.3f})")
    if value_before is not None:  # a slider: its readout moved too
        assert readout.inner_text() != value_before
    if control.expect == "{selected}":
        assert after["text"].startswith(f"{selected} "), (selected, after["text"])
    elif control.expect:
        assert control.expect in after["text"], (control.expect, after["text"])


def _classes(widget) -> set[str]:
    found = {c for c in getattr(widget, "_dom_classes", ()) if c.startswith("qatlab-")}
    for child in getattr(widget, "children", ()):
        found |= _classes(child)
    return found


def test_every_explorer_and_control_is_covered():
    """The browser tests know every explorer the notebooks show and every control each explorer has."""
    import torch

    from qatlab import QuantSpec, widgets

    shown = {
        nb.stem
        for nb in (ROOT / "notebooks").glob("*.ipynb")
        if re.search(r"widgets\.\w+_explorer\(", nb.read_text())
    }
    assert shown == {e.notebook for e in EXPLORERS}
    w = torch.randn(4, 2, 3, 3)
    boxes = {
        "qatlab-fq": widgets.fake_quant_explorer(),
        "qatlab-qe": widgets.quant_error_explorer({"weight": {"l": w}, "activation": {"l": w}}),
        "qatlab-bn": widgets.bn_fold_explorer({"l": (w, 2 * w)}),
        "qatlab-fmt": widgets.format_explorer(
            {"weight": {"l": w}, "activation": {"l": w}}, {"mxfp4": QuantSpec(format="mxfp4")}
        ),
    }
    assert set(boxes) == {e.prefix for e in EXPLORERS}
    for e in EXPLORERS:
        tested = {f"{e.prefix}-{part}" for part in ("explorer", "output")}
        tested |= {f"{e.prefix}-{c.name}" for c in e.controls}
        assert _classes(boxes[e.prefix]) == tested, e.notebook


def test_missing_browser_is_named(monkeypatch, tmp_path):
    """Without Chromium the browser tests skip with a message that names it and how make test installs it."""
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", tmp_path / "no-chromium")
    message = _missing()
    if message is not None and "playwright" in message:  # playwright itself absent: that message comes first
        assert "pip install playwright" in message
    else:
        assert message is not None and "no-chromium" in message and "apt-get" in message
