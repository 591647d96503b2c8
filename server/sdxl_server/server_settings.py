"""The server's settings: one frozen ServerConfig, which holds the engine's, built from flags and ``SDXL_*``.

Every settable field - the server's own below and the engine's in engine/settings.py, declared with
``settable.setting`` - is an option of ``sdxl-server serve`` named after the field (``max_queue`` is
``--max-queue`` and ``SDXL_MAX_QUEUE``), parsed by the field's type, with the field's help and default
shown in ``--help``. A flag wins over the environment, the environment over the default. Each dataclass
checks its own fields once, in ``__post_init__``; an engine check names the engine field, which is
the flag's name too. Parsing happens here, at the edge: the engine and the service receive values and
never read the environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sdxl_server.engine.api import Resolution
from sdxl_server.engine.models.model_source import DEMO, TINY
from sdxl_server.engine.settings import EngineConfig, SettingError
from sdxl_server.logs import LOG_FORMATS
from sdxl_server.settable import Setting, setting, setting_of

LOG_LEVELS = ("debug", "info", "warning", "error")
# The engine requires a model and its sizes; told nothing, the server serves the tiny model. Real SDXL
# is trained at 1024x1024; the tiny model is meant for quick local runs, so it serves small sizes.
DEFAULT_MODEL = TINY
DEFAULT_RESOLUTIONS = "1024x1024"
DEFAULT_TINY_RESOLUTIONS = "64x64,128x128"
DEFAULT_DEMO_RESOLUTIONS = "64x64"  # the demo model was trained at 64x64 and draws nothing else well
_RESOLUTIONS_BY_MODEL = {TINY: DEFAULT_TINY_RESOLUTIONS, DEMO: DEFAULT_DEMO_RESOLUTIONS}
# What --help shows for the two engine settings whose default is the server's (above).
_SERVER_DEFAULTS_SHOWN = {
    "model": DEFAULT_MODEL,
    "resolutions": f"{DEFAULT_RESOLUTIONS}; {DEFAULT_TINY_RESOLUTIONS} for the tiny model, "
    f"{DEFAULT_DEMO_RESOLUTIONS} for the demo model",
}


class ConfigError(ValueError):
    """A setting is missing or invalid; the message names the flag."""


def parse_resolutions(text: str) -> tuple[Resolution, ...]:
    return tuple(Resolution.parse(part) for part in text.split(",") if part.strip())


def default_resolutions(model: str) -> tuple[Resolution, ...]:
    """The sizes served when --resolutions is not given: they depend on the model."""
    return parse_resolutions(_RESOLUTIONS_BY_MODEL.get(model, DEFAULT_RESOLUTIONS))


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number") from None


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None


def _seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number of seconds") from None


def parse_boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{text!r} is not a boolean (use 1/0, true/false)")


# How a setting's text becomes its value, by the field's type (``X | None`` parses as X); a setting of
# another type names its parser in ``setting(..., parse=)``.
_PARSERS_BY_TYPE: dict[Any, Callable[[str], Any]] = {
    int: _whole_number,
    float: _number,
    str: str,
    bool: parse_boolean,
    tuple[Resolution, ...]: parse_resolutions,
}


def _default_engine() -> EngineConfig:
    return EngineConfig(model=DEFAULT_MODEL, resolutions=default_resolutions(DEFAULT_MODEL))


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    # Everything the engine needs, checked by the engine's own settings.
    engine: EngineConfig = dataclasses.field(default_factory=_default_engine)
    host: str = setting("0.0.0.0", "address to bind")
    port: int = setting(50051, "gRPC port; 0 picks a free one")
    metrics_port: int = setting(8000, "Prometheus /metrics HTTP port; 0 picks a free one")
    # The OpenAI Images API over HTTP; None: not served (the chart turns it on, on 8080).
    http_port: int | None = setting(
        None, "OpenAI Images API HTTP port; 0 picks a free one", shown_default="off"
    )
    drain_seconds: float = setting(60.0, "after SIGTERM, how long accepted work may finish", parse=_seconds)
    max_connection_age_seconds: float = setting(
        10.0, "connection age limit, so clients re-resolve", parse=_seconds
    )
    # Long enough to hold tens of arrivals at a pod's rate (a steady estimate), short next to the HPA's
    # 15 s sync (a step shows in full at the next sync).
    demand_window_seconds: float = setting(
        10.0, "sdxl_demand counts the work that arrived over this many seconds", parse=_seconds
    )
    tls_cert_file: str | None = setting(None, "PEM certificate chain; enables TLS with --tls-key-file")
    tls_key_file: str | None = setting(None, "PEM private key")
    # Read (and re-read on change) by service/auth.py's TokenFile, the one reader of the file.
    auth_token_file: str | None = setting(
        None, "file holding the bearer tokens clients may send, one per line"
    )
    log_prompts: bool = setting(False, "write prompts to the logs")
    log_level: str = setting("info", "debug, info, warning or error")
    # None: text when stderr is a terminal, JSON otherwise.
    log_format: str | None = setting(
        None, "text or json", shown_default="text when stderr is a terminal, else json"
    )

    def __post_init__(self) -> None:
        """The one check of the server's own settings (the engine checks its own)."""

        def require(ok: bool, field: str, message: str) -> None:
            if not ok:
                raise ConfigError(f"{flag_name(field)}: {message}")

        require(0 <= self.port <= 65535, "port", "must be within 0..65535 (0 picks a free port)")
        require(0 <= self.metrics_port <= 65535, "metrics_port", "must be within 0..65535")
        require(
            self.http_port is None or 0 <= self.http_port <= 65535,
            "http_port",
            "must be within 0..65535 (0 picks a free port)",
        )
        require(self.drain_seconds >= 0, "drain_seconds", "must not be negative")
        require(self.max_connection_age_seconds > 0, "max_connection_age_seconds", "must be positive")
        require(self.demand_window_seconds > 0, "demand_window_seconds", "must be positive")
        require(
            (self.tls_cert_file is None) == (self.tls_key_file is None),
            "tls_cert_file",
            "--tls-cert-file and --tls-key-file must be given together",
        )
        for field, path in (
            ("tls_cert_file", self.tls_cert_file),
            ("tls_key_file", self.tls_key_file),
            ("auth_token_file", self.auth_token_file),
        ):
            require(path is None or os.path.isfile(path), field, f"{path} is not a readable file")
        require(self.log_level in LOG_LEVELS, "log_level", f"must be one of {', '.join(LOG_LEVELS)}")
        require(
            self.log_format is None or self.log_format in LOG_FORMATS,
            "log_format",
            f"must be one of {', '.join(LOG_FORMATS)}",
        )

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert_file is not None


def flag_name(field: str) -> str:
    """The option that sets a settings field: ``max_queue`` is ``--max-queue``."""
    return "--" + field.replace("_", "-")


@dataclasses.dataclass(frozen=True)
class Option:
    """One option of ``sdxl-server serve``, derived from a settable field of ServerConfig or EngineConfig."""

    field: str
    owner: type  # EngineConfig or ServerConfig
    setting: Setting
    parse: Callable[[str], Any]
    # What --help shows in brackets; None: nothing (an unset path, for example).
    shown_default: str | None

    @property
    def flag(self) -> str:
        return flag_name(self.field)

    @property
    def env(self) -> str:
        return "SDXL_" + self.field.upper()

    @property
    def help(self) -> str:
        default = f" [{self.shown_default}]" if self.shown_default is not None else ""
        return f"{self.setting.help}{default} (env {self.env})"


def show_default(value: Any) -> str | None:
    """A default as --help writes it (the text it would be given as: parsing it gives the value back)."""
    if value is None or value is dataclasses.MISSING:
        return None
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ",".join(str(item) for item in value)
    return str(value)


def _options_of(owner: type) -> list[Option]:
    hints = typing.get_type_hints(owner)
    options = []
    for field in dataclasses.fields(owner):
        described = setting_of(field)
        if described is None:
            continue
        kind = hints[field.name]
        present = [arg for arg in typing.get_args(kind) if arg is not type(None)]
        if type(None) in typing.get_args(kind) and len(present) == 1:
            kind = present[0]
        parse = described.parse or _PARSERS_BY_TYPE.get(kind)
        if parse is None:
            raise TypeError(f"{owner.__name__}.{field.name}: no parser for {kind}; pass setting(parse=...)")
        shown = (
            described.shown_default or _SERVER_DEFAULTS_SHOWN.get(field.name) or show_default(field.default)
        )
        options.append(Option(field.name, owner, described, parse, shown))
    return options


# Every option, the engine's first; field names never repeat across the two (a test holds it).
OPTIONS: tuple[Option, ...] = (*_options_of(EngineConfig), *_options_of(ServerConfig))


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds every serve option; defaults stay None so that the environment can fill them in."""
    groups = {
        EngineConfig: parser.add_argument_group("model and batching"),
        ServerConfig: parser.add_argument_group("serving"),
    }
    for option in OPTIONS:
        group = groups[option.owner]
        if option.parse is parse_boolean:
            group.add_argument(option.flag, action="store_const", const="1", help=option.help)
        elif option.setting.repeatable:
            group.add_argument(option.flag, action="append", metavar=option.field.upper(), help=option.help)
        else:
            group.add_argument(option.flag, metavar=option.field.upper(), help=option.help)


def config_from(args: argparse.Namespace, env: Mapping[str, str]) -> ServerConfig:
    """Flags win over ``SDXL_*`` variables, which win over the dataclasses' defaults."""
    values: dict[type, dict[str, Any]] = {EngineConfig: {}, ServerConfig: {}}
    for option in OPTIONS:
        flag_value = getattr(args, option.field, None)
        if isinstance(flag_value, list):  # a repeatable flag: its values as the environment holds them
            flag_value = ",".join(flag_value)
        source, raw = (option.flag, flag_value) if flag_value is not None else (option.env, None)
        if raw is None:
            raw = env.get(option.env)
        if raw is None or (raw == "" and source == option.env):
            continue
        try:
            values[option.owner][option.field] = option.parse(raw)
        except ValueError as e:
            raise ConfigError(f"{source}: {e}") from None
    engine_values = values[EngineConfig]
    engine_values.setdefault("model", DEFAULT_MODEL)
    engine_values.setdefault("resolutions", default_resolutions(engine_values["model"]))
    try:
        engine = EngineConfig(**engine_values)
    except SettingError as e:  # the engine names its field, which names the flag
        raise ConfigError(f"{flag_name(e.field)}: {e.message}") from None
    return ServerConfig(engine=engine, **values[ServerConfig])


def parse_serve_config(argv: Sequence[str], env: Mapping[str, str] | None = None) -> ServerConfig:
    """Parses ``serve`` options (without the subcommand) from argv and env, for tests and tools."""
    parser = argparse.ArgumentParser(prog="sdxl-server serve")
    add_serve_arguments(parser)
    return config_from(parser.parse_args(list(argv)), os.environ if env is None else env)
