# tvr: `make demo` runs the main job end to end, `make test` runs the whole test suite.
# Both create (or reuse) the project-local virtual environment .venv and install everything into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tvr-installed
DEMO_DIR ?= demo-out
PYTEST_ARGS ?=

.PHONY: install dlib-source demo test test-fast bench clean

install: $(STAMP)

# torch and torchvision are installed together first: CUDA builds that also run on CPU
# (the CPU-only torch build has no matching torchvision wheel). dlib comes prebuilt (dlib-bin) wherever PyPI has a
# wheel for the platform and compiles from source elsewhere (pyproject's markers; docs/install.md).
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "tvr needs Python >= 3.11; '$(PYTHON)' is $$($(PYTHON) --version 2>&1). Run: make PYTHON=python3.11 ..."; exit 1; }
	@$(PYTHON) -m venv $(VENV) || { echo "'$(PYTHON) -m venv' failed: install your Python's venv module (Debian/Ubuntu: apt-get install python3-venv) and rerun"; exit 1; }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch torchvision
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -c 'import dlib' || { echo "dlib did not install: see docs/install.md"; exit 1; }
	touch $(STAMP)

# dlib built from source, e.g. with CUDA for the MMOD face detector (docs/install.md); pip's cached CPU wheel is skipped.
dlib-source: $(STAMP)
	$(PY) -m pip uninstall -y -q dlib-bin dlib
	$(PY) -m pip install -q --no-binary dlib --no-cache-dir 'dlib>=19.24'
	$(PY) -c "import dlib; print('dlib', dlib.__version__, 'with CUDA' if dlib.DLIB_USE_CUDA else 'CPU only')"

demo: $(STAMP)
	$(PY) -m pipelines.demo --out $(DEMO_DIR)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
