"""Compiled programs saved whole in the compilation cache directory, so that a warm start skips tracing.

The persistent XLA cache (compile_cache.py) turns a restart's compile into a load, but JAX still traces and
lowers every program first: Python walking the whole UNet, as long as the model load itself with the
bench model. Here each freshly compiled program is also serialized, under a key of everything it depends
on (the program, its argument shapes and shardings, the model's modules and dtype, the devices, library
versions and the source of the modules that build programs); a later start deserializes it without
tracing. Only programs that XLA really compiled in this process are saved: re-serializing an executable
that was itself loaded from XLA's cache loses kernels on the CPU backend, so there a program missing here
is compiled with XLA's cache unread (xla_cache.fresh_compiles), even where XLA's cache holds it (sources
changed, HLO not): the first start under a key pays a compile, every later one skips tracing (with the
tiny model under a 0.3-CPU quota, ~6 of ~11 CPU s of the engine's start). Any failure to read or write
falls back to the normal path, so this cache can only save time, never change a result. Like XLA's own
cache, loading runs what the directory holds: it must be writable only by the server.

The key has named parts (`key_parts`): the model (its modules' settings and configs, dtype included), the
attention implementation, the topology (platform, device kind, each device's id and coordinates), the
compiler flags (XLA_FLAGS and LIBTPU_INIT_ARGS), the JAX settings that change a traced program (matmul
precision, x64, the PRNG), the versions of jax, jaxlib, libtpu and the model
libraries, and the program-building sources. Each saved
program has a small JSON of its parts beside it (`sdxl-program-keys/`), so that a start that misses a
program it expected can say which part differed. `sdxl-server compile --cache-dir` fills the same layout
ahead of time, for a TPU topology from a machine without one (engine/device/ahead_of_time.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
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

# libtpu is absent off TPU ("?"): a key made with it never matches one made without it.
_LIBRARIES = ("jax", "jaxlib", "libtpu", "flax", "diffusers", "transformers")
_KEYS_DIRECTORY = "sdxl-program-keys"
# The modules whose source shapes a compiled program, named by module so that moving a file cannot break
# start-up (a missing module fails the import at once, loudly, instead of a file read at the first save).
_SOURCE_MODULES = (
    "sdxl_server.engine.device.programs",
    "sdxl_server.engine.device.denoise",
    "sdxl_server.engine.batching.buckets",
    "sdxl_server.engine.models.loader",
    "sdxl_server.engine.device.program_cache",
    "sdxl_server.engine.device.attention",
    "sdxl_server.engine.device.memory_plan",  # its probes' figures are recorded under this key too
)
# Compiler flags change what a program compiles to, as JAX's own cache key counts them. Not the ones that
# only shape the host: the simulated CPU device count is already in the topology part (and an
# ahead-of-time builder sets it where a pod does not), and dump options write files beside a compile.
_FLAG_VARIABLES = ("XLA_FLAGS", "LIBTPU_INIT_ARGS")
_FLAGS_OUTSIDE_THE_KEY = ("--xla_force_host_platform_device_count", "--xla_dump")
# JAX settings that change what tracing produces (each also set by an environment variable, e.g.
# JAX_DEFAULT_MATMUL_PRECISION). JAX's cache sees them in the HLO; a saved program skips tracing, so its key
# must name them.
_TRACING_SETTINGS = (
    "jax_default_matmul_precision",
    "jax_enable_x64",
    "jax_default_prng_impl",
    "jax_threefry_partitionable",
)


class ProgramCache:
    def __init__(
        self, directory: str | None, context: str, devices: list[Any], attention: str = "xla"
    ) -> None:
        """`directory`: the compilation cache directory (local paths only; None disables this cache).
        `context`: what every program depends on besides its arguments (model modules, dtype).
        `devices`: the mesh's devices, in mesh order: programs are loaded onto exactly these (attached
        devices, or a described TPU topology's when compiling ahead of time).
        `attention`: the attention implementation the programs were built with."""
        local = directory is not None and "://" not in directory
        root = Path(directory) if local and directory else None
        self._directory = root / "sdxl-programs" if root else None
        self._keys = root / _KEYS_DIRECTORY if root else None
        self._devices = devices
        self.parts = key_parts(context, devices, attention)
        self._context = "|".join(f"{part}={value}" for part, value in self.parts.items())
        self.hits = 0  # programs loaded
        self.misses = 0  # programs compiled because none was saved under their key
        self.records_found = 0  # recorded figures used instead of compiling a probe (`measured`)
        self.records_missed = 0

    def get_or_compile(self, name: str, signature: Any, compile_program: Callable[[], Any]) -> Any:
        """The compiled program `name` for arguments like `signature` (abstract or concrete arrays)."""
        path = self._path(name, signature)
        if path is not None and not path.exists():
            self.misses += 1
            log.info(
                "program %s is not in the program cache: compiling it (%s)", name, self._why_missed(name)
            )
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
        if path is None:
            return compile_program()
        # On the CPU, a real compile even where XLA's cache holds the program (its sources changed, not its
        # HLO): only such an executable can be saved whole (xla_cache.fresh_compiles). This start pays a
        # compile instead of XLA's load, once per key; every later start skips tracing. Accelerators keep
        # XLA's load (a real SDXL compile there takes minutes), and save only what XLA compiled.
        xla_hits_before = compile_cache.hits()
        fresh = self._devices[0].platform == "cpu"
        with compile_cache.fresh_compiles() if fresh else contextlib.nullcontext():
            program = compile_program()
        if compile_cache.hits() == xla_hits_before:
            self._save(path, program)
        return program

    def measured(self, name: str, signature: Any, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Figures measured from a program (the memory plan's probes: their temporaries), recorded as JSON
        under the same key a program of that name and signature would have: a start that finds them
        (e.g. written by `sdxl-server compile --cache-dir`) does not compile the probe at all."""
        path = self._path(name, signature)
        record = path.with_suffix(".json") if path is not None else None
        if record is not None and record.exists():
            try:
                figures = json.loads(record.read_text())["figures"]
                self.records_found += 1
                return dict(figures)
            except (OSError, ValueError, KeyError, TypeError) as error:
                log.warning(
                    "could not read the recorded figures %s (%s); measuring again",
                    record.name,
                    error,
                )
        if record is not None:
            self.records_missed += 1
            log.info(
                "program %s is not in the program cache: compiling it (%s)", name, self._why_missed(name)
            )
        figures = measure()
        if record is not None:
            self._write_atomically(record, (json.dumps({"figures": figures}) + "\n").encode())
            self._save_key(record)
        return figures

    def store(self, name: str, signature: Any, program: Any) -> None:
        """Saves a program compiled elsewhere (ahead of time) under the key a start would look it up by."""
        path = self._path(name, signature)
        if path is not None:
            self._save(path, program)

    def _path(self, name: str, signature: Any) -> Path | None:
        if self._directory is None:
            return None
        digest = hashlib.sha256(f"{self._context}|{name}|{_described(signature)}".encode()).hexdigest()
        return self._directory / f"{name}-{digest[:40]}.bin"

    def _why_missed(self, name: str) -> str:
        """Which key parts differ from the saved programs of the same name (they were built for another
        model, attention, topology or library version), or that none of that name was saved."""
        saved = sorted(self._keys.glob(f"{name}-*.json")) if self._keys and self._keys.is_dir() else []
        differences = set()
        for key_file in saved:
            try:
                theirs = json.loads(key_file.read_text())["parts"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            differing = [part for part in self.parts if theirs.get(part) != self.parts[part]]
            differences.add(", ".join(differing) or "argument shapes")
            if not differing:
                break
        if not differences:
            return "none of that name saved"
        return "saved ones differ in: " + " | ".join(sorted(differences))

    def _save(self, path: Path, program: Any) -> None:
        try:
            from jax.experimental.serialize_executable import serialize

            self._write_atomically(path, pickle.dumps(serialize(program)))
            self._save_key(path)
        except Exception as error:
            log.warning("could not save the compiled program %s: %s", path.name, error)

    @staticmethod
    def _write_atomically(path: Path, blob: bytes) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
            with os.fdopen(handle, "wb") as out:
                out.write(blob)
            os.replace(temporary, path)  # atomic: readers never see half a file
        except OSError as error:
            log.warning("could not save %s: %s", path.name, error)

    def _save_key(self, path: Path) -> None:
        """The key's named parts beside a saved program or record, for `_why_missed`."""
        if self._keys is None:
            return
        try:
            self._keys.mkdir(parents=True, exist_ok=True)
            key = {"name": path.name, "parts": self.parts}
            (self._keys / f"{path.stem}.json").write_text(json.dumps(key, indent=1) + "\n")
        except OSError as error:
            log.warning("could not save the key of %s: %s", path.name, error)


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


def key_parts(context: str, devices: list[Any], attention: str) -> dict[str, str]:
    """Everything a program depends on besides its arguments, by name (long values as digests)."""
    parts = {
        "model": _digest(context),  # modules' settings and configs, parameter dtype
        "attention": attention,
        "topology": describe_topology(devices),
        "compiler_flags": compiler_flags(),
        "jax_settings": " ".join(f"{name}={getattr(jax.config, name)}" for name in _TRACING_SETTINGS),
    }
    for library in _LIBRARIES:
        try:
            parts[library] = metadata.version(library)
        except metadata.PackageNotFoundError:
            parts[library] = "?"
    parts["sources"] = _digest(b"".join(_module_source(name) for name in _SOURCE_MODULES))
    return parts


def compiler_flags() -> str:
    """This process's compiler flags that shape a program, sorted ("none" without any)."""
    flags = [flag for variable in _FLAG_VARIABLES for flag in os.environ.get(variable, "").split()]
    return " ".join(sorted(f for f in flags if not f.startswith(_FLAGS_OUTSIDE_THE_KEY))) or "none"


def describe_topology(devices: list[Any]) -> str:
    """Platform, device kind and each device's id (and coordinates on a TPU), in mesh order: what an
    executable is compiled for. A v5e:2x2 described on a CPU host reads as the pod's attached chips do."""
    first = devices[0]
    placed = [
        f"{d.id}@{','.join(str(c) for c in d.coords)}"
        if getattr(d, "coords", None) is not None
        else str(d.id)
        for d in devices
    ]
    return f"{first.platform}:{first.device_kind}:{len(devices)}:{' '.join(placed)}"


def _described(signature: Any) -> str:
    described = jax.tree_util.tree_map(
        lambda x: (tuple(x.shape), str(x.dtype), str(getattr(x, "sharding", None))), signature
    )
    return str(described)


def _digest(value: str | bytes) -> str:
    data = value.encode() if isinstance(value, str) else value
    return hashlib.sha256(data).hexdigest()[:16]


def _module_source(name: str) -> bytes:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ImportError(f"the program cache's key names {name}, which does not exist")
    return Path(spec.origin).read_bytes()
