"""Compiled programs saved whole in the compilation cache directory, so that a warm start skips tracing.

The persistent XLA cache (compile_cache.py) turns a restart's compile into a load, but JAX still traces and
lowers every program first: Python walking the whole UNet, as long as the model load itself with the
bench model. Here each freshly compiled program is also serialized, under a key of everything it depends
on (the program, its argument shapes and shardings, the model's modules and dtype, the devices, library
versions and the source of the modules that build programs); a later start deserializes it without
tracing. Only programs that XLA really compiled in this process are saved: re-serializing an executable
that was itself loaded from XLA's cache loses kernels on the CPU backend. Any failure to read or write
falls back to the normal path, so this cache can only save time, never change a result. Like XLA's own
cache, loading runs what the directory holds: it must be writable only by the server.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import pickle
import tempfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import jax

from sdxl_server.engine.device import xla_cache as compile_cache

log = logging.getLogger(__name__)

_LIBRARIES = ("jax", "jaxlib", "flax", "diffusers", "transformers")
# The modules whose source shapes a compiled program, named by module so that moving a file cannot break
# start-up (a missing module fails the import at once, loudly, instead of a file read at the first save).
_SOURCE_MODULES = (
    "sdxl_server.engine.device.programs",
    "sdxl_server.engine.device.denoise",
    "sdxl_server.engine.batching.buckets",
    "sdxl_server.engine.models.loader",
    "sdxl_server.engine.device.program_cache",
)


class ProgramCache:
    def __init__(self, directory: str | None, context: str, devices: list[Any]) -> None:
        """`directory`: the compilation cache directory (local paths only; None disables this cache).
        `context`: what every program depends on besides its arguments (model modules, dtype).
        `devices`: the mesh's devices, in mesh order: programs are loaded onto exactly these."""
        local = directory is not None and "://" not in directory
        self._directory = Path(directory) / "sdxl-programs" if local and directory else None
        self._devices = devices
        device_list = repr([(d.id, d.device_kind) for d in devices])
        self._context = f"{context}|{device_list}{_environment()}"
        self.hits = 0

    def get_or_compile(self, name: str, signature: Any, compile_program: Callable[[], Any]) -> Any:
        """The compiled program `name` for arguments like `signature` (abstract or concrete arrays)."""
        path = self._path(name, signature)
        if path is not None and path.exists():
            try:
                from jax.experimental.serialize_executable import deserialize_and_load

                payload, in_tree, out_tree = pickle.loads(path.read_bytes())
                # Without execution_devices it would load onto every local device, whatever the mesh.
                program = deserialize_and_load(payload, in_tree, out_tree, execution_devices=self._devices)
                self.hits += 1
                return program
            except Exception as error:  # stale or unreadable: compile instead
                log.warning("could not load the saved program %s (%s); compiling it", path.name, error)
        xla_hits_before = compile_cache.hits()
        program = compile_program()
        if path is not None and compile_cache.hits() == xla_hits_before:
            self._save(path, program)
        return program

    def _path(self, name: str, signature: Any) -> Path | None:
        if self._directory is None:
            return None
        described = jax.tree_util.tree_map(
            lambda x: (tuple(x.shape), str(x.dtype), str(getattr(x, "sharding", None))), signature
        )
        digest = hashlib.sha256(f"{self._context}|{name}|{described}".encode()).hexdigest()
        return self._directory / f"{name}-{digest[:40]}.bin"

    def _save(self, path: Path, program: Any) -> None:
        try:
            from jax.experimental.serialize_executable import serialize

            blob = pickle.dumps(serialize(program))
            path.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
            with os.fdopen(handle, "wb") as out:
                out.write(blob)
            os.replace(temporary, path)  # atomic: readers never see half a program
        except Exception as error:
            log.warning("could not save the compiled program %s: %s", path.name, error)


def architecture(pipeline: Any, dtype_name: str) -> str:
    """The context of a model's programs: its modules (Flax reprs list every setting, dtype and
    split_head_dim included), the text encoders' configs and the parameter dtype."""
    parts = [
        repr(pipeline.unet),
        repr(pipeline.vae),
        pipeline.text_encoder.config.to_json_string(),
        pipeline.text_encoder_2.config.to_json_string(),
        dtype_name,
    ]
    return "|".join(parts)


def _environment() -> str:
    versions = []
    for library in _LIBRARIES:
        try:
            versions.append(f"{library}={metadata.version(library)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{library}=?")
    sources = hashlib.sha256(b"".join(_module_source(name) for name in _SOURCE_MODULES)).hexdigest()
    return f"|{','.join(versions)}|{jax.default_backend()}|{sources}"


def _module_source(name: str) -> bytes:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ImportError(f"the program cache's key names {name}, which does not exist")
    return Path(spec.origin).read_bytes()
