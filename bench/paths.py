"""Where the benchmarks keep what they build and write: one source for every bench/ script.

The same environment variables as the Makefile and the tests, so that a benchmark reuses the models and
compiled programs `make test` already made on this machine."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE_ROOT = Path(os.environ.get("SDXL_TEST_CACHE_ROOT", REPO / ".cache"))
TINY_MODEL_DIR = Path(os.environ.get("SDXL_TINY_MODEL_DIR", CACHE_ROOT / "tiny-sdxl"))
COMPILE_CACHE = Path(os.environ.get("SDXL_COMPILATION_CACHE_DIR", CACHE_ROOT / "jax-compilation-cache"))
# bench_model.py's models: the bench-size SDXL, and the same with a VAE whose decode costs what real SDXL's
# does relative to a step (the one to use wherever decodes share the device with steps).
BENCH_MODEL_DIR = CACHE_ROOT / "bench-sdxl"
HEAVY_VAE_BENCH_MODEL_DIR = CACHE_ROOT / "bench-sdxl-heavy-vae"
RESULTS_DIR = REPO / "bench" / "results"
