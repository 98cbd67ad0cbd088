# Two entry points for a fresh clone (see README):
#   make run   - create .venv, install synthgen, run the whole pipeline on the built-in digits data
#   make test  - create .venv, install synthgen[dev], run the full test suite (slow real-data tests included)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run test test-fast bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -c "import torch, torchvision, prefect, dvc; print('installed: torch', torch.__version__, '| torchvision', torchvision.__version__, '| prefect', prefect.__version__)"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/synthgen run

test: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -m "slow or not slow" tests

test-fast: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -m "not slow" tests

bench: $(STAMP)
	for script in bench/bench_*.py; do $(BIN)/python $$script || exit 1; done

clean:
	rm -rf data/prepared data/synthetic models checkpoints reports .dvc/tmp
