"""Targets as people write them (sdxl_client._channel): what the client dials, and with TLS or not."""

from __future__ import annotations

import pytest
from sdxl_client._channel import ChannelSettings, TargetError, parse_target


@pytest.mark.parametrize(
    ("written", "target", "tls"),
    [
        ("127.0.0.1", "127.0.0.1:50051", False),
        ("localhost:7", "localhost:7", False),
        ("http://127.0.0.1:50051", "127.0.0.1:50051", False),
        ("https://sdxl.example.com/", "sdxl.example.com:50051", True),
        ("[::1]", "[::1]:50051", False),
        ("dns:///sdxl-headless.serving", "dns:///sdxl-headless.serving:50051", False),
        ("dns:///sdxl-headless.serving:9000", "dns:///sdxl-headless.serving:9000", False),
        ("ipv4:10.0.0.1:1,10.0.0.2:2", "ipv4:10.0.0.1:1,10.0.0.2:2", False),
    ],
)
def test_targets_as_people_write_them(written, target, tls):
    assert parse_target(written) == (target, tls)
    settings = ChannelSettings(target=written)
    assert (settings.target, settings.tls) == (target, tls)


@pytest.mark.parametrize(
    ("written", "message"),
    [
        ("ftp://host:1", "unknown scheme ftp://"),
        ("http://host:1/v1", "a gRPC target has no path"),
        ("host:http", "port 'http' is not a number in 1..65535"),
        ("", "the target is empty"),
    ],
)
def test_unusable_targets_say_what_to_write(written, message):
    with pytest.raises(TargetError, match=message):
        parse_target(written)
