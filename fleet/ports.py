"""Free loopback ports for the tools that cannot bind port 0 and report it (dnsmasq, Prometheus).

The port is bound and released just before the tool binds it: another process could take it in
between, which then fails the start loudly (the tool exits) rather than silently.
"""

from __future__ import annotations

import socket


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
