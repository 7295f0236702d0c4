# The two README commands: `make demo` and `make test`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup lint test test-fast demo clean-demo gpu-check

setup:
	bash scripts/setup_env.sh

lint: setup
	$(PY) -m ruff check occ_mfd tools tests benchmarks visualize

test: lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

demo: setup
	$(PY) tools/demo.py --work-dir work_dirs/demo

clean-demo:
	rm -rf work_dirs/demo

# The first run on a GPU machine (≤ 10 min, installs nothing, so no `setup` here): the tests marked gpu, bf16 and
# MFD steps, spconv on CUDA, NCCL, torch.compile, teacher@10 vs student@1, peak memory → gpu_check.json. Without
# CUDA it runs the CPU-side checks and says that the CUDA part was skipped.
gpu-check:
	$(PY) tools/gpu_check.py --out gpu_check.json
