"""Where the engine loads its model from: a directory, a hub id, the tiny random model or the demo model."""

from __future__ import annotations

from pathlib import Path

TINY = "tiny"
DEMO = "demo"  # the trained demo SDXL shipped inside the package (sdxl_server/engine/models/demo)
# Used when the caller gives no tiny-model directory (main.py passes $SDXL_TINY_MODEL_DIR).
DEFAULT_TINY_MODEL_DIR = "~/.cache/sdxl-serve/tiny-sdxl"


def resolve_model(spec: str, tiny_model_dir: str | None = None) -> str:
    """Returns what `load_model` should load for `spec`.

    "tiny" builds the tiny random SDXL on first use into `tiny_model_dir` and returns that directory; an
    existing directory or file (a single-file checkpoint) is returned as an absolute path; anything
    else is taken as a hub id.
    "demo" is the directory of the shipped demo model.
    """
    if spec == DEMO:
        from sdxl_server.engine.models import DEMO_MODEL_DIR

        return str(DEMO_MODEL_DIR)
    if spec == TINY:
        from sdxl_server.engine.models.tiny_model import ensure_tiny_model

        directory = Path(tiny_model_dir or DEFAULT_TINY_MODEL_DIR).expanduser()
        return str(ensure_tiny_model(directory))
    path = Path(spec).expanduser()
    if path.is_dir() or path.is_file():
        return str(path.resolve())
    return spec
