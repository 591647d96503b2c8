"""Adapter bank residency: loads on first use into free places, a resident adapter never waits for
another's load, eviction of the least recently used adapter no slot holds, waiting when none can go."""

from __future__ import annotations

import pytest
from sdxl_server.engine.adapters.residency import AdapterResidency


class Loader:
    def __init__(self) -> None:
        self.started: list[tuple[str, int]] = []


@pytest.fixture
def loads():
    return Loader()


def test_first_use_loads_into_a_free_place_and_waits_until_loaded(loads) -> None:
    bank = AdapterResidency(2, lambda key, place: loads.started.append((key, place)))
    assert bank.prepare(["a"]) is False  # loading: the request stays queued
    assert loads.started == [("a", 0)]
    assert bank.prepare(["a"]) is False and loads.started == [("a", 0)]  # one load, not two
    bank.loaded("a", 0)
    assert bank.prepare(["a"]) is True and bank.acquire(["a"]) == (0,)
    assert bank.counts().loads == 1 and bank.counts().resident == 1


def test_a_resident_adapter_never_waits_on_another_load(loads) -> None:
    bank = AdapterResidency(2, lambda key, place: loads.started.append((key, place)))
    bank.prepare(["a"])
    bank.loaded("a", 0)
    assert bank.prepare(["b"]) is False  # b loads into place 1
    assert bank.prepare(["a"]) is True  # a is ready at once meanwhile


def test_the_least_recently_used_idle_adapter_is_evicted(loads) -> None:
    bank = AdapterResidency(2, lambda key, place: loads.started.append((key, place)))
    for key, place in (("a", 0), ("b", 1)):
        bank.prepare([key])
        bank.loaded(key, place)
    bank.new_round()  # the next boundary: what was asked for before may be evicted now
    bank.prepare(["a"])  # a used more recently than b
    assert bank.prepare(["c"]) is False
    assert loads.started[-1] == ("c", 1)  # b's place
    assert bank.place_of("b") is None and bank.place_of("a") == 0
    assert bank.counts().evictions == 1


def test_adapters_held_by_busy_slots_are_never_evicted(loads) -> None:
    bank = AdapterResidency(1, lambda key, place: loads.started.append((key, place)))
    bank.prepare(["a"])
    bank.loaded("a", 0)
    bank.acquire(["a"])
    assert bank.prepare(["b"]) is False and loads.started == [("a", 0)]  # waits; a stays
    bank.release(["a"])
    bank.new_round()
    assert bank.prepare(["b"]) is False and loads.started[-1] == ("b", 0)  # now a can go
    assert bank.counts().evictions == 1


def test_a_request_never_evicts_an_adapter_it_stacks(loads) -> None:
    bank = AdapterResidency(1, lambda key, place: loads.started.append((key, place)))
    bank.prepare(["a"])
    bank.loaded("a", 0)
    assert bank.prepare(["a", "b"]) is False  # b cannot come in without pushing a out: wait
    assert loads.started == [("a", 0)] and bank.place_of("a") == 0


def test_a_newer_request_never_evicts_what_an_older_one_asked_for_in_the_same_round(loads) -> None:
    # Two places, an older request needing a and b, a newer one needing c: without the rule each would
    # evict the other's resident adapter at every round and neither would ever run.
    bank = AdapterResidency(2, lambda key, place: loads.started.append((key, place)))
    bank.new_round()
    assert bank.prepare(["a", "b"]) is False  # a -> 0, b -> 1
    bank.loaded("a", 0)
    bank.loaded("b", 1)
    bank.new_round()
    assert bank.prepare(["c"]) is False  # only the newer one asks this round: it may evict (a, LRU)
    assert loads.started[-1] == ("c", 0)
    bank.loaded("c", 0)
    bank.new_round()
    assert bank.prepare(["a", "b"]) is False  # the older asks first: c is evicted for a
    assert loads.started[-1] == ("a", 0)
    assert bank.prepare(["c"]) is False  # the newer may not take b or a back in the same round
    assert loads.started[-1] == ("a", 0)
    bank.loaded("a", 0)
    bank.new_round()
    assert bank.prepare(["a", "b"]) is True  # the older runs
    bank.acquire(["a", "b"])
