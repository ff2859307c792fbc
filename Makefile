# Two commands on a new machine with Python 3.10-3.12:  make demo  |  make test
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_OUT ?= demo-output
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=

.PHONY: demo test lint install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.test-installed: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install -e ".[test,dask]"
	touch $@

$(VENV)/.all-installed: $(VENV)/.test-installed scripts/install-torch.sh
	PIP="$(BIN)/pip" TORCH_VERSION=$(TORCH_VERSION) sh scripts/install-torch.sh
	$(BIN)/pip install -e ".[train,dask,test]"
	touch $@

install-test: $(VENV)/.test-installed
install: $(VENV)/.all-installed

demo: $(VENV)/.all-installed
	$(BIN)/atlas-curate demo $(DEMO_OUT)

lint: $(VENV)/.test-installed
	$(BIN)/ruff check .

test: $(VENV)/.all-installed lint
	sh scripts/install-browser.sh
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
