# seaice_nb: every target sets up the isolated environment (.venv) first; a second run reuses it.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.seaice-installed

.PHONY: env predict-env demo benchmark benchmark-pretrain test docs export clean-nbs readme lab clean format lint

$(STAMP): settings.ini setup.py
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "seaice_nb needs Python >= 3.10, found " + sys.version.split()[0]'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip wheel setuptools
	$(BIN)/python -m pip install --progress-bar off -e ".[dev]"
	@touch $@

env: $(STAMP)  ## create .venv and install seaice_nb with its dev tools

PREDICT_VENV ?= .venv-predict
PREDICT_REQS = $(shell $(PYTHON) -c "import configparser; c = configparser.ConfigParser(delimiters=['=']); c.read('settings.ini'); print(c['DEFAULT']['predict_requirements'])")

predict-env:  ## a lean environment for `seaice predict MODEL.onnx SCENE.nc` (onnxruntime, no PyTorch) in .venv-predict
	@test -x $(PREDICT_VENV)/bin/python || $(PYTHON) -m venv $(PREDICT_VENV)
	$(PREDICT_VENV)/bin/python -m pip install --quiet --upgrade pip wheel setuptools
	$(PREDICT_VENV)/bin/python -m pip install --progress-bar off $(foreach r,$(PREDICT_REQS),'$(r)')
	$(PREDICT_VENV)/bin/python -m pip install --progress-bar off --no-deps -e .

demo: env  ## the main job on the built-in synthetic data (no downloads)
	$(BIN)/python tools/demo.py

benchmark: env  ## synthetic benchmark: 4 world draws x 2 seeds, claims as paired intervals (about 26 min on 2 cores; rerun to resume) -> docs/benchmark/
	$(BIN)/seaice benchmark

PRETRAINED_ROWS = tsvit_v2_pre tsvit_v3_pre tsvit_v3_few tsvit_v3_pre_few
benchmark-pretrain: env  ## the benchmark plus its pre-training rows (what docs/benchmark/ holds; about 56 min on 2 cores, 30 of them for the extra rows; resumes)
	$(BIN)/seaice benchmark --models majority gbm gbm_frames gbm_frames_amsr2 unet_baseline unet_winner tsvit_v1 tsvit_v2 tsvit_v3 $(PRETRAINED_ROWS)

test: env  ## the whole test suite (what CI runs)
	bash tools/test.sh

docs: env  ## build the docs site into _docs/
	bash tools/docs.sh

export: env  ## notebooks -> library
	$(BIN)/nbdev_export

format: env  ## ruff format the notebooks, tests and tools, then regenerate the library
	$(BIN)/ruff format nbs tests tools setup.py
	$(BIN)/nbdev_export
	$(BIN)/nbdev_clean

lint: env  ## ruff check everything (what CI runs)
	$(BIN)/ruff check

clean-nbs: env  ## strip execution counts and metadata from notebooks (keeps tags)
	$(BIN)/nbdev_clean

readme: env  ## README.md from nbs/index.ipynb
	$(BIN)/python tools/readme.py

lab: env  ## JupyterLab on the notebooks
	$(BIN)/jupyter lab --no-browser --ip 127.0.0.1 nbs

clean:
	rm -rf _proc _docs .pytest_cache
