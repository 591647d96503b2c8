"""A program the program cache lacks is saved whole even where XLA's persistent cache already holds it
(the program's sources changed, its HLO did not: what a fleet sees after most code changes), and the next
process loads it without tracing and gets the same result. A process with other compiler flags or other
JAX settings compiles its own.

Each step runs in its own interpreter: XLA's cache directory is fixed per process, and an executable that
lost its kernels fails only where they were never compiled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

_STEP = """
import json, sys
import jax, jax.numpy as jnp
from sdxl_server.engine.device import xla_cache
from sdxl_server.engine.device.program_cache import ProgramCache

directory, context, may_trace = sys.argv[1], sys.argv[2], sys.argv[3] == "trace"
xla_cache.enable(directory)
x = jnp.linspace(0.0, 1.0, 64, dtype=jnp.float32).reshape(1, 1, 8, 8)
w = jnp.full((1, 1, 3, 3), 0.5, jnp.float32)

def program(x, w):
    return jnp.tanh(jax.lax.conv_general_dilated(x, w, (1, 1), "SAME")).sum()

def compile_program():
    assert may_trace, "traced although the program cache held the program"
    return jax.jit(program).lower(x, w).compile()

cache = ProgramCache(directory, context, jax.devices()[:1])
hits = xla_cache.hits()
compiled = cache.get_or_compile("conv", (x, w), compile_program)
print(json.dumps({"loaded": cache.hits, "xla_hits": xla_cache.hits() - hits,
                  "result": float(compiled(x, w)), "expected": float(program(x, w))}))
"""


def _step(
    directory: Path, context: str, may_trace: bool, xla_flags: str = "", **environment: str
) -> dict[str, float]:
    run = subprocess.run(
        [sys.executable, "-c", _STEP, str(directory), context, "trace" if may_trace else "load"],
        env=dict(os.environ, XLA_FLAGS=xla_flags, **environment),
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(json.loads(run.stdout.strip().splitlines()[-1]))


def test_a_program_xla_already_holds_is_saved_whole_and_loads_without_tracing(tmp_path: Path) -> None:
    first = _step(tmp_path, "sources-1", may_trace=True)  # XLA compiles it and caches it
    assert first["loaded"] == 0
    changed = _step(tmp_path, "sources-2", may_trace=True)  # another key: traced, compiled, saved
    assert changed["loaded"] == 0
    assert changed["xla_hits"] == 0  # compiled for real although XLA's cache held it
    again = _step(tmp_path, "sources-2", may_trace=False)
    assert again["loaded"] == 1
    assert again["result"] == again["expected"]


def test_other_compiler_flags_compile_their_own_program_and_the_host_device_count_does_not(
    tmp_path: Path,
) -> None:
    two_devices = "--xla_force_host_platform_device_count=2"
    assert _step(tmp_path, "sources", may_trace=True, xla_flags=two_devices)["loaded"] == 0
    # The device count shapes only the host (the program runs on the first device either way): loaded.
    assert _step(tmp_path, "sources", may_trace=False)["loaded"] == 1
    # LLVM at -O1 builds another executable: a program saved without the flag is not loaded for it.
    other = _step(tmp_path, "sources", may_trace=True, xla_flags="--xla_backend_optimization_level=1")
    assert other["loaded"] == 0
    assert other["result"] == other["expected"]


def test_another_matmul_precision_compiles_its_own_program(tmp_path: Path) -> None:
    assert _step(tmp_path, "sources", may_trace=True)["loaded"] == 0
    assert _step(tmp_path, "sources", may_trace=False)["loaded"] == 1
    # A setting that changes the traced program (the convolution's precision), not the compiler flags.
    highest = _step(tmp_path, "sources", may_trace=True, JAX_DEFAULT_MATMUL_PRECISION="highest")
    assert highest["loaded"] == 0
