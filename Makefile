# sdxl-serve: the two commands a newcomer needs are `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
CONSTRAINTS := requirements/constraints.txt
PROTO_OUT := client/sdxl_client/_proto
# Shared by tests, `make run` and benchmarks so that a compile happens once per machine (the tests compile
# with flags of their own, tests/support/xla_flags.py, so their programs are keyed apart).
export SDXL_COMPILATION_CACHE_DIR ?= $(CURDIR)/.cache/jax-compilation-cache
export SDXL_TINY_MODEL_DIR ?= $(CURDIR)/.cache/tiny-sdxl

# Parts of the build owned by one area each (e.g. mk/chart.mk adds the Helm CLI to TEST_PREREQS).
-include mk/*.mk

.PHONY: install proto proto-check test lint run bench clean
.DEFAULT_GOAL := help

help:
	@echo "make run    - install, then serve the demo model (coloured shapes) on 127.0.0.1:50051"
	@echo "             (more flags: make run ARGS=\"--http-port 8080 --port 50061\")"
	@echo "make test   - install, then run every test"
	@echo "make lint   - ruff and mypy"
	@echo "make bench  - benchmarks under bench/ (tables + JSON in bench/results/)"
	@echo "make proto  - regenerate the Python stubs from proto/"
	@echo "make manifests - render k8s/ from the Helm chart"

# Idempotent: re-runs pip only when a dependency list changed.
install: $(INSTALLED)
$(INSTALLED): pyproject.toml client/pyproject.toml server/pyproject.toml requirements/dev.txt $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c $(CONSTRAINTS) -r requirements/dev.txt -e ./client -e ./server -e .
	touch $@

proto: install
	$(PY) tools/gen_proto.py $(PROTO_OUT)

# Two workers (the CI machine has 2 cores); tests/conftest.py groups the tests that share an engine or a
# server into one worker each (--dist loadgroup). TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2
test: install $(TEST_PREREQS)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup

lint: install
	$(PY) -m ruff check client server tests bench tools fleet
	$(PY) -m ruff format --check client server tests bench tools fleet
	$(PY) -m mypy

# Extra serve flags: make run ARGS="--http-port 8080 --port 50061" (make's own options come before ARGS).
ARGS ?=
run: install
	@echo "Serving the demo SDXL (trained here on coloured shapes, 64x64) on 127.0.0.1 (Ctrl-C stops it)."
	@echo "Once it logs \"ready\", copy the command it prints into another terminal; the demo draws prompts like"
	@echo "  'a yellow circle on a purple background' (colours: red green blue yellow orange purple white black;"
	@echo "  shapes: circle square triangle). Other flags: make run ARGS=\"--http-port 8080 --port 50061\""
	STARTED_BY_MAKE_RUN=1 $(VENV)/bin/sdxl-server serve --model demo --host 127.0.0.1 --port 50051 $(ARGS)

bench: install
	$(PY) bench/engine_vs_recipe.py
	$(PY) bench/engine.py
	$(PY) bench/service.py

clean:
	rm -rf $(VENV) .cache .tools

