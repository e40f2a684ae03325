# The two commands of the quick start are `make run` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
FLASK := $(BIN)/flask --app wsgi

.PHONY: run test lint migrate bench mutate clean

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
# Three processes on two cores: most tests wait on servers, not on the CPU. A file's tests stay
# together (they share fixtures and servers).
test: $(VENV)/.dev lint
	$(BIN)/pytest -n 3 --dist loadfile

## The import-linter contracts in pyproject.toml: app/ imports run one way, floor by floor.
# No cache: grimp's can keep a file's imports after a module it names appeared or went away.
lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

migrate: $(VENV)/.runtime
	$(FLASK) db upgrade

## Mutation testing (docs/reliability.md): each module where a bug costs most, then the scores.
## Set TEST_DATABASE_URL and TEST_REDIS_URL as for `make test` to include PostgreSQL and Redis;
## `make mutate MUTATED=app.services.consent` runs one module. A timeout counts as caught.
MUTATED ?= app.services.email_verification app.services.files app.services.erasure \
	app.services.consent app.services.orphan_sweep app.services.job_runs app.rate_limits \
	app.services.download_links app.deadline app.db_deadline app.redis_connection \
	app.services.data_requests
mutate: $(VENV)/.dev
	@for module in $(MUTATED); do \
		echo "mutating $$module"; \
		$(BIN)/mutmut run --max-children 2 "$$module.*" > mutants-$$module.log 2>&1 || exit 1; \
	done
	@$(BIN)/mutmut results --all true | awk -F': ' '/__mutmut_/ { \
		name = $$1; sub(/^ +/, "", name); module = substr(name, 1, match(name, /\.x[_ǁ]/) - 1); \
		status = $$2; if (status == "not checked" || status == "skipped") next; \
		total[module]++; if (status == "killed" || status == "timeout") caught[module]++ } \
		END { for (m in total) printf "%-34s %4d of %4d caught  %5.1f %%\n", \
			m, caught[m], total[m], 100 * caught[m] / total[m] }' | sort

bench: $(VENV)/.dev
	$(BIN)/python bench/session_throughput.py

clean:
	rm -rf $(VENV) instance mutants mutants-*.log .pytest_cache .mypy_cache .ruff_cache
