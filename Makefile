# One command for the main job (`make run`), one for the tests (`make test`); each sets itself up.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Pin threads: on 2 cores, a busy second core makes multi-threaded torch 50-300x slower.
export OMP_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1
export HF_HUB_OFFLINE ?= 1
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: setup run test test-all clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

run: setup
	$(BIN)/rlfew train configs/world/dmdr.yaml $(ARGS)

test: setup
	$(BIN)/python -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-all: setup
	$(BIN)/python -m pytest -m "not gpu" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs
