"""Every program the server would run, compiled for a TPU topology that is not attached (or for this CPU).

With libtpu installed, JAX describes a TPU slice without one (`jax.experimental.topologies`): a mesh over
its devices, parameters and state as shapes with shardings (`jax.ShapeDtypeStruct`), then `build_programs`
compiles exactly what a pod of that slice compiles at start. No weights are needed: `sdxl-base` is built
from its published configs alone, other models are loaded and only their shapes kept.

Each compiled program's `memory_analysis()` gives its per-device HBM (arguments, outputs, temporaries),
`cost_analysis()` its FLOPs and bytes accessed; a roofline bounds its time from the chip's peak rates.
XLA's cost analysis counts a loop body once, not once per iteration: the figures of a program with a
loop (a step program with k > 1 steps per dispatch, the seed's 20-step generate) cover one iteration.

`cache_dir` writes the executables into the engine's program cache layout (program_cache.py), keyed as
a pod of that topology keys them: the pod loads them instead of compiling.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sdxl_server.engine.adapters.adapter_directory import bank_layouts
from sdxl_server.engine.adapters.layer_names import layer_names_of
from sdxl_server.engine.api import Resolution
from sdxl_server.engine.batching.buckets import bucket_sizes
from sdxl_server.engine.device.attention import Kernel, attention_flops, attention_kernel, flash_kernel
from sdxl_server.engine.device.memory_plan import DeviceMemory, fit_and_describe
from sdxl_server.engine.device.mesh import DATA_AXIS
from sdxl_server.engine.device.program_cache import ProgramCache, architecture
from sdxl_server.engine.device.programs import ENCODE_ROWS, build_programs, is_abstract
from sdxl_server.engine.models.loader import PARAM_GROUPS, LoadedModel, load_model, resolve_dtype
from sdxl_server.engine.settings import AUTO, EngineConfig

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_flops: float  # per second, the dtype the programs compute in (bf16 on TPU)
    memory_bytes_per_second: float
    memory_bytes: int  # HBM per chip (per device)


# Google's published v5e figures: 197 TFLOP/s bf16, 819 GB/s HBM bandwidth; of the 16 GiB of HBM per chip
# libtpu gives programs 15.75 GiB (its own out-of-memory error when compiling for v5e here: "exceeds
# available HBM (15.75G)"), the figure a pod's memory plan reads, so that `auto` decides the same here.
V5E = Chip("TPU v5e", 197e12, 819e9, int(15.75 * GIB))
# name -> the chips a single host of that slice holds (x, y, z): v5e's single-host shapes.
TPU_TOPOLOGIES = {"v5e:1x1": (1, 1, 1), "v5e:2x2": (2, 2, 1), "v5e:2x4": (2, 4, 1)}
CPU_TOPOLOGY = "cpu"  # this process's CPU devices (XLA_FLAGS may simulate several): the CI proxy
TOPOLOGIES = (*TPU_TOPOLOGIES, CPU_TOPOLOGY)


def allow_libtpu_without_a_tpu() -> None:
    """Settings for a process that only compiles for TPU, set before JAX loads libtpu: several such
    processes may run at once (libtpu otherwise takes a host-wide lock, meant for processes that own
    the chips), and none asks the GCE metadata server for a TPU it does not have."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")


class TopologyUnavailable(RuntimeError):
    """The topology cannot be described here (libtpu missing): the message says how to get it."""


def topology_devices(
    name: str, max_devices: int | None = None, first_device: int = 0
) -> tuple[list[Any], Chip]:
    """The devices of topology `name` in mesh order (as a pod of that slice lists its local devices),
    from `first_device` on, and the chip's rates. The CPU "chip" takes this host's memory and nominal
    rates (no roofline meaning)."""
    if name == CPU_TOPOLOGY:
        devices = jax.local_devices(backend="cpu")[first_device:][:max_devices]
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return devices, Chip("CPU (this host)", 1e12, 50e9, memory)
    if name not in TPU_TOPOLOGIES:
        raise ValueError(f"--topology: {name!r} is not one of {', '.join(TOPOLOGIES)}")
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        raise TopologyUnavailable(
            f"--topology {name}: libtpu is not installed in this environment. `make tpu-aot ARGS=...` "
            "installs it into .venv-tpu (pip install 'jax[tpu]==<this jax version>')"
        )
    try:
        from jax.experimental import topologies

        described = topologies.get_topology_desc(
            platform="tpu",
            topology_name=name,
            chip_config_name="default",
            chips_per_host_bounds=TPU_TOPOLOGIES[name],
            num_slices=1,
        )
    except Exception as error:
        raise TopologyUnavailable(f"--topology {name}: libtpu cannot describe it here: {error}") from None
    return list(described.devices)[first_device:][:max_devices], V5E


def abstract_model(
    spec: str,
    dtype_name: str,
    platform: str,
    model_configs: str | None = None,
    tiny_model_dir: str | None = None,
) -> LoadedModel:
    """The model as the server on `platform` would hold it, its parameters as shapes only.

    An architecture name (`sdxl-base`) builds its modules from the published configs, with no weights;
    anything else (`tiny`, `demo`, a directory, a checkpoint) is loaded as `serve` loads it and only the
    parameter shapes are kept, so that the modules and the key are exactly the server's."""
    from sdxl_server.engine.models.architectures import ARCHITECTURES

    if spec in ARCHITECTURES:
        return _model_from_architecture(
            spec, resolve_dtype(dtype_name, platform), split_head_dim=platform == "tpu"
        )
    from sdxl_server.engine.models.model_source import resolve_model

    model = load_model(resolve_model(spec, tiny_model_dir), dtype_name, model_configs, platform=platform)
    model.params = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), model.params)
    return model


def _model_from_architecture(name: str, dtype: Any, *, split_head_dim: bool) -> LoadedModel:
    from diffusers import FlaxEulerDiscreteScheduler, FlaxStableDiffusionXLPipeline
    from flax.core.frozen_dict import unfreeze

    from sdxl_server.engine.models.architectures import architecture_named
    from sdxl_server.engine.models.checkpoints.assemble import build_modules
    from sdxl_server.engine.models.checkpoints.component_configs import resolve_configs

    configs = resolve_configs(name)
    unet, vae, text_encoder, text_encoder_2 = build_modules(
        configs, dtype=dtype, split_head_dim=split_head_dim
    )
    rng = jax.random.PRNGKey(0)
    tokens = int(architecture_named(name).TOKENIZER["model_max_length"])
    shapes = {
        "unet": jax.eval_shape(unet.init_weights, rng),
        "vae": jax.eval_shape(vae.init_weights, rng),
        "text_encoder": jax.eval_shape(lambda k: text_encoder.init_weights(k, (1, tokens)), rng),
        "text_encoder_2": jax.eval_shape(lambda k: text_encoder_2.init_weights(k, (1, tokens)), rng),
    }
    # Plain dicts of the serving dtype, as the loader's cast leaves every group.
    params = {
        group: jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), unfreeze(shapes[group]))
        for group in PARAM_GROUPS
    }
    scheduler: Any = FlaxEulerDiscreteScheduler.from_config(
        {k: v for k, v in configs.configs["scheduler"].items() if not k.startswith("_")}
    )
    pipeline: Any = FlaxStableDiffusionXLPipeline(
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        vae=vae,
        tokenizer=None,  # programs take token ids; the vocabulary is not needed to compile
        tokenizer_2=None,
        unet=unet,
        scheduler=scheduler,
        dtype=dtype,
    )
    return LoadedModel(
        pipeline=pipeline,
        params=params,
        scheduler_state=scheduler.create_state(),
        dtype=dtype,
        max_tokens=tokens,
        vae_scale_factor=int(pipeline.vae_scale_factor),
        latent_channels=int(unet.config.in_channels),
    )


@dataclasses.dataclass
class ProgramReport:
    """One compiled program on one device (an SPMD program's per-device share)."""

    name: str
    hbm_bytes: int  # arguments + outputs - aliased + temporaries + code
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    code_bytes: int
    flops: float
    bytes_accessed: float
    roofline_seconds: float  # max(FLOPs / peak, bytes / bandwidth)
    compile_seconds: float
    images: int = 0  # step programs: guided images advanced per device per iteration (rows / 2)
    loop_iterations: int = 1  # steps per dispatch: the cost figures cover one iteration
    per_image_step_seconds: float | None = None  # step programs: roofline per guided image (2 rows)
    # Flash attention's FLOPs counted analytically from the traced shapes (0 with xla). XLA's own count
    # already includes them on TPU (the Pallas kernel declares a cost estimate); shown to say how much.
    attention_flops: float = 0.0

    @property
    def resident_extra_bytes(self) -> int:
        """What running it adds on top of the arrays that live between programs."""
        return self.hbm_bytes - self.argument_bytes


def report_of(name: str, compiled: Any, seconds: float, chip: Chip) -> ProgramReport:
    memory = compiled.memory_analysis()
    costs = compiled.cost_analysis()
    costs = costs[0] if isinstance(costs, list) else costs  # older JAX: one dict per module
    flops = float(costs.get("flops", 0.0))
    accessed = float(costs.get("bytes accessed", 0.0))
    arguments = int(memory.argument_size_in_bytes)
    outputs = int(memory.output_size_in_bytes)
    temp = int(memory.temp_size_in_bytes)
    code = int(memory.generated_code_size_in_bytes)
    hbm = arguments + outputs - int(memory.alias_size_in_bytes) + temp + code
    roofline = max(flops / chip.peak_flops, accessed / chip.memory_bytes_per_second)
    return ProgramReport(name, hbm, arguments, outputs, temp, code, flops, accessed, roofline, seconds)


def _step_shape(name: str) -> tuple[int, int] | None:
    """(k, rows) of a step program's name (programs.py: "step{k}x{rows}-{resolution}": k steps per
    dispatch of `rows` UNet rows per device), else None."""
    head = name.split("-", 1)[0]
    if not head.startswith("step"):
        return None
    k, rows = head[len("step") :].split("x")
    return int(k), int(rows)


@dataclasses.dataclass
class AheadOfTimeReport:
    topology: str
    chip: Chip
    devices: int
    model: str
    dtype: str
    attention: str
    resolutions: tuple[Resolution, ...]
    slots_per_device: int
    resident_bytes: int  # per device: parameters and every resolution's slot bank
    programs: list[ProgramReport]
    seed_programs: list[ProgramReport]
    selected: str | None = None  # the --programs pattern of a partial run (totals cover only those)
    max_decode_batch: int = 0  # images per decode call per device (the decode buckets stop there)
    memory_plan: str | None = None  # the memory plan's line, as a pod of this configuration logs it

    @property
    def total_hbm_bytes(self) -> int:
        """Per device at the worst moment: resident arrays, every program's code, and the largest
        temporaries and outputs of any one program (the step loop runs one program at a time)."""
        code = sum(p.code_bytes for p in self.programs)
        worst = max((p.resident_extra_bytes - p.code_bytes for p in self.programs), default=0)
        return self.resident_bytes + code + worst

    @property
    def fits(self) -> bool:
        return self.total_hbm_bytes <= self.chip.memory_bytes

    def as_json(self) -> dict[str, Any]:
        return {
            "topology": self.topology,
            "chip": self.chip.name,
            "devices": self.devices,
            "model": self.model,
            "dtype": self.dtype,
            "attention": self.attention,
            "resolutions": [str(r) for r in self.resolutions],
            "slots_per_device": self.slots_per_device,
            "max_decode_batch": self.max_decode_batch,
            "memory_plan": self.memory_plan,
            "device_hbm_bytes": self.chip.memory_bytes,
            "resident_bytes": self.resident_bytes,
            "total_hbm_bytes": self.total_hbm_bytes,
            "fits": self.fits,
            "partial": self.selected is not None,
            "programs_selected": self.selected,
            "peak_flops": self.chip.peak_flops,
            "memory_bytes_per_second": self.chip.memory_bytes_per_second,
            "programs": [dataclasses.asdict(p) for p in self.programs],
            "seed_programs": [dataclasses.asdict(p) for p in self.seed_programs],
        }


class _WritingCache(ProgramCache):
    """The program cache as `compile --cache-dir` fills it: always compiles (an executable for a TPU
    cannot be loaded on this host to check it) and saves under the key a pod of the topology computes.
    Programs `selected` refuses are not compiled at all (None): a partial run, for measuring a few."""

    def __init__(self, *args: Any, selected: Callable[[str], bool], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._selected = selected

    def get_or_compile(self, name: str, signature: Any, compile_program: Callable[[], Any]) -> Any:
        if not self._selected(name):
            return None
        program = compile_program()
        self.store(name, signature, program)
        return program


def compile_for_topology(
    topology: str,
    model: LoadedModel,
    model_name: str,
    resolutions: tuple[Resolution, ...],
    slots_per_device: int,
    max_steps: int,
    steps_per_dispatch: int,
    attention: str = "xla",  # xla or flash, as the server resolves it for the topology's platform
    cache_dir: str | None = None,
    seed_steps: int | None = None,
    max_devices: int | None = None,
    first_device: int = 0,
    progress: Callable[[ProgramReport], None] | None = None,
    programs: str | None = None,
    seed_images: int | None = None,
    max_decode_batch: int = AUTO,
    memory_fraction: float = 0.9,
    lora_places: int = 0,
    lora_max_rank: int = EngineConfig.lora_max_rank,
    loras_per_request: int = EngineConfig.max_loras_per_request,
) -> AheadOfTimeReport:
    """Compiles every program of the server's configuration for `topology` (only those whose name
    matches the regular expression `programs`, when given: the report is then partial); with
    `seed_steps`, also the seed's per-chip generate (the Flax pipeline's, `seed_images` images per chip,
    default `slots_per_device`) per resolution.

    First the memory plan runs as a pod's start would, against the chip's memory: it resolves `auto`
    slots and decode batch, and with `cache_dir` its probes' figures are recorded where the pod's plan
    looks them up, so that the pod compiles nothing at all. A partial run skips it (unless its pattern
    selects `memory-probe-` or something is `auto`) and decodes up to every slot.

    `lora_places` > 0: a server with `--lora-dir` and that many `--lora-places` (of `lora_max_rank`, with
    `loras_per_request` adapters a slot): its adapter bank's step and encode programs too, and the banks
    counted as resident.

    `first_device` with `max_devices` 1: the programs of one engine of a server with an engine per device
    (engine/group/), which are bound to their chip and keyed by it."""
    devices, chip = topology_devices(topology, max_devices, first_device)
    mesh = Mesh(np.array(devices), (DATA_AXIS,))
    pattern = re.compile(programs) if programs else None
    cache = _WritingCache(
        cache_dir,  # None: nothing is written
        architecture(model.pipeline, model.dtype_name),
        devices,
        attention,
        selected=lambda name: pattern is None or pattern.search(name) is not None,
    )
    adapter_layouts = None
    if lora_places:
        adapter_layouts = bank_layouts(
            layer_names_of(model.params, model.pipeline.unet.config), lora_places, lora_max_rank
        )
    plan_line = None
    wants_plan = pattern is None or pattern.search("memory-probe-") is not None
    if wants_plan or AUTO in (slots_per_device, max_decode_batch):
        kind = "RAM" if topology == CPU_TOPOLOGY else "HBM"
        memory = DeviceMemory(chip.memory_bytes, f"{chip.memory_bytes / GIB:.1f} GiB of {chip.name} {kind}")
        config = EngineConfig(
            model=model_name,
            resolutions=resolutions,
            slots_per_device=slots_per_device,
            max_decode_batch=max_decode_batch,
            max_steps=max_steps,
            default_steps=max_steps,  # any value within the bounds: the plan does not read it
            attention=attention,
            memory_fraction=memory_fraction,
            lora_places=max(lora_places, 1),  # the plan counts them only with adapter_layouts
            lora_max_rank=lora_max_rank,
        )
        fitted, plan_line = fit_and_describe(
            config, model, devices, records=cache, memory=memory, adapter_layouts=adapter_layouts
        )
        slots_per_device, max_decode_batch = fitted.slots_per_device, fitted.max_decode_batch
    elif max_decode_batch == AUTO:
        max_decode_batch = slots_per_device
    reports: list[ProgramReport] = []
    attention_calls: list[int] = []  # FLOPs of each flash attention traced since the last program

    def observe(name: str, compiled: Any, seconds: float) -> None:
        if compiled is None:  # not selected
            return
        report = report_of(name, compiled, seconds, chip)
        report.attention_flops = float(sum(attention_calls))
        attention_calls.clear()
        shape = _step_shape(name)
        if shape is not None:
            report.loop_iterations, rows = shape
            # A guided image (SDXL's default) is two UNet rows; a lone unguided image runs one row.
            report.images = max(rows // 2, 1)
            report.per_image_step_seconds = report.roofline_seconds * 2 / rows
        reports.append(report)
        if progress is not None:
            progress(report)

    platform = devices[0].platform
    with attention_kernel(attention, platform, _counting(flash_kernel(platform), attention_calls)):
        built = build_programs(
            model,
            mesh,
            resolutions,
            slots_per_device,
            max_steps,
            bucket_sizes(steps_per_dispatch),
            cache,
            on_compiled=observe,
            decode_batch=max_decode_batch,
            adapter_layouts=adapter_layouts,
            loras_per_request=loras_per_request,
        )
    resident = (
        _bytes_per_device(built.params, 1)
        + sum(_bytes_per_device(p.empty_bank, mesh.size) for p in built.by_resolution.values())
        + _bytes_per_device(built.adapter_banks, 1)  # replicated, as the parameters
    )
    seed: list[ProgramReport] = []
    if seed_steps:
        images = seed_images or slots_per_device
        for resolution in resolutions:
            seed.append(seed_program(model, devices[0], chip, resolution, images, seed_steps))
            if progress is not None:
                progress(seed[-1])
    return AheadOfTimeReport(
        topology=topology,
        chip=chip,
        devices=len(devices),
        model=model_name,
        dtype=model.dtype_name,
        attention=attention,
        resolutions=resolutions,
        slots_per_device=slots_per_device,
        resident_bytes=resident,
        programs=reports,
        seed_programs=seed,
        selected=programs,
        max_decode_batch=max_decode_batch,
        memory_plan=plan_line,
    )


def _counting(kernel: Kernel, calls: list[int]) -> Kernel:
    """`kernel`, noting each call's FLOPs (analytic): the per-device shapes it is traced with."""

    def counted(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
        batch, q_len, heads, head_dim = q.shape
        calls.append(attention_flops(batch, heads, q_len, k.shape[1], head_dim))
        return kernel(q, k, v, scale)

    return counted


def _bytes_per_device(tree: Any, shards: int) -> int:
    leaves = jax.tree_util.tree_leaves(tree)
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in leaves) // shards


def seed_program(
    model: LoadedModel, device: Any, chip: Chip, resolution: Resolution, images: int, steps: int
) -> ProgramReport:
    """The seed's program on one chip: `FlaxStableDiffusionXLPipeline._generate` (what its pmap runs on
    every chip: text encoders, `steps` guided UNet steps in a loop, the VAE) for `images` images, the
    parameters (scheduler state included) replicated, as bench/seed_recipe.py runs the recipe."""
    if not is_abstract(model.params):
        raise ValueError("seed_program compiles from parameter shapes (abstract_model)")
    pipeline = model.pipeline
    whole = NamedSharding(Mesh(np.array([device]), (DATA_AXIS,)), PartitionSpec())

    def on_chip(x: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=whole)

    params = jax.tree_util.tree_map(on_chip, dict(model.params, scheduler=model.scheduler_state))
    ids = jax.ShapeDtypeStruct((images, ENCODE_ROWS, model.max_tokens), jnp.int32, sharding=whole)
    key = on_chip(jax.eval_shape(lambda: jax.random.PRNGKey(0)))
    guidance = jax.ShapeDtypeStruct((), jnp.float32, sharding=whole)

    def generate(prompt_ids: Any, p: Any, rng: Any, guidance_scale: Any, neg_prompt_ids: Any) -> Any:
        return pipeline._generate(
            prompt_ids,
            p,
            rng,
            steps,
            resolution.height,
            resolution.width,
            guidance_scale,
            neg_prompt_ids=neg_prompt_ids,
        )

    started = time.perf_counter()
    compiled = jax.jit(generate).lower(ids, params, key, guidance, ids).compile()
    name = f"seed-generate-{images}x{resolution}-{steps}it"
    report = report_of(name, compiled, time.perf_counter() - started, chip)
    report.images, report.loop_iterations = images, steps
    return report


def describe(report: AheadOfTimeReport) -> str:
    """The table `sdxl-server compile` prints: one row per program, then the totals."""
    header = (
        f"{'program':<28} {'HBM GiB':>8} {'args GiB':>8} {'temp GiB':>8} {'TFLOP':>8} {'GB acc.':>8} "
        f"{'roofline ms':>11} {'ms/img-step':>11} {'compile s':>9}"
    )
    lines = [
        f"{report.model} ({report.dtype}, attention {report.attention}) on {report.topology}: "
        f"{report.devices} x {report.chip.name}, {report.slots_per_device} slots per device, "
        f"{', '.join(str(r) for r in report.resolutions)}",
        header,
    ]

    def row(p: ProgramReport) -> str:
        per_step = (
            f"{p.per_image_step_seconds * 1e3:11.1f}" if p.per_image_step_seconds is not None else " " * 11
        )
        return (
            f"{p.name:<28} {p.hbm_bytes / GIB:8.2f} {p.argument_bytes / GIB:8.2f} {p.temp_bytes / GIB:8.2f} "
            f"{p.flops / 1e12:8.3f} {p.bytes_accessed / 1e9:8.2f} {p.roofline_seconds * 1e3:11.1f} "
            f"{per_step} {p.compile_seconds:9.1f}"
        )

    lines += [row(p) for p in report.programs]
    if report.seed_programs:
        lines.append("the seed's per-chip program (one loop iteration counted by cost analysis):")
        lines += [row(p) for p in report.seed_programs]
    verdict = "fits" if report.fits else "DOES NOT FIT"
    if report.selected is not None:
        verdict += f" (partial: only programs matching {report.selected!r})"
    lines.append(
        f"per device: resident {report.resident_bytes / GIB:.2f} GiB (parameters, slot banks), worst moment "
        f"{report.total_hbm_bytes / GIB:.2f} GiB of {report.chip.memory_bytes / GIB:.2f} GiB: {verdict}"
    )
    return "\n".join(lines)
