"""Which adapter holds which place of the adapter bank: loads on first use, least-recently-used eviction
among adapters no busy slot uses. Host-side bookkeeping only (no JAX): the step loop, the one owner of the
bank, asks it at each boundary and performs the loads it starts.

- `prepare(keys)`: for a request about to be admitted. Resident adapters are touched (their last use is
  now) and are ready at once: a request never waits on another adapter's load. A missing adapter gets a
  free place, else the place of the least recently used adapter that no slot holds (an eviction), and
  its load starts (`start_load(key, place)`: asynchronous; the loader calls `loaded` when the place is
  written). Until all its adapters are resident, the request is not ready: it stays queued, holding no
  slot. With every place held by busy slots, nothing is evicted and the request waits.
- `new_round()`: the step loop's boundary. An adapter a queued request asked for in this round is not
  evicted for a request asked about later in it: requests are asked in queue order, so an older request's
  adapters are never taken by a newer one (two requests evicting each other's adapters would both wait
  forever when places are few).
- `acquire(keys)` / `release(keys)`: a slot admitted with these adapters, and the slot freed. A held
  adapter is never evicted, so an image in progress keeps its weights even if its file is removed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Sequence


@dataclasses.dataclass
class _Place:
    key: Hashable
    resident: bool = False  # False while its load is under way
    holders: int = 0  # busy slots using it
    last_used: int = 0  # a counter, not a clock: ties never happen
    asked_in: int = -1  # the last round in which a queued request asked for it


@dataclasses.dataclass(frozen=True)
class ResidencyCounts:
    loads: int
    evictions: int
    resident: int


class AdapterResidency:
    def __init__(
        self,
        places: int,
        start_load: Callable[[Hashable, int], None],
        on_evict: Callable[[Hashable, int], None] | None = None,
    ) -> None:
        if places < 1:
            raise ValueError("the adapter bank needs at least one place")
        self._places: list[_Place | None] = [None] * places
        self._start_load = start_load
        self._on_evict = on_evict  # (the evicted key, its place), before the place's next load starts
        self._tick = 0
        self._round = 0
        self._loads = 0
        self._evictions = 0

    def new_round(self) -> None:
        self._round += 1

    def place_of(self, key: Hashable) -> int | None:
        """The place `key` is resident in, or None (absent or still loading)."""
        index = self._index(key)
        if index is None:
            return None
        held = self._places[index]
        return index if held is not None and held.resident else None

    def prepare(self, keys: Sequence[Hashable]) -> bool:
        """Whether every adapter of `keys` is resident (the request can take a slot now); starts the
        loads of those that are not, where a place can be had."""
        ready = True
        for key in keys:
            self._tick += 1
            index = self._index(key)
            if index is None:
                index = self._free_place(protected=set(keys))
                if index is None:
                    return False  # every place is busy or loading: wait without evicting anything
                self._places[index] = _Place(key, last_used=self._tick)
                self._loads += 1
                self._start_load(key, index)
            held = self._places[index]
            assert held is not None
            held.last_used = self._tick
            held.asked_in = self._round
            ready = ready and held.resident
        return ready

    def loaded(self, key: Hashable, place: int) -> None:
        """The loader wrote `key` into `place`."""
        held = self._places[place]
        if held is not None and held.key == key:
            held.resident = True

    def forget(self, key: Hashable, place: int) -> None:
        """`key`'s load into `place` failed: the place is free again."""
        held = self._places[place]
        if held is not None and held.key == key and held.holders == 0:
            self._places[place] = None

    def acquire(self, keys: Sequence[Hashable]) -> tuple[int, ...]:
        """A slot starts with these (resident) adapters; returns their places."""
        places = []
        for key in keys:
            index = self.place_of(key)
            if index is None:
                raise RuntimeError(f"adapter {key!r} is not resident")
            held = self._places[index]
            assert held is not None
            held.holders += 1
            places.append(index)
        return tuple(places)

    def release(self, keys: Sequence[Hashable]) -> None:
        for key in keys:
            index = self._index(key)
            held = self._places[index] if index is not None else None
            if held is not None and held.holders > 0:
                held.holders -= 1

    def counts(self) -> ResidencyCounts:
        resident = sum(1 for p in self._places if p is not None and p.resident)
        return ResidencyCounts(loads=self._loads, evictions=self._evictions, resident=resident)

    def _index(self, key: Hashable) -> int | None:
        return next((i for i, p in enumerate(self._places) if p is not None and p.key == key), None)

    def _free_place(self, protected: set[Hashable]) -> int | None:
        """A free place, else the least recently used idle one (never one of `protected`: the request
        being prepared needs all its adapters at once)."""
        for index, held in enumerate(self._places):
            if held is None:
                return index
        idle = [
            (held.last_used, index)
            for index, held in enumerate(self._places)
            if held is not None
            and held.resident
            and held.holders == 0
            and held.key not in protected
            and held.asked_in != self._round
        ]
        if not idle:
            return None
        _, index = min(idle)
        self._evictions += 1
        evicted = self._places[index]
        self._places[index] = None
        if self._on_evict is not None and evicted is not None:
            self._on_evict(evicted.key, index)
        return index
