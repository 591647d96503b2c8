"""A rotated token is picked up without a restart, the way a Kubernetes Secret volume delivers it.

The kubelet writes the new Secret into a fresh directory and swaps the ``..data`` symlink; the token
file's path stays the same and resolves to a new inode. The server looks at the file at most once a
second, so each step below polls (bounded) instead of sleeping.
"""

from __future__ import annotations

import time

import grpc
from hostile_wire import SERVER_INFO, TOKEN, bearer, call

NEW_TOKEN = "rotated-token"


def _accepted(server, token: str) -> bool:
    with server.channel() as channel:
        outcome = call(channel, SERVER_INFO, b"", bearer(token), timeout=30)
    assert outcome.code in (grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED), outcome
    return outcome.code == grpc.StatusCode.OK


def _until(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


def test_rotation_overlaps_old_and_new_tokens_then_drops_the_old(hostile_server, secret) -> None:
    assert _accepted(hostile_server, TOKEN) and not _accepted(hostile_server, NEW_TOKEN)
    try:
        secret.write(f"{TOKEN}\n{NEW_TOKEN}\n")  # step 1: both accepted while clients move over
        _until(lambda: _accepted(hostile_server, NEW_TOKEN), "the new token is accepted")
        assert _accepted(hostile_server, TOKEN)

        secret.write(NEW_TOKEN)  # step 2: the old token is retired
        _until(lambda: not _accepted(hostile_server, TOKEN), "the old token is refused")
        assert _accepted(hostile_server, NEW_TOKEN)

        secret.write("\n")  # a broken update keeps the tokens that worked
        deadline = time.monotonic() + 2.5  # longer than the server's 1 s re-check
        while time.monotonic() < deadline:
            assert _accepted(hostile_server, NEW_TOKEN)
            time.sleep(0.1)
        assert "keeping the previous auth tokens" in hostile_server.output()
    finally:
        secret.write(TOKEN)
        _until(lambda: _accepted(hostile_server, TOKEN), "the original token is back")
