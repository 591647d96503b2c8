"""Pure parts of sdxl_client: request building, error mapping, retry decisions, results, channel options.

Network behaviour against real servers is in tests/integration/test_client_*.py.
"""

from __future__ import annotations

import io
import json
from datetime import timedelta

import grpc
import pytest
import sdxl_client
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from sdxl_client._channel import ChannelSettings
from sdxl_client._errors import from_rpc_error
from sdxl_client._proto.sdxl.v1 import sdxl_pb2
from sdxl_client._requests import build_generate_request
from sdxl_client._retry import CallsInProgress, RetryBudget, RetryPolicy, RetryState
from sdxl_client._types import stream_event_from_proto


# --- request building -----------------------------------------------------------------------------
def test_request_carries_every_field_and_a_request_id():
    request = build_generate_request(
        "a cat",
        negative_prompt="blurry",
        seed=2**40,
        num_images=3,
        steps=7,
        guidance_scale=4.5,
        width=128,
        height=64,
        format="jpg",
        quality=80,
    )
    assert (request.prompt, request.negative_prompt, request.seed) == ("a cat", "blurry", 2**40)
    assert (request.num_images, request.steps, request.width, request.height) == (3, 7, 128, 64)
    assert request.guidance_scale == pytest.approx(4.5)
    assert request.format == sdxl_pb2.JPEG and request.quality == 80
    assert len(request.request_id) == 32


def test_unset_seed_stays_unset_and_zero_seed_is_sent():
    assert not build_generate_request("x").HasField("seed")
    assert build_generate_request("x", seed=0).HasField("seed")


def test_caller_request_id_is_kept():
    assert build_generate_request("x", request_id="abc").request_id == "abc"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "  "}, "prompt"),
        ({"steps": -1}, "steps"),
        ({"num_images": 1.5}, "num_images"),
        ({"width": True}, "width"),
        ({"seed": -3}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"format": "gif"}, "format"),
    ],
)
def test_bad_field_raises_invalid_request_naming_it(kwargs, field):
    args = {"prompt": "x", **kwargs}
    with pytest.raises(sdxl_client.InvalidRequest) as raised:
        build_generate_request(args.pop("prompt"), **args)
    assert raised.value.field == field
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert not raised.value.retryable


def test_image_format_parse():
    parse = sdxl_client.ImageFormat.parse
    assert parse(None) is sdxl_client.ImageFormat.DEFAULT
    assert parse("WebP") is sdxl_client.ImageFormat.WEBP
    assert parse(sdxl_pb2.PNG) is sdxl_client.ImageFormat.PNG
    assert sdxl_client.ImageFormat.JPEG.extension == "jpg"


# --- error mapping --------------------------------------------------------------------------------
class _FailedCall(grpc.RpcError):
    """The grpc.Call surface of a failed call, as grpc raises it, with given status and trailers."""

    def __init__(self, code, details, *rich_details):
        self._code, self._details = code, details
        status = status_pb2.Status(code=code.value[0], message=details)
        for detail in rich_details:
            packed = any_pb2.Any()
            packed.Pack(detail)
            status.details.append(packed)
        self._trailers = (("grpc-status-details-bin", status.SerializeToString()),) if rich_details else ()

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailers


def test_bad_request_details_become_field_violations():
    bad_request = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field="steps", description="must be <= 20"),
            error_details_pb2.BadRequest.FieldViolation(field="width", description="not served"),
        ]
    )
    error = from_rpc_error(_FailedCall(grpc.StatusCode.INVALID_ARGUMENT, "bad steps", bad_request))
    assert isinstance(error, sdxl_client.InvalidRequest)
    assert error.field == "steps"
    assert [v.field for v in error.violations] == ["steps", "width"]
    assert error.message == "bad steps"


def test_retry_info_becomes_retry_after():
    retry_info = error_details_pb2.RetryInfo()
    retry_info.retry_delay.FromTimedelta(timedelta(milliseconds=250))
    error = from_rpc_error(_FailedCall(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", retry_info))
    assert isinstance(error, sdxl_client.Overloaded)
    assert error.retry_after == pytest.approx(0.25)
    assert error.retryable


def test_retry_info_on_unavailable_is_kept_too():
    retry_info = error_details_pb2.RetryInfo()
    retry_info.retry_delay.FromTimedelta(timedelta(seconds=1))
    error = from_rpc_error(_FailedCall(grpc.StatusCode.UNAVAILABLE, "draining", retry_info))
    assert isinstance(error, sdxl_client.Unavailable) and error.retry_after == 1.0


def test_overloaded_without_details_has_no_delay():
    error = from_rpc_error(_FailedCall(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full"))
    assert isinstance(error, sdxl_client.Overloaded) and error.retry_after is None


@pytest.mark.parametrize(
    ("code", "error_class", "retryable"),
    [
        (grpc.StatusCode.UNAVAILABLE, sdxl_client.Unavailable, True),
        (grpc.StatusCode.DEADLINE_EXCEEDED, sdxl_client.DeadlineExceeded, False),
        (grpc.StatusCode.UNAUTHENTICATED, sdxl_client.Unauthenticated, False),
        (grpc.StatusCode.PERMISSION_DENIED, sdxl_client.PermissionDenied, False),
        (grpc.StatusCode.CANCELLED, sdxl_client.Cancelled, False),
        (grpc.StatusCode.UNIMPLEMENTED, sdxl_client.Unimplemented, False),
        (grpc.StatusCode.INTERNAL, sdxl_client.Internal, False),
        (grpc.StatusCode.INVALID_ARGUMENT, sdxl_client.InvalidRequest, False),
    ],
)
def test_each_code_maps_to_its_class(code, error_class, retryable):
    error = from_rpc_error(_FailedCall(code, "why"))
    assert type(error) is error_class
    assert error.code == code and error.retryable is retryable
    assert str(error) == f"{code.name}: why"


def test_unmapped_code_keeps_its_code():
    error = from_rpc_error(_FailedCall(grpc.StatusCode.ABORTED, "aborted"))
    assert type(error) is sdxl_client.SdxlError
    assert error.code == grpc.StatusCode.ABORTED and not error.retryable


def test_malformed_details_trailer_does_not_hide_the_error():
    call = _FailedCall(grpc.StatusCode.INVALID_ARGUMENT, "bad")
    call._trailers = (("grpc-status-details-bin", b"\xff\xff not a status"),)
    error = from_rpc_error(call)
    assert isinstance(error, sdxl_client.InvalidRequest) and error.field is None


# --- retry decisions ------------------------------------------------------------------------------
class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def _state(policy=None, timeout=None, uniform=lambda: 1.0):
    clock = _Clock()
    return RetryState(policy or RetryPolicy(), timeout, clock=clock, uniform=uniform), clock


def test_backoff_caps_grow_exponentially_up_to_the_maximum():
    policy = RetryPolicy(initial_backoff=0.1, multiplier=2.0, max_backoff=0.5)
    assert [policy.backoff_cap(n) for n in (1, 2, 3, 4)] == pytest.approx([0.1, 0.2, 0.4, 0.5])


def test_full_jitter_scales_the_cap():
    state, _ = _state(RetryPolicy(initial_backoff=1.0), uniform=lambda: 0.25)
    state.start_attempt()
    assert state.delay_before_retry(sdxl_client.Unavailable("down")) == pytest.approx(0.25)


def test_retry_info_is_a_floor_for_the_wait():
    state, _ = _state(RetryPolicy(initial_backoff=0.1), uniform=lambda: 0.5)
    state.start_attempt()
    assert state.delay_before_retry(sdxl_client.Overloaded("full", retry_after=2.0)) == 2.0


def test_retry_info_longer_than_max_backoff_is_capped():
    state, _ = _state(RetryPolicy(initial_backoff=0.1, max_backoff=3.0), uniform=lambda: 0.5)
    state.start_attempt()
    assert state.delay_before_retry(sdxl_client.Overloaded("full", retry_after=49.0)) == 3.0


def test_attempts_are_bounded():
    state, _ = _state(RetryPolicy(max_attempts=3))
    delays = []
    for _ in range(5):
        state.start_attempt()
        delay = state.delay_before_retry(sdxl_client.Unavailable("down"))
        if delay is None:
            break
        delays.append(delay)
    assert state.attempts == 3 and len(delays) == 2


@pytest.mark.parametrize(
    "error",
    [
        sdxl_client.InvalidRequest("bad"),
        sdxl_client.DeadlineExceeded("late"),
        sdxl_client.Unauthenticated("who"),
        sdxl_client.Internal("boom"),
    ],
)
def test_non_retryable_errors_are_never_retried(error):
    state, _ = _state()
    state.start_attempt()
    assert state.delay_before_retry(error) is None


def test_each_attempt_gets_the_time_left_and_no_wait_ends_past_the_deadline():
    state, clock = _state(RetryPolicy(initial_backoff=1.0), timeout=10.0)
    assert state.start_attempt() == pytest.approx(10.0)
    clock.now += 4.0
    assert state.delay_before_retry(sdxl_client.Unavailable("down")) == pytest.approx(1.0)
    clock.now += 1.0
    assert state.start_attempt() == pytest.approx(5.0)
    clock.now += 4.5
    # The next wait (cap 2 s) would end past the deadline: give up now.
    assert state.delay_before_retry(sdxl_client.Unavailable("down")) is None
    clock.now += 1.0
    with pytest.raises(sdxl_client.DeadlineExceeded):
        state.start_attempt()


def test_retry_budget_is_a_share_of_the_calls_in_progress_with_a_floor():
    budget = RetryBudget(ratio=0.2, min_retrying=3)
    assert budget.allows(retrying=2, in_progress=3) and not budget.allows(retrying=3, in_progress=3)
    assert budget.allows(retrying=19, in_progress=100) and not budget.allows(retrying=20, in_progress=100)


def _calls_in_progress(policy: RetryPolicy, count: int) -> tuple[CallsInProgress, list[RetryState]]:
    calls = CallsInProgress()
    states = [RetryState(policy, None, calls=calls, uniform=lambda: 1.0).__enter__() for _ in range(count)]
    for state in states:
        state.start_attempt()
    return calls, states


def test_overload_retries_beyond_the_budget_are_refused_until_a_place_frees():
    calls, states = _calls_in_progress(RetryPolicy(budget=RetryBudget(ratio=0.0, min_retrying=2)), 4)
    full = sdxl_client.Overloaded("full", retry_after=0.5)
    delays = [state.delay_before_retry(full) for state in states]
    assert delays == [0.5, 0.5, None, None]
    assert [s.refused_by_budget for s in states] == [False, False, True, True]
    assert (calls.retrying, calls.refused) == (2, 2)
    # A call that holds a place keeps it for its next retries.
    states[0].start_attempt()
    assert states[0].delay_before_retry(full) is not None and calls.retrying == 2
    states[0].__exit__(None, None, None)
    assert (calls.in_progress, calls.retrying) == (3, 1)
    late = RetryState(states[1].policy, None, calls=calls).__enter__()
    late.start_attempt()
    assert late.delay_before_retry(full) is not None and calls.retrying == 2


def test_unavailable_is_never_budgeted_and_no_budget_retries_everything():
    _, states = _calls_in_progress(RetryPolicy(budget=RetryBudget(ratio=0.0, min_retrying=0)), 3)
    assert all(s.delay_before_retry(sdxl_client.Unavailable("gone")) is not None for s in states)
    assert all(s.delay_before_retry(sdxl_client.Overloaded("full", retry_after=0.1)) is None for s in states)
    calls, unbudgeted = _calls_in_progress(RetryPolicy(budget=None), 3)
    full = sdxl_client.Overloaded("full", retry_after=0.1)
    assert all(s.delay_before_retry(full) is not None for s in unbudgeted) and calls.refused == 0


def test_policy_rejects_nonsense():
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError):
        RetryBudget(ratio=1.5)


# --- results --------------------------------------------------------------------------------------
def _png(width, height):
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_generate_response_becomes_typed_result():
    response = sdxl_pb2.GenerateResponse(
        images=[
            sdxl_pb2.Image(data=_png(128, 64), format=sdxl_pb2.PNG, width=128, height=64, seed=5 + i, index=i)
            for i in range(2)
        ],
        request_id="r1",
        timings=sdxl_pb2.Timings(queue_seconds=0.5, denoise_seconds=1.0, total_seconds=2.0),
        prompt_truncated=True,
        seed=5,
        steps=4,
        guidance_scale=5.0,
    )
    result = sdxl_client.GenerateResult.from_proto(response)
    assert [(i.seed, i.index) for i in result.images] == [(5, 0), (6, 1)]
    assert result.request_id == "r1" and result.prompt_truncated and result.steps == 4
    assert result.timings.total_seconds == 2.0
    assert result.images[0].to_pil().size == (128, 64)
    assert result.images[0].format is sdxl_client.ImageFormat.PNG


def test_stream_events_convert_in_kind():
    events = [
        sdxl_pb2.GenerateEvent(queued=sdxl_pb2.Queued(position=2, request_id="r")),
        sdxl_pb2.GenerateEvent(progress=sdxl_pb2.Progress(completed_steps=3, total_steps=4)),
        sdxl_pb2.GenerateEvent(image=sdxl_pb2.Image(data=b"x", format=sdxl_pb2.WEBP, index=0)),
        sdxl_pb2.GenerateEvent(done=sdxl_pb2.Done(request_id="r", num_images=1, steps=4)),
        sdxl_pb2.GenerateEvent(),
    ]
    converted = [stream_event_from_proto(e) for e in events]
    assert converted[0] == sdxl_client.Queued(position=2, request_id="r")
    assert converted[1].fraction == 0.75
    assert converted[2].format is sdxl_client.ImageFormat.WEBP
    assert isinstance(converted[3], sdxl_client.Done) and converted[3].num_images == 1
    assert converted[4] is None


def test_server_info_as_dict_is_json_serialisable():
    info = sdxl_client.ServerInfo.from_proto(
        sdxl_pb2.ServerInfo(
            model="tiny",
            resolutions=[sdxl_pb2.Resolution(width=64, height=64)],
            formats=[sdxl_pb2.PNG, sdxl_pb2.JPEG],
            versions={"jax": "0.10.2"},
        )
    )
    data = json.loads(json.dumps(info.as_dict()))
    assert data["resolutions"] == ["64x64"] and data["formats"] == ["PNG", "JPEG"]
    assert data["versions"] == {"jax": "0.10.2"}


# --- channel settings -----------------------------------------------------------------------------
def test_channel_balances_round_robin_and_accepts_large_responses():
    options = dict(ChannelSettings(target="dns:///sdxl:50051").options())
    assert json.loads(options["grpc.service_config"]) == {"loadBalancingConfig": [{"round_robin": {}}]}
    assert options["grpc.max_receive_message_length"] >= 64 * 1024 * 1024
    assert options["grpc.keepalive_time_ms"] == 300_000  # what a default gRPC server accepts


def test_token_is_metadata_on_plaintext_and_credentials_on_tls():
    assert ChannelSettings(token="s3cret").call_metadata() == (("authorization", "Bearer s3cret"),)
    assert ChannelSettings(token="s3cret", tls=True).call_metadata() == ()
    assert ChannelSettings().call_metadata() == ()


def test_client_is_importable_without_jax_or_the_server():
    import subprocess
    import sys

    code = (
        "import sys, sdxl_client, sdxl_client.cli; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax', 'sdxl_server')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_results_and_server_info_name_the_sampler_and_recipe_as_requests_do():
    from sdxl_client._types import GenerateResult, ServerInfo

    response = sdxl_pb2.GenerateResponse(request_id="r", sampler=sdxl_pb2.DPMPP_2M)
    assert GenerateResult.from_proto(response).sampler == "dpmpp_2m"
    info = ServerInfo.from_proto(
        sdxl_pb2.ServerInfo(default_sampler=sdxl_pb2.LCM, default_timestep_spacing=sdxl_pb2.TRAILING)
    )
    assert (info.default_sampler, info.default_timestep_spacing) == ("lcm", "trailing")
    assert ServerInfo.from_proto(sdxl_pb2.ServerInfo()).default_sampler == ""  # an older server


def test_guidance_zero_is_sent_and_none_is_not():
    assert build_generate_request("a cat", guidance_scale=0.0).HasField("guidance_scale")
    assert not build_generate_request("a cat").HasField("guidance_scale")
    request = build_generate_request(
        "a cat", sampler="dpmpp_2m", guidance_interval=(0.0, 0.4), timesteps=[999, 499]
    )
    assert (request.sampler, list(request.timesteps)) == (sdxl_pb2.DPMPP_2M, [999, 499])
    assert request.guidance_interval.end == pytest.approx(0.4)


def test_server_info_says_how_many_engines_share_the_devices():
    from sdxl_client._types import ServerInfo

    assert ServerInfo.from_proto(sdxl_pb2.ServerInfo(devices=4, engines=4)).engines == 4
    # A server older than the field sends 0: it ran one engine over its devices.
    assert ServerInfo.from_proto(sdxl_pb2.ServerInfo(devices=4)).engines == 1
