# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= demo_out
DEMO_PATIENTS ?= 1000

BIN := $(VENV)/bin

.PHONY: demo test test-all lint venv clean

$(BIN)/odyssey: pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(BIN)/odyssey

venv: $(BIN)/odyssey

demo: venv
	$(BIN)/odyssey demo --patients $(DEMO_PATIENTS) --out $(DEMO_DIR)

lint: venv
	$(BIN)/ruff check .

test: venv lint
	$(BIN)/python -m pytest -q

# the slow end-to-end tests too (minutes more on 2 cores)
test-all: venv lint
	$(BIN)/python -m pytest -q -m ""

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
