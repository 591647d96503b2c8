"""`--lora-dir`: the folder's adapters listed with their rank or the reason they are unusable (a file the
adapter bank cannot hold included), new files found without a restart, removed ones forgotten, each
unusable file logged once per version.

A clock the test moves decides when GetServerInfo's listing is old; a request's unknown name lists the
folder at once (no waiting on the clock).
"""

from __future__ import annotations

import json
import logging
import os

import pytest
from sdxl_server.engine.adapters.adapter_directory import (
    AdapterDirectory,
    adapter_infos,
    bank_layouts,
    check_adapters,
)
from sdxl_server.engine.adapters.layer_names import layer_names_of
from sdxl_server.engine.api import AdapterInfo, AdapterNotFoundError, InvalidRequestError, LoraChoice
from sdxl_test_support.checkpoint_writers import read_flax_params
from sdxl_test_support.lora_writers import random_layers, write_diffusers, write_kohya


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def names(tiny_model_dir):
    params = {c: read_flax_params(tiny_model_dir, c) for c in ("unet", "text_encoder", "text_encoder_2")}
    return layer_names_of(params, json.loads((tiny_model_dir / "unet" / "config.json").read_text()))


@pytest.fixture(scope="module")
def layouts(names):
    return bank_layouts(names, places=2, max_rank=8)


@pytest.fixture
def folder(tiny_model_dir, tmp_path):
    write_kohya(tiny_model_dir, random_layers(tiny_model_dir, rank=4, seed=1), tmp_path / "style.safetensors")
    unet_only = random_layers(tiny_model_dir, rank=8, seed=2, components=("unet",), every=3)
    write_diffusers(tiny_model_dir, unet_only, tmp_path / "detail.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "README.txt").write_text("not an adapter")
    return tmp_path


def test_the_folder_is_listed_with_ranks_and_reasons(folder, names, layouts, caplog):
    with caplog.at_level(logging.INFO, logger="sdxl_server.engine.adapters.adapter_directory"):
        directory = AdapterDirectory(folder, names, layouts, clock=Clock())
        infos = adapter_infos(directory)
    assert [info.name for info in infos] == ["broken", "detail", "style"]
    broken, detail, style = infos
    assert (detail.usable, detail.rank) == (True, 8)
    assert style == AdapterInfo("style", usable=True, rank=4)
    assert not broken.usable and "not a readable safetensors file" in broken.reason
    unusable_lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(unusable_lines) == 1 and "broken" in unusable_lines[0]
    adapter_infos(directory)  # listed again: nothing changed, nothing read or logged again
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_new_files_appear_and_removed_ones_go_without_a_restart(folder, names, layouts, tiny_model_dir):
    clock = Clock()
    directory = AdapterDirectory(folder, names, layouts, rescan_seconds=1.0, clock=clock)
    assert "late" not in {e.name for e in directory.entries()}

    write_kohya(tiny_model_dir, random_layers(tiny_model_dir, seed=3), folder / "late.safetensors")
    (folder / "style.safetensors").unlink()
    assert {e.name for e in directory.entries()} == {"broken", "detail", "style"}  # listing still fresh
    clock.now += 1.0
    assert {e.name for e in directory.entries()} == {"broken", "detail", "late"}


def test_a_request_finds_a_file_dropped_in_at_once(folder, names, layouts, tiny_model_dir):
    directory = AdapterDirectory(folder, names, layouts, rescan_seconds=3600.0, clock=Clock())
    directory.entries()
    write_diffusers(tiny_model_dir, random_layers(tiny_model_dir, seed=4), folder / "fresh.safetensors")
    entry = directory.find("fresh")
    assert entry is not None and entry.usable and entry.file is not None


def test_a_file_rewritten_in_place_is_read_again(folder, names, layouts, tiny_model_dir):
    clock = Clock()
    directory = AdapterDirectory(folder, names, layouts, rescan_seconds=0.0, clock=clock)
    assert not directory.find("broken").usable
    repaired = folder / "broken.safetensors"
    write_kohya(tiny_model_dir, random_layers(tiny_model_dir, seed=5), repaired)
    os.utime(repaired, ns=(1, 1))  # another version even on a file system with coarse timestamps
    assert {e.name: e.usable for e in directory.entries()}["broken"]


def test_request_names_unknown_or_unusable_are_refused_naming_the_field(folder, names, layouts):
    directory = AdapterDirectory(folder, names, layouts, clock=Clock())
    with pytest.raises(AdapterNotFoundError) as unknown:
        check_adapters(directory, [LoraChoice("style"), LoraChoice("nope", 0.5)])
    assert unknown.value.field == "loras[1].name" and unknown.value.name == "nope"
    assert "'nope'" in str(unknown.value)
    with pytest.raises(InvalidRequestError) as unusable:
        check_adapters(directory, [LoraChoice("broken")])
    assert (
        unusable.value.field == "loras[0].name"
        and "not a readable safetensors file" in unusable.value.message
    )
    with pytest.raises(AdapterNotFoundError):
        check_adapters(None, [LoraChoice("style")])  # a server without --lora-dir knows no adapter
    assert check_adapters(None, []) == ()


def test_files_the_bank_cannot_hold_are_listed_and_refused_as_unusable_with_the_reason(
    folder, names, layouts, tiny_model_dir, caplog
):
    locon = random_layers(tiny_model_dir, rank=2, seed=6, components=("unet",), convolutions=True)
    write_kohya(tiny_model_dir, locon, folder / "locon.safetensors")
    write_diffusers(
        tiny_model_dir, random_layers(tiny_model_dir, rank=16, seed=7), folder / "wide.safetensors"
    )
    with caplog.at_level(logging.WARNING, logger="sdxl_server.engine.adapters.adapter_directory"):
        infos = {
            info.name: info for info in adapter_infos(AdapterDirectory(folder, names, layouts, clock=Clock()))
        }
    assert not infos["locon"].usable and not infos["wide"].usable
    assert "convolution (LoCon)" in infos["locon"].reason and "--fuse-lora" in infos["locon"].reason
    assert "rank 16 is above the adapter bank's maximum 8" in infos["wide"].reason
    assert (infos["style"].usable, infos["detail"].usable) == (True, True)  # rank 8 fits a bank of 8
    logged = [r.getMessage() for r in caplog.records]
    assert sum("locon" in line for line in logged) == 1 and sum("wide" in line for line in logged) == 1
    directory = AdapterDirectory(folder, names, layouts, clock=Clock())
    with pytest.raises(InvalidRequestError) as refused:
        check_adapters(directory, [LoraChoice("style"), LoraChoice("wide")])
    assert (
        refused.value.field == "loras[1].name" and "above the adapter bank's maximum" in refused.value.message
    )
    # The same file fits a bank of a higher rank: the listing judges against this server's bank.
    roomy = AdapterDirectory(folder, names, bank_layouts(names, places=2, max_rank=16), clock=Clock())
    assert {e.name: e.usable for e in roomy.entries()}["wide"]
