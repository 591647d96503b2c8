"""Property-based fuzzing through the real server: whatever a caller sends, it gets a documented status.

Two generators: well-formed GenerateRequests with every field drawn from around and far beyond its
bounds, and raw bodies (random bytes, and valid requests cut short or with a byte flipped). Every call
must end OK or INVALID_ARGUMENT, never UNKNOWN or INTERNAL; an INVALID_ARGUMENT names real fields; an OK
response holds the images asked for at the size asked for. Examples are derandomized (the same ones
on every run, so CI cannot flake on a new example) and no example database is written.
"""

from __future__ import annotations

import grpc
import pytest
from hostile_wire import GENERATE, GENERATE_STREAM, TOKEN, bearer, call
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sdxl_client._proto.sdxl.v1 import sdxl_pb2

FIELDS = {field.name for field in sdxl_pb2.GenerateRequest.DESCRIPTOR.fields} | {"request"}
UINT32 = st.integers(0, 2**32 - 1)
SERVED = {(64, 64), (128, 64)}  # the integration servers' --resolutions
FUZZ = settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _mostly(valid: st.SearchStrategy, wild: st.SearchStrategy) -> st.SearchStrategy:
    """``valid`` 7 times in 8, else ``wild``: with a dozen fields, about a third of requests are valid."""
    return st.integers(0, 7).flatmap(lambda pick: wild if pick == 0 else valid)


def _request(fields: dict) -> sdxl_pb2.GenerateRequest:
    width, height = fields.pop("size")
    return sdxl_pb2.GenerateRequest(width=width, height=height, **fields)


requests = st.fixed_dictionaries(
    {
        "prompt": _mostly(st.text(min_size=1, max_size=120), st.text(alphabet="🦊 a\x00", max_size=400)),
        "negative_prompt": st.text(max_size=40),
        "seed": st.one_of(st.none(), st.integers(0, 2**64 - 1)),
        "num_images": _mostly(st.integers(0, 2), UINT32),
        "steps": _mostly(st.integers(0, 3), UINT32),
        "guidance_scale": _mostly(
            st.floats(0, 20, width=32), st.floats(width=32, allow_nan=True, allow_infinity=True)
        ),
        "size": _mostly(st.sampled_from([(0, 0), *SERVED]), st.tuples(UINT32, UINT32)),
        "format": _mostly(st.integers(0, 3), st.integers(4, 2**31 - 1)),  # proto3 enums are open
        "request_id": _mostly(st.from_regex(r"[a-z0-9-]{0,32}", fullmatch=True), st.text(max_size=140)),
        "quality": _mostly(st.integers(0, 100), UINT32),
    }
).map(_request)


def _check(outcome, request: sdxl_pb2.GenerateRequest | None) -> None:
    assert outcome.code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), outcome
    if outcome.code == grpc.StatusCode.INVALID_ARGUMENT:
        assert outcome.violations, outcome
        assert set(outcome.violations) <= FIELDS, outcome.violations
        return
    if request is None:
        return
    response = sdxl_pb2.GenerateResponse.FromString(outcome.responses[0])
    assert len(response.images) == (request.num_images or 1)
    for image in response.images:
        assert (image.width, image.height) in SERVED
        assert request.width in (0, image.width) and request.height in (0, image.height)
        assert image.data


@FUZZ
@given(request=requests)
def test_fuzzed_requests_get_ok_or_invalid_argument(hostile_server, request) -> None:
    with hostile_server.channel() as channel:
        _check(call(channel, GENERATE, request.SerializeToString(), bearer(TOKEN)), request)


_VALID = sdxl_pb2.GenerateRequest(prompt="a valid request", steps=1, width=64, height=64).SerializeToString()


@st.composite
def damaged_bodies(draw) -> bytes:
    body = bytearray(_VALID)
    if draw(st.booleans()):
        del body[draw(st.integers(0, len(body) - 1)) :]
    else:
        body[draw(st.integers(0, len(body) - 1))] ^= 1 << draw(st.integers(0, 7))
    return bytes(body)


@FUZZ
@given(body=st.one_of(st.binary(max_size=48), damaged_bodies()))
@pytest.mark.parametrize("method", [GENERATE, GENERATE_STREAM])
def test_raw_bodies_get_ok_or_invalid_argument(hostile_server, method, body) -> None:
    with hostile_server.channel() as channel:
        _check(call(channel, method, body, bearer(TOKEN)), None)
