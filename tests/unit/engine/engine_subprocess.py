"""Runs engines in a fresh process and prints what the tests need as JSON (the last stdout line).

Used where a process-wide setting must differ from the test process: the simulated device count
(XLA_FLAGS, read when JAX starts) and a fresh persistent compilation cache directory.

    python engine_subprocess.py devices MODEL_DIR CACHE_DIR   # 1 vs all devices: images and step HLO
    python engine_subprocess.py start MODEL_DIR CACHE_DIR     # one start: cache hits, images
"""

from __future__ import annotations

import base64
import json
import sys

import jax
from engine_helpers import Recorder, request
from sdxl_server.engine import EngineConfig, JaxEngine
from sdxl_server.engine.api import Finished, Resolution

COLLECTIVES = ("all-reduce", "all-gather", "collective-permute", "all-to-all", "reduce-scatter")
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
        ("one", dict(max_devices=1, slots_per_device=4)),
        ("all", dict(slots_per_device=2)),  # 2 per device: packing and held decodes across devices
    ):
        engine = JaxEngine(config(model_dir, cache_dir, **overrides))
        engine.start()
        programs = engine._programs.by_resolution[Resolution(64, 64)]
        # Every compiled size of the step and of the decode: none may move data between devices.
        step_hlo = "".join(p.as_text() for p in [*programs.steps.values(), *programs.decode.values()])
        result[name] = {
            "devices": engine.info().devices,
            "slots": engine.info().slots,
            "images": images_from(engine),
            "collectives": [c for c in COLLECTIVES if c in step_hlo],
        }
        engine.stop()
    return result


def start(model_dir: str, cache_dir: str) -> dict:
    engine = JaxEngine(config(model_dir, cache_dir, max_devices=1, slots_per_device=2))
    engine.start()
    stats = engine.stats()
    images = images_from(engine)
    engine.stop()
    return {
        "cache_hits": engine.compilation_cache_hits,
        "compile_seconds": stats.compile_seconds,
        "images": images,
    }


if __name__ == "__main__":
    command, model_dir, cache_dir = sys.argv[1:4]
    print(json.dumps({"devices": devices, "start": start}[command](model_dir, cache_dir)))
