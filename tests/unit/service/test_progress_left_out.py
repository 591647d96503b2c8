"""A door that shows no progress asks for none: its request's Progress events never reach the event loop
(bridge.py drops them on the engine's thread), while everything else arrives in order."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry
from sdxl_client._proto.sdxl.v1 import sdxl_pb2
from sdxl_server.engine import api
from sdxl_server.metrics import ServiceMetrics
from sdxl_server.service.generation import Generations
from sdxl_server.service.serving_gate import Admission
from sdxl_test_support.fake_engine import FakeEngine


def _kinds(progress: bool) -> list[str]:
    engine = FakeEngine()

    async def run() -> list[str]:
        admission = Admission(engine, 16)
        admission.mark_serving()
        generations = Generations(engine, admission, ServiceMetrics(CollectorRegistry()))
        message = sdxl_pb2.GenerateRequest(prompt="a lighthouse", seed=1, steps=3, num_images=2)
        return [type(event).__name__ async for _, event in generations.run(message, None, progress=progress)]

    return asyncio.run(run())


def test_without_progress_only_queued_images_and_finished_arrive():
    assert _kinds(progress=False) == ["Queued", "ImageReady", "ImageReady", "Finished"]


def test_with_progress_every_step_arrives():
    assert _kinds(progress=True).count(api.Progress.__name__) == 3
