"""`--fuse-lora FILE[:SCALE]`: repeatable flag, comma-separated variable, checked before the model loads."""

from __future__ import annotations

import pytest
from sdxl_server.engine.adapters.fuse_spec import FusedLora, parse_fused_loras
from sdxl_server.server_settings import ConfigError, parse_serve_config


def test_the_flag_repeats_and_each_scale_defaults_to_one(tmp_path) -> None:
    first, second = tmp_path / "lightning.safetensors", tmp_path / "style.safetensors"
    first.write_bytes(b"")
    second.write_bytes(b"")
    config = parse_serve_config(["--fuse-lora", f"{first}:0.5", "--fuse-lora", str(second)], env={})
    assert config.engine.fuse_lora == (FusedLora(str(first), 0.5), FusedLora(str(second), 1.0))
    from_env = parse_serve_config([], env={"SDXL_FUSE_LORA": f"{first}:0.5,{second}"})
    assert from_env.engine.fuse_lora == config.engine.fuse_lora
    assert parse_serve_config([], env={}).engine.fuse_lora == ()


def test_a_colon_that_is_not_a_scale_stays_in_the_path() -> None:
    assert parse_fused_loras("dir:v2/a.safetensors") == (FusedLora("dir:v2/a.safetensors", 1.0),)
    assert parse_fused_loras("dir:v2/a.safetensors:-0.25") == (FusedLora("dir:v2/a.safetensors", -0.25),)


def test_a_missing_file_or_a_scale_that_is_not_finite_names_the_flag(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"^--fuse-lora: .*missing.safetensors is not a file"):
        parse_serve_config(["--fuse-lora", str(tmp_path / "missing.safetensors")], env={})
    with pytest.raises(ConfigError, match=r"^--fuse-lora: .*finite"):
        parse_serve_config(["--fuse-lora", f"{tmp_path / 'a.safetensors'}:nan"], env={})
