"""The persistent XLA compilation cache: a restart (or a new replica) loads programs instead of compiling.

JAX's cache settings are process-wide and the cache directory is fixed once the first program compiles
with it, so every engine in one process shares the first directory set.
"""

from __future__ import annotations

import threading

import jax
from jax import monitoring

_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_lock = threading.Lock()
_hits = 0
_listening = False


def _count(event: str, **_: object) -> None:
    global _hits
    if event == _HIT_EVENT:
        with _lock:
            _hits += 1


def enable(directory: str) -> None:
    """Caches every compiled program under `directory` (local path or gs://), however quick to compile."""
    global _listening
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    with _lock:
        if not _listening:
            monitoring.register_event_listener(_count)
            _listening = True


def hits() -> int:
    """Programs loaded from the persistent cache so far in this process."""
    return _hits
