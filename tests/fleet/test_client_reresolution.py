"""The client's channels find a replica published in DNS within about one connection age.

Real parts: dnsmasq answering a headless-Service-like name, two gRPC servers on 127.0.0.20/21 that age
connections every second, and a channel opened with the client library's own settings. gRPC on its own
re-resolves at most every 30 s, so a new pod behind a headless Service waited that long for traffic from
existing callers (docs/AUTOSCALING.md); the client library lowers that interval.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from sdxl_client._channel import ChannelSettings

from fleet.ports import free_port
from fleet.reresolution import measure

REPO = Path(__file__).resolve().parents[2]
GRPC_DEFAULT_INTERVAL_SECONDS = 30.0

pytestmark = pytest.mark.slow


def test_a_newly_published_address_gets_calls_before_grpcs_default_interval() -> None:
    dnsmasq = os.environ.get("SDXL_DNSMASQ") or str(REPO / ".tools" / "debian" / "bin" / "dnsmasq")
    assert os.access(dnsmasq, os.X_OK), f"dnsmasq missing at {dnsmasq}: `make debian-tools` installs it"
    options = ChannelSettings().options()
    wait = GRPC_DEFAULT_INTERVAL_SECONDS - 5  # gRPC's default could not reach it by then
    seconds = asyncio.run(measure(dnsmasq, 1.0, wait, free_port(), options))
    assert seconds is not None, f"the second address got no call within {wait} s"
