# One entry point for setting up, running, testing and linting xmodal.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.xmodal-installed
# The torch build that installs offline on our CI machines; override with TORCH_PIN= to skip.
# The runtime dependencies install at the versions the images pin (docker/constraints.txt), so
# a fresh checkout tests what ships, not whatever the registry has newest that day.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup run test lint format bench clean

$(STAMP): pyproject.toml docker/constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(if $(TORCH_PIN),$(BIN)/python -m pip install -q $(TORCH_PIN))
	$(BIN)/python -m pip install -q -c docker/constraints.txt -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

## Start the service on embedded defaults (no Redis, no GPU, no network).
run: $(STAMP)
	$(BIN)/xmodal serve

## Run lint and the full test suite (Redis tests use 127.0.0.1:6379).
test: $(STAMP)
	$(MAKE) lint
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check models index service tests bench
	$(BIN)/ruff format --check models index service tests bench
	$(BIN)/mypy models index service

format: $(STAMP)
	$(BIN)/ruff check --fix models index service tests bench
	$(BIN)/ruff format models index service tests bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
