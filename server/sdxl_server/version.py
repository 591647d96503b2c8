"""The server's own version, as installed (shown by ``--version`` and in GetServerInfo's ``versions``)."""

from __future__ import annotations

from importlib import metadata


def server_version() -> str:
    try:
        return metadata.version("sdxl-server")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"
