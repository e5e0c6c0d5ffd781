# The two commands: `make run` starts the node; `make test` runs the whole suite.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Every install keeps torch at the CPU wheel's version: an ML package that asks for another
# torch fails to resolve instead of pulling a multi-GB CUDA build.
PIN    := PIP_CONSTRAINT=$(CURDIR)/constraints.txt
CONFIG ?= config.toml
APT_PEERS := dcmtk dicom3tools

.PHONY: install run test test-fast lint peers clean ohif

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=25.1"
	$(PIN) $(PIP) install -q torch==2.13.0
	$(PIN) $(PIP) install -q -e .
	touch $@

run: install
	$(VENV)/bin/scp-node serve --config $(CONFIG)

$(VENV)/.test-installed: $(VENV)/.installed pyproject.toml
	$(PIN) $(PIP) install -q --group dev
	touch $@

# Debian peers the tests talk to for real: dcmtk (storescu/echoscu), dicom3tools (dciodvfy),
# postgresql (tests/support/postgres.py runs its own private server), orthanc + its DICOMweb
# plugin (the PACS of tests/e2e/test_orthanc.py; never orthanc-gdcm, it crashed here), chromium
# (headless, drives the OHIF viewer).
peers:
	@missing=""; \
	command -v storescu >/dev/null || missing="$$missing dcmtk"; \
	command -v dciodvfy >/dev/null || missing="$$missing dicom3tools"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v Orthanc >/dev/null || missing="$$missing orthanc"; \
	test -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so || missing="$$missing orthanc-dicomweb"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

lint: $(VENV)/.test-installed
	$(VENV)/bin/ruff check scp_node tests bench
	$(VENV)/bin/ruff format --check scp_node tests bench
	$(VENV)/bin/mypy

# The OHIF viewer (a prebuilt static site from npm) for the OHIF tests in tests/e2e/test_orthanc.py; git-ignored.
OHIF_VERSION := 3.12.10
OHIF_DIR := .cache/ohif

$(OHIF_DIR)/package/dist/index.html:
	mkdir -p $(OHIF_DIR)
	cd $(OHIF_DIR) && npm pack --silent @ohif/app@$(OHIF_VERSION) >/dev/null \
	  && tar xzf ohif-app-$(OHIF_VERSION).tgz && rm ohif-app-$(OHIF_VERSION).tgz
	touch $@

ohif: $(OHIF_DIR)/package/dist/index.html

test: $(VENV)/.test-installed peers ohif lint
	$(VENV)/bin/pytest

# The quick loop for developers: everything but the slow tests (end-to-end, training, and
# every test that uses PostgreSQL: those are marked `postgres` and with it `slow`).
test-fast: $(VENV)/.test-installed peers
	$(VENV)/bin/pytest -m "not slow"

clean:
	rm -rf var test-artifacts .pytest_cache .mypy_cache .ruff_cache
