"""The shipped demo model: where `--model demo` points, its checksums, and the world it was trained on."""

from __future__ import annotations

import hashlib
import json
import pathlib

from sdxl_server.engine.api import Resolution
from sdxl_server.engine.models import shapes
from sdxl_server.engine.models.model_source import resolve_model
from sdxl_server.server_settings import parse_serve_config


def _model_dir() -> pathlib.Path:
    return pathlib.Path(resolve_model("demo"))


def test_demo_resolves_to_the_shipped_diffusers_model() -> None:
    directory = _model_dir()
    index = json.loads((directory / "model_index.json").read_text())
    assert index["_class_name"] == "FlaxStableDiffusionXLPipeline"
    assert {"text_encoder", "text_encoder_2", "unet", "vae", "scheduler"} <= set(index)


def test_every_shipped_file_matches_its_sha256() -> None:
    directory = _model_dir()
    listed = {}
    for line in (directory / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ", 1)
        listed[name] = digest
    # TRAINING.md is the notes on how the files were made, written after the run; the rest is its output.
    files = {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()}
    files -= {"SHA256SUMS", "TRAINING.md"}
    assert set(listed) == files
    for name, digest in listed.items():
        assert hashlib.sha256((directory / name).read_bytes()).hexdigest() == digest, name


def test_the_model_was_trained_on_the_world_the_tests_judge() -> None:
    world = json.loads((_model_dir() / "world.json").read_text())
    assert {tuple(pair) for pair in world["held_back"]} == shapes.HELD_BACK
    assert {name: tuple(rgb) for name, rgb in world["colours"].items()} == shapes.COLOURS
    assert tuple(world["shapes"]) == shapes.SHAPES
    assert world["command"].startswith("python tools/train_demo_model.py")


def test_demo_serves_its_native_resolution_by_default() -> None:
    assert parse_serve_config(["--model", "demo"], env={}).engine.resolutions == (Resolution(64, 64),)
