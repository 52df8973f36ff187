# tvr: `make demo` runs the main job end to end, `make test` runs the whole test suite.
# Both create (or reuse) the project-local virtual environment .venv and install everything into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tvr-installed
DEMO_DIR ?= demo-out
PYTEST_ARGS ?=

.PHONY: install demo test test-fast bench clean

install: $(STAMP)

# torch and torchvision are installed together first: CUDA builds that also run on CPU
# (the CPU-only torch build has no matching torchvision wheel). dlib compiles from source (~10 min; pip caches the wheel).
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "tvr needs Python >= 3.11; '$(PYTHON)' is $$($(PYTHON) --version 2>&1). Run: make PYTHON=python3.11 ..."; exit 1; }
	@$(PYTHON) -m venv $(VENV) || { echo "'$(PYTHON) -m venv' failed: install your Python's venv module (Debian/Ubuntu: apt-get install python3-venv) and rerun"; exit 1; }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch torchvision
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

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
