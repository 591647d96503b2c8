"""ServerConfig from flags and SDXL_* environment variables: precedence, defaults, and clear errors."""

from __future__ import annotations

import argparse
import dataclasses
import re

import pytest
from sdxl_server.engine.api import Resolution
from sdxl_server.engine.settings import EngineConfig
from sdxl_server.server_settings import (
    OPTIONS,
    ConfigError,
    ServerConfig,
    add_serve_arguments,
    parse_serve_config,
)
from sdxl_server.startup_checks import check_auth_token_file


def test_defaults_serve_the_tiny_model_on_the_contract_ports() -> None:
    config = parse_serve_config([], env={})
    assert (config.engine.model, config.port, config.metrics_port, config.host) == (
        "tiny",
        50051,
        8000,
        "0.0.0.0",
    )
    engine = config.engine
    assert (engine.max_steps, engine.default_steps, engine.max_images_per_request) == (50, 30, 4)
    assert config.drain_seconds == 60 and config.max_connection_age_seconds == 10
    assert not config.log_prompts and config.auth_token_file is None and not config.tls_enabled


def test_real_models_default_to_1024_and_the_first_resolution_is_the_default() -> None:
    real = parse_serve_config(["--model", "/models/sdxl"], env={})
    assert real.engine.resolutions == (Resolution(1024, 1024),)
    config = parse_serve_config(["--resolutions", "1152x896,1024x1024"], env={})
    assert config.engine.resolutions == (Resolution(1152, 896), Resolution(1024, 1024))
    assert config.engine.default_resolution == Resolution(1152, 896)


def test_environment_fills_in_and_flags_win() -> None:
    env = {"SDXL_PORT": "6000", "SDXL_MAX_QUEUE": "7", "SDXL_POLICY": "static", "SDXL_LOG_PROMPTS": "1"}
    config = parse_serve_config(["--port", "7000"], env=env)
    assert config.port == 7000  # flag over env
    assert (config.engine.max_queue, config.engine.policy, config.log_prompts) == (7, "static", True)
    assert parse_serve_config(["--log-prompts"], env={}).log_prompts


def test_the_engine_settings_travel_inside_the_server_settings() -> None:
    env = {"SDXL_COMPILATION_CACHE_DIR": "/cache", "SDXL_TINY_MODEL_DIR": "/tiny"}
    engine = parse_serve_config(["--slots-per-device", "2", "--steps-per-dispatch", "4"], env=env).engine
    assert (engine.slots_per_device, engine.steps_per_dispatch) == (2, 4)
    assert (engine.compilation_cache_dir, engine.tiny_model_dir) == ("/cache", "/tiny")


def test_model_configs_reach_the_engine_from_the_flag_or_the_environment() -> None:
    flags = ["--model", "/models/finetune.safetensors", "--model-configs", "/models/configs"]
    assert parse_serve_config(flags, env={}).engine.model_configs == "/models/configs"
    from_env = parse_serve_config([], env={"SDXL_MODEL_CONFIGS": "sdxl-base"})
    assert from_env.engine.model_configs == "sdxl-base"
    assert parse_serve_config([], env={}).engine.model_configs is None


@pytest.mark.parametrize(
    ("argv", "env", "named"),
    [
        (["--port", "http"], {}, "--port"),
        ([], {"SDXL_PORT": "http"}, "SDXL_PORT"),
        (["--port", "70000"], {}, "--port"),
        (["--resolutions", "1024"], {}, "--resolutions"),
        (["--policy", "random"], {}, "--policy"),
        (["--default-steps", "60"], {}, "--default-steps"),
        (["--slots-per-device", "0"], {}, "--slots-per-device"),
        ([], {"SDXL_LOG_PROMPTS": "maybe"}, "SDXL_LOG_PROMPTS"),
        (["--tls-cert-file", "/nonexistent.pem"], {}, "--tls-cert-file"),
        (["--auth-token-file", "/nonexistent"], {}, "--auth-token-file"),
        (["--log-level", "loud"], {}, "--log-level"),
    ],
)
def test_invalid_settings_are_rejected_naming_the_flag_or_variable(argv, env, named) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_serve_config(argv, env=env)
    assert str(caught.value).startswith(named)


def test_tls_needs_both_files(tmp_path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    with pytest.raises(ConfigError, match="--tls-cert-file and --tls-key-file"):
        parse_serve_config(["--tls-cert-file", str(cert)], env={})


def test_a_token_file_is_checked_before_start_by_the_reader_the_server_uses(tmp_path) -> None:
    token = tmp_path / "token"
    token.write_text("  abc123\nrotated-in\n")  # one token per line, as service/auth.py reads it
    config = parse_serve_config(["--auth-token-file", str(token)], env={})
    check_auth_token_file(config.auth_token_file)
    token.write_text("\n")
    with pytest.raises(ConfigError, match=r"^--auth-token-file: .* holds no token"):
        check_auth_token_file(config.auth_token_file)


def _help_of(option_flag: str) -> str:
    parser = argparse.ArgumentParser(prog="sdxl-server serve")
    add_serve_arguments(parser)
    for action in parser._actions:
        if option_flag in action.option_strings:
            return str(action.help)
    raise AssertionError(f"{option_flag} is not an option")


def _declared_default(field: str) -> object:
    defaults = ServerConfig()
    return getattr(defaults.engine if hasattr(defaults.engine, field) else defaults, field)


def test_every_option_is_named_after_its_field_and_the_environment_after_the_option() -> None:
    fields = [option.field for option in OPTIONS]
    assert len(fields) == len(set(fields))  # no server setting shadows an engine setting
    for option in OPTIONS:
        assert option.flag == "--" + option.field.replace("_", "-")
        assert option.env == "SDXL_" + option.field.upper()
        assert f"(env {option.env})" in _help_of(option.flag)


@pytest.mark.parametrize("option", OPTIONS, ids=lambda option: option.flag)
def test_the_default_shown_in_help_is_the_dataclass_default(option) -> None:
    shown = re.search(r"\[([^\]]*)\] \(env ", _help_of(option.flag))
    declared = _declared_default(option.field)
    if option.field == "resolutions":  # depends on the model: every case is shown
        assert shown is not None and shown.group(1).startswith("1024x1024; ")
        assert "64x64,128x128 for the tiny model" in shown.group(1)
        assert declared == option.parse("64x64,128x128")  # the default model is the tiny one
    elif option.setting.shown_default is not None:  # a None default that means something, or a word
        assert shown is not None and shown.group(1) == option.setting.shown_default
        assert declared is None or option.parse(shown.group(1)) == declared  # e.g. "auto" for AUTO
    elif declared is None:
        assert shown is None  # nothing to show
    else:
        # What --help shows, given back as the flag's text, is the default itself.
        assert shown is not None and option.parse(shown.group(1)) == declared


# One value the engine refuses for each engine setting that a flag reaches; a new engine setting must
# add its own (or say it takes any text), so that no flag can reach the engine unchecked.
_REFUSED_ENGINE_VALUES = {
    "model": "",
    "resolutions": "1001x1001",
    "slots_per_device": "0",
    "max_decode_batch": "0",
    "max_queue": "0",
    "policy": "random",
    "dtype": "float8",
    "compilation_cache_dir": None,  # any path
    "tiny_model_dir": None,  # any path
    "model_configs": None,  # any folder or architecture name (checked before start, not here)
    "max_steps": "0",
    "default_steps": "51",
    "max_images_per_request": "0",
    "steps_per_dispatch": "0",
    "decode_hold_steps": "-1",
    "memory_fraction": "1.5",
    "attention": "fast",
    "default_guidance_scale": "31",
    "default_sampler": "heun",
    "default_timestep_spacing": "karras",
    "png_compression": "10",
    "prompt_cache_entries": "-1",
    "prompt_cache_mib": "-1",
    "fuse_lora": "/no/such/adapter.safetensors:0.5",
    "lora_dir": "/no/such/lora/folder",
    "max_loras_per_request": "-1",
    "lora_places": "0",
    "lora_max_rank": "0",
    "engine_per_device": None,  # a switch: the flag takes no value (its variable is parsed as a boolean)
}


def test_every_engine_setting_a_flag_reaches_is_refused_naming_the_flag() -> None:
    engine_options = [option for option in OPTIONS if option.owner is EngineConfig]
    assert {option.field for option in engine_options} == set(_REFUSED_ENGINE_VALUES)
    assert {f.name for f in dataclasses.fields(ServerConfig)} & set(_REFUSED_ENGINE_VALUES) == set()
    for option in engine_options:
        value = _REFUSED_ENGINE_VALUES[option.field]
        if value is None:
            continue
        with pytest.raises(ConfigError) as caught:
            parse_serve_config([option.flag, value], env={})
        assert str(caught.value).startswith(f"{option.flag}: "), str(caught.value)
        if value:  # (an empty variable means unset)
            with pytest.raises(ConfigError) as from_env:  # the environment's value meets the same check
                parse_serve_config([], env={option.env: value})
            assert str(from_env.value) == str(caught.value)


def test_a_models_recipe_is_set_by_flags_and_the_environment() -> None:
    config = parse_serve_config(
        ["--default-sampler", "lcm", "--default-steps", "4", "--default-guidance-scale", "0"],
        env={"SDXL_DEFAULT_TIMESTEP_SPACING": "trailing"},
    )
    engine = config.engine
    assert (engine.default_sampler, engine.default_steps, engine.default_guidance_scale) == ("lcm", 4, 0.0)
    assert engine.default_timestep_spacing == "trailing"
