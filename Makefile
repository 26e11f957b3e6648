# One entry point per job. Everything installs into ./.venv so a fresh machine needs only python3.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FASHION_MNIST_DIR ?= /usr/share/datasets/fashion-mnist

.PHONY: setup data test test-fast lint demo ablation bench clean

# setup.cfg declares the versions the library supports; constraints.txt pins the ones the tests run on.
$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

setup: $(VENV)/.installed

# Debian ships the real Fashion-MNIST; install it when it is missing (root, or sudo where available).
$(FASHION_MNIST_DIR):
	@if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO=sudo; fi; \
	$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist

data: $(FASHION_MNIST_DIR)

lint: setup
	$(VENV)/bin/ruff check attndistill_hf recipes tests bench docs/scripts
	$(VENV)/bin/ruff format --check attndistill_hf recipes tests bench docs/scripts

test: setup data lint
	$(VENV)/bin/python -m pytest -q tests

# The edit loop: everything but the multi-process and end-to-end tests (marked slow).
test-fast: setup data lint
	$(VENV)/bin/python -m pytest -q -m "not slow" tests

demo: setup data
	$(PY) recipes/demo.py

ablation: setup data
	$(PY) recipes/ablation.py

bench: setup
	$(PY) bench/bench_step.py
	$(PY) bench/bench_data.py

clean:
	rm -rf $(VENV) outputs demo_output
