# drplan: `make run` brings the local sandbox up and runs the DR checks against it; `make test` runs the suite.
# The virtualenv is built on a system interpreter the PostgreSQL OS user can execute (barman-cloud runs
# from archive_command as that user; a pyenv Python under /root is unreadable to it, see docs/architecture.md).
PYTHON ?= $(firstword $(wildcard /usr/bin/python3.11 /usr/bin/python3) python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PLAN   ?= plans/sandbox.yaml

.PHONY: run test lint ui ui-down sandbox-down clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/drplan sandbox up --plan $(PLAN)
	$(BIN)/drplan dr-test --plan $(PLAN) --database devonn-postgres

test: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/pytest

ui: $(STAMP)
	$(BIN)/drplan sandbox up --plan $(PLAN)
	$(BIN)/drplan serve --plan $(PLAN)

ui-down: $(STAMP)
	$(BIN)/drplan serve --stop --plan $(PLAN)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

sandbox-down: $(STAMP)
	$(BIN)/drplan serve --stop --plan $(PLAN)
	$(BIN)/drplan sandbox down --plan $(PLAN)

clean:
	-test -x $(BIN)/drplan && $(BIN)/drplan serve --stop --plan $(PLAN)
	-test -x $(BIN)/drplan && $(BIN)/drplan sandbox down --plan $(PLAN) --purge
	rm -rf $(VENV)
