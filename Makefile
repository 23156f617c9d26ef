# tt_mimic: `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TT := $(VENV)/bin/tt-mimic
STAMP := $(VENV)/.installed
FLAGFILE ?= flags/sample.cfg
# The run directory: the one FLAGFILE names (flags/full.cfg: saved_models/full),
# so `make recommend FLAGFILE=flags/full.cfg` finds what `make train
# FLAGFILE=flags/full.cfg` made. Expanded when a recipe runs (the venv exists).
MODEL_DIR ?= $(or $(shell $(PY) -m tt_mimic.commands.run_dir '$(FLAGFILE)'),$(error FLAGFILE=$(FLAGFILE): no run directory))
USER_ID ?=
# `make recommend USER=<id>`; USER from the environment (the login) is ignored.
RECOMMEND_USER := $(if $(filter command line,$(origin USER)),$(USER),$(USER_ID))
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install train ingest test tensorboard recommend serve export evaluate catalog sample clean

help:  ## List the targets.
	@grep -E '^[a-z_-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 14

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## Build .venv from the repo (fast when already done).

train: $(STAMP)  ## Train, evaluate and export on FLAGFILE (default: the embedded sample), then print a recommendation.
	$(TT) train --flagfile=$(FLAGFILE) --model_dir=$(MODEL_DIR) $(ARGS)

ingest: $(STAMP)  ## Run only the ingest step on FLAGFILE.
	$(TT) ingest --flagfile=$(FLAGFILE) --model_dir=$(MODEL_DIR) $(ARGS)

test: $(STAMP)  ## Run the test suite.
	$(PY) -m pytest -q -n 2 --dist loadgroup tests

tensorboard: $(STAMP)  ## Open TensorBoard on saved_models/.
	$(VENV)/bin/tensorboard --logdir saved_models

recommend: $(STAMP)  ## Recommend for USER=<id> from MODEL_DIR.
	$(TT) recommend --model_dir=$(MODEL_DIR) --user_id='$(RECOMMEND_USER)' --k=10 $(ARGS)

serve: $(STAMP)  ## Serve MODEL_DIR over HTTP on 127.0.0.1:8501.
	$(TT) serve --model_dir=$(MODEL_DIR) $(ARGS)

export: $(STAMP)  ## Re-export an existing run in MODEL_DIR.
	$(TT) export --model_dir=$(MODEL_DIR) $(ARGS)

evaluate: $(STAMP)  ## Evaluate the run in MODEL_DIR (ARGS=--eval_split=val for validation).
	$(TT) evaluate --model_dir=$(MODEL_DIR) $(ARGS)

catalog: $(STAMP)  ## Add new books to the export of MODEL_DIR (ARGS=--books_csv=<file>).
	$(TT) catalog --model_dir=$(MODEL_DIR) $(ARGS)

sample: $(STAMP)  ## Regenerate the embedded sample in data/ (byte for byte).
	$(TT) synth --out_dir=data

clean:  ## Remove the venv, caches and exports.
	rm -rf $(VENV) saved_models/*/ .pytest_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
