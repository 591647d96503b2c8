"""The synchronous client. :mod:`sdxl_client.aio` has the same methods for asyncio."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sdxl_client._base import _USE_DEFAULT, ClientBase
from sdxl_client._channel import open_channel
from sdxl_client._errors import DeadlineExceeded, SdxlError, from_rpc_error
from sdxl_client._proto.sdxl.v1 import sdxl_pb2, sdxl_pb2_grpc
from sdxl_client._requests import build_generate_request
from sdxl_client._retry import RetryState
from sdxl_client._types import (
    GenerateResult,
    HealthStatus,
    ImageFormat,
    ServerInfo,
    StreamEvent,
    stream_event_from_proto,
)

__all__ = ["Client"]

_T = TypeVar("_T")
Metadata = tuple[tuple[str, str], ...]


class Client(ClientBase):
    """Calls an sdxl-serve server. Thread-safe; use as a context manager or call :meth:`close`.

    Example::

        with Client("localhost:50051") as client:
            result = client.generate("a lighthouse at dusk", seed=7, steps=20)
            result.images[0].save("lighthouse.png")

    See :class:`sdxl_client._base.ClientBase` for the constructor's arguments.
    """

    def _open(self) -> None:
        # Creating a channel does no I/O: it connects on the first call.
        self._channel = open_channel(self.settings)
        self._stub = sdxl_pb2_grpc.ImageServiceStub(self._channel)
        self._health_stub = health_pb2_grpc.HealthStub(self._channel)

    def generate(
        self,
        prompt: str,
        *,
        negative_prompt: str = "",
        seed: int | None = None,
        num_images: int = 0,
        steps: int = 0,
        guidance_scale: float | None = None,
        guidance_interval: tuple[float, float] | None = None,
        sampler: str | None = None,
        timestep_spacing: str | None = None,
        timesteps: Sequence[int] = (),
        width: int = 0,
        height: int = 0,
        format: ImageFormat | str | None = None,
        quality: int = 0,
        request_id: str | None = None,
        timeout: float | None = _USE_DEFAULT,
    ) -> GenerateResult:
        """Generates images and returns them all together.

        Zero (or None) for a numeric argument means the server's default; :meth:`server_info` tells the
        defaults and bounds.

        Args:
            prompt: What to draw; required.
            negative_prompt: What to steer away from.
            seed: Seed of the first image (image i uses seed + i); None lets the server pick and report it.
            num_images: Images to generate (0 means 1).
            steps: Denoising steps per image.
            guidance_scale: Classifier-free guidance scale; None for the model's default, <= 1 for
                none (one UNet row per step, as diffusers does; 0 is what Turbo/Lightning use).
            guidance_interval: (start, end) fractions of the steps with guidance; None for all of them.
            sampler: ``"euler"``, ``"ddim"``, ``"dpmpp_2m"`` or ``"lcm"``; None for the model's default.
            timestep_spacing: ``"leading"``, ``"trailing"`` or ``"linspace"``; None for the default.
            timesteps: Explicit timesteps, strictly decreasing (their count is the steps).
            width: Image width in pixels; width x height must be a served resolution.
            height: Image height in pixels.
            format: ``"png"``, ``"jpeg"``, ``"webp"`` or an :class:`ImageFormat`.
            quality: JPEG/WebP quality 1..100 (0 means 90).
            request_id: Identifier echoed by the server and written to its logs; generated when None.
                Retries reuse it.
            timeout: Overall deadline in seconds, retries included; defaults to the client's; None for none.

        Returns:
            The images, seed, steps, timings and request id.

        Raises:
            InvalidRequest: A field is out of bounds (``.field`` names it).
            Overloaded: The server stayed overloaded through every retry.
            Unavailable: No server could be reached through every retry.
            DeadlineExceeded: The request could not finish in time.
            Unauthenticated: The token is missing or wrong.
            Internal: The server failed.
        """
        request = build_generate_request(
            prompt,
            negative_prompt=negative_prompt,
            seed=seed,
            num_images=num_images,
            steps=steps,
            guidance_scale=guidance_scale,
            guidance_interval=guidance_interval,
            sampler=sampler,
            timestep_spacing=timestep_spacing,
            timesteps=timesteps,
            width=width,
            height=height,
            format=format,
            quality=quality,
            request_id=request_id,
        )
        response = self._with_retries(
            lambda attempt_timeout, metadata: self._stub.Generate(
                request, timeout=attempt_timeout, metadata=metadata
            ),
            timeout,
        )
        return GenerateResult.from_proto(response)

    def generate_stream(
        self,
        prompt: str,
        *,
        negative_prompt: str = "",
        seed: int | None = None,
        num_images: int = 0,
        steps: int = 0,
        guidance_scale: float | None = None,
        guidance_interval: tuple[float, float] | None = None,
        sampler: str | None = None,
        timestep_spacing: str | None = None,
        timesteps: Sequence[int] = (),
        width: int = 0,
        height: int = 0,
        format: ImageFormat | str | None = None,
        quality: int = 0,
        request_id: str | None = None,
        timeout: float | None = _USE_DEFAULT,
    ) -> Iterator[StreamEvent]:
        """Generates images and reports the work as it happens.

        Takes the same arguments as :meth:`generate`. A failure before the first event is retried like
        :meth:`generate`; after it, the error is raised (the work already shown would be repeated).
        Leaving the loop early cancels the request on the server.

        Returns:
            An iterator of events: :class:`Queued`, then :class:`Progress` events, one
            :class:`GeneratedImage` per image as soon as it is ready, and :class:`Done` last.

        Raises:
            The errors of :meth:`generate`, while iterating (a bad argument type already on this call).
        """
        request = build_generate_request(
            prompt,
            negative_prompt=negative_prompt,
            seed=seed,
            num_images=num_images,
            steps=steps,
            guidance_scale=guidance_scale,
            guidance_interval=guidance_interval,
            sampler=sampler,
            timestep_spacing=timestep_spacing,
            timesteps=timesteps,
            width=width,
            height=height,
            format=format,
            quality=quality,
            request_id=request_id,
        )
        return self._stream(request, self._retry_state(timeout))

    def _stream(self, request: sdxl_pb2.GenerateRequest, state: RetryState) -> Iterator[StreamEvent]:
        with state:
            while True:
                attempt_timeout = state.start_attempt()
                call = self._stub.GenerateStream(
                    request, timeout=attempt_timeout, metadata=self._attempt_metadata(state)
                )
                received_any = False
                try:
                    for message in call:
                        event = stream_event_from_proto(message)
                        if event is not None:
                            received_any = True
                            yield event
                    return
                except grpc.RpcError as rpc_error:
                    error = from_rpc_error(rpc_error)
                    delay = None if received_any else self._retry_delay(state, error)
                    if delay is None:
                        raise error from rpc_error
                finally:
                    call.cancel()  # no-op when finished; frees the server's slot if the caller stopped early
                time.sleep(delay)

    def server_info(self, *, timeout: float | None = _USE_DEFAULT) -> ServerInfo:
        """Describes the served model and the bounds a request must respect.

        Args:
            timeout: Overall deadline in seconds, retries included.

        Returns:
            The server's description.

        Raises:
            Unavailable: No server could be reached. Unauthenticated: the token is missing or wrong.
        """
        info = self._with_retries(
            lambda attempt_timeout, metadata: self._stub.GetServerInfo(
                sdxl_pb2.GetServerInfoRequest(), timeout=attempt_timeout, metadata=metadata
            ),
            timeout,
        )
        return ServerInfo.from_proto(info)

    def health(self, *, service: str = "", timeout: float | None = _USE_DEFAULT) -> HealthStatus:
        """Asks the standard gRPC health service once (no retries).

        Args:
            service: Service name to ask about; "" is the whole server.
            timeout: Deadline in seconds.

        Returns:
            SERVING once the server is warm and not draining, else NOT_SERVING (or SERVICE_UNKNOWN).

        Raises:
            Unavailable: The server could not be reached.
        """
        try:
            response = self._health_stub.Check(
                health_pb2.HealthCheckRequest(service=service),
                timeout=self._single_timeout(timeout),
                metadata=self._metadata,
            )
        except grpc.RpcError as rpc_error:
            raise from_rpc_error(rpc_error) from rpc_error
        return HealthStatus(response.status)

    def wait_until_serving(self, timeout: float, *, poll_seconds: float = 0.1) -> None:
        """Polls :meth:`health` until the server reports SERVING.

        Args:
            timeout: Seconds to wait at most.
            poll_seconds: Pause between checks.

        Raises:
            DeadlineExceeded: The server was not SERVING within ``timeout``.
        """
        deadline = time.monotonic() + timeout
        last: HealthStatus | SdxlError | None = None
        while time.monotonic() < deadline:
            try:
                last = self.health(timeout=max(0.01, min(1.0, deadline - time.monotonic())))
                if last is HealthStatus.SERVING:
                    return
            except SdxlError as error:
                last = error
            time.sleep(poll_seconds)
        raise DeadlineExceeded(f"{self.target} not SERVING after {timeout} s (last: {last})")

    def close(self) -> None:
        """Closes the channel; calls in progress are cancelled."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _with_retries(self, invoke: Callable[[float | None, Metadata], _T], timeout: float | None) -> _T:
        with self._retry_state(timeout) as state:
            while True:
                attempt_timeout = state.start_attempt()
                try:
                    return invoke(attempt_timeout, self._attempt_metadata(state))
                except grpc.RpcError as rpc_error:
                    error = from_rpc_error(rpc_error)
                    delay = self._retry_delay(state, error)
                    if delay is None:
                        raise error from rpc_error
                time.sleep(delay)
