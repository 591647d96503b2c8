"""Behaviour that needs a process of its own: 4 simulated devices, and a fresh compilation cache."""

from __future__ import annotations

import base64
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from sdxl_test_support.xla_flags import xla_flags

HERE = pathlib.Path(__file__).parent


def run_engine_process(
    command: str, model_dir, cache_dir, devices: int = 1, script: str = "engine_subprocess.py"
) -> dict:
    """`script COMMAND MODEL_DIR CACHE_DIR` in a process with `devices` CPU devices: its last line's JSON."""
    env = dict(os.environ, XLA_FLAGS=xla_flags(devices))
    completed = subprocess.run(
        [sys.executable, str(HERE / script), command, str(model_dir), str(cache_dir)],
        env=env,
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def pixels(encoded: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(encoded), np.uint8).astype(np.int32)


@pytest.mark.slow
def test_one_device_and_four_devices_give_the_same_images(tiny_model_dir, compilation_cache_dir):
    result = run_engine_process("devices", tiny_model_dir, compilation_cache_dir, devices=4)
    assert result["device_count"] == 4
    one, four = result["one"], result["all"]
    assert (one["devices"], one["slots"]) == (1, 2)
    assert (four["devices"], four["slots"]) == (4, 8)
    for a, b in zip(one["images"], four["images"], strict=True):
        assert np.abs(pixels(a) - pixels(b)).max() <= 1
    # The 4 probes (guided, one at a time on each device: the least-loaded one) run in a bucket of 2
    # rows, and a device whose probe has ended skips the UNet while the others' go on: every row-step
    # run is a busy one. In lockstep without the skip, each step would run 2 rows on all 4 devices.
    assert one["steps_branch"] and four["steps_branch"]
    row_steps = four["row_steps"]
    assert row_steps["run"] == row_steps["busy"] == 2 * row_steps["probe_steps"], row_steps
    # first_device: an engine of one device on the last one holds its weights and slots there only, and
    # draws what the first device's engine draws (bench/devices_apart.py runs an engine per device).
    last = result["last"]
    assert (one["device_ids"], one["weights_device_ids"]) == ([0], [0])
    assert (last["devices"], last["device_ids"], last["weights_device_ids"]) == (1, [3], [3])
    # Within one level, as one against four: which probes share a step depends on when each arrives, and
    # a batch's rows round differently from a lone row's (a clean-clone run here drew 1-level differences).
    for a, b in zip(one["images"], last["images"], strict=True):
        assert np.abs(pixels(a) - pixels(b)).max() <= 1
    # Each device works on its own slots: no compiled step or decode (any bucket) moves data between devices.
    assert four["collectives"] == []
    # Each device decodes only its own count of held rows: those equal the full decode's, the others
    # (device 2 decodes none) come back as zeros, where a full decode gives pixels.
    assert four["decode_counts"] == {
        "decoded_rows_equal": True,
        "skipped_rows_zero": True,
        "full_rows_nonzero": True,
    }


@pytest.mark.slow
def test_a_second_start_loads_its_programs_from_the_compilation_cache(tiny_model_dir, tmp_path):
    cache = tmp_path / "compilation-cache"
    cold = run_engine_process("start", tiny_model_dir, cache)
    entries = list(cache.iterdir())
    assert entries, "the first start wrote nothing to the compilation cache"
    saved = list((cache / "sdxl-programs").iterdir())
    saved_programs = [path for path in saved if path.suffix == ".bin"]
    # encode, insert, rearrange, a step per row bucket (1 slot: 1 and 2 UNet rows) and a decode of 1 image
    assert len(saved_programs) == 6, saved
    # and the memory plan's two probes (step and decode at 64x64), as figures the next start reads
    assert sorted(path.name.split("-64x64")[0] for path in saved if path.suffix == ".json") == [
        "memory-probe-decode",
        "memory-probe-step",
    ], saved
    warm = run_engine_process("start", tiny_model_dir, cache)
    assert warm["cache_hits"] >= 5  # each of them traced no more
    assert warm["cache_hits"] > cold["cache_hits"]
    # Programs loaded from the cache compute what freshly compiled ones do (within one level, as the
    # engine's oracles compare: a loaded executable need not round the last bit as a fresh compile does).
    for a, b in zip(cold["images"], warm["images"], strict=True):
        assert np.abs(pixels(a) - pixels(b)).max() <= 1


@pytest.mark.slow
def test_the_decode_hold_waits_for_a_second_device_only_with_a_deep_backlog(
    tiny_model_dir, compilation_cache_dir
):
    """The hold trades a finished image's latency for fuller decodes: worth it only when images queue up
    beyond the slots (saturation), pure latency when a few wait now and then (load below capacity)."""
    result = run_engine_process("hold", tiny_model_dir, compilation_cache_dir, devices=2)
    assert result["devices"] == 2
    # One image queued beyond the slots: the first image is decoded alone, at once.
    assert result["shallow"][0] == 1, result
    # As many queued as slots: it waits 2 steps for the other device's image; one decode of both.
    assert result["deep"][0] == 2, result
    assert sum(result["shallow"]) == sum(result["deep"]) - 1 == 4
