"""ServerConfig from flags and SDXL_* environment variables: precedence, defaults, and clear errors."""

from __future__ import annotations

import pytest
from sdxl_server.server_settings import ConfigError, parse_serve_config
from sdxl_server.engine.api import Resolution


def test_defaults_serve_the_tiny_model_on_the_contract_ports() -> None:
    config = parse_serve_config([], env={})
    assert (config.model, config.port, config.metrics_port, config.host) == ("tiny", 50051, 8000, "0.0.0.0")
    assert (config.max_steps, config.default_steps, config.max_images_per_request) == (50, 30, 4)
    assert config.drain_seconds == 60 and config.max_connection_age_seconds == 10
    assert not config.log_prompts and config.auth_token_file is None and not config.tls_enabled


def test_real_models_default_to_1024_and_the_first_resolution_is_the_default() -> None:
    assert parse_serve_config(["--model", "/models/sdxl"], env={}).resolutions == (Resolution(1024, 1024),)
    config = parse_serve_config(["--resolutions", "1152x896,1024x1024"], env={})
    assert config.resolutions == (Resolution(1152, 896), Resolution(1024, 1024))


def test_environment_fills_in_and_flags_win() -> None:
    env = {"SDXL_PORT": "6000", "SDXL_MAX_QUEUE": "7", "SDXL_POLICY": "static", "SDXL_LOG_PROMPTS": "1"}
    config = parse_serve_config(["--port", "7000"], env=env)
    assert config.port == 7000  # flag over env
    assert (config.max_queue, config.policy, config.log_prompts) == (7, "static", True)
    assert parse_serve_config(["--log-prompts"], env={}).log_prompts


def test_engine_config_carries_the_engine_settings() -> None:
    env = {"SDXL_COMPILATION_CACHE_DIR": "/cache", "SDXL_TINY_MODEL_DIR": "/tiny"}
    engine = parse_serve_config(
        ["--slots-per-device", "2", "--steps-per-dispatch", "4"], env=env
    ).engine_config()
    assert (engine.slots_per_device, engine.steps_per_dispatch) == (2, 4)
    assert (engine.compilation_cache_dir, engine.tiny_model_dir) == ("/cache", "/tiny")


def test_model_configs_reach_the_engine_from_the_flag_or_the_environment() -> None:
    flags = ["--model", "/models/finetune.safetensors", "--model-configs", "/models/configs"]
    assert parse_serve_config(flags, env={}).engine_config().model_configs == "/models/configs"
    from_env = parse_serve_config([], env={"SDXL_MODEL_CONFIGS": "sdxl-base"})
    assert from_env.engine_config().model_configs == "sdxl-base"
    assert parse_serve_config([], env={}).engine_config().model_configs is None


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
        parse_serve_config(argv, env=env).engine_config()
    assert str(caught.value).startswith(named)


def test_tls_needs_both_files(tmp_path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    with pytest.raises(ConfigError, match="--tls-cert-file and --tls-key-file"):
        parse_serve_config(["--tls-cert-file", str(cert)], env={})


def test_auth_token_is_read_from_its_file_and_must_not_be_empty(tmp_path) -> None:
    token = tmp_path / "token"
    token.write_text("  abc123\n")
    assert parse_serve_config(["--auth-token-file", str(token)], env={}).read_auth_token() == "abc123"
    token.write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        parse_serve_config(["--auth-token-file", str(token)], env={}).read_auth_token()
