"""`make run`'s executor: rendered notebooks, summary, failures reported, empty folder handled."""

import json
import os

import nbformat
from nbformat.v4 import new_code_cell, new_notebook

from qatlab.runner import STEADY_MALLOC, main, output_defects


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


def test_a_notebook_runs_again_only_when_something_it_depends_on_changed(tmp_path, monkeypatch):
    nbs, build = tmp_path / "nbs", tmp_path / "build"
    nbs.mkdir()
    count = "open('runs.txt', 'a').write('x')\nlen(open('runs.txt').read())"
    _write(nbs / "01_ok.ipynb", count)
    _write(nbs / "02_bad.ipynb", "assert False, 'claim failed'")

    def runs():
        return len((build / "runs.txt").read_text())

    monkeypatch.delenv("QATLAB_RECOMPUTE", raising=False)
    assert main([str(nbs), str(build), "--fast"]) == 1 and runs() == 1
    assert main([str(nbs), str(build), "--fast"]) == 1 and runs() == 1  # unchanged: reused, not run
    summary = (build / "summary.csv").read_text().splitlines()
    assert summary[1].startswith("01_ok.ipynb,ok,") and summary[1].endswith(",1")  # reused
    assert summary[2].startswith("02_bad.ipynb,failed,") and summary[2].endswith(",0")  # a failure runs again
    assert "1 ran" in (build / "summary.md").read_text() and "1 reused" in (build / "summary.md").read_text()
    done = nbformat.read(build / "notebooks" / "01_ok.ipynb", as_version=4)
    assert done.cells[0].outputs[0]["data"]["text/plain"] == "1"  # the rendered copy of the run that counted
    assert main([str(nbs), str(build)]) == 1 and runs() == 2  # full mode is another key
    _write(nbs / "01_ok.ipynb", count, "1 + 1")  # an edited notebook
    assert main([str(nbs), str(build)]) == 1 and runs() == 3
    assert main([str(nbs), str(build)]) == 1 and runs() == 3
    monkeypatch.setenv("QATLAB_RECOMPUTE", "1")
    assert main([str(nbs), str(build)]) == 1 and runs() == 4
    monkeypatch.delenv("QATLAB_RECOMPUTE")
    import qatlab.store

    monkeypatch.setattr(qatlab.store, "source_hash", lambda presentation=False: "other qatlab code")
    assert main([str(nbs), str(build)]) == 1 and runs() == 5


def test_kernels_get_steady_malloc_settings_unless_set(tmp_path, monkeypatch):
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    _write(nbs / "01_env.ipynb", "import os, json\njson.dump({k: os.environ.get(k) for k in "
           f"{sorted(STEADY_MALLOC)!r}}}, open('env.json', 'w'))")  # fmt: skip
    monkeypatch.setenv("QATLAB_RECOMPUTE", "1")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "123")  # the user's own setting wins
    assert main([str(nbs), str(tmp_path / "build"), "--fast"]) == 0
    seen = json.loads((tmp_path / "build" / "env.json").read_text())
    assert seen == {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": "123"}


def test_no_notebooks_is_not_an_error(tmp_path, capsys):
    (tmp_path / "nbs").mkdir()
    assert main([str(tmp_path / "nbs"), str(tmp_path / "build")]) == 0
    assert "no notebooks found" in capsys.readouterr().out
    assert main([str(tmp_path / "missing"), str(tmp_path / "build")]) == 2


EXPLORER = """import ipywidgets as W
from IPython.display import Image, display
out = W.Output()
png = {png!r}
with out:
    print("4-bit grid: S = 0.25")
    display(Image(data=png))
W.VBox([W.IntSlider(), W.VBox([out])])"""


def test_explorers_keep_a_static_copy(tmp_path):
    """Read without a kernel, an explorer shows the caption and figure it last drew, not ``VBox(...)``."""
    import base64
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1, 1))
    ax.plot([0, 1])
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    nbs, build = tmp_path / "nbs", tmp_path / "build"
    nbs.mkdir()
    _write(nbs / "01_widget.ipynb", EXPLORER.format(png=buf.getvalue()), "W.IntSlider()")
    assert main([str(nbs), str(build), "--fast"]) == 0
    done = nbformat.read(build / "notebooks" / "01_widget.ipynb", as_version=4)
    data = done.cells[0].outputs[0]["data"]
    assert "application/vnd.jupyter.widget-view+json" in data  # still a live widget in JupyterLab
    assert data["text/plain"] == "4-bit grid: S = 0.25"
    assert base64.b64decode(data["image/png"]) == buf.getvalue()  # the nested Output's figure, byte for byte
    assert (
        done.cells[1].outputs[0]["data"]["text/plain"].startswith("IntSlider(")
    )  # nothing printed: repr kept
    html = (build / "notebooks" / "01_widget.html").read_text()
    assert "4-bit grid: S = 0.25" in html and data["image/png"][:64] in html
    assert '<script type="application/vnd.jupyter.widget-view+json">' not in html


def test_executed_notebooks_hold_no_progress_bars_or_raw_reprs(tmp_path, capsys):
    nbs, build = tmp_path / "nbs", tmp_path / "build"
    nbs.mkdir()
    _write(
        nbs / "01_outputs.ipynb",
        # the lab's progress bars and the transformers library's are off in make run's kernels
        "import os\nfrom qatlab.config import progress_bar\nfor _ in progress_bar(range(3)): pass\n"
        "os.environ['HF_HUB_DISABLE_PROGRESS_BARS']",
        "import numpy as np\nprint({'acc': np.float64(0.5)})",  # a raw dict holding a numpy scalar
        "print(f'accuracy {np.float64(0.5):.2f}')",  # a sentence: fine
    )
    assert main([str(nbs), str(build), "--fast"]) == 0
    done = nbformat.read(build / "notebooks" / "01_outputs.ipynb", as_version=4)
    assert done.cells[0].outputs == [{"output_type": "execute_result", "data": {"text/plain": "'1'"},
                                      "metadata": {}, "execution_count": 1}]  # fmt: skip
    defects = output_defects(done)
    assert [d.split(":")[:2] for d in defects] == [["cell 1", " numpy scalar repr"], ["cell 1", " raw dict"]]
    assert "note: cell 1: raw dict" in capsys.readouterr().out  # make run names them as it goes
    frozen = new_notebook(cells=[new_code_cell("")])
    frozen.cells[0].outputs = [
        nbformat.v4.new_output("stream", text="fit:   0%|          | 0/8 [00:00<?, ?epoch/s]")
    ]
    assert output_defects(frozen) == [
        "cell 0: frozen progress bar: 'fit:   0%|          | 0/8 [00:00<?, ?epoch/s]'"
    ]
