"""Checks that run before anything slow (importing JAX, loading the model), each failing as one line.

A port already taken, a model path that does not exist or a token file without a token would otherwise
surface minutes later, deep in warm-up or as a traceback from the event loop. Binding a port here and
releasing it is a probe, not a reservation: the real bind can still lose a race, and then fails with its
own clear error.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import os
import re
import socket

from sdxl_server.server_settings import ConfigError, ServerConfig

MAKE_RUN_MARKER = "STARTED_BY_MAKE_RUN"
_KNOWN_NAMES = "'demo' (the trained demo model: coloured shapes) or 'tiny' (random weights)"
# What a Hugging Face hub id looks like: owner/name, letters, digits, '-', '_' and '.'.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


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
            # Under `make run` (its recipe sets STARTED_BY_MAKE_RUN), a flag goes through make's ARGS: make
            # would read a bare --port as its own option.
            through_make = (
                f' (with make: make run ARGS="--{flag} {port + 10}")'
                if os.environ.get(MAKE_RUN_MARKER)
                else ""
            )
            raise ConfigError(
                f"--{flag}: port {port} on {host} {reason} (another sdxl-server?); "
                f"choose another with --{flag} (0 picks a free one){through_make}"
            ) from None


def check_model(model: str, model_configs: str | None = None) -> None:
    """A --model that is written as a path must exist (else it would be tried as a hub id, minutes later);
    a model folder must hold every file its components need, a single file configs to be read with."""
    looks_like_path = os.path.isabs(model) or model.startswith(("./", "../", "~", ".\\", "..\\"))
    if looks_like_path and not os.path.exists(os.path.expanduser(model)):
        raise ConfigError(
            f"--model: {model} does not exist; give a diffusers model directory, "
            f"a hub id (e.g. stabilityai/stable-diffusion-xl-base-1.0) or {_KNOWN_NAMES}"
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
    if not os.path.exists(os.path.expanduser(model)) and not _HUB_ID.fullmatch(model):
        # Neither a name, a path nor an owner/name hub id: the hub would be tried for ~25 s, then a traceback.
        close = difflib.get_close_matches(model.lower(), (DEMO, TINY), n=1, cutoff=0.5)
        suggestion = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(
            f"--model: {model!r} is not a model name, an existing path or a hub id (owner/name); "
            f"the names are {_KNOWN_NAMES}{suggestion}"
        )
    try:
        kind = check_model_files(model)
    except CheckpointError as error:
        raise ConfigError(f"--model: {error}") from None
    if kind == SINGLE_FILE:
        try:
            check_model_configs(model_configs)
        except CheckpointError as error:
            raise ConfigError(f"--model-configs: {error}") from None


def check_auth_token_file(path: str | None) -> None:
    """The token file must hold at least one token, read by the reader the server uses (one per line)."""
    if path is None:
        return
    from sdxl_server.service.auth import TokenFileError, read_tokens

    try:
        read_tokens(path)
    except TokenFileError as error:
        raise ConfigError(f"--auth-token-file: {error}") from None


def check_before_start(config: ServerConfig) -> None:
    """Every start-up check; raises ConfigError with a message naming the flag."""
    check_model(config.engine.model, config.engine.model_configs)
    check_auth_token_file(config.auth_token_file)
    check_distinct_ports(_port_flags(config))
    for flag, port in _port_flags(config).items():
        check_port_free(config.host, port, flag)


def _port_flags(config: ServerConfig) -> dict[str, int]:
    """Each port flag and the port it chose (--http-port only when HTTP is on)."""
    ports = {"port": config.port, "metrics-port": config.metrics_port}
    if config.http_port is not None:
        ports["http-port"] = config.http_port
    return ports


def check_distinct_ports(ports: dict[str, int]) -> None:
    """Two flags naming one port would make the second bind fail (a raw [Errno 98]): refused here."""
    seen: dict[int, str] = {}
    for flag, port in ports.items():
        if port != 0 and port in seen:
            raise ConfigError(
                f"--{flag}: port {port} is already --{seen[port]}'s; each of --port, --metrics-port and "
                f"--http-port needs its own port (0 picks a free one)"
            )
        seen[port] = flag


def flags_of_failed_bind(config: ServerConfig, error: BaseException) -> str:
    """The port flag(s) whose port a bind error names, for the one-line message of a port lost to a race
    after the checks above; all of them when the error names no port."""
    ports = _port_flags(config)
    named = [flag for flag, port in ports.items() if port and str(port) in str(error)]
    return " / ".join(f"--{flag}" for flag in (named or ports))
