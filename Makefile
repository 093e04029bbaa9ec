# Quick start: `make demo` (set up, then simulate -> denoise -> evaluate) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch 2.13.0 lies on the development machines' disk; a looser spec
# would pull a multi-GB CUDA build. GPU machines may override: make TORCH=torch test
TORCH ?= torch==2.13.0

.PHONY: demo test lint install clean

$(BIN)/.srdvol-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

install: $(BIN)/.srdvol-installed

demo: install
	$(BIN)/srdvol demo

# Two test processes, each test file whole in one of them (its module fixtures built once).
test: install
	$(BIN)/python -m pytest -n 2 --dist loadfile

lint: install
	$(BIN)/ruff check srdvol tests benchmarks examples

clean:
	rm -rf $(VENV) demo-output .pytest_cache .hypothesis
