# pgsnow — run `make help` for the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TOOLS ?= .venv-tools

.DEFAULT_GOAL := help

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "} {printf "  %-14s %s\n", $$1, $$2}'

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/python -m pgsnow.local.duckdb_setup
	touch $@

venv: $(BIN)/.installed ## Create the virtualenv and install pgsnow with its local stack and dev tools

demo: venv ## Start the local stack, create the sample shop, replicate every table, report OK/MISMATCH/FAILED
	$(BIN)/pgsnow demo $(DEMO_ARGS)

# xdist workers (one per core by default); each keeps a test module on one worker (--dist loadfile),
# so a module's stack is started once. TEST_WORKERS=0 runs serially.
TEST_WORKERS ?= auto

test: venv ## Run the unit and integration tests against real servers on loopback, in parallel; print the slowest
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile --durations=25 $(PYTEST_ARGS)

lint: venv ## ruff and mypy
	$(BIN)/ruff check src tests extractor loader cleanup bench
	$(BIN)/ruff format --check src tests extractor loader cleanup bench
	$(BIN)/mypy

BENCH_VENV ?= .venv-bench

bench: venv ## Benchmark extraction vs COPY|gzip, ADBC and dlt (BENCH_ARGS="--rows 200000" for a quick run)
	test -x $(BENCH_VENV)/bin/python || { $(PYTHON) -m venv $(BENCH_VENV) && echo '*' > $(BENCH_VENV)/.gitignore; }
	$(BENCH_VENV)/bin/pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/pip install --quiet -r bench/requirements.txt
	$(BIN)/python bench/run.py --bench-python $(BENCH_VENV)/bin/python --profile $(BENCH_ARGS)

bench-verify: venv ## What comparing JSON columns costs pgsnow verify, against a plain read (docs/performance.md)
	$(BIN)/python bench/verify_json.py $(BENCH_VERIFY_ARGS)

bench-load: venv ## Load-side benchmark: the batched event source vs one COPY per file (BENCH_LOAD_ARGS="--files 500")
	$(BIN)/python bench/load.py $(BENCH_LOAD_ARGS)

# dlt's pg_replication source is not in the dlt package: bench/cdc.py reads its files from a git copy
# of dlt-hub/verified-sources (DLT_VERIFIED_SOURCES, a git directory) at run time, and runs it with
# the bench virtualenv's dlt.
bench-cdc: venv ## Change capture: pgsnow's drain vs pg_recvlogical and dlt, peak RSS, commit-to-visible delay (BENCH_CDC_ARGS="--latency-minutes 0")
	test -x $(BENCH_VENV)/bin/python || { $(PYTHON) -m venv $(BENCH_VENV) && echo '*' > $(BENCH_VENV)/.gitignore; }
	$(BENCH_VENV)/bin/pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/pip install --quiet -r bench/requirements.txt
	$(BIN)/python bench/cdc.py --dlt-python $(BENCH_VENV)/bin/python $(BENCH_CDC_ARGS)

include build/lambda.mk

.PHONY: help venv demo test lint bench bench-verify bench-load bench-cdc
