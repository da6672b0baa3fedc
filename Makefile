# Single entry point. Every target does its own set-up, so each works on a fresh machine.
PY      := .venv/bin/python
SEAL    := .venv/bin/sealstream
STAMP   := .venv/.installed

.PHONY: help install lint test demo bench stack-up stack-down stack-status migrate clean

help:  ## Show the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)  ## Create .venv and install the project with its test extras

lint: $(STAMP)  ## ruff (lint + format check) and mypy
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy sealstream ingest encryptor indexer reader schemas admin delivery examples

stack-up: $(STAMP)  ## Install (if missing) and start the seven servers of the local stack
	$(SEAL) stack up

stack-down: $(STAMP)  ## Stop exactly what stack-up started
	$(SEAL) stack down

stack-status: $(STAMP)  ## Show each server, its port and whether it answers
	$(SEAL) stack status

migrate: stack-up  ## Apply Postgres, Cassandra, OpenSearch and Kafka schemas
	$(SEAL) migrate

test: stack-up  ## Run the whole test suite against the real local stack
	$(PY) -m pytest

demo: stack-up  ## Run the five services (ingest, encryptor, indexer, reader, delivery) with demo traffic and print a report
	$(SEAL) demo

bench: stack-up  ## Print the benchmark figures (crypto, keys, pipeline, lifecycle)
	$(SEAL) bench

clean: stack-down  ## Stop the stack and delete its data (.stack/)
	rm -rf .stack
