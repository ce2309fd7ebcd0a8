# `make demo` and `make test` both set everything up first (see README).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

test: venv
	$(BIN)/python -m pytest -n 2 -q

demo: venv
	$(BIN)/python -m blinddiff.demo --out demo_output

bench: venv
	$(BIN)/python benchmarks/degradation_throughput.py

clean:
	rm -rf $(VENV) demo_output .pytest_cache
