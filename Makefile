# One obvious way to set up, train and test. `make setup` is idempotent: it reinstalls only
# when pyproject.toml or the pinned constraints change.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.flip-installed

.PHONY: setup train test test-fast lint format clean-data gpu-check

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet --disable-pip-version-check \
		-c requirements/constraints.txt -e '.[dev]'
	touch $(STAMP)

train: setup
	$(PY) train.py

# The suite runs on one pytest worker per logical CPU, up to 4 (pytest-xdist): most of its time is
# subprocesses importing torch and Lightning, which a second CPU overlaps. `logical`, not `auto`:
# auto counts physical cores, one on a 2-vCPU machine whose vCPUs are a core's two hyperthreads.
# Each test file stays on one worker, so a module's shared fixture (a trained run, a 2-rank DDP
# run) is built once. Plain `pytest tests/test_x.py` runs in one process, for debugging.
PARALLEL := -n logical --maxprocesses 4 --dist loadfile

test: setup
	$(PY) -m pytest $(PARALLEL)

# the quick loop while editing: everything but the tests marked slow (training runs, subprocesses, DDP)
test-fast: setup
	$(PY) -m pytest $(PARALLEL) -m "not slow"

# the GPU paths (bf16, FILIP on CUDA, DeepSpeed ZeRO-2/3 + resume, compile, MFU); exits 0 without CUDA
gpu-check: setup
	$(PY) bench/gpu_check.py

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean-data:
	rm -rf data/faceshapes
