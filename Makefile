# `make test`: install into .venv and run every test; `make test-fast`: all but those marked slow.
# `make reproduce`: install and run the tiny recipe.
PYTHON ?= python3
VENV ?= .venv
RECIPE ?= recipes/tiny.yaml
# every path of the experiment lives under RUN (the recipe's own paths are overridden here)
RUN ?= runs/tiny
BIN := $(VENV)/bin
D2C ?= $(BIN)/d2c
# the experiment's independent steps run JOBS at a time, one thread each (small models on shared cores
# are much faster as parallel one-thread processes than as one process with a thread pool)
JOBS ?= 2
FUSIONS ?= add prefix qformer crossattn
# held-out images: the reference for every FID, and the real images of the oracle and reconstruction rows
VAL_PER_CLASS ?= 20

.PHONY: install test test-fast smoke smoke-chain reproduce experiment bench clean
# every file below is a finished step's marker: never delete one as an intermediate
.SECONDARY:

# PYTHONWARNINGS on the pip line: setuptools' notices about editable installs of a flat layout are not for
# our users (errors still show)
$(BIN)/d2c: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	PYTHONWARNINGS=ignore $(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,fid]'
	touch $@

install: $(BIN)/d2c

test: install
	$(BIN)/python -m pytest -q --durations=25

# the developer loop (about a minute): every test not marked slow
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# The whole chain at the smallest sizes (recipes/smoke.yaml, one fusion, a two-point frontier per system) into
# runs/smoke: checks an installation. `smoke-chain` is the same without the install (the chain test runs it).
SMOKE_RUN ?= runs/smoke
SMOKE_FUSIONS ?= add
smoke: install
	@start=$$(date +%s); OMP_NUM_THREADS=1 $(MAKE) --no-print-directory -j$(JOBS) smoke-chain; \
	echo "make smoke: $$(( $$(date +%s) - start )) s"

smoke-chain:
	@$(MAKE) --no-print-directory experiment RECIPE=recipes/smoke.yaml RUN=$(SMOKE_RUN) VAL_PER_CLASS=2 \
		FUSIONS="$(SMOKE_FUSIONS)" SWEEP_STAGE1="--grid stage1.cfg_scale=1.0,2.0" \
		SWEEP_STAGE2="--grid stage2.sampler:stage2.num_sampling_steps=ddpm:4,dpm-solver++:3" \
		SWEEP_SEEDS="--grid seed=1 --grid stage2.sampler:stage2.num_sampling_steps=dpm-solver++:3"

# The tiny experiment end to end, then its results table. Every step is resumable and a finished one is
# skipped: re-running `make reproduce` finishes a killed run.
reproduce: install
	@start=$$(date +%s); OMP_NUM_THREADS=1 $(MAKE) --no-print-directory -j$(JOBS) experiment; \
	echo "make reproduce: $$(( ($$(date +%s) - start) / 60 )) min $$(( ($$(date +%s) - start) % 60 )) s"

R := --recipe $(RECIPE)
TOK := --set tokenizers.vq.checkpoint=$(RUN)/vq/tokenizer.pt --set tokenizers.kl.checkpoint=$(RUN)/kl/tokenizer.pt
SAMPLE = $(D2C) sample $(@D) $(R) $(TOK) --set sample.discrete=$(RUN)/discrete \
	--set sample.oracle_data=$(RUN)/encoded-val
FID_REF := $(RUN)/val-ref.npz
# table order: the ceilings, the two baselines, the method per fusion, stage 2's ceiling per fusion
SYSTEMS := vq-reconstruction kl-reconstruction discrete-only continuous-only \
	$(addprefix two-stage-,$(FUSIONS)) $(addprefix oracle-codes-,$(FUSIONS))
# The speed-quality frontier (`d2c sweep`), its grid fixed before any of its numbers was seen: discrete-only
# at four stage-1 CFG scales; continuous-only and each fusion at num_iter 1/2/4/8 x {DDPM 25, DPM-Solver++ 10};
# the seed-to-seed spread of FID at one point (two-stage add, num_iter 4, DPM-Solver++ 10: seeds 1-3 beside 0).
SWEEP_STAGE1 := --grid stage1.cfg_scale=1.0,1.5,2.0,3.0
SWEEP_STAGE2 := --grid stage2.num_iter=1,2,4,8 --grid stage2.sampler:stage2.num_sampling_steps=ddpm:25,dpm-solver++:10
SWEEP_SEEDS := --grid seed=1,2,3 --grid stage2.num_iter=4 --grid stage2.sampler:stage2.num_sampling_steps=dpm-solver++:10
SWEEPS := discrete-only continuous-only $(addprefix two-stage-,$(FUSIONS)) seeds
SWEEP = $(D2C) sweep $(@D) $(R) $(TOK) --set sample.discrete=$(RUN)/discrete --ref $(FID_REF)

experiment: $(RUN)/results.md
	@cat $(RUN)/results.md
	@echo "grids: $(RUN)/results.png, $(RUN)/samples/*/grid.png, training grids in $(RUN)/*/grids; frontier: $(RUN)/frontier.png"

$(RUN)/shards/manifest.json:
	$(D2C) prepare synthetic $(RUN)/shards $(R)
$(RUN)/val/manifest.json:
	$(D2C) prepare synthetic $(RUN)/val $(R) --set prepare.seed=1 \
		--set prepare.synthetic.images_per_class=$(VAL_PER_CLASS)
$(RUN)/vq/summary.json $(RUN)/kl/summary.json: $(RUN)/shards/manifest.json $(RUN)/val/manifest.json
	$(D2C) train-tokenizer $(notdir $(@D)) $(RUN)/shards $(@D) $(R) --set tokenizer_training.val=$(RUN)/val
$(RUN)/encoded/manifest.json $(RUN)/encoded-val/manifest.json: $(RUN)/vq/summary.json $(RUN)/kl/summary.json
$(RUN)/encoded/manifest.json: $(RUN)/shards/manifest.json
	$(D2C) encode $(RUN)/shards $(@D) $(R) $(TOK)
$(RUN)/encoded-val/manifest.json: $(RUN)/val/manifest.json
	$(D2C) encode $(RUN)/val $(@D) $(R) $(TOK)
$(RUN)/discrete/summary.json: $(RUN)/encoded/manifest.json
	$(D2C) train-discrete $(R) --set discrete.data=$(RUN)/encoded --set discrete.out=$(@D)
$(RUN)/continuous-%/summary.json: $(RUN)/encoded/manifest.json
	$(D2C) train-continuous $(R) --set continuous.data=$(RUN)/encoded --set continuous.out=$(@D) \
		--set continuous.fusion=$*

$(RUN)/samples/discrete-only/manifest.json: $(RUN)/discrete/summary.json
	$(SAMPLE) --set sample.mode=discrete-only
$(RUN)/samples/continuous-only/manifest.json: $(RUN)/continuous-none/summary.json
	$(SAMPLE) --set sample.mode=continuous-only --set sample.continuous=$(RUN)/continuous-none
$(RUN)/samples/two-stage-%/manifest.json: $(RUN)/discrete/summary.json $(RUN)/continuous-%/summary.json
	$(SAMPLE) --set sample.mode=two-stage --set sample.continuous=$(RUN)/continuous-$*
$(RUN)/samples/oracle-codes-%/manifest.json: $(RUN)/encoded-val/manifest.json $(RUN)/continuous-%/summary.json
	$(SAMPLE) --set sample.mode=oracle-codes --set sample.continuous=$(RUN)/continuous-$*
$(RUN)/samples/%-reconstruction/manifest.json: $(RUN)/encoded-val/manifest.json
	$(SAMPLE) --set sample.mode=$*-reconstruction

$(FID_REF): $(RUN)/val/manifest.json
	$(D2C) fid-ref $(RUN)/val $@ $(R)
$(RUN)/samples/%/metrics.json: $(RUN)/samples/%/manifest.json $(FID_REF)
	$(D2C) fid $(RUN)/samples/$* --ref $(FID_REF) $(R)

$(RUN)/sweep/discrete-only/frontier.json: $(RUN)/discrete/summary.json $(FID_REF)
	$(SWEEP) --system discrete-only=discrete-only $(SWEEP_STAGE1)
$(RUN)/sweep/continuous-only/frontier.json: $(RUN)/continuous-none/summary.json $(FID_REF)
	$(SWEEP) --system continuous-only=continuous-only:$(RUN)/continuous-none $(SWEEP_STAGE2)
$(RUN)/sweep/two-stage-%/frontier.json: $(RUN)/discrete/summary.json $(RUN)/continuous-%/summary.json $(FID_REF)
	$(SWEEP) --system two-stage-$*=two-stage:$(RUN)/continuous-$* $(SWEEP_STAGE2)
$(RUN)/sweep/seeds/frontier.json: $(RUN)/discrete/summary.json $(RUN)/continuous-add/summary.json $(FID_REF)
	$(SWEEP) --system two-stage-add=two-stage:$(RUN)/continuous-add $(SWEEP_SEEDS)

$(RUN)/results.md: $(foreach s,$(SYSTEMS),$(RUN)/samples/$(s)/metrics.json) \
		$(foreach s,$(SWEEPS),$(RUN)/sweep/$(s)/frontier.json)
	$(D2C) results $(RUN) $(foreach s,$(SYSTEMS),$(s)=$(RUN)/samples/$(s)) --classes $(RUN)/val/manifest.json \
		--title "Tiny experiment ($(RECIPE))" $(foreach s,$(SWEEPS),--frontier $(RUN)/sweep/$(s))

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
