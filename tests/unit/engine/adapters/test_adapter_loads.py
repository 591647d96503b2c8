"""The step loop's side of adapter loads: a load is read off the loop's thread and written into every
component's bank at the next boundary; until then the image is not admissible; a load that fails (the
file vanished after the request was checked) frees the place and fails the requests waiting for it."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from sdxl_server.engine.adapters.adapter_bank import ADAPTER_COMPONENTS, BankLayout
from sdxl_server.engine.adapters.adapter_loads import AdapterLoads
from sdxl_server.engine.adapters.device_bank import empty_device_bank
from sdxl_server.engine.adapters.layer_names import layer_names_of
from sdxl_server.engine.adapters.lora_file import read_lora_file
from sdxl_server.engine.adapters.request_adapters import RequestAdapters
from sdxl_server.engine.api import Failed, InvalidRequestError
from sdxl_test_support.checkpoint_writers import read_flax_params
from sdxl_test_support.lora_writers import random_layers, write_kohya

WAIT_SECONDS = 60.0


@pytest.fixture(scope="module")
def names(tiny_model_dir):
    params = {c: read_flax_params(tiny_model_dir, c) for c in ADAPTER_COMPONENTS}
    return layer_names_of(params, json.loads((tiny_model_dir / "unet" / "config.json").read_text()))


class Woken:
    """The loads' wake-up (the admission queue's wake in the engine), as an event a test waits on."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self) -> None:
        self.event.set()

    def wait(self) -> None:
        assert self.event.wait(WAIT_SECONDS), "the load never finished"
        self.event.clear()


class Request:
    def __init__(self) -> None:
        self.events: list[object] = []

    def deliver(self, event: object) -> bool:
        self.events.append(event)
        return True


def _loads(names, woken: Woken) -> AdapterLoads:
    layouts = {c: BankLayout.of(names, c, places=2, max_rank=4) for c in ADAPTER_COMPONENTS}
    banks = {c: empty_device_bank(layout, np.float32) for c, layout in layouts.items()}
    return AdapterLoads(layouts, banks, loras_per_request=2, wake=woken)


def test_a_load_is_written_into_every_components_bank_at_the_next_boundary(names, tiny_model_dir, tmp_path):
    layers = random_layers(tiny_model_dir, rank=4, seed=21)  # the UNet and both text encoders
    lora = read_lora_file(write_kohya(tiny_model_dir, layers, tmp_path / "a.safetensors"), names)
    woken = Woken()
    loads = _loads(names, woken)
    adapters = RequestAdapters((lora,), (0.5,))
    assert not loads.ready(adapters)  # its load starts; the image stays queued
    woken.wait()
    assert not loads.ready(adapters)  # read, but not yet written: only the step loop writes the bank
    loads.apply_loads([])
    assert loads.ready(adapters)
    places, scales = loads.acquire(adapters)
    assert places.tolist() == [0, 0] and scales.tolist() == [0.5, 0.0]
    for component, bank in loads.banks.items():
        expected = BankLayout.of(names, component, places=2, max_rank=4).place(lora.load())
        for module, (down, up) in bank.items():
            np.testing.assert_allclose(np.asarray(down[0]), expected[module][0], rtol=1e-6)
            np.testing.assert_allclose(np.asarray(up[0]), expected[module][1], rtol=1e-6)
    counts = loads.counts()
    assert (counts.loads, counts.resident, counts.failures) == (1, 1, 0) and counts.load_seconds > 0
    assert loads.resident_files == {lora.path}
    loads.shutdown()


def test_a_failed_load_frees_its_place_and_fails_the_requests_waiting_for_it(names, tiny_model_dir, tmp_path):
    layers = random_layers(tiny_model_dir, rank=2, seed=22, components=("unet",))
    path = write_kohya(tiny_model_dir, layers, tmp_path / "gone.safetensors")
    lora = read_lora_file(path, names)  # checked at submit ...
    path.unlink()  # ... and gone before its load
    woken = Woken()
    loads = _loads(names, woken)
    adapters = RequestAdapters((lora,), (1.0,))
    waiting, bystander = Request(), Request()
    assert not loads.ready(adapters)
    woken.wait()
    loads.apply_loads([(adapters, waiting), (RequestAdapters(), bystander)])
    (failed,) = waiting.events
    assert isinstance(failed, Failed) and isinstance(failed.error, InvalidRequestError)
    assert failed.error.field == "loras" and "'gone' failed to load" in str(failed.error)
    assert bystander.events == []
    assert loads.counts().failures == 1 and loads.counts().resident == 0
    assert not loads.ready(adapters)  # a later request tries again: the place was freed
    woken.wait()
    loads.shutdown()
