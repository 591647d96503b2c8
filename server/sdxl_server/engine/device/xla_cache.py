"""The persistent XLA compilation cache: a restart (or a new replica) loads programs instead of compiling.

JAX's cache settings are process-wide and the cache directory is fixed once the first program compiles
with it, so every engine in one process shares the first directory set.

`fresh_compiles` makes compiles skip the cache's reads (they still write): the program cache
(program_cache.py) saves executables whole, and one that XLA:CPU loaded from this cache serializes without
its kernels (running the reloaded copy fails: "Function ... not found"), so a program to be saved whole
must come from a real compile.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any, cast

import jax
from jax import monitoring

_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_lock = threading.Lock()
_hits = 0
_listening = False
# fresh_compiles: how many are open now, and JAX's cache object the first one swapped out. Counted so
# that overlapping uses (two threads compiling) restore the real object once, after the last.
_fresh_open = 0
_swapped_out: Any = None


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


class _WritesOnly:
    """JAX's persistent cache with every read a miss; writes and the rest go through."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def get(self, key: str) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@contextlib.contextmanager
def fresh_compiles() -> Iterator[bool]:
    """Compiles inside really compile (the persistent cache is not read, still written); yields whether
    that holds. JAX has no public switch for it, so this swaps its private cache object and yields False
    (compiles load as usual) where that object is not there: callers must still check `hits()`. Process-
    wide while it lasts: a compile on another thread meanwhile compiles too, which costs time only. Uses
    may overlap (threads): the first swaps, the last restores."""
    global _fresh_open, _swapped_out
    from jax._src import compilation_cache as jax_cache

    with _lock:
        inner = getattr(jax_cache, "_cache", None)
        if _fresh_open == 0:
            if inner is None or not callable(getattr(inner, "get", None)):
                swapped = False
            else:
                _swapped_out, jax_cache._cache = inner, cast(Any, _WritesOnly(inner))
                swapped = True
        else:  # another thread's swap is in place: share it (never wrap the wrapper)
            swapped = isinstance(inner, _WritesOnly)
        if swapped:
            _fresh_open += 1
    if not swapped:
        yield False
        return
    try:
        yield True
    finally:
        with _lock:
            _fresh_open -= 1
            if _fresh_open == 0:
                jax_cache._cache, _swapped_out = _swapped_out, None
