# Every target does its own set-up: a fresh clone needs only `make serve` or `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: serve test lint protos train export eval bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[train,test,ray]'
	$(PY) -m serving.protos
	touch $(STAMP)

protos: $(STAMP)
	$(PY) -m serving.protos

serve: $(STAMP)
	$(VENV)/bin/coursezoo serve --repo exported

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

train: $(STAMP)
	$(VENV)/bin/coursezoo train all

export: $(STAMP)
	$(VENV)/bin/coursezoo export all

eval: $(STAMP)
	$(VENV)/bin/coursezoo eval all

bench: $(STAMP)
	$(VENV)/bin/coursezoo bench --quick

clean:
	rm -rf $(VENV) serving/_generated .pytest_cache
