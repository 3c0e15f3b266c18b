# make test: unit, data and quick notebook tests.  make run: regenerate every notebook and results/.
# Both create .venv and install requirements.txt when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)
# The offline sample packs, when this checkout sits beside the workplace's shared folder.
RCONV_DATA ?= $(if $(wildcard ../shared/datasets),../shared/datasets,)
export RCONV_DATA

.PHONY: test run bench baselines distributed clean-venv

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e . || $(PY) -m pip install --quiet --no-deps -e .
	touch $@

# The optional baselines package (breaching), for Experiments/Baselines.ipynb and its tests.
$(VENV)/.baselines: $(VENV)/.installed requirements-baselines.txt
	$(PY) -m pip install --quiet -r requirements-baselines.txt
	touch $@

baselines: $(VENV)/.baselines

# The optional Dask package, for the sweeps on a cluster (run_all.py --workers/--scheduler) and their tests.
$(VENV)/.distributed: $(VENV)/.installed requirements-distributed.txt
	$(PY) -m pip install --quiet -r requirements-distributed.txt
	touch $@

distributed: $(VENV)/.distributed

test: $(VENV)/.installed $(VENV)/.distributed
	$(PY) -m pytest -q

run: $(VENV)/.baselines
	$(PY) run_all.py

bench: $(VENV)/.installed
	$(PY) benchmarks/bench.py

clean-venv:
	rm -rf $(VENV)
