"""The `sdxl` command line's help for mistakes and its exit statuses, without a server (issue 24)."""

from __future__ import annotations

import pytest
from sdxl_client import Overloaded
from sdxl_client._errors import DeadlineExceeded, FieldViolation, InvalidRequest, Unauthenticated, Unavailable
from sdxl_client._proto.sdxl.v1 import sdxl_pb2
from sdxl_client._types import ServerInfo
from sdxl_client.cli import EXIT_STATUSES, exit_status, main
from sdxl_client.cli._loadtest import describe_mix, parse_mix


def _info() -> ServerInfo:
    return ServerInfo.from_proto(
        sdxl_pb2.ServerInfo(
            model="demo", resolutions=[sdxl_pb2.Resolution(width=64, height=64)], default_steps=10
        )
    )


def _warming_up() -> Unavailable:
    error = Unavailable("the server is warming up")
    error.retry_after = 1.0  # a server's own UNAVAILABLE carries a delay; a refused connection does not
    return error


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (InvalidRequest("bad", [FieldViolation("steps", "51 is outside 1..50")]), 2),
        (Unavailable("connection refused"), 3),
        (_warming_up(), 1),
        (Overloaded("queue full", retry_after=1.0), 1),
        (Unauthenticated("no token"), 1),
        (DeadlineExceeded("too late"), 1),
    ],
    ids=["invalid-argument", "no-server", "warming-up", "overloaded", "unauthenticated", "deadline"],
)
def test_exit_status_follows_the_kind_of_failure(error, status):
    assert exit_status(error) == status
    assert f"  {status}    " in EXIT_STATUSES  # and the documented table has that status


def test_a_typo_of_a_connection_option_gets_the_nearest_one(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["health", "--targte", "localhost"])
    assert exited.value.code == 2
    assert (
        capsys.readouterr().err
        == "sdxl health: error: unrecognized option --targte; did you mean --target?\n"
    )


def test_an_option_far_from_any_gets_no_guess(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "x", "--frobnicate"])
    assert capsys.readouterr().err == (
        "sdxl generate: error: unrecognized option --frobnicate (sdxl generate --help lists them)\n"
    )


def test_the_server_default_mix_is_shown_as_what_it_sends():
    assert describe_mix(parse_mix("default:0"), _info()) == "64x64, 10 steps"
    assert (
        describe_mix(parse_mix("64x64:4:3,default:0:1"), _info())
        == "64x64, 4 steps (x3); 64x64, 10 steps (x1)"
    )
    assert str(parse_mix("default:0")[0]) == "default:0:1"  # round-trips through --mix
