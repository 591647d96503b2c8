"""The server's settings: one frozen ServerConfig built from flags and ``SDXL_*`` environment variables.

Every option of ``sdxl-server serve`` is also settable as ``SDXL_<NAME>`` (``--max-queue`` is
``SDXL_MAX_QUEUE``); a flag wins over the environment, the environment over the default. Parsing happens
here, at the edge: the engine and the service receive values and never read the environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sdxl_server.engine.api import Resolution
from sdxl_server.engine.settings import DTYPES, POLICIES, EngineConfig
from sdxl_server.logs import LOG_FORMATS

LOG_LEVELS = ("debug", "info", "warning", "error")
# Real SDXL is trained at 1024x1024; the tiny model is meant for quick local runs, so it serves small sizes.
DEFAULT_RESOLUTIONS = "1024x1024"
DEFAULT_TINY_RESOLUTIONS = "64x64,128x128"
DEFAULT_DEMO_RESOLUTIONS = "64x64"  # the demo model was trained at 64x64 and draws nothing else well


class ConfigError(ValueError):
    """A setting is missing or invalid; the message names the flag."""


def parse_resolutions(text: str) -> tuple[Resolution, ...]:
    return tuple(Resolution.parse(part) for part in text.split(",") if part.strip())


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number") from None


def _seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number of seconds") from None


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{text!r} is not a boolean (use 1/0, true/false)")


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    model: str = "tiny"
    resolutions: tuple[Resolution, ...] = (Resolution(64, 64), Resolution(128, 128))
    slots_per_device: int = 1
    max_queue: int = 64
    policy: str = "continuous"
    host: str = "0.0.0.0"
    port: int = 50051
    metrics_port: int = 8000
    # The OpenAI Images API over HTTP; None: not served (the chart turns it on, on 8080).
    http_port: int | None = None
    compilation_cache_dir: str | None = None
    tiny_model_dir: str | None = None
    model_configs: str | None = None
    dtype: str = "auto"
    max_steps: int = 50
    default_steps: int = 30
    max_images_per_request: int = 4
    steps_per_dispatch: int = 1
    decode_hold_steps: int = 4
    drain_seconds: float = 60.0
    max_connection_age_seconds: float = 10.0
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    auth_token_file: str | None = None
    log_prompts: bool = False
    log_level: str = "info"
    # None: text when stderr is a terminal, JSON otherwise.
    log_format: str | None = None
    # Test-only (hidden flag): warm-up waits until this file exists, so that a test can observe the
    # NOT_SERVING window before warm-up ends deterministically instead of racing a fast warm-up.
    hold_warmup_until_file: str | None = None

    def __post_init__(self) -> None:
        def require(ok: bool, flag: str, message: str) -> None:
            if not ok:
                raise ConfigError(f"--{flag}: {message}")

        require(bool(self.model), "model", "must not be empty")
        require(len(self.resolutions) > 0, "resolutions", "at least one WIDTHxHEIGHT is required")
        require(self.slots_per_device >= 1, "slots-per-device", "must be at least 1")
        require(self.max_queue >= 1, "max-queue", "must be at least 1")
        require(self.policy in POLICIES, "policy", f"must be one of {', '.join(POLICIES)}")
        require(self.dtype in DTYPES, "dtype", f"must be one of {', '.join(DTYPES)}")
        require(0 <= self.port <= 65535, "port", "must be within 0..65535 (0 picks a free port)")
        require(0 <= self.metrics_port <= 65535, "metrics-port", "must be within 0..65535")
        require(
            self.http_port is None or 0 <= self.http_port <= 65535,
            "http-port",
            "must be within 0..65535 (0 picks a free port)",
        )
        require(self.max_steps >= 1, "max-steps", "must be at least 1")
        require(1 <= self.default_steps <= self.max_steps, "default-steps", "must be within 1..--max-steps")
        require(self.max_images_per_request >= 1, "max-images-per-request", "must be at least 1")
        require(self.steps_per_dispatch >= 1, "steps-per-dispatch", "must be at least 1")
        require(self.decode_hold_steps >= 0, "decode-hold-steps", "must not be negative")
        require(self.drain_seconds >= 0, "drain-seconds", "must not be negative")
        require(self.max_connection_age_seconds > 0, "max-connection-age-seconds", "must be positive")
        require(
            (self.tls_cert_file is None) == (self.tls_key_file is None),
            "tls-cert-file",
            "--tls-cert-file and --tls-key-file must be given together",
        )
        for flag, path in (
            ("tls-cert-file", self.tls_cert_file),
            ("tls-key-file", self.tls_key_file),
            ("auth-token-file", self.auth_token_file),
        ):
            require(path is None or os.path.isfile(path), flag, f"{path} is not a readable file")
        require(self.log_level in LOG_LEVELS, "log-level", f"must be one of {', '.join(LOG_LEVELS)}")
        require(
            self.log_format is None or self.log_format in LOG_FORMATS,
            "log-format",
            f"must be one of {', '.join(LOG_FORMATS)}",
        )

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert_file is not None

    def read_auth_token(self) -> str | None:
        """The bearer token clients must send, or None when auth is off."""
        if self.auth_token_file is None:
            return None
        with open(self.auth_token_file, encoding="utf-8") as f:
            token = f.read().strip()
        if not token:
            raise ConfigError(f"--auth-token-file: {self.auth_token_file} is empty")
        return token

    def engine_config(self) -> EngineConfig:
        try:
            return EngineConfig(
                model=self.model,
                resolutions=self.resolutions,
                slots_per_device=self.slots_per_device,
                max_queue=self.max_queue,
                policy=self.policy,
                dtype=self.dtype,
                compilation_cache_dir=self.compilation_cache_dir,
                tiny_model_dir=self.tiny_model_dir,
                model_configs=self.model_configs,
                max_steps=self.max_steps,
                default_steps=self.default_steps,
                max_images_per_request=self.max_images_per_request,
                steps_per_dispatch=self.steps_per_dispatch,
                decode_hold_steps=self.decode_hold_steps,
            )
        except ValueError as e:  # EngineConfig names its field; say which flag sets it
            field, _, message = str(e).partition(": ")
            raise ConfigError(f"--{field.replace('_', '-')}: {message}") from None


@dataclasses.dataclass(frozen=True)
class _Option:
    flag: str
    parse: Callable[[str], Any]
    help: str
    hidden: bool = False

    @property
    def field(self) -> str:
        return self.flag.replace("-", "_")

    @property
    def env(self) -> str:
        return "SDXL_" + self.field.upper()


_OPTIONS = (
    _Option(
        "model",
        str,
        "diffusers folder (Flax or PyTorch-layout safetensors), single-file SDXL .safetensors, hub id, "
        "'tiny' (random, built on first use) or 'demo' [tiny]",
    ),
    _Option(
        "model-configs",
        str,
        "configs a single-file --model is read with: a diffusers folder of configs and tokenizers, "
        "or an architecture name [sdxl-base]",
    ),
    _Option(
        "resolutions",
        parse_resolutions,
        f"served WIDTHxHEIGHT list, the first is the default [{DEFAULT_RESOLUTIONS}; "
        f"{DEFAULT_TINY_RESOLUTIONS} for the tiny model, {DEFAULT_DEMO_RESOLUTIONS} for the demo model]",
    ),
    _Option("slots-per-device", _integer, "images denoised concurrently per device [1]"),
    _Option("max-queue", _integer, "images that may wait for a slot before RESOURCE_EXHAUSTED [64]"),
    _Option("policy", str, "admission policy: continuous or static [continuous]"),
    _Option("host", str, "address to bind [0.0.0.0]"),
    _Option("port", _integer, "gRPC port; 0 picks a free one [50051]"),
    _Option("metrics-port", _integer, "Prometheus /metrics HTTP port; 0 picks a free one [8000]"),
    _Option("http-port", _integer, "OpenAI Images API HTTP port; 0 picks a free one [off]"),
    _Option("compilation-cache-dir", str, "persistent XLA compilation cache (path or gs://)"),
    _Option("tiny-model-dir", str, "where --model tiny is built [~/.cache/sdxl-serve/tiny-sdxl]"),
    _Option("dtype", str, "parameter dtype: float32, bfloat16 or auto [auto]"),
    _Option("max-steps", _integer, "most denoising steps a request may ask for [50]"),
    _Option("default-steps", _integer, "steps when a request leaves them at 0 [30]"),
    _Option("max-images-per-request", _integer, "most images per request [4]"),
    _Option(
        "steps-per-dispatch", _integer, "steps per device call when no waiting image could join sooner [1]"
    ),
    _Option(
        "decode-hold-steps",
        _integer,
        "most steps a finished image waits to share a decode across devices, with a deep backlog [4]",
    ),
    _Option("drain-seconds", _seconds, "after SIGTERM, how long accepted work may finish [60]"),
    _Option("max-connection-age-seconds", _seconds, "connection age limit, so clients re-resolve [10]"),
    _Option("tls-cert-file", str, "PEM certificate chain; enables TLS with --tls-key-file"),
    _Option("tls-key-file", str, "PEM private key"),
    _Option("auth-token-file", str, "file holding the bearer token clients must send"),
    _Option("log-prompts", _parse_bool, "write prompts to the logs (off by default)"),
    _Option("log-level", str, "debug, info, warning or error [info]"),
    _Option("log-format", str, "text or json [text when stderr is a terminal, else json]"),
    _Option("hold-warmup-until-file", str, "test only", hidden=True),
)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds every serve option; defaults stay None so that the environment can fill them in."""
    for option in _OPTIONS:
        help_text = argparse.SUPPRESS if option.hidden else f"{option.help} (env {option.env})"
        if option.parse is _parse_bool:
            parser.add_argument(f"--{option.flag}", action="store_const", const="1", help=help_text)
        else:
            parser.add_argument(f"--{option.flag}", metavar=option.field.upper(), help=help_text)


def config_from(args: argparse.Namespace, env: Mapping[str, str]) -> ServerConfig:
    """Flags win over ``SDXL_*`` variables, which win over ServerConfig's defaults."""
    values: dict[str, Any] = {}
    for option in _OPTIONS:
        flag_value = getattr(args, option.field, None)
        source, raw = (f"--{option.flag}", flag_value) if flag_value is not None else (option.env, None)
        if raw is None:
            raw = env.get(option.env)
        if raw is None or (raw == "" and source == option.env):
            continue
        try:
            values[option.field] = option.parse(raw)
        except ValueError as e:
            raise ConfigError(f"{source}: {e}") from None
    if "resolutions" not in values:
        small = {"tiny": DEFAULT_TINY_RESOLUTIONS, "demo": DEFAULT_DEMO_RESOLUTIONS}
        default = small.get(values.get("model", "tiny"), DEFAULT_RESOLUTIONS)
        values["resolutions"] = parse_resolutions(default)
    return ServerConfig(**values)


def parse_serve_config(argv: Sequence[str], env: Mapping[str, str] | None = None) -> ServerConfig:
    """Parses ``serve`` options (without the subcommand) from argv and env, for tests and tools."""
    parser = argparse.ArgumentParser(prog="sdxl-server serve")
    add_serve_arguments(parser)
    return config_from(parser.parse_args(list(argv)), os.environ if env is None else env)
