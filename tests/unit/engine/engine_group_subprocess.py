"""An engine per device (engine/group/) on 2 simulated CPU devices, in a process of its own (the test
process has one device); prints what the test needs as JSON (the last stdout line).

    python engine_group_subprocess.py group MODEL_DIR CACHE_DIR
"""

from __future__ import annotations

import base64
import itertools
import json
import sys
import threading

import jax
from engine_helpers import SQUARE, WAIT_SECONDS, Recorder, request
from engine_subprocess import config
from sdxl_server.engine import JaxEngine
from sdxl_server.engine.api import (
    CancelledError,
    Failed,
    Finished,
    ImageReady,
    NotReadyError,
    Progress,
    Queued,
)
from sdxl_server.engine.device.ahead_of_time import CPU_TOPOLOGY, topology_devices
from sdxl_server.engine.group.engine_group import EngineGroup, engine_for

SPLIT = dict(prompt="a red circle", seed=7, num_images=3, steps=4)


def events_of(recorder: Recorder) -> list[str]:
    return [type(e).__name__ for e in recorder.events]


def split_request(group: EngineGroup) -> dict:
    """Three images over two engines of one slot each: parts of 2 and 1, merged back into one stream."""
    recorder = Recorder()
    group.submit(request("split", **SPLIT), recorder)
    end = recorder.wait()
    ready = [e for e in recorder.events if isinstance(e, ImageReady)]
    progress = [e for e in recorder.events if isinstance(e, Progress)]
    return {
        "end": type(end).__name__,
        "events": events_of(recorder),
        "indices": sorted(e.index for e in ready),
        "seeds": sorted(e.seed for e in ready),
        "last_progress": [progress[-1].completed_steps, progress[-1].total_steps],
        "progress_never_falls": all(
            a.completed_steps <= b.completed_steps for a, b in itertools.pairwise(progress)
        ),
        "images_per_engine": [engine.stats().images_total for engine in group.engines],
        "denoise_positive": isinstance(end, Finished) and end.denoise_seconds > 0,
        "images": {i: base64.b64encode(a.tobytes()).decode() for i, a in recorder.images().items()},
    }


def routing(group: EngineGroup) -> dict:
    """Two one-image requests submitted back to back, before either engine reaches a boundary: the
    group's ledger sends the second to the other engine (the engines' published stats would not)."""
    before = [engine.stats().images_total for engine in group.engines]
    recorders = [Recorder() for _ in range(2)]
    for i, recorder in enumerate(recorders):
        group.submit(request(f"route-{i}", prompt="a blue square", seed=20 + i, steps=6), recorder)
    ends = [type(r.wait()).__name__ for r in recorders]
    after = [engine.stats().images_total for engine in group.engines]
    return {"ends": ends, "per_engine": [a - b for a, b in zip(after, before, strict=True)]}


def cancellation(group: EngineGroup) -> dict:
    """A 2-image request (one part per engine) cancelled at its first Progress: one Failed(Cancelled),
    nothing after it, and both engines' slots free again."""
    first_progress = threading.Event()
    recorder = Recorder(on_progress=lambda _: first_progress.set())
    ticket = group.submit(
        request("cancel-me", prompt="a green triangle", seed=30, num_images=2, steps=8), recorder
    )
    assert first_progress.wait(WAIT_SECONDS)
    group.cancel(ticket)
    end = recorder.wait()
    # Let both engines pass a boundary: a new request runs to its end only once the slots are free.
    follow = Recorder()
    group.submit(request("after-cancel", prompt="a white circle", seed=40, num_images=2, steps=2), follow)
    follow_end = follow.wait()
    return {
        "end": f"{type(end).__name__}:{type(end.error).__name__}"
        if isinstance(end, Failed)
        else type(end).__name__,
        "terminal_events": sum(isinstance(e, Finished | Failed) for e in recorder.events),
        "last_is_terminal": isinstance(recorder.events[-1], Finished | Failed),
        "follow_end": type(follow_end).__name__,
        "queued_first": isinstance(recorder.events[0], Queued),
        "cancelled_error": isinstance(end, Failed) and isinstance(end.error, CancelledError),
    }


def refused_part(group: EngineGroup) -> dict:
    """Engine 1 stopped: a 2-image request's part there is refused after engine 0 admitted the other.
    The caller gets the refusal alone, as from one engine; engine 0's part is withdrawn, its slot free."""
    group.engines[1].stop()
    recorder = Recorder()
    try:
        group.submit(
            request("half-refused", prompt="a black square", seed=50, num_images=2, steps=8), recorder
        )
        raised = ""
    except NotReadyError as error:
        raised = type(error).__name__
    follow = Recorder()
    group.engines[0].submit(request("after-refusal", prompt="a red square", seed=60, steps=2), follow)
    return {
        "raised": raised,
        "events_to_caller": events_of(recorder),
        "engine_0_follow": type(follow.wait()).__name__,
        "engine_0_busy_after": group.engines[0].stats().slots_busy,
    }


def main(model_dir: str, cache_dir: str) -> None:
    settings = dict(slots_per_device=1, engine_per_device=True)
    group = engine_for(config(model_dir, cache_dir, **settings))
    assert isinstance(group, EngineGroup)
    group.start()
    info, stats = group.info(), group.stats()
    # `sdxl-server compile --engine-per-device` compiles engine i's programs for these devices: the
    # program cache keys them by device, so they must be the ones engine i runs on.
    aot_devices = [topology_devices(CPU_TOPOLOGY, 1, first_device=i)[0] for i in range(2)]
    result: dict = {
        "aot_devices_match": aot_devices
        == [
            list(e.compiled_programs().by_resolution[SQUARE].empty_bank.held.sharding.device_set)
            for e in group.engines
        ],
        "device_count": jax.local_device_count(),
        "engines": len(group.engines),
        "engine_devices": [
            sorted(
                {
                    d.id
                    for d in e.compiled_programs().by_resolution[SQUARE].empty_bank.held.sharding.device_set
                }
            )
            for e in group.engines
        ],
        "info": {"devices": info.devices, "slots": info.slots, "engines": info.engines},
        "stats": {"slots_total": stats.slots_total, "ready": stats.ready, "healthy": stats.healthy},
        "split": split_request(group),
        "routing": routing(group),
        "cancel": cancellation(group),
        "estimate": group.estimate_seconds(3, 4) is not None,
    }
    merged = group.stats()
    result["merged_images_total"] = merged.images_total
    result["sum_images_total"] = sum(engine.stats().images_total for engine in group.engines)
    histogram = group.step_histogram()
    result["histogram_steps"] = histogram[0][-1][1] if histogram else 0
    result["steps_total"] = merged.steps_total
    result["refused"] = refused_part(group)
    group.stop()
    # The lockstep's oracle: one engine on device 0 with the same settings draws the same three images.
    lone = JaxEngine(config(model_dir, cache_dir, slots_per_device=1, max_devices=1))
    lone.start()
    recorder = Recorder()
    lone.submit(request("lone", **SPLIT), recorder)
    assert isinstance(recorder.wait(), Finished)
    result["lone_images"] = {i: base64.b64encode(a.tobytes()).decode() for i, a in recorder.images().items()}
    lone.stop()
    print(json.dumps(result))


if __name__ == "__main__":
    assert sys.argv[1] == "group", sys.argv  # the command test_engine_processes.run_engine_process passes
    main(*sys.argv[2:4])
