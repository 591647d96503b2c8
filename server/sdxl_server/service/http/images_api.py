"""The OpenAI Images API over aiohttp: ``POST /v1/images/generations`` and ``GET /v1/models``.

A door onto the same path as gRPC: the body becomes a GenerateRequest (``images_request``), which goes
through the shared ``Generations`` (serving gate, validation, admission, engine). Every call passes
``_endpoint``: the bearer token (the gRPC door's check, same tokens), the handler, then exactly one status
counted in ``sdxl_requests_total{method,code}`` before the response leaves (methods ``CreateImage`` and
``ListModels``, OpenAI's operation ids; codes the gRPC names, so that alerts read both doors alike).

The caller's deadline: ``X-Request-Timeout`` (seconds), or the read timeout the openai client sends
(``X-Stainless-Read-Timeout``); the smaller wins. A client that has stopped waiting gains nothing from
the work, so a request that cannot finish in time is refused (504) before it costs device time, as a
gRPC deadline is. A caller that disconnects cancels its request (the handler is cancelled and the engine
frees the slots at the next step boundary).
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import time
from collections.abc import Awaitable, Callable

import grpc
from aiohttp import web
from sdxl_client._proto.sdxl.v1 import sdxl_pb2

from sdxl_server.engine import api
from sdxl_server.service import status_mapping as errors
from sdxl_server.service.auth import bearer_token
from sdxl_server.service.demand import ATTEMPT_HEADER
from sdxl_server.service.generation import Generations, as_service_error
from sdxl_server.service.http.error_responses import error_json, error_response
from sdxl_server.service.http.images_request import field_name, to_generate_request
from sdxl_server.service.request_conversion import SAMPLER_TO_PROTO, FieldViolation, ValidationError
from sdxl_server.service.time_budget import timings_json

CREATE_IMAGE = "CreateImage"
LIST_MODELS = "ListModels"
TIMEOUT_HEADERS = ("X-Request-Timeout", "X-Stainless-Read-Timeout")
REQUEST_ID_HEADER = "X-Request-Id"
# Four PNGs of 1024x1024 fit many times over in a response; a request body is a prompt and a few numbers.
MAX_BODY_BYTES = 1 << 20
OWNER = "sdxl-serve"

Handler = Callable[[web.Request], Awaitable[web.Response]]
TokenCheck = Callable[[str], bool]


class ImagesApi:
    def __init__(self, generations: Generations, accepts_token: TokenCheck | None = None) -> None:
        """``accepts_token``: whether a bearer token is accepted (None: no auth)."""
        self._generations = generations
        self._accepts_token = accepts_token
        self._created = int(time.time())

    def application(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_json_http_errors])
        app.router.add_post("/v1/images/generations", self._endpoint(CREATE_IMAGE, self._create_image))
        app.router.add_get("/v1/models", self._endpoint(LIST_MODELS, self._list_models))
        return app

    def _endpoint(self, method: str, handler: Handler) -> Handler:
        metrics = self._generations.metrics

        async def endpoint(request: web.Request) -> web.Response:
            started = time.monotonic()
            try:
                self._authenticate(request)
                response = await handler(request)
            except asyncio.CancelledError:  # the caller went away: nobody reads a response
                metrics.observe_request(method, grpc.StatusCode.CANCELLED.name, time.monotonic() - started)
                raise
            except Exception as e:
                error = as_service_error(e)
                # Counted before the response goes out: a caller that has seen it finds it counted.
                metrics.observe_request(method, error.code.name, time.monotonic() - started)
                return error_response(error, field_name)
            metrics.observe_request(method, grpc.StatusCode.OK.name, time.monotonic() - started)
            return response

        return endpoint

    def _authenticate(self, request: web.Request) -> None:
        if self._accepts_token is None:
            return
        token = bearer_token([("authorization", request.headers.get("Authorization", ""))])
        if token is not None and self._accepts_token(token):
            return
        message = "missing bearer token" if token is None else "wrong bearer token"
        raise errors.ServiceError(
            grpc.StatusCode.UNAUTHENTICATED, f"{message}: send 'Authorization: Bearer <token>'"
        )

    async def _create_image(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read())
        except web.HTTPRequestEntityTooLarge:
            raise errors.invalid_argument([("body", f"is larger than {MAX_BODY_BYTES} bytes")]) from None
        except ValueError:  # not JSON, or not UTF-8
            raise errors.invalid_argument([("body", "is not valid JSON")]) from None
        try:
            message, output_format = to_generate_request(
                body, self._model(), request.headers.get(REQUEST_ID_HEADER, "")
            )
            time_remaining = _time_remaining(request)
        except ValidationError as e:
            raise errors.from_validation(e) from None
        images: list[api.ImageReady] = []
        done = sdxl_pb2.Done()
        attempt = request.headers.get(ATTEMPT_HEADER)
        async for outcome, event in self._generations.run(
            message, time_remaining, progress=False, attempt_header=attempt
        ):
            if isinstance(event, api.ImageReady):
                images.append(event)
            elif isinstance(event, api.Finished):
                done = outcome.done()
        # Base64 and JSON of megabytes of images take milliseconds: off the loop that serves both doors.
        text = await asyncio.to_thread(_images_json, images, done, output_format, self._model())
        return web.Response(
            text=text, content_type="application/json", headers={REQUEST_ID_HEADER: done.request_id}
        )

    async def _list_models(self, _request: web.Request) -> web.Response:
        limits = self._generations.limits()
        model = {
            "id": self._model(),
            "object": "model",
            "created": self._created,
            "owned_by": OWNER,
            # Extension: the model's recipe, what a request that leaves these out gets.
            "recipe": {
                "sampler": limits.default_sampler,
                "timestep_spacing": limits.default_timestep_spacing,
                "steps": limits.default_steps,
                "guidance_scale": limits.default_guidance_scale,
            },
        }
        return web.json_response({"object": "list", "data": [model]})

    def _model(self) -> str:
        return self._generations.model_name()


SAMPLER_NAMES = {number: name for name, number in SAMPLER_TO_PROTO.items()}


def _images_json(images: list[api.ImageReady], done: sdxl_pb2.Done, output_format: str, model: str) -> str:
    """OpenAI's ImagesResponse, plus what the server actually used (as gRPC's GenerateResponse says)."""
    ordered = sorted(images, key=lambda image: image.index)
    return json.dumps(
        {
            "created": int(time.time()),
            "data": [
                {"b64_json": base64.b64encode(image.data).decode("ascii"), "seed": image.seed}
                for image in ordered
            ],
            "output_format": output_format,
            "size": f"{ordered[0].width}x{ordered[0].height}",
            # Extensions.
            "model": model,
            "request_id": done.request_id,
            "seed": done.seed,
            "steps": done.steps,
            "guidance_scale": round(done.guidance_scale, 6),  # a float32 on the way: 7.5 stays 7.5
            "sampler": SAMPLER_NAMES.get(done.sampler, ""),
            "prompt_truncated": done.prompt_truncated,
            "unknown_words": list(done.unknown_words),
            "timings": timings_json(done.timings),  # the request's time budget, as gRPC's Timings
        }
    )


def _time_remaining(request: web.Request) -> float | None:
    """Seconds until the caller stops waiting (the smallest timeout header), None without one."""
    remaining: float | None = None
    for header in TIMEOUT_HEADERS:
        text = request.headers.get(header)
        if text is None:
            continue
        try:
            seconds = float(text)
        except ValueError:
            seconds = math.nan
        if not (math.isfinite(seconds) and seconds > 0):
            description = f"{text!r} is not a positive number of seconds"
            raise ValidationError([FieldViolation(header.lower(), description)])
        remaining = seconds if remaining is None else min(remaining, seconds)
    return remaining


@web.middleware
async def _json_http_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """aiohttp's own refusals (unknown path, wrong method, body too large) in the OpenAI error shape."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        headers = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
        code = e.reason.lower().replace(" ", "_")
        return error_json(e.status, f"{request.method} {request.path}: {e.reason}", None, code, headers)
