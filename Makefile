# Two entry points that work on a fresh clone with only Python installed:
#   make demo   sets up .venv and runs the main job on the embedded default
#   make test   sets up .venv and runs the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test setup clean long-context

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU wheel of these machines; the package itself asks for torch>=2.10.
	$(PY) -m pip install --quiet torch==2.13.0 numpy
	# Every extra the demo and the tests use: transformers, lm-eval, matplotlib, pytest (+ triton for the
	# interpreter tests of the kernels).
	$(PY) -m pip install --quiet -e ".[dev,hf,eval,plot]"
	touch $(STAMP)

setup: $(STAMP)

# Trains the small Megalodon on Shakespeare for about five minutes (fetched and tokenized on first use).
demo: $(STAMP)
	$(VENV)/bin/megalodon train --config demo --run-dir runs/demo --overwrite

test: $(STAMP)
	$(PY) -m pytest -n 2 tests

# The long-context suite at its small settings (docs/long-context.md, "Running the suite").
long-context: $(STAMP)
	bash benchmarks/long_context/run_all.sh

clean:
	rm -rf $(VENV) build dist src/*.egg-info
