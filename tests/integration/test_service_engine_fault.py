"""An engine fault reaches the caller as INTERNAL with a fixed message: no cause, no stack trace.

A real device fault cannot be caused on purpose here, so this is the one test that injects one: the real
JaxEngine (tiny model) runs in this process behind the real gRPC service, and ``FaultInjectingEngine``
forwards everything to it, except that the next request it admits is cancelled in the real engine and
reported to the service as failed with EngineFatalError.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry
from sdxl_client._proto.sdxl.v1 import sdxl_pb2
from sdxl_server.engine import EngineConfig, api
from sdxl_server.metrics import ServiceMetrics
from sdxl_server.service.grpc_server import ServerOptions, build_server, new_health_servicer
from sdxl_server.service.servicer import ImageService
from sdxl_server.service.serving_gate import Admission
from sdxl_server.service.status_mapping import INTERNAL_MESSAGE
from sdxl_test_support.grpc_details import image_stub

SECRET_CAUSE = "XLA: device 0 halted; Traceback (most recent call last): secret internals"


class FaultInjectingEngine:
    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self.fail_next = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def submit(self, request: api.GenerationRequest, listener: api.Listener) -> api.Ticket:
        if not self.fail_next.is_set():
            return self._engine.submit(request, listener)
        self.fail_next.clear()
        faulted = threading.Event()

        def until_the_fault(event: api.EngineEvent) -> None:
            if not faulted.is_set():
                listener(event)

        ticket = self._engine.submit(request, until_the_fault)
        faulted.set()
        self._engine.cancel(ticket)
        listener(api.Failed(api.EngineFatalError(SECRET_CAUSE)))
        return ticket


@pytest.fixture(scope="module")
def served(tiny_model_dir: Path, compilation_cache_dir: Path) -> Iterator[tuple[str, FaultInjectingEngine]]:
    from sdxl_server.engine import JaxEngine

    config = EngineConfig(
        model="tiny",
        resolutions=(api.Resolution(64, 64),),
        tiny_model_dir=str(tiny_model_dir),
        compilation_cache_dir=str(compilation_cache_dir),
        max_steps=20,
        default_steps=2,
    )
    engine = FaultInjectingEngine(JaxEngine(config))
    engine.start()
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop = asyncio.Event()
    target: list[str] = []

    async def serve() -> None:
        admission = Admission(engine, config.max_queue)
        admission.mark_serving()
        service = ImageService(engine, admission, ServiceMetrics(CollectorRegistry()))
        server, port = build_server(
            service,
            await new_health_servicer(),
            ServerOptions("127.0.0.1", 0, max_connection_age_seconds=300),
        )
        await server.start()
        target.append(f"127.0.0.1:{port}")
        ready.set()
        await stop.wait()
        await server.stop(1)

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    ready.wait(60)
    try:
        yield target[0], engine
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
        engine.stop(0.0)


def test_an_engine_fault_is_internal_without_details(served) -> None:
    target, engine = served
    with grpc.insecure_channel(target) as channel:
        stub = image_stub(channel)
        engine.fail_next.set()
        with pytest.raises(grpc.RpcError) as caught:
            stub.Generate(sdxl_pb2.GenerateRequest(prompt="doomed"), timeout=120)
        assert caught.value.code() == grpc.StatusCode.INTERNAL
        assert caught.value.details() == INTERNAL_MESSAGE
        assert "Traceback" not in str(caught.value.trailing_metadata())
        # One failed request does not take the service down with it.
        assert len(stub.Generate(sdxl_pb2.GenerateRequest(prompt="fine"), timeout=120).images) == 1
