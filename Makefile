# `make test`: install into .venv and run the tests. `make reproduce`: install and run the tiny recipe.
PYTHON ?= python3
VENV ?= .venv
RECIPE ?= recipes/tiny.yaml
# the tiny recipe's paths point into this folder
RUN := runs/tiny
BIN := $(VENV)/bin
D2C := $(BIN)/d2c

.PHONY: install test reproduce bench clean

$(BIN)/d2c: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,fid]'
	touch $@

install: $(BIN)/d2c

test: install
	$(BIN)/python -m pytest -q

# The tiny recipe end to end. Each step is resumable: re-running `make reproduce` finishes a killed run.
reproduce: install
	$(D2C) prepare synthetic $(RUN)/shards --recipe $(RECIPE)
	$(D2C) prepare synthetic $(RUN)/val --recipe $(RECIPE) --set prepare.seed=1 --set prepare.synthetic.images_per_class=10
	$(D2C) train-tokenizer vq $(RUN)/shards $(RUN)/vq --recipe $(RECIPE) --set tokenizer_training.val=$(RUN)/val
	$(D2C) train-tokenizer kl $(RUN)/shards $(RUN)/kl --recipe $(RECIPE) --set tokenizer_training.val=$(RUN)/val
	$(D2C) encode $(RUN)/shards $(RUN)/encoded --recipe $(RECIPE)
	$(D2C) train-discrete --recipe $(RECIPE)
	$(D2C) train-continuous --recipe $(RECIPE)
	$(D2C) sample $(RUN)/samples --recipe $(RECIPE)
	$(D2C) sample $(RUN)/samples-discrete-only --recipe $(RECIPE) --set sample.mode=discrete-only
	$(D2C) fid-ref $(RUN)/val $(RUN)/val-ref.npz --recipe $(RECIPE)
	$(D2C) fid $(RUN)/samples/samples.npz --ref $(RUN)/val-ref.npz --recipe $(RECIPE)
	$(D2C) fid $(RUN)/samples-discrete-only/samples.npz --ref $(RUN)/val-ref.npz --recipe $(RECIPE)
	@echo "tiny recipe done: grids in $(RUN)/*/grids and $(RUN)/samples*/grid.png, metrics in $(RUN)/samples*/metrics.json"

bench: install
	$(BIN)/python bench/prepare.py
	$(BIN)/python bench/encode.py
	$(BIN)/python bench/discrete.py
	$(BIN)/python bench/continuous.py
	$(BIN)/python bench/fid.py
	$(BIN)/python bench/loader.py
	$(BIN)/python bench/gpu.py

clean:
	rm -rf $(RUN)
