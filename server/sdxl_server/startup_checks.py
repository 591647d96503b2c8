"""Checks that run before anything slow (importing JAX, loading the model), each failing as one line.

A port already taken or a model path that does not exist would otherwise surface minutes later, deep in
warm-up or as a traceback from the event loop. Binding a port here and releasing it is a probe, not a
reservation: the real bind can still lose a race, and then fails with its own clear error.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket

from sdxl_server.server_settings import ConfigError, ServerConfig


def check_port_free(host: str, port: int, flag: str) -> None:
    """Raises ConfigError naming ``flag`` when ``host:port`` cannot be bound (port 0 is always free)."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise ConfigError(f"--host: cannot listen on {host!r}: {error.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with contextlib.closing(socket.socket(family, kind, proto)) as probe:
        # The real servers set SO_REUSEADDR too, so a port left in TIME_WAIT is not reported as taken.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            reason = (
                "is already in use"
                if error.errno == errno.EADDRINUSE
                else f"cannot be bound ({error.strerror})"
            )
            raise ConfigError(
                f"--{flag}: port {port} on {host} {reason} (another sdxl-server?); "
                f"choose another with --{flag} (0 picks a free one)"
            ) from None


def check_model(model: str, model_configs: str | None = None) -> None:
    """A --model that is written as a path must exist (else it would be tried as a hub id, minutes later);
    a model folder must hold every file its components need, a single file configs to be read with."""
    looks_like_path = os.path.isabs(model) or model.startswith(("./", "../", "~", ".\\", "..\\"))
    if looks_like_path and not os.path.exists(os.path.expanduser(model)):
        raise ConfigError(
            f"--model: {model} does not exist; give a diffusers model directory, "
            "a hub id (e.g. stabilityai/stable-diffusion-xl-base-1.0) or 'tiny'"
        )
    from sdxl_server.engine.models.checkpoints import (  # file names only: no JAX, no weights read
        SINGLE_FILE,
        CheckpointError,
        check_model_configs,
        check_model_files,
    )
    from sdxl_server.engine.models.model_source import DEMO, TINY

    if model in (TINY, DEMO):
        return
    try:
        kind = check_model_files(model)
    except CheckpointError as error:
        raise ConfigError(f"--model: {error}") from None
    if kind == SINGLE_FILE:
        try:
            check_model_configs(model_configs)
        except CheckpointError as error:
            raise ConfigError(f"--model-configs: {error}") from None


def check_before_start(config: ServerConfig) -> None:
    """Every start-up check; raises ConfigError with a message naming the flag."""
    check_model(config.model, config.model_configs)
    check_port_free(config.host, config.port, "port")
    check_port_free(config.host, config.metrics_port, "metrics-port")
