# `make test`: install into .venv and run the tests. `make reproduce`: install and run the tiny recipe.
PYTHON ?= python3
VENV ?= .venv
RECIPE ?= recipes/tiny.yaml
RUN ?= runs/tiny
BIN := $(VENV)/bin

.PHONY: install test reproduce bench clean

$(BIN)/d2c: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/d2c

test: install
	$(BIN)/python -m pytest -q

reproduce: install
	$(BIN)/d2c prepare synthetic $(RUN)/shards --recipe $(RECIPE)

bench: install
	$(BIN)/python bench/prepare.py
	$(BIN)/python bench/fid.py

clean:
	rm -rf $(RUN)
