"""`xla_cache.fresh_compiles` swaps JAX's persistent cache object for one that misses every read. Two
threads' uses may overlap (an engine per device started side by side would): the real object must come
back once the last one ends, never a wrapper left in place for the life of the process."""

from __future__ import annotations

import threading

from jax._src import compilation_cache as jax_cache
from sdxl_server.engine.device import xla_cache


class _Cache:
    def get(self, key: str) -> bytes:
        return b"held"


def test_overlapping_fresh_compiles_restore_the_real_cache_after_the_last(monkeypatch) -> None:
    # The first use ends while the second is still open: the harmful order for a plain save-and-restore
    # (the second would put the first's wrapper back when it ends, for good).
    real = _Cache()
    monkeypatch.setattr(jax_cache, "_cache", real)
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, object] = {}

    def first() -> None:
        with xla_cache.fresh_compiles() as fresh:
            seen["first"] = fresh
            first_in.set()
            second_in.wait(timeout=30)
        first_out.set()

    def second() -> None:
        first_in.wait(timeout=30)
        with xla_cache.fresh_compiles() as fresh:
            seen["second"] = fresh
            seen["wrapped_once"] = jax_cache._cache._inner is real
            second_in.set()
            first_out.wait(timeout=30)
            seen["reads_miss_after_the_first_ended"] = jax_cache._cache.get("k") is None

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert seen == {
        "first": True, "second": True, "wrapped_once": True, "reads_miss_after_the_first_ended": True,
    }  # fmt: skip
    assert jax_cache._cache is real and real.get("k") == b"held"


def test_without_a_cache_object_nothing_is_swapped(monkeypatch) -> None:
    monkeypatch.setattr(jax_cache, "_cache", None)
    with xla_cache.fresh_compiles() as fresh:
        assert fresh is False
    assert jax_cache._cache is None
