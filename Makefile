# The two commands of the quick start are `make run` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
FLASK := $(BIN)/flask --app wsgi

.PHONY: run test lint migrate bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.runtime: requirements.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.dev: requirements.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@ $(VENV)/.runtime

## Install, apply migrations and serve the API on the embedded defaults (SQLite, port 5000).
run: $(VENV)/.runtime
	$(FLASK) db upgrade
	@echo "Serving the API at http://127.0.0.1:5000 (try: curl -X POST http://127.0.0.1:5000/api/v1/generate-uuid)"
	$(FLASK) run --host 127.0.0.1 --port 5000

## Install the test tools, lint, type-check and run the whole test suite.
# Two processes; a file's tests stay together (they share fixtures and servers).
test: $(VENV)/.dev lint
	$(BIN)/pytest -n 2 --dist loadfile

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

migrate: $(VENV)/.runtime
	$(FLASK) db upgrade

bench: $(VENV)/.dev
	$(BIN)/python bench/session_throughput.py

clean:
	rm -rf $(VENV) instance .pytest_cache .mypy_cache .ruff_cache
