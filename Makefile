# The two commands: `make run` starts the node; `make test` runs the whole suite.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
CONFIG ?= config.toml
APT_PEERS := dcmtk dicom3tools

.PHONY: install run test test-fast lint peers clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=25.1"
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e .
	touch $@

run: install
	$(VENV)/bin/scp-node serve --config $(CONFIG)

$(VENV)/.test-installed: $(VENV)/.installed pyproject.toml
	$(PIP) install -q --group dev
	touch $@

# Debian peers the tests talk to for real: dcmtk (storescu/echoscu), dicom3tools (dciodvfy).
peers:
	@missing=""; \
	command -v storescu >/dev/null || missing="$$missing dcmtk"; \
	command -v dciodvfy >/dev/null || missing="$$missing dicom3tools"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

lint: $(VENV)/.test-installed
	$(VENV)/bin/ruff check scp_node tests bench
	$(VENV)/bin/ruff format --check scp_node tests bench
	$(VENV)/bin/mypy

test: $(VENV)/.test-installed peers lint
	$(VENV)/bin/pytest

# The quick loop for developers: everything but the slow end-to-end tests.
test-fast: $(VENV)/.test-installed peers
	$(VENV)/bin/pytest -m "not slow"

clean:
	rm -rf var test-artifacts .pytest_cache .mypy_cache .ruff_cache
