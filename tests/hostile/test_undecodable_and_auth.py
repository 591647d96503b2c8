"""Bodies that are not valid messages, and calls without a token, through the real server's wire.

Undecodable bodies end INVALID_ARGUMENT naming the field ``request``, counted in sdxl_requests_total,
with at most one short log line (rejections are rate-limited) and no traceback; without a token nothing
is decoded at all (UNAUTHENTICATED, and the decoder's INVALID_ARGUMENT count does not move), including
for methods that do not exist.
"""

from __future__ import annotations

import json

import grpc
import pytest
from hostile_wire import GENERATE, GENERATE_STREAM, HEALTH_CHECK, SERVER_INFO, TOKEN, bearer, call
from sdxl_client._proto.sdxl.v1 import sdxl_pb2
from sdxl_test_support.metrics_page import metric_samples, sample

NOT_UTF8 = bytes.fromhex("0a02fffe")  # field 1 (prompt), 2 bytes, not UTF-8
CORRUPT = bytes.fromhex("0a10") + b"short"  # a length that runs past the end
VARINT_OVERRUN = b"\x28" + b"\xff" * 11  # field 5 (steps), a varint longer than 10 bytes
UNDECODABLE = {"not UTF-8": NOT_UTF8, "truncated": CORRUPT, "bad varint": VARINT_OVERRUN}


def _count(server, method: str, code: str) -> float:
    return sample(metric_samples(server.scrape_metrics()), "sdxl_requests_total", method=method, code=code)


def _new_output(server, since: int) -> list[str]:
    return server.output().splitlines()[since:]


@pytest.mark.parametrize("method", [GENERATE, GENERATE_STREAM])
@pytest.mark.parametrize("body", UNDECODABLE.values(), ids=UNDECODABLE.keys())
def test_an_undecodable_body_is_invalid_argument_counted_and_logged_in_one_line(
    hostile_server, method, body
) -> None:
    name = method.rsplit("/", 1)[1]
    before = _count(hostile_server, name, "INVALID_ARGUMENT")
    lines_before = len(hostile_server.output().splitlines())
    with hostile_server.channel() as channel:
        outcome = call(channel, method, body, bearer(TOKEN))
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome
    assert list(outcome.violations) == ["request"]
    assert f"{len(body)}-byte {name} body cannot be decoded" in outcome.violations["request"]
    assert _count(hostile_server, name, "INVALID_ARGUMENT") == before + 1
    new = _new_output(hostile_server, lines_before)
    assert not any("Traceback" in line or "DecodeError" in line for line in new), new
    # Mentioned only in the rate-limited rejection lines (one per kind per window, then a summary).
    mentions = [json.loads(line) for line in new if "cannot be decoded" in line]
    assert all(entry["event"] in ("rejected", "rejections") for entry in mentions), mentions


def test_a_non_utf8_prompt_is_named_as_such(hostile_server) -> None:
    with hostile_server.channel() as channel:
        outcome = call(channel, GENERATE, NOT_UTF8, bearer(TOKEN))
    assert "UTF-8" in outcome.violations["request"]


def test_health_checks_need_no_token_and_survive_garbage(hostile_server) -> None:
    with hostile_server.channel() as channel:
        assert call(channel, HEALTH_CHECK, b"").code == grpc.StatusCode.OK
        assert call(channel, HEALTH_CHECK, NOT_UTF8).code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("metadata", [(), bearer("wrong"), (("authorization", TOKEN),)])
@pytest.mark.parametrize("method", [GENERATE, GENERATE_STREAM, SERVER_INFO])
def test_without_the_token_nothing_is_decoded(hostile_server, method, metadata) -> None:
    name = method.rsplit("/", 1)[1]
    codes = ("UNAUTHENTICATED", "INVALID_ARGUMENT")
    before = [_count(hostile_server, name, code) for code in codes]
    lines_before = len(hostile_server.output().splitlines())
    with hostile_server.channel() as channel:
        outcomes = [call(channel, method, body, metadata) for body in UNDECODABLE.values()]
    assert {o.code for o in outcomes} == {grpc.StatusCode.UNAUTHENTICATED}
    after = [_count(hostile_server, name, code) for code in codes]
    assert after == [before[0] + len(UNDECODABLE), before[1]]
    new = _new_output(hostile_server, lines_before)
    assert not any("Traceback" in line for line in new), new


def test_an_unknown_method_without_a_token_is_unauthenticated_and_not_counted(hostile_server) -> None:
    before = metric_samples(hostile_server.scrape_metrics())
    with hostile_server.channel() as channel:
        assert call(channel, "/sdxl.v1.ImageService/Nope", NOT_UTF8).code == grpc.StatusCode.UNAUTHENTICATED
        assert call(channel, "/x.Y/Z", b"").code == grpc.StatusCode.UNAUTHENTICATED
        with_token = call(channel, "/x.Y/Z", b"", bearer(TOKEN))
    assert with_token.code == grpc.StatusCode.UNIMPLEMENTED
    after = metric_samples(hostile_server.scrape_metrics())
    # Callers must not be able to mint metric labels: no series for made-up methods.
    names = {dict(labels).get("method") for (name, labels) in after if name == "sdxl_requests_total"}
    assert not names & {"Nope", "Z"}
    assert {k for k in after if k[0] == "sdxl_requests_total"} >= {
        k for k in before if k[0] == "sdxl_requests_total"
    }


def test_a_valid_body_still_works_with_the_token(hostile_server) -> None:
    body = sdxl_pb2.GenerateRequest(prompt="fine", steps=1).SerializeToString()
    with hostile_server.channel() as channel:
        outcome = call(channel, GENERATE, body, bearer(TOKEN))
    assert outcome.code == grpc.StatusCode.OK
    assert len(sdxl_pb2.GenerateResponse.FromString(outcome.responses[0]).images) == 1
