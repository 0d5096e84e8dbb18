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

demo: venv ## Start the local stack, create the sample shop, replicate every table, report OK/MISMATCH
	$(BIN)/pgsnow demo $(DEMO_ARGS)

test: venv ## Run the unit and integration tests against real servers on loopback
	$(BIN)/pytest $(PYTEST_ARGS)

lint: venv ## ruff and mypy
	$(BIN)/ruff check src tests extractor loader cleanup bench
	$(BIN)/ruff format --check src tests extractor loader cleanup bench
	$(BIN)/mypy

include build/lambda.mk

.PHONY: help venv demo test lint
