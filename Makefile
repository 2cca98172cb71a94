# Two commands do all set-up on a fresh machine:
#   make demo   -> creates/refreshes .venv, installs, runs the Lightning digits demo on a local Ray
#   make test   -> creates/refreshes .venv, installs, runs lint + the test suite
# torch is installed first, alone: torch==2.13.0 (a CPU build from local disk on the dev
# machines, the CUDA build from the registry elsewhere); if torch is already importable
# in the venv, that step is skipped. Installing lightning/nixl first would pull a
# multi-GB CUDA torch.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
EXTRAS ?= dev,lightning,examples,nixl
STAMP  := $(VENV)/.installed-$(shell echo $(EXTRAS) | tr ',' '-')

.PHONY: setup demo test test-gpu lint bench bench-smoke clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

demo: setup
	$(PY) examples/train_lightning.py

lint: setup
	$(PY) -m ruff check torch_raydata tests examples benchmarks

test: setup lint
	$(PY) -m pytest -q

# Every `gpu`-marked test (tests/test_gpu.py; docs/gpu.md), one line per test and one
# per failure. On a machine without CUDA they are all reported as skipped.
# More detail on failures: make test-gpu GPU_PYTEST_ARGS=--tb=short
GPU_PYTEST_ARGS ?= --tb=line
test-gpu: setup
	@$(PY) -c "import torch; n = torch.cuda.device_count(); print(f'torch {torch.__version__}, CUDA {torch.version.cuda}, {n} device(s)' + ('' if n else ': NO CUDA DEVICE, every gpu test will be skipped'))"
	$(PY) -m pytest -m gpu -q -rA -p no:cacheprovider $(GPU_PYTEST_ARGS)

# Full run of workloads 1-7 (~10 min here); rewrites benchmarks/RESULTS.md (generated).
bench: setup
	$(PY) -m benchmarks.bench --write-results

bench-smoke: setup
	$(PY) -m benchmarks.bench --smoke

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
