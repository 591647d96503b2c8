"""Runs engines in a fresh process and prints what the tests need as JSON (the last stdout line).

Used where a process-wide setting must differ from the test process: the simulated device count
(XLA_FLAGS, read when JAX starts) and a fresh persistent compilation cache directory.

    python engine_subprocess.py devices MODEL_DIR CACHE_DIR   # 1 vs all devices: images and step HLO
    python engine_subprocess.py start MODEL_DIR CACHE_DIR     # one start: cache hits, images
    python engine_subprocess.py hold MODEL_DIR CACHE_DIR      # the decode hold, shallow vs deep backlog
"""

from __future__ import annotations

import base64
import json
import sys
import threading

import jax
import numpy as np
from engine_helpers import WAIT_SECONDS, Recorder, request
from sdxl_server.engine import EngineConfig, JaxEngine
from sdxl_server.engine.api import Finished, Resolution

COLLECTIVES = ("all-reduce", "all-gather", "collective-permute", "all-to-all", "reduce-scatter")
COUNTS = (2, 1, 0, 2)  # rows each of 4 devices decodes in `decode_counts`
PROBES = [dict(prompt=f"probe {i}", seed=100 + i, steps=3 + i) for i in range(4)]


def config(model_dir: str, cache_dir: str, **overrides) -> EngineConfig:
    settings = dict(
        model="tiny",
        tiny_model_dir=model_dir,
        compilation_cache_dir=cache_dir,
        resolutions=(Resolution(64, 64),),
        max_steps=8,
        default_steps=4,
        steps_per_dispatch=1,
    )
    settings.update(overrides)
    return EngineConfig(**settings)


def images_from(engine: JaxEngine) -> list[str]:
    recorders = [Recorder() for _ in PROBES]
    for i, (probe, recorder) in enumerate(zip(PROBES, recorders, strict=True)):
        engine.submit(request(f"probe-{i}", **probe), recorder)
    for recorder in recorders:
        assert isinstance(recorder.wait(), Finished)
    return [base64.b64encode(r.images()[0].tobytes()).decode() for r in recorders]


def devices(model_dir: str, cache_dir: str) -> dict:
    result: dict = {"device_count": jax.local_device_count()}
    for name, overrides in (
        # Few slots where the test needs no more: each engine compiles a step per row bucket (1, 2, 4 rows
        # for 2 slots) and a decode per batch size, and these three starts are most of the test's time.
        ("one", dict(max_devices=1, slots_per_device=2)),
        ("all", dict(slots_per_device=2)),  # 2 per device: packing and held decodes across devices
        # An engine of its own on the last device (an engine per device): its programs run there.
        ("last", dict(max_devices=1, slots_per_device=1, first_device=jax.local_device_count() - 1)),
    ):
        engine = JaxEngine(config(model_dir, cache_dir, **overrides))
        engine.start()
        compiled = engine.compiled_programs()
        programs = compiled.by_resolution[Resolution(64, 64)]
        # Every compiled size of the step and of the decode: none may move data between devices.
        step_hlo = "".join(p.as_text() for p in [*programs.steps.values(), *programs.decode.values()])
        result[name] = {
            "devices": engine.info().devices,
            "slots": engine.info().slots,
            "images": images_from(engine),
            "collectives": [c for c in COLLECTIVES if c in step_hlo],
            # Each step program decides per device whether to run the UNet (a block with no image skips).
            "steps_branch": all("conditional" in p.as_text() for p in programs.steps.values()),
            "device_ids": sorted({d.id for d in programs.empty_bank.held.sharding.device_set}),
            "weights_device_ids": sorted(
                {
                    d.id
                    for leaf in jax.tree_util.tree_leaves(compiled.params)
                    for d in leaf.sharding.device_set
                }
            ),
        }
        if name == "all":
            stats = engine.stats()
            result[name]["row_steps"] = {
                "run": stats.unet_row_steps_run,
                "busy": stats.unet_row_steps_busy,
                "probe_steps": sum(probe["steps"] for probe in PROBES),
            }
            result[name]["decode_counts"] = decode_counts(engine)
        engine.stop()
    return result


def decode_counts(engine: JaxEngine) -> dict:
    """decode[2] over a held buffer of distinct latents, every device decoding 2 rows, then device d
    decoding COUNTS[d]: the rows it decodes must equal the full decode's, the rest must be zeros."""
    programs = engine.compiled_programs()
    held = programs.by_resolution[Resolution(64, 64)].empty_bank.held
    latents = np.random.default_rng(0).standard_normal(held.shape).astype(np.float32)
    latents = jax.device_put(latents, held.sharding)
    decode, vae = programs.by_resolution[Resolution(64, 64)].decode[2], programs.params["vae"]
    devices, batch = jax.local_device_count(), 2  # output rows per device
    full = np.asarray(decode(vae, latents, np.int32(0), np.full(devices, 2, np.int32)))
    counted = np.asarray(decode(vae, latents, np.int32(0), np.array(COUNTS, np.int32)))
    rows = [(d, r) for d in range(devices) for r in range(batch)]
    return {
        "decoded_rows_equal": all(
            np.array_equal(counted[d * batch + r], full[d * batch + r]) for d, r in rows if r < COUNTS[d]
        ),
        "skipped_rows_zero": all(not counted[d * batch + r].any() for d, r in rows if r >= COUNTS[d]),
        "full_rows_nonzero": all(full[d * batch + r].any() for d, r in rows),
    }


def start(model_dir: str, cache_dir: str) -> dict:
    engine = JaxEngine(config(model_dir, cache_dir, max_devices=1, slots_per_device=1))  # few programs
    engine.start()
    stats = engine.stats()
    images = images_from(engine)
    engine.stop()
    return {
        "cache_hits": engine.compilation_cache_hits,
        "compile_seconds": stats.compile_seconds,
        "images": images,
    }


def hold(model_dir: str, cache_dir: str) -> dict:
    """The decode's images per batch when the first image finishes while another device's image is 2
    steps from its end, with 1 image (shallow) or 2 images (deep: as many as slots) left in the queue.

    2 devices x 1 slot, decode hold 4 steps. The step loop is held inside the first image's first Progress
    until everything else is submitted, so that admission is the same in every run: "first" (3 steps) on
    device 0 at boundary 1, "second" (4 steps) on device 1 at boundary 2, the rest queued; "first"
    finishes at dispatch 3, "second" at dispatch 5, and a queued image takes "first"'s slot at boundary 4.
    """
    engine = JaxEngine(config(model_dir, cache_dir, slots_per_device=1, decode_hold_steps=4))
    engine.start()
    result: dict = {"devices": jax.local_device_count()}
    for name, queued in (("shallow", 2), ("deep", 3)):
        start_boundary = engine.loop_statistics().boundary
        release = threading.Event()
        recorders = [Recorder(on_progress=lambda _, gate=release: gate.wait(WAIT_SECONDS))]
        engine.submit(request(f"{name}-first", seed=1, steps=3), recorders[0])
        while not any(e.kind == "step" and e.boundary > start_boundary for e in engine.trace()):
            release.wait(0.01)  # polls the trace until the first step was dispatched
        for i, steps in enumerate([4] + [8] * queued):
            recorders.append(Recorder())
            engine.submit(request(f"{name}-{i}", seed=10 + i, steps=steps), recorders[-1])
        release.set()
        for recorder in recorders:
            assert isinstance(recorder.wait(), Finished)
        decodes = [e for e in engine.trace() if e.kind == "decode" and e.boundary > start_boundary]
        result[name] = [int(e.detail.split("images=")[1]) for e in decodes]
    engine.stop()
    return result


if __name__ == "__main__":
    command, model_dir, cache_dir = sys.argv[1:4]
    print(json.dumps({"devices": devices, "start": start, "hold": hold}[command](model_dir, cache_dir)))
