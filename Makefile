# make test: unit, data and quick notebook tests.  make run: render the templated notebooks, then regenerate
# every notebook and results/.
# Both create .venv and install requirements.txt when missing, pinned by requirements-lock.txt so that
# every regeneration runs the same arithmetic (float32 rounding differs between library versions).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)
# The offline sample packs, when this checkout sits beside the workplace's shared folder.
RCONV_DATA ?= $(if $(wildcard ../shared/datasets),../shared/datasets,)
export RCONV_DATA

.PHONY: test run bench baselines distributed federated clean-venv

LOCK := requirements-lock.txt
# Notebooks side by side: the machine's cores (the stored tables do not depend on it: each sweep's task
# runs on one thread).
JOBS ?= $(shell nproc 2>/dev/null || echo 1)

$(VENV)/.installed: requirements.txt pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -c $(LOCK)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e . || $(PY) -m pip install --quiet --no-deps -e .
	touch $@

# The optional baselines package (breaching), for Experiments/Baselines.ipynb and its tests.
$(VENV)/.baselines: $(VENV)/.installed requirements-baselines.txt
	$(PY) -m pip install --quiet -r requirements-baselines.txt -c $(LOCK)
	touch $@

baselines: $(VENV)/.baselines

# The optional Dask package, for the sweeps on a cluster (run_all.py --workers/--scheduler) and their tests.
$(VENV)/.distributed: $(VENV)/.installed requirements-distributed.txt
	$(PY) -m pip install --quiet -r requirements-distributed.txt -c $(LOCK)
	touch $@

distributed: $(VENV)/.distributed

# The optional Flower and Opacus packages, for attacking real federated clients and their tests.
$(VENV)/.federated: $(VENV)/.installed requirements-federated.txt
	$(PY) -m pip install --quiet -r requirements-federated.txt -c $(LOCK)
	touch $@

federated: $(VENV)/.federated

test: $(VENV)/.installed $(VENV)/.distributed $(VENV)/.federated
	$(PY) -m pytest -q

run: $(VENV)/.baselines
	$(PY) run_all.py --render
	$(PY) run_all.py --jobs $(JOBS)

bench: $(VENV)/.installed
	$(PY) benchmarks/bench.py

clean-venv:
	rm -rf $(VENV)
