# Set-up and checks for deployd. Every target creates the virtual
# environment it needs, so each works on a fresh clone.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench clean

# Install deployd and deploy "api" twice at once with the example script:
# the second deploy waits for the first and shows who is ahead of it.
demo: $(VENV)/.installed
	PATH="$(CURDIR)/$(BIN):$$PATH" DEPLOY_DRY_RUN=1 sh -c '\
		examples/deploy-service.sh api & first=$$!; \
		sleep 0.5; \
		examples/deploy-service.sh api; second=$$?; \
		wait $$first && exit $$second'
	$(BIN)/deployd status

# Install deployd with what the tests need and run the whole suite.
test: $(VENV)/.installed-test
	$(BIN)/pytest

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check client daemon tests bench
	$(BIN)/mypy

bench: $(VENV)/.installed
	bench/run_all.sh

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install --quiet -e '.[test,dev]'
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info
