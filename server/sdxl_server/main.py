"""Composition root: ``sdxl-server serve``, ``compile``, ``build-tiny-model``, ``build-random-model``.

Start-up order: the gRPC server listens first with health NOT_SERVING (so probes get an answer and
requests a clean UNAVAILABLE), then the engine loads and compiles everything in a thread, then health
turns SERVING. Shutdown on SIGTERM/SIGINT, in this order: health NOT_SERVING and new requests UNAVAILABLE;
accepted requests finish (up to --drain-seconds); the gRPC server stops; only then the engine stops, so
no accepted request ever loses its producer; exit 0. Every step after the drain has its own time bound
(``_AFTER_DRAIN_SECONDS`` in all), so the whole shutdown stays inside --drain-seconds plus that: a pod's
grace period must exceed it (the chart checks).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from prometheus_client import CollectorRegistry

from sdxl_server.compile_command import add_compile_arguments, run_compile
from sdxl_server.engine.api import Engine
from sdxl_server.logs import configure_logging, default_log_format, fields
from sdxl_server.metrics import EngineCollector, ServiceMetrics
from sdxl_server.metrics_endpoint import MetricsServer
from sdxl_server.server_settings import (
    ConfigError,
    ServerConfig,
    add_serve_arguments,
    config_from,
    flag_name,
)
from sdxl_server.service.auth import TokenFile
from sdxl_server.service.demand import DemandMeter, histogram_count
from sdxl_server.service.generation import Generations
from sdxl_server.service.grpc_server import (
    BindError,
    CallArrivals,
    ServerOptions,
    build_server,
    new_health_servicer,
    set_serving,
)
from sdxl_server.service.servicer import ImageService
from sdxl_server.service.serving_gate import Admission, ServingState
from sdxl_server.startup_checks import check_before_start, flags_of_failed_bind
from sdxl_server.version import server_version

if TYPE_CHECKING:
    from sdxl_server.service.http.http_server import HttpServer

log = logging.getLogger("sdxl_server")
# Seconds between checks that the engine is still healthy (a device fault makes the process exit).
_HEALTH_POLL_SECONDS = 1.0
# After the drain, RPCs that already have their result get this long to send it.
_FINAL_FLUSH_SECONDS = 2.0
# After the drain, the gRPC server stops once no call arrived for this long (late callers got
# UNAVAILABLE and back off), or after the most: a call caught by the stop itself would end CANCELLED.
_QUIET_SECONDS, _MOST_QUIET_WAIT_SECONDS = 0.25, 2.0
# Bounds of the other steps after the drain: a hung step must not hold the pod past its grace period.
_GRPC_STOP_SECONDS = _FINAL_FLUSH_SECONDS + 3.0
_ENGINE_STOP_SECONDS = 5.0
# Quiet wait, gRPC stop, HTTP stop, engine stop, metrics server stop.
_AFTER_DRAIN_SECONDS = _MOST_QUIET_WAIT_SECONDS + 2 * _GRPC_STOP_SECONDS + _ENGINE_STOP_SECONDS + 1.0


# Called on the warm-up thread before the engine starts; tests use it to hold the server in NOT_SERVING
# (sdxl_test_support.held_warmup). Never reachable from flags or the environment.
BeforeWarmUp = Callable[[], None]


def _start_in_thread(engine: Engine, before_warm_up: BeforeWarmUp | None) -> asyncio.Future[None]:
    """Runs warm-up on a daemon thread (a SIGTERM during warm-up must not wait for the compiler)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle(error: BaseException | None) -> None:  # on the event loop
        if done.done():
            return
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)

    def run() -> None:
        error: BaseException | None = None
        try:
            if before_warm_up is not None:
                before_warm_up()
            engine.start()
        except BaseException as e:
            error = e
        loop.call_soon_threadsafe(settle, error)

    threading.Thread(target=run, name="engine-warm-up", daemon=True).start()
    return done


def _call_hint(config: ServerConfig, port: int, http_port: int | None = None) -> str:
    from sdxl_server.ready_hints import ready_hint

    return ready_hint(
        config.engine.model,
        config.host,
        port,
        http_port,
        tls=config.tls_enabled,
        auth=config.auth_token_file is not None,
    )


async def serve(config: ServerConfig, before_warm_up: BeforeWarmUp | None = None) -> int:
    from sdxl_server.engine.device.memory_plan import MemoryPlanError
    from sdxl_server.engine.group.engine_group import EngineGroup, engine_for
    from sdxl_server.engine.models.quiet_libraries import silence_library_noise

    silence_library_noise()
    engine = engine_for(config.engine)  # one engine over the devices, or one per device
    registry = CollectorRegistry()
    metrics = ServiceMetrics(registry)
    demand = DemandMeter(
        config.demand_window_seconds, batched_steps=lambda: histogram_count(engine.step_histogram())
    )
    admission = Admission(engine, config.engine.max_queue, demand)
    registry.register(
        EngineCollector(
            engine.stats,
            engine.step_histogram,
            serving=lambda: admission.state is ServingState.SERVING,
            demand=demand.value,
            per_engine=engine.engine_stats if isinstance(engine, EngineGroup) else None,
        )
    )
    health = await new_health_servicer()

    tokens = TokenFile(config.auth_token_file) if config.auth_token_file else None

    arrivals = CallArrivals()

    def count_rejection(method: str, code: grpc.StatusCode) -> None:
        metrics.observe_request(method.rsplit("/", 1)[-1], code.name, 0.0)

    server, port = build_server(
        ImageService(engine, admission, metrics, config.log_prompts),
        health,
        ServerOptions(
            host=config.host,
            port=config.port,
            max_connection_age_seconds=config.max_connection_age_seconds,
            tls_cert_file=config.tls_cert_file,
            tls_key_file=config.tls_key_file,
            auth_tokens=tokens,
            on_reject=count_rejection,
            arrivals=arrivals,
        ),
    )
    await server.start()
    metrics_server = await MetricsServer.start(registry, config.host, config.metrics_port)
    http_server = await _start_http(
        config, Generations(engine, admission, metrics, config.log_prompts), tokens
    )
    http_port = http_server.port if http_server else None
    log.info(
        "listening; warming up",
        extra=fields(
            event="listening",
            port=port,
            metrics_port=metrics_server.port,
            http_port=http_port,
            tls=config.tls_enabled,
        ),
    )

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    warm_up = _start_in_thread(engine, before_warm_up)
    stopping: asyncio.Future[bool] = asyncio.ensure_future(stop.wait())
    first: list[asyncio.Future[Any]] = [warm_up, stopping]
    await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
    exit_code = 0
    if warm_up.done() and isinstance(warm_up.exception(), MemoryPlanError):
        # Slots or sizes that do not fit the device: one line, exit 2, like the other start-up refusals.
        refusal = warm_up.exception()
        assert isinstance(refusal, MemoryPlanError)
        sys.stderr.write(f"sdxl-server serve: error: {flag_name(refusal.field)}: {refusal.message}\n")
        exit_code = 2
    elif warm_up.done() and warm_up.exception() is not None:
        log.error("engine warm-up failed", exc_info=warm_up.exception(), extra=fields(event="failed"))
        exit_code = 1
    elif warm_up.done():
        admission.mark_serving()
        await set_serving(health)
        hint = _call_hint(config, port, http_port)
        log.info(hint, extra=fields(event="ready", port=port, metrics_port=metrics_server.port))
        if sys.stdout.isatty() and (config.log_format or default_log_format()) == "json":
            print(hint, flush=True)  # readable once: a text log already showed it
        exit_code = await _serve_until_stopped(engine, stopping)

    log.info("draining", extra=fields(event="draining", in_flight=admission.in_flight))
    admission.begin_drain()
    await health.enter_graceful_shutdown()
    if not await admission.wait_idle(config.drain_seconds):
        log.warning("drain period over; cancelling %d requests", admission.in_flight)
    if not await arrivals.wait_quiet(_QUIET_SECONDS, _MOST_QUIET_WAIT_SECONDS):
        log.info("calls still arriving after the drain; stopping anyway")
    if not await _bounded(server.stop(_FINAL_FLUSH_SECONDS), _GRPC_STOP_SECONDS):
        log.warning("the gRPC server did not stop within %.0fs; going on", _GRPC_STOP_SECONDS)
    if http_server is not None and not await _bounded(http_server.stop(), _GRPC_STOP_SECONDS):
        log.warning("the HTTP server did not stop within %.0fs; going on", _GRPC_STOP_SECONDS)
    log.info("gRPC server stopped; stopping the engine", extra=fields(event="grpc_stopped"))
    if not await _bounded(asyncio.to_thread(engine.stop, 0.0), _ENGINE_STOP_SECONDS):
        log.warning("the engine did not stop within %.0fs; exiting anyway", _ENGINE_STOP_SECONDS)
    await metrics_server.stop()
    log.info("stopped", extra=fields(event="stopped", exit_code=exit_code))
    return exit_code


async def _start_http(
    config: ServerConfig, generations: Generations, tokens: TokenFile | None
) -> HttpServer | None:
    """The OpenAI Images API on --http-port, through the same generation path as gRPC (None: off)."""
    if config.http_port is None:
        return None
    # Imported only here: aiohttp costs ~0.17 CPU s at start (0.6 s of wall time under a 0.3-CPU limit),
    # which a pod without --http-port (the fleet harness's) would spend for nothing.
    from sdxl_server.service.http.http_server import HttpServer
    from sdxl_server.service.http.images_api import ImagesApi

    return await HttpServer.start(
        ImagesApi(generations, tokens.accepts if tokens else None),
        config.host,
        config.http_port,
        config.tls_cert_file,
        config.tls_key_file,
        grace_seconds=_FINAL_FLUSH_SECONDS,
    )


async def _bounded(step: Any, seconds: float) -> bool:
    """Awaits ``step`` for at most ``seconds``; False if it took longer (it is then left behind)."""
    try:
        await asyncio.wait_for(step, seconds)
    except TimeoutError:
        return False
    return True


async def _serve_until_stopped(engine: Engine, stopping: asyncio.Future[bool]) -> int:
    """Waits for a signal; returns 1 early if the engine reports itself broken."""
    while not stopping.done():
        await asyncio.wait([stopping], timeout=_HEALTH_POLL_SECONDS)
        if not engine.stats().healthy:
            log.error("the engine is unhealthy; shutting down", extra=fields(event="unhealthy"))
            return 1
    return 0


def _build_tiny_model(directory: str) -> int:
    from sdxl_server.engine.models.quiet_libraries import silence_library_noise
    from sdxl_server.engine.models.tiny_model import ensure_tiny_model

    silence_library_noise()
    path = ensure_tiny_model(Path(directory))
    print(f"tiny SDXL model in {path}")
    return 0


def _build_random_model(arch: str, directory: str) -> int:
    from sdxl_server.engine.models.quiet_libraries import silence_library_noise
    from sdxl_server.engine.models.random_model import build_random_model

    silence_library_noise()
    path = build_random_model(arch, Path(directory))
    print(f"{arch} with random weights in {path}")
    return 0


def main(argv: Sequence[str] | None = None, before_warm_up: BeforeWarmUp | None = None) -> int:
    """``sdxl-server``; ``before_warm_up`` is a hook for tests (see BeforeWarmUp)."""
    parser = argparse.ArgumentParser(prog="sdxl-server", description="Stable Diffusion XL over gRPC.")
    parser.add_argument("--version", action="version", version=f"sdxl-server {server_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    add_serve_arguments(commands.add_parser("serve", help="serve the model over gRPC"))
    build = commands.add_parser("build-tiny-model", help="write the tiny random SDXL used by tests")
    build.add_argument("directory")
    random = commands.add_parser(
        "build-random-model",
        help="write a published SDXL architecture with random weights (real-size cost, no download)",
    )
    random.add_argument("--arch", default="sdxl-base", choices=["sdxl-base"], help="the architecture")
    random.add_argument("directory")
    add_compile_arguments(
        commands.add_parser("compile", help="compile every program ahead of time for a TPU topology (or cpu)")
    )
    args = parser.parse_args(argv)
    if args.command == "compile":
        return run_compile(args)
    if args.command == "build-tiny-model":
        return _build_tiny_model(args.directory)
    if args.command == "build-random-model":
        return _build_random_model(args.arch, args.directory)
    try:
        config = config_from(args, os.environ)  # every setting checked, the engine's included
        check_before_start(config)  # a taken port, a missing model path, an empty token file: one line
    except ConfigError as e:
        parser.exit(2, f"sdxl-server serve: error: {e}\n")
    configure_logging(config.log_level, config.log_format)
    try:
        exit_code = asyncio.run(serve(config, before_warm_up))
    except (BindError, OSError) as e:
        if isinstance(e, OSError) and e.errno != errno.EADDRINUSE:
            raise
        # A port taken between the start-up check and the real bind: still one line, not a traceback.
        sys.stderr.write(f"sdxl-server serve: error: {e} (check {flags_of_failed_bind(config, e)})\n")
        os._exit(2)
    logging.shutdown()
    sys.stdout.flush()
    # A warm-up thread interrupted by SIGTERM may still be inside the compiler, and the engine's threads
    # are done: exit without waiting for daemon threads during interpreter teardown.
    os._exit(exit_code)


if __name__ == "__main__":
    sys.exit(main())
