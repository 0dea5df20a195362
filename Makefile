# Developer entry points. The README's two set-up commands are `make demo` and `make test`;
# .ci/run calls `make test`. Everything is installed into $(VENV); nothing needs sudo.

VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

# llama-cpp-python builds libllama from source the first time (~15 min on 2 cores); pip caches the
# wheel afterwards, so keep pip's cache on. Override CMAKE_ARGS for e.g. -DGGML_CUDA=on.
CMAKE_ARGS ?= -DLLAVA_BUILD=OFF
CMAKE_BUILD_PARALLEL_LEVEL ?= 2
PIP_INSTALL := CMAKE_ARGS="$(CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$(CMAKE_BUILD_PARALLEL_LEVEL) $(PIP) install

# Debian packages the tests need beyond what the Python wheels bundle (soundfile's wheel ships
# libsndfile): libfluidsynth and the GM soundfont render the demo data set (examples/demo_model/data.py).
# Space-separated; only the missing ones are installed.
SYSDEPS ?= fluidsynth fluid-soundfont-gm

PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help venv sysdeps install-dev install-demo install-demo-model test test-slow lint format demo demo-eval \
	demo-model bench clean distclean

help:
	@echo "make demo       install the runtime and caption the example clips with the demo model (examples/demo.py)"
	@echo "make demo-eval  score the demo model on held-out pieces (renders the demo data first)"
	@echo "make demo-model rebuild the demo model from scratch: data, training, export (examples/demo_model/train.py)"
	@echo "make test       install everything for development, run ruff and the fast tests"
	@echo "make test-slow  run only the tests marked slow"
	@echo "make lint       ruff check;  make format: ruff format + import sorting"
	@echo "make bench      run the benchmarks (bench/; results in bench/RESULTS.md; BENCH_ARGS=--quick)"
	@echo "make clean      remove build artefacts and caches (distclean also removes $(VENV))"

$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' || \
	  { echo "error: $(PYTHON) is Python $$($(PYTHON) -c 'import platform; print(platform.python_version())'); 3.10 or newer is needed (make PYTHON=python3.11 ...)" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

venv: $(PY)

sysdeps:
	@missing=""; \
	for pkg in $(SYSDEPS); do \
	  dpkg -s "$$pkg" >/dev/null 2>&1 || missing="$$missing $$pkg"; \
	done; \
	if [ -z "$$missing" ]; then echo "sysdeps: nothing to install"; exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then \
	  echo "error: missing Debian packages:$$missing; run as root: apt-get install$$missing" >&2; exit 1; \
	fi; \
	command -v apt-get >/dev/null || { echo "error: missing packages:$$missing and no apt-get" >&2; exit 1; }; \
	echo "sysdeps: installing$$missing"; \
	apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing

$(VENV)/.installed-dev: pyproject.toml | $(PY) sysdeps
	$(PIP_INSTALL) -e '.[dev]'
	@touch $@

# The demo needs the runtime only (the bundle is committed): no torch.
$(VENV)/.installed-demo: pyproject.toml | $(PY)
	$(PIP_INSTALL) -e '.[cpu]'
	@touch $@

# Rendering the demo data, training and exporting need everything (music21, torch, onnx, gguf).
$(VENV)/.installed-demo-model: pyproject.toml | $(PY) sysdeps
	$(PIP_INSTALL) -e '.[demo]'
	@touch $@

install-dev: $(VENV)/.installed-dev

install-demo: $(VENV)/.installed-demo

install-demo-model: $(VENV)/.installed-demo-model

# pytest exits 5 when no test ran: that is a failure here, not a pass.
test: sysdeps install-dev
	$(VENV)/bin/ruff check .
	@$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests (exit 5)" >&2; fi; \
	exit $$rc

test-slow: sysdeps install-dev
	@$(PY) -m pytest -q -m slow $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: no test is marked slow (pytest exit 5)" >&2; fi; \
	exit $$rc

lint: install-dev
	$(VENV)/bin/ruff check .

format: install-dev
	$(VENV)/bin/ruff check --select I --fix .
	$(VENV)/bin/ruff format .

demo: install-demo
	$(PY) -m examples.demo

demo-eval: install-demo-model
	$(PY) -m examples.demo_model.evaluate

# One command, < 20 minutes on 2 cores; writes examples/demo_bundle (bit-for-bit the committed one:
# check with `$(PY) -m examples.demo_model.train --check`).
demo-model: install-demo-model
	$(PY) -m examples.demo_model.train

# BENCH_ARGS: e.g. "--quick" (shorter runs) or benchmark names ("bandwidth memory"); see bench/README.md.
BENCH_ARGS ?=
bench: install-dev
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf build dist .pytest_cache .ruff_cache .hypothesis native_bridge/_build native_bridge/build
	find . -path ./$(VENV) -prune -o -name '*.egg-info' -prune -exec rm -rf {} + -o \
	  -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
