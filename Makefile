# One obvious way to set up, train and test. `make setup` is idempotent: it reinstalls only
# when pyproject.toml or the pinned constraints change.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.flip-installed

.PHONY: setup train test lint format clean-data

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet --disable-pip-version-check \
		-c requirements/constraints.txt -e '.[dev]'
	touch $(STAMP)

train: setup
	$(PY) train.py

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean-data:
	rm -rf data/faceshapes
