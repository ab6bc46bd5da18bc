# drplan: `make run` brings the local sandbox up and runs the DR checks against it; `make test` runs the suite.
# The virtualenv is built on a system interpreter the PostgreSQL OS user can execute (barman-cloud runs
# from archive_command as that user; a pyenv Python under /root is unreadable to it, see docs/architecture.md).
PYTHON ?= $(firstword $(wildcard /usr/bin/python3.11 /usr/bin/python3) python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PLAN   ?= plans/sandbox.yaml
# The dependencies (with the test extra) are pinned, with hashes, in requirements.lock; uv installs exactly
# that set into the venv (uv pip sync), then drplan itself as an editable install without dependencies.
# uv reads its own settings (UV_DEFAULT_INDEX, uv.toml), not pip's: by default both use PyPI. Bytecode is
# compiled at install, as pip does: processes under PYTHONDONTWRITEBYTECODE, or run as the PostgreSQL OS user
# (barman-cloud), could not write it and would recompile prefect, botocore and the rest on every start.
LOCK   := requirements.lock
UV_VERSION ?= 0.13.9
UV     := $(BIN)/uv

.PHONY: run test browser lint ui ui-down sandbox-down clean lock

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check 'uv==$(UV_VERSION)'
	$(UV) pip sync -q --python $(BIN)/python --require-hashes --compile-bytecode $(LOCK)
	$(UV) pip install -q --python $(BIN)/python --no-deps -e .
	touch $(STAMP)

# Re-resolve requirements.lock from pyproject.toml (for every platform, Python 3.11 and up); `make test` then
# installs it. By default every package moves to the newest release that pyproject.toml allows:
#   make lock                                       upgrade everything
#   make lock UPGRADE='--upgrade-package prefect'   upgrade prefect only (and what it needs)
#   make lock UPGRADE=                              keep the pins; only add or drop what pyproject.toml changed
UPGRADE ?= --upgrade
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check 'uv==$(UV_VERSION)'
	$(UV) pip compile -q pyproject.toml --extra test --universal --python-version 3.11 --generate-hashes \
	  $(UPGRADE) --custom-compile-command 'make lock' -o $(LOCK)

run: $(STAMP)
	$(BIN)/drplan sandbox up --plan $(PLAN)
	$(BIN)/drplan dr-test --plan $(PLAN)

# TEST_WORKERS=N runs the suite in N pytest-xdist workers, each with a sandbox of its own, a test file at a time (its
# module fixtures stay in one worker). The default is one process: on 2 cores two workers saved only 4 of 48 minutes
# (the two sandboxes then compete for the CPU; see docs/architecture.md).
TEST_WORKERS ?= 0
test: $(STAMP) browser
	$(BIN)/lint-imports
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile

# Headless Chromium (Debian package `chromium`) opens the DR test's HTML report in a test: installed here when it
# is missing and apt-get can (root). Without it that test skips, and fails under CI=true.
browser:
	@command -v chromium >/dev/null || { test "$$(id -u)" = 0 && command -v apt-get >/dev/null && \
	  { DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium || \
	    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }; }; } || \
	  echo "make browser: chromium could not be installed; the HTML report's browser test skips (fails with CI=true)"

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
