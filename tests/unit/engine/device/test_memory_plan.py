"""The memory plan: figures from XLA's memory analysis of probe programs, and the decision they make."""

from __future__ import annotations

import dataclasses

import pytest
from sdxl_server.engine.api import Resolution
from sdxl_server.engine.device.memory_plan import (
    CPU_TEMP_FACTOR,
    GIB,
    MAX_AUTO_SLOTS,
    DeviceMemory,
    MemoryPlan,
    MemoryPlanError,
    ResolutionNeeds,
    host_available_bytes,
    plan_memory,
    tree_bytes,
)
from sdxl_server.engine.settings import AUTO, AUTO_SLOTS, EngineConfig, SettingError, parse_count_or_auto

SMALL, LARGE = Resolution(64, 64), Resolution(512, 512)


def plan_with(budget_gib: float, needs, params_gib: float = 1.0, attention: str = "xla") -> MemoryPlan:
    """A plan over made-up needs with exactly `budget_gib` per device (fraction 1, one device, factor 1)."""
    return MemoryPlan(
        params_bytes=int(params_gib * GIB),
        needs=tuple(needs),
        memory=DeviceMemory(int(budget_gib * GIB), f"{budget_gib} GiB of test memory"),
        memory_fraction=1.0,
        temp_factor=1.0,
        attention=attention,
    )


def needs(resolution, state_gib, step_gib, decode_gib=0.0):
    return ResolutionNeeds(resolution, int(state_gib * GIB), int(step_gib * GIB), int(decode_gib * GIB))


def test_slots_that_fit_are_kept_and_auto_takes_the_most_that_fit():
    # Per slot: two image places of 0.5 GiB of state at both sizes (rows are the capacity: P slots hold
    # up to 2P unguided images), and the largest program's 1.5 GiB: 2.5 GiB a slot.
    plan = plan_with(13.5, [needs(SMALL, 0.25, 0.5), needs(LARGE, 0.25, 1.5, decode_gib=1.0)])
    assert plan.bytes_per_device(4) == int(1.0 * GIB) + 4 * int(2.5 * GIB)
    assert plan.most_slots() == 5
    assert plan.slots_per_device(3) == 3
    assert plan.slots_per_device(AUTO_SLOTS) == 5


def test_auto_stops_at_its_bound_where_memory_would_allow_more():
    plan = plan_with(1000.0, [needs(SMALL, 0.001, 0.001)])
    assert plan.most_slots() > MAX_AUTO_SLOTS
    assert plan.slots_per_device(AUTO_SLOTS) == MAX_AUTO_SLOTS


def test_too_many_slots_are_refused_naming_the_flag_the_figures_and_what_fits():
    plan = plan_with(11.0, [needs(LARGE, 0.25, 1.5)])
    with pytest.raises(MemoryPlanError) as refused:
        plan.slots_per_device(8)
    assert refused.value.field == "slots_per_device"
    line = refused.value.message
    assert "\n" not in line
    assert line.startswith("8 slots per device do not fit: 8 slots per device need 17.00 GiB")
    assert "the step's temporaries at 512x512 12.00 GiB with --attention xla" in line
    assert "is 11.00 GiB" in line and line.endswith("at most 5 fit (--slots-per-device 5 or auto)")


def test_the_decode_batch_is_the_most_that_fits_beside_the_slots():
    """A decode's temporaries grow with its images (at 1024x1024 on v5e: 1.76 GiB for one, 12.1 for 4):
    4 slots fit with decodes of 2, and the slots count decodes of one image when they are sized."""
    plan = plan_with(7.0, [needs(LARGE, 0.125, 0.5, decode_gib=2.0)])
    assert plan.bytes_per_device(4, decode_batch=4) == 10 * GIB  # 1 + 8 places x 0.125 + 4 x 2.0
    assert plan.bytes_per_device(4, decode_batch=2) == 6 * GIB
    assert plan.decode_batch(4, AUTO) == 2
    assert plan.decode_batch(4, 1) == 1 and plan.decode_batch(1, 4) == 1  # never above the slots
    assert plan.most_slots() == 8  # 1 + 16 x 0.125 + max(8 x 0.5, 2.0) = 7
    assert plan.slots_per_device(AUTO_SLOTS) == 8
    with pytest.raises(MemoryPlanError) as refused:
        plan.decode_batch(4, 4)
    assert refused.value.field == "max_decode_batch"
    line = refused.value.message
    assert "\n" not in line and line.startswith("decodes of 4 images do not fit beside 4 slots")
    assert "the decode's temporaries at 512x512 8.00 GiB" in line
    assert line.endswith("at most 2 fit (--max-decode-batch 2 or auto)")
    assert "decodes of 2 images per call" in plan.describe(4, 2)


def test_a_size_that_does_not_fit_one_slot_is_refused_naming_resolutions():
    plan = plan_with(4.0, [needs(SMALL, 0.1, 0.2), needs(LARGE, 0.5, 9.0)])
    with pytest.raises(MemoryPlanError) as refused:
        plan.slots_per_device(1)
    assert refused.value.field == "resolutions"
    assert refused.value.message.startswith("512x512 does not fit the device: one slot per device needs")
    assert refused.value.message.endswith("serve smaller --resolutions or use --attention flash")
    # MemoryPlanError is a SettingError: the server writes the field's flag before the message.
    assert isinstance(refused.value, SettingError)


def test_sizes_that_fit_alone_but_not_together_are_refused_naming_resolutions():
    plan = plan_with(4.0, [needs(SMALL, 0.75, 0.5), needs(LARGE, 0.75, 0.5)], attention="flash")
    with pytest.raises(MemoryPlanError, match="2 resolutions together do not fit") as refused:
        plan.slots_per_device(1)
    assert refused.value.field == "resolutions"
    assert refused.value.message.endswith("serve fewer --resolutions")  # flash already: no hint to use it


def test_cpu_devices_share_the_host_s_ram():
    memory = DeviceMemory(int(16 * GIB), "16 GiB of available RAM (MemAvailable)", shared_by=4)
    plan = dataclasses.replace(plan_with(0, [needs(SMALL, 0.5, 0.5)]), memory=memory, memory_fraction=0.5)
    assert plan.budget_bytes == 2 * GIB


def test_available_ram_is_the_cgroup_s_room_when_that_is_smaller(tmp_path):
    (tmp_path / "meminfo").write_text("MemTotal: 33554432 kB\nMemAvailable: 16777216 kB\n")
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    assert host_available_bytes(str(tmp_path / "meminfo"), str(cgroup)) == (16 * GIB, "MemAvailable")
    (cgroup / "memory.max").write_text(f"{8 * GIB}\n")
    (cgroup / "memory.current").write_text(f"{3 * GIB}\n")
    available, source = host_available_bytes(str(tmp_path / "meminfo"), str(cgroup))
    assert available == 5 * GIB and "memory.max" in source
    (cgroup / "memory.max").write_text("max\n")  # no limit: the node's figure stands
    assert host_available_bytes(str(tmp_path / "meminfo"), str(cgroup))[0] == 16 * GIB


def test_slots_per_device_takes_auto_or_a_positive_number():
    assert parse_count_or_auto("auto") == AUTO_SLOTS and parse_count_or_auto("3") == 3
    with pytest.raises(ValueError, match="whole number or auto"):
        parse_count_or_auto("two")
    with pytest.raises(ValueError, match="must be at least 1, or auto"):
        parse_count_or_auto("-1")  # not taken for the AUTO it is stored as
    with pytest.raises(SettingError, match="max_decode_batch: must be at least 1, or auto"):
        EngineConfig(model="tiny", resolutions=(SMALL,), max_decode_batch=0)
    config = EngineConfig(model="tiny", resolutions=(SMALL,), slots_per_device=AUTO_SLOTS)
    assert config.slots_per_device == AUTO_SLOTS
    with pytest.raises(SettingError, match="slots_per_device: must be at least 1, or auto"):
        EngineConfig(model="tiny", resolutions=(SMALL,), slots_per_device=0)
    with pytest.raises(SettingError, match="memory_fraction"):
        EngineConfig(model="tiny", resolutions=(SMALL,), memory_fraction=1.5)
    with pytest.raises(SettingError, match="attention"):
        EngineConfig(model="tiny", resolutions=(SMALL,), attention="fast")


@pytest.fixture(scope="module")
def demo_model():
    from sdxl_server.engine.models.loader import load_model
    from sdxl_server.engine.models.model_source import resolve_model

    return load_model(resolve_model("demo", None), "float32")


@pytest.mark.slow
def test_the_demo_model_s_figures_come_from_xla_s_analysis_on_the_cpu(demo_model):
    """On the CPU: the host's RAM, temporaries counted 3x, and the score matrices of `xla` attention at
    full latent resolution (512x512: 2 rows x 4 heads x 4,096^2 x 4 bytes = 512 MiB) in the step's."""
    import jax

    xla = plan_memory(demo_model, jax.local_devices()[:1], (SMALL, LARGE), 50, "xla", 0.9)
    flash = plan_memory(demo_model, jax.local_devices()[:1], (LARGE,), 50, "flash", 0.9)
    assert xla.temp_factor == CPU_TEMP_FACTOR and "available RAM" in xla.memory.described
    small, large = xla.needs
    assert 0 < small.step_temp_bytes < large.step_temp_bytes
    assert large.step_temp_bytes >= 2 * 4 * 4096**2 * 4
    assert flash.needs[0].step_temp_bytes < large.step_temp_bytes / 4
    # The resident state is the slot's latents (twice: the slot and its held row), embeddings, schedules.
    assert large.state_bytes >= 2 * 4 * 64 * 64 * 4
    assert xla.params_bytes > 0


@pytest.mark.slow
def test_recorded_probe_figures_make_the_next_plan_compile_nothing(demo_model, tmp_path):
    """The probes' figures go into the program cache under the programs' key: a second start (a new
    process would build the same key) reads them and compiles no probe; another attention does not."""
    import jax
    from sdxl_server.engine.device.program_cache import ProgramCache, architecture

    devices = jax.local_devices()[:1]
    context = architecture(demo_model.pipeline, demo_model.dtype_name)

    def plan(attention: str) -> tuple[MemoryPlan, ProgramCache]:
        records = ProgramCache(str(tmp_path), context, devices, attention)
        return plan_memory(demo_model, devices, (SMALL,), 50, attention, 0.9, records=records), records

    first, records = plan("flash")
    assert (records.records_found, records.records_missed) == (0, 2)
    again, records = plan("flash")
    assert (records.records_found, records.records_missed) == (2, 0)
    assert again.needs == first.needs and first.needs[0].step_temp_bytes > 0
    _, records = plan("xla")
    assert (records.records_found, records.records_missed) == (0, 2)


def test_the_plan_counts_the_state_of_every_image_place_the_engine_allocates(engine):
    """Rows are the capacity: a device's block holds 2P images (P guided or 2P unguided), each with its
    held row, so the plan counts 2P image places a device, not P slots (at P it would count half)."""
    config, banks = engine.config, engine._programs.by_resolution
    devices = sorted(banks[config.resolutions[0]].empty_bank.held.sharding.device_set, key=lambda d: d.id)
    plan = plan_memory(
        engine._model, devices[:1], config.resolutions, config.max_steps, config.attention, 0.9
    )
    for resolution, counted in zip(config.resolutions, plan.needs, strict=True):
        bank = banks[resolution].empty_bank
        allocated = tree_bytes(bank) // len(devices)  # every device holds its own block
        assert plan.state_bytes(config.slots_per_device, [counted]) == allocated


def test_the_adapter_banks_count_against_the_device_and_a_bank_that_does_not_fit_names_lora_places():
    # 2.5 GiB a slot as above; 8 adapter places of 0.5 GiB (SDXL base at rank 64 in bf16: 0.42 GiB a
    # place for the UNet and both text encoders) take 4 GiB beside the parameters.
    base = plan_with(13.5, [needs(SMALL, 0.25, 0.5), needs(LARGE, 0.25, 1.5, decode_gib=1.0)])
    plan = dataclasses.replace(base, adapter_places=8, adapter_place_bytes=GIB // 2)
    assert plan.bytes_per_device(3) == base.bytes_per_device(3) + 4 * GIB
    assert plan.slots_per_device(AUTO_SLOTS) == 3  # 5 without the banks
    assert "adapter banks 4.00 GiB" in plan.describe(3)
    with pytest.raises(MemoryPlanError) as refused:
        plan.slots_per_device(5)  # fits without the banks: the banks are what to change
    assert refused.value.field == "lora_places"
    line = refused.value.message
    assert "\n" not in line and line.startswith("8 LoRA adapter places of 0.50 GiB do not fit beside 5 slots")
    assert "at most 0 fit" not in line and "not one place fits" in line  # 1 + 5 x 2.5 leaves 0 GiB
    with pytest.raises(MemoryPlanError) as refused:
        plan.slots_per_device(4)
    assert "at most 5 fit (--lora-places 5)" in refused.value.message  # 13.5 - 11 = 2.5 GiB: 5 places
    crowded = dataclasses.replace(base, adapter_places=64, adapter_place_bytes=GIB // 2)
    with pytest.raises(MemoryPlanError) as refused:
        crowded.slots_per_device(AUTO_SLOTS)  # not one slot beside 32 GiB of banks; 13.5 - 3.5 leaves 10
    assert (
        refused.value.field == "lora_places" and "at most 20 fit (--lora-places 20)" in refused.value.message
    )
    with pytest.raises(MemoryPlanError) as refused:
        plan.slots_per_device(6)  # does not fit even without the banks: the slots are what to change
    assert refused.value.field == "slots_per_device"
