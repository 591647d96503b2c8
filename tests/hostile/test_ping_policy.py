"""The server's HTTP/2 ping policy leaves the client library comfortable room (no "too_many_pings"),
and gRPC core never cancels calls that wait for a busy server."""

from __future__ import annotations

from sdxl_client._channel import ChannelSettings
from sdxl_server.service.grpc_server import ServerOptions, server_options


def test_the_server_allows_client_pings_far_more_often_than_the_client_sends_them() -> None:
    server = dict(server_options(ServerOptions("127.0.0.1", 0, max_connection_age_seconds=300)))
    client = dict(ChannelSettings().options())
    allowed_ms = server["grpc.http2.min_ping_interval_without_data_ms"]
    assert client["grpc.keepalive_time_ms"] >= 2 * allowed_ms  # not at the edge (gRPC's default is 300 s)
    assert client["grpc.keepalive_permit_without_calls"] == 0  # so idle clients never ping at all
    # The server pings too, also on idle connections and long calls that send no data.
    assert server["grpc.keepalive_time_ms"] > 0 and server["grpc.keepalive_permit_without_calls"] == 1
    assert server["grpc.http2.max_pings_without_data"] == 0
    # A client must survive the server's pings: its own timeout bounds how long one may stay unanswered.
    assert server["grpc.keepalive_timeout_ms"] < server["grpc.keepalive_time_ms"]


def test_calls_waiting_for_a_starved_server_are_answered_not_cancelled_by_grpc() -> None:
    """gRPC core cancels a call that waited this long for the server to request it (default 30 s) with a
    bare CANCELLED nobody retries (fleet/unrequested_calls.py reproduces it); the server keeps such
    calls as long as an accepted call may take, so that they get the server's own answer."""
    server = dict(server_options(ServerOptions("127.0.0.1", 0, max_connection_age_seconds=30)))
    waited = server["grpc.server_max_unrequested_time_in_server"]
    assert waited >= server["grpc.max_connection_age_grace_ms"] / 1000 and waited > 30
