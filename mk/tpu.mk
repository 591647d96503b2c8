# Ahead-of-time compile for TPU on any machine (no TPU needed): `make tpu-aot ARGS="--topology v5e:2x2 ..."`.
#
# libtpu lives in its own virtualenv, .venv-tpu, never in .venv: with a TPU plugin installed JAX probes for
# TPU devices at start-up, which would change every CPU test's start for everyone sharing .venv. The extra
# pins jax[tpu] to the JAX version of the constraints so that executables compiled here match the server's.
TPU_VENV := .venv-tpu
TPU_PY := $(TPU_VENV)/bin/python
TPU_INSTALLED := $(TPU_VENV)/.installed
JAX_PINNED_VERSION = $(shell sed -n 's/^jax==//p' $(CONSTRAINTS))

.PHONY: tpu-install tpu-aot

tpu-install: $(TPU_INSTALLED)
$(TPU_INSTALLED): pyproject.toml client/pyproject.toml server/pyproject.toml requirements/dev.txt $(CONSTRAINTS)
	test -x $(TPU_PY) || $(PYTHON) -m venv $(TPU_VENV)
	$(TPU_PY) -m pip install -q --upgrade pip
	$(TPU_PY) -m pip install -q -c $(CONSTRAINTS) -r requirements/dev.txt "jax[tpu]==$(JAX_PINNED_VERSION)" \
		-e ./client -e ./server -e .
	touch $@

# Example: make tpu-aot ARGS="--topology v5e:2x2 --model sdxl-base --resolutions 1024x1024 --slots-per-device 4 --json bench/results/aot.json"
tpu-aot: $(TPU_INSTALLED)
	$(TPU_VENV)/bin/sdxl-server compile $(ARGS)

# CI installs it too (`make test`): the test that the tiny model's programs compile for a v5e chip
# (tests/unit/engine/test_ahead_of_time.py) is the only check that the server's programs still compile for
# the hardware it exists for. Measured here: the install takes about 2 minutes (libtpu is a 0.3 GB wheel,
# 0.7 GB installed) and the test about 1 to 3 minutes on 2 cores. Without .venv-tpu the test is skipped
# and says why.
TEST_PREREQS += tpu-install
