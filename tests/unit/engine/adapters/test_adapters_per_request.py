"""Per-request LoRA adapters served by the real engine (tiny model, CPU): an image made with adapter X at
scale s, in a batch whose other rows use adapter Y or none, equals the Flax pipeline's image with X
merged into the weights (W + s * alpha/rank * up @ down, by hand: lora_writers) and the same request
served alone; two adapters stacked equal both merged; a third adapter evicts the least recently used
idle one; an adapter on the text encoders too equals it merged into all three (applied when the prompt
is encoded, and the prompt cache keyed on it); an adapter the bank cannot hold is refused naming the
field.

Tolerance: one level of 255, as for the engine's own oracle and --fuse-lora's (the bank adds the
low-rank product beside the kernel, x @ W + (x @ down) @ up, where the merged pipeline computes
x @ (W + down @ up): the same sums in another order, float32).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
from engine_helpers import (
    SQUARE,
    Recorder,
    make_config,
    max_level_difference,
    request,
    run,
    trace_between,
)
from sdxl_server.engine import JaxEngine
from sdxl_server.engine.api import Finished, InvalidRequestError, LoraChoice
from sdxl_test_support.lora_writers import merged_flax_params, random_layers, write_diffusers, write_kohya

PROMPT, NEGATIVE, STEPS, GUIDANCE = "a red bicycle", "blurry", 4, 7.5


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    x = random_layers(tiny_model_dir, rank=4, alpha=2.0, seed=11, components=("unet",))
    y = random_layers(tiny_model_dir, rank=2, alpha=1.0, seed=12, components=("unet",), every=2)
    z = random_layers(tiny_model_dir, rank=3, alpha=3.0, seed=13, components=("unet",), every=3)
    write_kohya(tiny_model_dir, x, folder / "x.safetensors", original_unet_names=True)  # stored fp16
    write_diffusers(tiny_model_dir, y, folder / "y.safetensors")  # float32
    write_diffusers(tiny_model_dir, z, folder / "z.safetensors")
    te = random_layers(tiny_model_dir, rank=4, alpha=4.0, seed=14)  # the UNet and both text encoders
    write_kohya(tiny_model_dir, te, folder / "with-te.safetensors")
    locon = random_layers(tiny_model_dir, rank=2, seed=15, components=("unet",), convolutions=True)
    write_kohya(tiny_model_dir, locon, folder / "locon.safetensors")
    written = {"x": (x, np.float16), "y": (y, np.float32), "z": (z, np.float32), "with-te": (te, np.float16)}
    return folder, written


@pytest.fixture(scope="module")
def lora_engine(tiny_model_dir, compilation_cache_dir, adapters):
    # The fewest programs that still mix requests in a step (2 slots: 4 rows, buckets 1, 2, 4) and stack
    # two adapters (the narrow and the wide adapter steps): one step per dispatch halves the step programs.
    folder, _ = adapters
    config = make_config(
        tiny_model_dir,
        compilation_cache_dir,
        resolutions=(SQUARE,),
        slots_per_device=2,
        steps_per_dispatch=1,
        lora_dir=str(folder),
        lora_places=2,
        lora_max_rank=4,
        max_loras_per_request=2,
    )
    started = JaxEngine(config)
    started.start()
    yield started
    started.stop(drain_seconds=10)


def _case(request_id: str, seed: int, *loras: tuple[str, float]):
    case = request(
        request_id, prompt=PROMPT, negative_prompt=NEGATIVE, seed=seed, steps=STEPS, guidance_scale=GUIDANCE
    )
    return dataclasses.replace(case, loras=tuple(LoraChoice(name, scale) for name, scale in loras))


@functools.cache
def _pipeline(model_dir: str):
    """The Flax pipeline and its parameters, loaded once: merging an adapter copies the parameters."""
    from diffusers import FlaxStableDiffusionXLPipeline
    from sdxl_server.engine.models.quiet_libraries import silence_library_noise

    silence_library_noise()
    return FlaxStableDiffusionXLPipeline.from_pretrained(model_dir)


def _pipeline_image(tiny_model_dir, adapters, seed: int, *loras: tuple[str, float]) -> np.ndarray:
    import jax

    _, written = adapters
    pipeline, params = _pipeline(str(tiny_model_dir))
    for name, scale in loras:
        layers, dtype = written[name]
        params = merged_flax_params(params, [(layers, scale)], dtype=dtype)
    images = pipeline(
        pipeline.prepare_inputs([PROMPT]),
        params,
        jax.random.PRNGKey(seed),
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        height=SQUARE.height,
        width=SQUARE.width,
        neg_prompt_ids=pipeline.prepare_inputs([NEGATIVE]),
        jit=False,
    ).images
    return np.round(np.asarray(images[0]) * 255).astype(np.uint8)


def _served_together(engine, *cases) -> list[np.ndarray]:
    recorders = [Recorder() for _ in cases]
    for case, recorder in zip(cases, recorders, strict=True):
        engine.submit(case, recorder)
    images = []
    for case, recorder in zip(cases, recorders, strict=True):
        end = recorder.wait()
        assert isinstance(end, Finished), f"{case.request_id} ended with {end}"
        images.append(recorder.images()[0])
    return images


@pytest.mark.slow
def test_an_adapter_in_a_mixed_batch_gives_the_pipelines_image_with_it_merged(
    tiny_model_dir, adapters, lora_engine
):
    with_x, with_y, without = _served_together(
        lora_engine, _case("x", 5, ("x", 0.8)), _case("y", 6, ("y", -1.0)), _case("none", 7)
    )
    assert max_level_difference(with_x, _pipeline_image(tiny_model_dir, adapters, 5, ("x", 0.8))) <= 1
    assert max_level_difference(with_y, _pipeline_image(tiny_model_dir, adapters, 6, ("y", -1.0))) <= 1
    assert max_level_difference(without, _pipeline_image(tiny_model_dir, adapters, 7)) <= 1
    # Served alone, the same request gives the same image; and the adapter did change it.
    alone = run(lora_engine, _case("x-alone", 5, ("x", 0.8))).images()[0]
    assert max_level_difference(with_x, alone) <= 1
    assert max_level_difference(with_x, _pipeline_image(tiny_model_dir, adapters, 5)) > 10
    # The batch did mix them: a step ran with rows of more than one request at once.
    steps = [e for e in lora_engine.trace() if e.kind.name == "STEP"]
    assert any("slots=2" in e.detail or "slots=3" in e.detail for e in steps)


def _last_boundary(engine) -> int:
    return max((e.boundary for e in engine.trace()), default=-1)


def _adapter_widths(engine, after_boundary: int) -> set[int]:
    """The stack widths of the adapter step programs the engine ran after `after_boundary`."""
    details = [e.detail for e in trace_between(engine, after_boundary, "step")]
    return {int(f.rpartition(":")[2]) for d in details for f in d.split() if f.startswith("adapters=")}


@pytest.mark.slow
def test_one_adapter_a_request_runs_the_narrow_step_and_gives_the_wide_steps_images(lora_engine):
    def batch(tag: str) -> tuple[set[int], list[np.ndarray]]:
        after = _last_boundary(lora_engine)
        images = _served_together(
            lora_engine, _case(f"x-{tag}", 5, ("x", 0.8)), _case(f"y-{tag}", 6, ("y", -1.0))
        )
        return _adapter_widths(lora_engine, after), images

    narrow_widths, narrow = batch("narrow")
    assert narrow_widths == {1}  # the engine allows 2 a request; each of these names one
    # The same batch on the wide programs only (the narrow ones set aside, then put back).
    steps = lora_engine._programs.by_resolution[SQUARE].adapter_steps
    set_aside = {key: program for key, program in steps.items() if key[2] == 1}
    for key in set_aside:
        del steps[key]
    try:
        wide_widths, wide = batch("wide")
    finally:
        steps.update(set_aside)
    assert wide_widths == {2}
    for narrow_image, wide_image in zip(narrow, wide, strict=True):
        assert max_level_difference(narrow_image, wide_image) <= 1


@pytest.mark.slow
def test_two_adapters_stacked_equal_both_merged(tiny_model_dir, adapters, lora_engine):
    after = _last_boundary(lora_engine)
    served = run(lora_engine, _case("xy", 8, ("x", 0.5), ("y", 1.5))).images()[0]
    assert _adapter_widths(lora_engine, after) == {2}  # the wide program: both applied
    expected = _pipeline_image(tiny_model_dir, adapters, 8, ("x", 0.5), ("y", 1.5))
    assert max_level_difference(served, expected) <= 1


@pytest.mark.slow
def test_a_third_adapter_evicts_the_least_recently_used_and_metrics_count_it(
    tiny_model_dir, adapters, lora_engine
):
    run(lora_engine, _case("x-again", 9, ("x", 1.0)))  # x used after y: y is the least recently used
    before = lora_engine.stats()
    served = run(lora_engine, _case("z", 10, ("z", 1.0))).images()[0]
    after = lora_engine.stats()
    assert after.lora_evictions == before.lora_evictions + 1
    assert after.lora_loads == before.lora_loads + 1
    assert after.lora_resident == 2 and after.lora_load_seconds > before.lora_load_seconds
    assert after.lora_requests == before.lora_requests + 1
    assert max_level_difference(served, _pipeline_image(tiny_model_dir, adapters, 10, ("z", 1.0))) <= 1
    resident = {a.name for a in lora_engine.info().adapters if a.resident}
    assert resident == {"x", "z"}  # GetServerInfo's view: y left
    # x stayed resident: its next request loads nothing.
    run(lora_engine, _case("x-resident", 11, ("x", 1.0)))
    assert lora_engine.stats().lora_loads == after.lora_loads


@pytest.mark.slow
def test_an_adapter_on_the_text_encoders_applies_at_encoding_and_keys_the_prompt_cache(
    tiny_model_dir, adapters, lora_engine
):
    plain = run(lora_engine, _case("te-plain", 13)).images()[0]  # caches the prompt's plain embeddings
    hits = lora_engine.stats().prompt_cache_hits
    served = run(lora_engine, _case("te", 13, ("with-te", 0.7))).images()[0]
    assert lora_engine.stats().prompt_cache_hits == hits  # not the plain prompt's cached embeddings
    expected = _pipeline_image(tiny_model_dir, adapters, 13, ("with-te", 0.7))
    assert max_level_difference(served, expected) <= 1
    assert max_level_difference(served, plain) > 10
    again = run(lora_engine, _case("te-again", 13, ("with-te", 0.7))).images()[0]
    assert lora_engine.stats().prompt_cache_hits == hits + 1  # same prompt, adapters and scales: a hit
    assert max_level_difference(again, served) == 0


def test_an_adapter_the_bank_cannot_hold_is_listed_unusable_and_refused_naming_the_field(lora_engine):
    with pytest.raises(InvalidRequestError) as refused:
        lora_engine.submit(_case("locon", 1, ("x", 1.0), ("locon", 1.0)), Recorder())
    assert refused.value.field == "loras[1].name"
    assert "convolution (LoCon)" in str(refused.value) and "--fuse-lora" in str(refused.value)
    listed = {adapter.name: adapter for adapter in lora_engine.info().adapters}  # GetServerInfo's list
    assert not listed["locon"].usable and "convolution (LoCon)" in listed["locon"].reason
    assert listed["x"].usable


@pytest.mark.slow
def test_the_lora_metrics_have_no_label_per_adapter(lora_engine):
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families
    from sdxl_server.metrics import EngineCollector

    run(lora_engine, _case("metered", 12, ("y", 0.5)))
    registry = CollectorRegistry()
    registry.register(EngineCollector(lora_engine.stats))
    samples = {
        sample.name: sample
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for sample in family.samples
        if sample.name.startswith("sdxl_lora_")
    }
    stats = lora_engine.stats()
    assert samples["sdxl_lora_loads_total"].value == stats.lora_loads >= 1
    assert samples["sdxl_lora_requests_total"].value == stats.lora_requests >= 1
    assert samples["sdxl_lora_resident"].value == stats.lora_resident >= 1
    assert samples["sdxl_lora_load_seconds_total"].value > 0
    assert {"sdxl_lora_evictions_total", "sdxl_lora_load_failures_total"} <= set(samples)
    assert all(not sample.labels for sample in samples.values())  # never one series per adapter


def test_the_memory_plan_counts_the_adapter_banks_the_engine_allocates(lora_engine):
    from sdxl_server.engine.device.memory_plan import adapter_place_bytes, tree_bytes

    banks = lora_engine._programs.adapter_banks  # replicated: each device holds the whole banks
    place = adapter_place_bytes(lora_engine._model, lora_engine._adapter_layouts)
    assert place * lora_engine.config.lora_places == tree_bytes(banks) > 0


def test_a_bank_that_does_not_fit_the_device_is_refused_at_start_naming_lora_places(
    tiny_model_dir, compilation_cache_dir, adapters
):
    from sdxl_server.engine.device.memory_plan import MemoryPlanError

    folder, _ = adapters
    # A million places of the tiny model's layers at rank 64: far beyond this host's RAM.
    config = make_config(
        tiny_model_dir, compilation_cache_dir, resolutions=(SQUARE,), lora_dir=str(folder), lora_places=10**6
    )
    engine = JaxEngine(config)
    with pytest.raises(MemoryPlanError) as refused:
        engine.start()  # before any program is built or any bank allocated
    assert refused.value.field == "lora_places"
    assert refused.value.message.startswith("1000000 LoRA adapter places of")
