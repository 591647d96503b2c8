"""The XLA flags of every JAX process the tests run: the pytest workers and the servers and engines they
start (tests/conftest.py sets them for the workers; a test that starts a process with its own device count
takes them from `xla_flags`).

The tests compile with LLVM at -O2 rather than XLA's default -O3. Measured on the tiny model (2 slots, one
resolution, 1 CPU device, empty cache): XLA's compile took 21 s against 30.5 s, the start 42 s against
51 s, and an 8-step image the same time (0.08-0.10 s either way); most of the suite's time is compiling.
-O2 against -O3 changes how LLVM optimizes the machine code, not the arithmetic XLA asks for (fast math
stays off), so the oracle tests see the images a production server computes. On a TPU the flag is unused.

Every process of a run must have the same flags: they are part of the compilation caches' keys (JAX's and
the program cache's), and a server started by a test loads what the tests compiled only under one key.
"""

from __future__ import annotations

TEST_COMPILE_FLAGS = ("--xla_backend_optimization_level=2",)


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a process with `devices` simulated CPU devices, compiling as the tests do."""
    return " ".join((f"--xla_force_host_platform_device_count={devices}", *TEST_COMPILE_FLAGS))


def with_test_compile_flags(flags: str) -> str:
    """`flags` (an XLA_FLAGS value) with the tests' compile flags added where they are missing."""
    present = flags.split()
    return " ".join([*present, *(flag for flag in TEST_COMPILE_FLAGS if flag not in present)])
