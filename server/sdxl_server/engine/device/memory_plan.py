"""The memory plan: before the real compile, whether the slots and resolutions fit the device's memory.

What one device holds while serving:

* the parameters (replicated: every device holds all of them);
* with `--lora-dir`, the LoRA adapter banks (replicated too): `--lora-places` places, each every covered
  layer's factors at `--lora-max-rank` (SDXL base at rank 64 in bf16: 0.32 GiB a place for the UNet,
  0.11 GiB for both text encoders); a bank that does not fit is refused naming `--lora-places`;
* per resolution, the slot state of its block (latents, embeddings, schedules) and the held latents,
  for 2P image places (P slots per device: rows are the capacity, so a block holds up to 2P unguided
  images, each with a held row; buckets.rows_per_device);
* the temporaries of the program that runs, one at a time: the largest is a step or a decode. A step
  runs every slot's rows at once; a decode takes at most `max_decode_batch` images per call (at 1024x1024
  on v5e the decode of 4 images holds 12.1 GiB of temporaries, so 4 slots fit only with decodes of fewer
  images: docs/PERFORMANCE.md).

Temporaries come from XLA's memory analysis of probe programs compiled from abstract shapes (no weights
placed, nothing allocated): the per-device step body and the VAE decode on one slot, traced with the
configured attention, scaled by the slots per device (activations grow with the batch; the parameters,
which do not, are arguments, not temporaries). A probe costs one compile of one program (seconds on CPU
for the demo model at 1024x1024, minutes for SDXL's UNet on a TPU). Their figures are recorded in the
program cache (program_cache.py, `measured`) under the programs' key, so a pod whose cache was filled by
`sdxl-server compile --cache-dir` plans without compiling anything.

The device's memory: `memory_stats()["bytes_limit"]` on TPU and GPU; on the CPU the host's available RAM
(`MemAvailable`, and the cgroup's limit less its usage when that is smaller: in a pod, /proc/meminfo
shows the node), shared by every CPU device. XLA:CPU's runtime peak exceeds its analysed temporaries
(measured with the demo UNet and `xla` attention: 2.9 GiB analysed, 8.2 GB peak at 768x768; 0.6 GiB
and 1.2 GB at 512x512), so on the CPU temporaries count `CPU_TEMP_FACTOR` times.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import SingleDeviceSharding

from sdxl_server.engine.adapters.adapter_bank import BankLayout
from sdxl_server.engine.api import Resolution
from sdxl_server.engine.batching.buckets import bucket_sizes, rows_per_device
from sdxl_server.engine.device.attention import attention_kernel, resolve_attention
from sdxl_server.engine.device.denoise import decode_latents
from sdxl_server.engine.device.flax_parameters import parameters_as_loaded
from sdxl_server.engine.device.program_cache import ProgramCache
from sdxl_server.engine.device.programs import _bank_shapes
from sdxl_server.engine.models.loader import LoadedModel
from sdxl_server.engine.settings import AUTO, EngineConfig, SettingError

log = logging.getLogger(__name__)

CPU_TEMP_FACTOR = 3.0
# `auto` stops here even where memory allows more: every bucket up to it is a compiled program, and a
# step's latency grows with its batch. A number given explicitly may go beyond.
MAX_AUTO_SLOTS = 16
GIB = 2**30


class MemoryPlanError(SettingError):
    """The configuration does not fit the device: the field to change (slots_per_device, resolutions,
    max_decode_batch or lora_places) and one line of figures; the server prints it after the field's
    flag and exits 2."""


def fit_to_memory(
    config: EngineConfig,
    model: LoadedModel,
    devices: Sequence[Any],
    records: ProgramCache | None = None,
    memory: DeviceMemory | None = None,
    adapter_layouts: Mapping[str, BankLayout] | None = None,
) -> EngineConfig:
    """`config` with its attention resolved for the platform, and its slots per device and decode batch
    checked against the memory plan (`auto`: the most that fit); MemoryPlanError when they do not fit.
    `records`: where the probes' figures are looked up and saved (the program cache, whose attention
    must be the resolved one); `memory`: the device's memory when its devices cannot report it (a
    described TPU topology); `adapter_layouts`: the LoRA adapter banks' (with --lora-dir), resident."""
    fitted, line = fit_and_describe(config, model, devices, records, memory, adapter_layouts)
    log.info("%s", line)
    return fitted


def fit_and_describe(
    config: EngineConfig,
    model: LoadedModel,
    devices: Sequence[Any],
    records: ProgramCache | None = None,
    memory: DeviceMemory | None = None,
    adapter_layouts: Mapping[str, BankLayout] | None = None,
) -> tuple[EngineConfig, str]:
    """`fit_to_memory`'s decision and its one line for the log."""
    attention = resolve_attention(config.attention, devices[0].platform)
    plan = plan_memory(
        model,
        devices,
        config.resolutions,
        config.max_steps,
        attention,
        config.memory_fraction,
        memory=memory,
        records=records,
    )
    if adapter_layouts:
        plan = dataclasses.replace(
            plan,
            adapter_places=config.lora_places,
            adapter_place_bytes=adapter_place_bytes(model, adapter_layouts),
        )
    slots = plan.slots_per_device(config.slots_per_device)
    decode_batch = plan.decode_batch(slots, config.max_decode_batch)
    asked = {"slots-per-device": config.slots_per_device, "max-decode-batch": config.max_decode_batch}
    chosen = [flag for flag, value in asked.items() if value == AUTO]
    line = plan.describe(slots, decode_batch) + (f" (--{' and --'.join(chosen)} auto)" if chosen else "")
    fitted = dataclasses.replace(
        config, slots_per_device=slots, max_decode_batch=decode_batch, attention=attention
    )
    return fitted, line


@dataclasses.dataclass(frozen=True)
class DeviceMemory:
    bytes: int  # the memory the devices below share (one device's HBM; the host's RAM for CPU devices)
    described: str  # e.g. "15.7 GiB of TPU v5 lite HBM", "22.6 GiB of available RAM (MemAvailable)"
    shared_by: int = 1  # devices that use it at once


def device_memory(devices: Sequence[Any]) -> DeviceMemory:
    """The memory one of `devices` may use: its own (accelerators) or the host's, shared (CPU)."""
    device = devices[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        limit = int(stats["bytes_limit"])
        return DeviceMemory(limit, f"{limit / GIB:.1f} GiB of {device.device_kind} memory")
    available, source = host_available_bytes()
    return DeviceMemory(available, f"{available / GIB:.1f} GiB of available RAM ({source})", len(devices))


def host_available_bytes(meminfo: str = "/proc/meminfo", cgroup: str = "/sys/fs/cgroup") -> tuple[int, str]:
    """The RAM this process may still take, and where the figure comes from."""
    available, source = _meminfo_available(meminfo), "MemAvailable"
    limit, usage = (
        _read_int(os.path.join(cgroup, "memory.max")),
        _read_int(os.path.join(cgroup, "memory.current")),
    )
    if limit is not None and usage is not None and limit - usage < available:
        available, source = max(limit - usage, 0), "the cgroup's memory.max less memory.current"
    return available, source


def _meminfo_available(path: str) -> int:
    with open(path) as lines:
        for line in lines:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{path} has no MemAvailable line")


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


@dataclasses.dataclass(frozen=True)
class ResolutionNeeds:
    """Per slot, at one resolution: what stays resident and what one program needs while it runs."""

    resolution: Resolution
    state_bytes: int  # one image place's state and its held-latents row (a block has 2P of them)
    step_temp_bytes: int  # the guided step's temporaries
    decode_temp_bytes: int  # the VAE decode's temporaries


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    params_bytes: int
    needs: tuple[ResolutionNeeds, ...]
    memory: DeviceMemory
    memory_fraction: float
    temp_factor: float  # CPU_TEMP_FACTOR on the CPU, 1 on accelerators
    attention: str
    adapter_places: int = 0  # the LoRA adapter banks' places (--lora-places; 0 without --lora-dir)
    adapter_place_bytes: int = 0  # one place in every component's bank, on one device

    @property
    def budget_bytes(self) -> int:
        """What one device may use: its share of the memory, times the memory fraction."""
        return int(self.memory.bytes * self.memory_fraction / self.memory.shared_by)

    @property
    def adapter_bytes(self) -> int:
        """The adapter banks on one device (replicated, as the parameters)."""
        return self.adapter_places * self.adapter_place_bytes

    def bytes_per_device(
        self,
        slots_per_device: int,
        needs: Sequence[ResolutionNeeds] | None = None,
        decode_batch: int | None = None,
    ) -> int:
        """Parameters, the state of every image place (2P a device, `_image_places`), and the largest
        temporaries of one program: the step over every slot's two rows (2P rows), or a decode of
        `decode_batch` images (default: the slots per device; never more, held images beyond it are
        decoded in several calls)."""
        chosen = self.needs if needs is None else needs
        decoded = slots_per_device if decode_batch is None else min(decode_batch, slots_per_device)
        state = self.state_bytes(slots_per_device, chosen)
        temps = max(max(n.step_temp_bytes * slots_per_device, n.decode_temp_bytes * decoded) for n in chosen)
        return self.params_bytes + self.adapter_bytes + math.ceil(state + temps * self.temp_factor)

    def state_bytes(self, slots_per_device: int, needs: Sequence[ResolutionNeeds] | None = None) -> int:
        """The banks' resident state on one device: 2P image places per resolution, since rows are the
        capacity (a block holds up to 2P unguided images, each with its held row)."""
        chosen = self.needs if needs is None else needs
        return _image_places(slots_per_device) * sum(n.state_bytes for n in chosen)

    def most_slots(self, needs: Sequence[ResolutionNeeds] | None = None) -> int:
        """The most slots per device that fit the budget with decodes of one image (0: not even one)."""
        fits = lambda slots: self.bytes_per_device(slots, needs, decode_batch=1) <= self.budget_bytes  # noqa: E731
        low, high = 0, 1 << 20  # fits(low); a bound past which counting slots means nothing
        if fits(high):
            return high
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if fits(middle) else (low, middle)
        return low

    def decode_batch(self, slots_per_device: int, requested: int) -> int:
        """Images per decode call: `requested` (at most the slots) if it fits, the most of the compiled
        sizes (1, 2, 4, ..., slots) that fit for `auto`; else MemoryPlanError naming the setting."""
        if requested != AUTO:
            wanted = min(requested, slots_per_device)
            if self.bytes_per_device(slots_per_device, decode_batch=wanted) > self.budget_bytes:
                most = self.decode_batch(slots_per_device, AUTO)
                raise MemoryPlanError(
                    "max_decode_batch",
                    f"decodes of {wanted} images do not fit beside {_slots(slots_per_device)}: "
                    f"{self._figures(slots_per_device, self.needs, wanted)}; at most {most} fit "
                    f"(--max-decode-batch {most} or auto)",
                )
            return wanted
        fitting = [
            size
            for size in bucket_sizes(slots_per_device)
            if self.bytes_per_device(slots_per_device, decode_batch=size) <= self.budget_bytes
        ]
        return max(fitting, default=1)  # 1 fits whenever the slots were accepted

    def slots_per_device(self, requested: int) -> int:
        """`requested` if it fits, the most that fit for `auto`; else MemoryPlanError naming the setting
        (--lora-places when the slots would fit without the adapter banks)."""
        without_bank = dataclasses.replace(self, adapter_places=0)
        if self.adapter_places and self.most_slots() < max(requested, 1) <= without_bank.most_slots():
            raise self._bank_refusal(max(requested, 1))
        if self.most_slots() < 1:
            alone = [n for n in self.needs if self.most_slots([n]) < 1]
            if alone:
                worst = max(alone, key=lambda n: self.bytes_per_device(1, [n]))
                raise MemoryPlanError(
                    "resolutions",
                    f"{', '.join(str(n.resolution) for n in alone)} does not fit the device: "
                    f"{self._figures(1, [worst], 1)}; serve smaller --resolutions{self._flash_hint()}",
                )
            raise MemoryPlanError(
                "resolutions",
                f"{len(self.needs)} resolutions together do not fit the device: "
                f"{self._figures(1, self.needs, 1)}; serve fewer --resolutions{self._flash_hint()}",
            )
        if requested == AUTO:
            return min(self.most_slots(), MAX_AUTO_SLOTS)
        if self.bytes_per_device(requested, decode_batch=1) > self.budget_bytes:
            raise MemoryPlanError(
                "slots_per_device",
                f"{_slots(requested)} per device do not fit: {self._figures(requested, self.needs, 1)}; "
                f"at most {self.most_slots()} fit (--slots-per-device {self.most_slots()} or auto)",
            )
        return requested

    def _bank_refusal(self, slots: int) -> MemoryPlanError:
        room = self.budget_bytes - dataclasses.replace(self, adapter_places=0).bytes_per_device(
            slots, None, 1
        )
        most = max(room, 0) // max(self.adapter_place_bytes, 1)
        fewer = f"at most {most} fit (--lora-places {most})" if most else "not one place fits"
        return MemoryPlanError(
            "lora_places",
            f"{self.adapter_places} LoRA adapter places of {self.adapter_place_bytes / GIB:.2f} GiB do not "
            f"fit beside {_slots(slots)}: {self._figures(slots, self.needs, 1)}; {fewer}, or serve fewer "
            "--slots-per-device or a lower --lora-max-rank",
        )

    def describe(self, slots_per_device: int, decode_batch: int | None = None) -> str:
        """One line for the start-up log."""
        decoded = slots_per_device if decode_batch is None else decode_batch
        return (
            f"memory plan: {self._figures(slots_per_device, self.needs, decode_batch)}; decodes of "
            f"{decoded} image{'s' if decoded != 1 else ''} per call; at most {self.most_slots()} slots fit"
        )

    def _figures(self, slots: int, needs: Sequence[ResolutionNeeds], decode_batch: int | None = None) -> str:
        decoded = slots if decode_batch is None else min(decode_batch, slots)

        def largest_temps(n: ResolutionNeeds) -> tuple[int, str]:
            return max((n.step_temp_bytes * slots, "step"), (n.decode_temp_bytes * decoded, "decode"))

        largest = max(needs, key=lambda n: largest_temps(n)[0])
        temps_bytes, program = largest_temps(largest)
        if program == "decode" and decoded != slots:
            program = f"decode of {decoded}"
        temps = temps_bytes * self.temp_factor
        counted = f", {self.temp_factor:g}x XLA:CPU's analysis" if self.temp_factor != 1 else ""
        state = self.state_bytes(slots, needs)
        share = f" shared by {self.memory.shared_by} devices" if self.memory.shared_by > 1 else ""
        adapters = f", adapter banks {self.adapter_bytes / GIB:.2f} GiB" if self.adapter_places else ""
        return (
            f"{_slots(slots)} per device need{'s' if slots == 1 else ''} "
            f"{self.bytes_per_device(slots, needs, decoded) / GIB:.2f} GiB "
            f"(parameters {self.params_bytes / GIB:.2f} GiB{adapters}, slot state {state / GIB:.2f} GiB, "
            f"the {program}'s temporaries at {largest.resolution} {temps / GIB:.2f} GiB "
            f"with --attention {self.attention}{counted}); --memory-fraction {self.memory_fraction:g} "
            f"of {self.memory.described}{share} is {self.budget_bytes / GIB:.2f} GiB"
        )

    def _flash_hint(self) -> str:
        return " or use --attention flash" if self.attention != "flash" else ""


def _image_places(slots_per_device: int) -> int:
    """Images a device's block holds in each bank: 2P, as many as its rows (programs.build_programs
    sizes the bank so), since 2P unguided images take P guided images' rows."""
    return rows_per_device(slots_per_device)


def _slots(count: int) -> str:
    return "one slot" if count == 1 else f"{count} slots"


def adapter_place_bytes(model: LoadedModel, layouts: Mapping[str, BankLayout]) -> int:
    """One place in every component's adapter bank, in the dtype of that component's parameters (as
    programs.build_programs allocates the banks)."""
    return sum(
        layout.bytes_per_place(
            jnp.dtype(jax.tree_util.tree_leaves(model.params[component])[0].dtype).itemsize
        )
        for component, layout in layouts.items()
    )


def tree_bytes(tree: Any) -> int:
    return sum(
        math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree_util.tree_leaves(tree)
    )


@parameters_as_loaded()
def plan_memory(
    model: LoadedModel,
    devices: Sequence[Any],
    resolutions: Sequence[Resolution],
    max_steps: int,
    attention: str,
    memory_fraction: float,
    memory: DeviceMemory | None = None,
    records: ProgramCache | None = None,
) -> MemoryPlan:
    """Compiles the probe programs from shapes for `devices[0]` and returns the plan (nothing is placed
    on a device). `devices` may be a described TPU topology's (`sdxl-server compile`), with `memory` the
    chip's, as its devices report no memory statistics; by default the devices' own memory.

    With `records` (the program cache, built for these devices and this attention), a probe whose figures
    were recorded under the same key is not compiled at all; one that is compiled has its figures
    recorded. Without a record the probes still go through JAX's persistent compilation cache."""
    platform = devices[0].platform
    on_device = SingleDeviceSharding(devices[0])
    abstract = functools.partial(
        jax.tree_util.tree_map, lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=on_device)
    )
    text_params = {
        "text_encoder": model.params["text_encoder"],
        "text_encoder_2": model.params["text_encoder_2"],
    }
    token_ids = jax.ShapeDtypeStruct((2, 2, model.max_tokens), jnp.int32)
    embeds, pooled = jax.eval_shape(model.pipeline.get_embeddings, token_ids, abstract(text_params))
    unet_params, vae_params = abstract(model.params["unet"]), abstract(model.params["vae"])
    plan = MemoryPlan(
        params_bytes=tree_bytes(model.params),
        needs=(),
        memory=memory or device_memory(devices),
        memory_fraction=memory_fraction,
        temp_factor=CPU_TEMP_FACTOR if platform == "cpu" else 1.0,
        attention=attention,
    )
    with attention_kernel(attention, platform):
        for resolution in resolutions:  # the steps first: the usual reason not to fit, found soonest
            h, w = resolution.height // model.vae_scale_factor, resolution.width // model.vae_scale_factor
            latents = jax.ShapeDtypeStruct((1, model.latent_channels, h, w), jnp.float32, sharding=on_device)
            step_args = (
                unet_params,
                _rows(latents, GUIDED_ROWS, on_device),
                _rows(embeds, GUIDED_ROWS, on_device),
                _rows(pooled, GUIDED_ROWS, on_device),
            )
            step_temps = _probe(
                records,
                f"memory-probe-step-{resolution}",
                step_args[1:],
                lambda args=step_args: jax.jit(functools.partial(_guided_unet, model)).lower(*args).compile(),
            )
            needs = ResolutionNeeds(
                resolution, _place_state_bytes(model, resolution, embeds, pooled, max_steps), step_temps, 0
            )
            plan = dataclasses.replace(plan, needs=(*plan.needs, needs))
        if plan.most_slots() < 1:
            return plan  # refused already: the decodes cannot make it fit
        with_decodes = []
        for needs in plan.needs:
            h, w = (
                needs.resolution.height // model.vae_scale_factor,
                needs.resolution.width // model.vae_scale_factor,
            )
            latents = jax.ShapeDtypeStruct((1, model.latent_channels, h, w), jnp.float32, sharding=on_device)
            decode_temps = _probe(
                records,
                f"memory-probe-decode-{needs.resolution}",
                latents,
                lambda latents=latents: (
                    jax.jit(functools.partial(decode_latents, model)).lower(vae_params, latents).compile()
                ),
            )
            with_decodes.append(dataclasses.replace(needs, decode_temp_bytes=decode_temps))
    return dataclasses.replace(plan, needs=tuple(with_decodes))


# A guided step runs the UNet on two rows per slot (unconditional and conditional).
GUIDED_ROWS = 2


def _rows(spec: Any, rows: int, sharding: Any = None) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((rows, *spec.shape[1:]), spec.dtype, sharding=sharding)


def _guided_unet(model: LoadedModel, unet_params: Any, sample: Any, embeds: Any, pooled: Any) -> Any:
    """The step's cost: the UNet on one slot's guided rows (the sampler's arithmetic around it is a few
    latents-sized arrays). Independent of the slot state's layout, which the samplers own."""
    rows = sample.shape[0]
    time_ids = jnp.ones((rows, 6), embeds.dtype)
    added = {"text_embeds": pooled, "time_ids": time_ids}
    timesteps = jnp.full((rows,), 500, jnp.int32)
    return model.pipeline.unet.apply({"params": unet_params}, sample, timesteps, embeds, added).sample


def _place_state_bytes(
    model: LoadedModel, resolution: Resolution, embeds: Any, pooled: Any, max_steps: int
) -> int:
    """One image place's resident state: a bank of one slot as build_programs lays it out (the slot's
    latents, the sampler's history, both rows of embeddings, its per-step tables and counters) and its
    held row waiting for a decode. Taken from the bank's own shapes so that the plan cannot drift from
    what is allocated."""
    return tree_bytes(_bank_shapes(model, resolution, 1, max_steps, embeds, pooled))


def _probe(records: ProgramCache | None, name: str, signature: Any, compile_probe: Any) -> int:
    """A probe's temporaries: recorded under the programs' key, or compiled (and then recorded)."""
    if records is None:
        return _temp_bytes(compile_probe())
    figures = records.measured(name, signature, lambda: {"temp_bytes": _temp_bytes(compile_probe())})
    return int(figures["temp_bytes"])


def _temp_bytes(compiled: Any) -> int:
    """Temporaries plus outputs (the outputs are live while it runs, beside the inputs already counted)."""
    analysis = compiled.memory_analysis()
    if analysis is None:  # a backend without the analysis: nothing to add beyond the resident state
        return 0
    return int(analysis.temp_size_in_bytes + analysis.output_size_in_bytes)
