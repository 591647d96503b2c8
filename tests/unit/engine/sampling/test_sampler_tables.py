"""Each sampler's host tables, run through the device's one generic update, equal the scheduler it
reproduces, step after step, on a stand-in model (a fixed nonlinear function of the UNet input and t).

Where diffusers has a Flax scheduler it is the reference, built with `from_config` from the tiny model's
scheduler config as the engine builds its tables: its timesteps, initial noise scale, UNet inputs and
every latent it steps to. Where it has none, the numpy references of sampler_references.py are (each
names its published source), with the timesteps diffusers' documentation gives checked literally.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sampler_references import TINY_CONFIG, alphas_cumprod, ddim, euler_trailing, lcm
from sdxl_server.engine.sampling.tables import SamplerTables
from sdxl_server.engine.sampling.update import COEFFICIENTS, scale_model_input, update

SHAPE = (1, 4, 8, 8)
SEED = 7
# Compiled once for the module: eagerly, the update's lax.cond would be traced and compiled at every call.
jit_update = jax.jit(update)
jit_scale_model_input = jax.jit(scale_model_input)


def stand_in_model(unet_input, t):
    """An epsilon 'prediction' that depends on the input and the timestep, like a UNet's."""
    return np.tanh(np.asarray(unet_input) * (0.5 + t / 1000.0)) + 0.1 * np.cos(t / 50.0)


def noise():
    return np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)


def tables() -> SamplerTables:
    return SamplerTables(TINY_CONFIG, alphas_cumprod())


def run_engine_arithmetic(sampler, spacing, steps, explicit=()):
    """(timesteps, UNet inputs, latents after each step) as the device computes them from the tables."""
    table = tables().build(sampler, spacing, steps, explicit)
    x = jnp.asarray(noise() * np.float32(table.init_noise_sigma))
    history = jnp.zeros_like(x)
    inputs, latents = [], []
    for i in range(table.num_steps):
        row = jnp.asarray(table.coefficients[i : i + 1])
        unet_input = jit_scale_model_input(row, x)
        eps = jnp.asarray(stand_in_model(unet_input, int(table.timesteps[i])), jnp.float32)
        x, history = jit_update(
            row, x, eps, history, jnp.array([SEED], jnp.uint32), jnp.array([i], jnp.int32)
        )
        inputs.append(np.asarray(unet_input))
        latents.append(np.asarray(x))
    return table, inputs, latents


def flax_scheduler(sampler, spacing):
    from diffusers import FlaxDDIMScheduler, FlaxDPMSolverMultistepScheduler, FlaxEulerDiscreteScheduler

    cls = {"euler": FlaxEulerDiscreteScheduler, "ddim": FlaxDDIMScheduler}.get(
        sampler, FlaxDPMSolverMultistepScheduler
    )
    scheduler = cls.from_config(TINY_CONFIG, timestep_spacing=spacing)
    if sampler == "dpmpp_2m":
        # The Flax DPM-Solver reads config.steps_offset for "leading" but does not declare it; the
        # PyTorch class defaults it to 0, as the engine's tables do.
        scheduler.register_to_config(steps_offset=0)
    return scheduler


def run_flax_scheduler(sampler, spacing, steps):
    """What FlaxStableDiffusionXLPipeline._generate does with the scheduler, around the stand-in model."""
    scheduler = flax_scheduler(sampler, spacing)
    state = scheduler.set_timesteps(scheduler.create_state(), num_inference_steps=steps, shape=SHAPE)
    x = jnp.asarray(noise()) * state.init_noise_sigma
    scale = jax.jit(scheduler.scale_model_input)
    step = jax.jit(lambda state, eps, t, x: scheduler.step(state, eps, t, x).to_tuple())
    timesteps, inputs, latents = [], [], []
    for i in range(steps):
        t = jnp.array(state.timesteps, dtype=jnp.int32)[i]
        unet_input = scale(state, x, t)
        eps = jnp.asarray(stand_in_model(unet_input, int(t)), jnp.float32)
        x, state = step(state, eps, t, x)
        timesteps.append(int(t))
        inputs.append(np.asarray(unet_input))
        latents.append(np.asarray(x))
    return float(scheduler.set_timesteps(scheduler.create_state(), steps, SHAPE).init_noise_sigma), (
        timesteps,
        inputs,
        latents,
    )


FLAX_CASES = (
    [("euler", "leading", steps) for steps in (1, 25)]
    + [("euler", "linspace", steps) for steps in (4, 9)]
    + [("ddim", "leading", steps) for steps in (1, 9)]
    # 1 step, second-order steps ending in a first-order one (< 15 steps), and 20 that end second-order
    + [
        ("dpmpp_2m", spacing, steps)
        for spacing in ("leading", "trailing", "linspace")
        for steps in (1, 4, 20)
    ]
)


@pytest.mark.parametrize(("sampler", "spacing", "steps"), FLAX_CASES)
def test_tables_and_update_equal_the_flax_scheduler(sampler, spacing, steps):
    table, inputs, latents = run_engine_arithmetic(sampler, spacing, steps)
    init_noise_sigma, (timesteps, flax_inputs, flax_latents) = run_flax_scheduler(sampler, spacing, steps)
    assert list(table.timesteps) == timesteps
    assert table.init_noise_sigma == pytest.approx(init_noise_sigma, rel=1e-6)
    for i, (ours, theirs) in enumerate(zip(inputs, flax_inputs, strict=True)):
        np.testing.assert_allclose(ours, theirs, rtol=2e-5, atol=2e-5, err_msg=f"input {i}")
    for i, (ours, theirs) in enumerate(zip(latents, flax_latents, strict=True)):
        np.testing.assert_allclose(ours, theirs, rtol=2e-5, atol=2e-5, err_msg=f"step {i}")


@pytest.mark.parametrize(
    ("spacing", "step_counts"),
    # set_timesteps compiles anew for every length (~0.5 s), so a spread of step counts.
    [("leading", (1, 2, 3, 7, 9, 20, 30, 50, 97, 100)), ("linspace", (1, 4, 9, 20))],
)
def test_euler_sigmas_are_the_flax_schedulers_bit_for_bit(spacing, step_counts):
    """The Euler tables hold the scheduler's own float32 sigmas at the index it looks each int32 timestep
    up at: "leading" is replayed in numpy (no per-length compile stalling the step loop) and must give
    the same bits; with "linspace" the fractional timesteps match nothing after the cast and the
    scheduler falls back to index 0, a quirk the tables reproduce."""
    from diffusers import FlaxEulerDiscreteScheduler

    scheduler = FlaxEulerDiscreteScheduler.from_config(TINY_CONFIG, timestep_spacing=spacing)
    book = tables()
    sigma = COEFFICIENTS.index("input_sigma")
    slope = COEFFICIENTS.index("from_slope")
    for steps in step_counts:
        state = scheduler.set_timesteps(scheduler.create_state(), num_inference_steps=steps, shape=())
        table = book.build("euler", spacing, steps)
        sigmas = np.asarray(state.sigmas, np.float32)
        timesteps = np.asarray(jnp.array(state.timesteps, dtype=jnp.int32))
        indices = [
            int(np.nonzero(np.asarray(state.timesteps) == np.float32(t))[0][:1].sum()) for t in timesteps
        ]
        np.testing.assert_array_equal(table.timesteps, timesteps)
        np.testing.assert_array_equal(table.coefficients[:, sigma], sigmas[indices])
        np.testing.assert_array_equal(
            table.coefficients[:, slope], np.float32(sigmas[np.add(indices, 1)] - sigmas[indices])
        )
        assert table.init_noise_sigma == float(np.float32(state.init_noise_sigma))


REFERENCE_CASES = (
    [("euler", "trailing", steps, (), euler_trailing(steps)) for steps in (1, 4, 8)]
    + [
        ("ddim", spacing, steps, (), ddim(spacing, steps))
        for spacing in ("trailing", "linspace")
        for steps in (1, 4, 9)
    ]
    + [("lcm", "", steps, (), lcm(steps)) for steps in (1, 2, 4, 8)]
    + [
        ("lcm", "", 4, (999, 749, 499, 249), lcm(4, (999, 749, 499, 249))),  # DMD2's four steps
        ("euler", "", 4, (999, 749, 499, 249), None),
    ]
)


@pytest.mark.parametrize(("sampler", "spacing", "steps", "explicit", "reference"), REFERENCE_CASES)
def test_tables_and_update_equal_the_published_rule(sampler, spacing, steps, explicit, reference):
    if reference is None:  # explicit Euler timesteps: trailing's rule at the given timesteps
        reference = euler_trailing(steps)
    timesteps, init_noise_sigma, run = reference
    table, _, latents = run_engine_arithmetic(sampler, spacing, steps, explicit)
    np.testing.assert_array_equal(table.timesteps, timesteps)
    if sampler == "euler" and explicit:
        # EulerDiscreteScheduler's initial scale follows its config's spacing (the tiny model's: leading).
        assert table.init_noise_sigma == pytest.approx(np.sqrt(init_noise_sigma**2 + 1), rel=1e-6)
        return  # the steps themselves are trailing's, checked above at the same timesteps
    assert table.init_noise_sigma == pytest.approx(init_noise_sigma, rel=1e-6)
    expected = run(noise().astype(np.float64) * init_noise_sigma, stand_in_model, SEED)  # same start
    np.testing.assert_allclose(latents[-1], expected, rtol=1e-4, atol=1e-4)


def test_timesteps_are_the_ones_diffusers_documents():
    """SDXL-Lightning's 4 trailing steps, LCM's 4 steps and DMD2's explicit ones, as documented."""
    book = tables()
    assert list(book.build("euler", "trailing", 4).timesteps) == [999, 749, 499, 249]
    assert list(book.build("ddim", "trailing", 4).timesteps) == [999, 749, 499, 249]
    assert list(book.build("lcm", "", 4).timesteps) == [999, 759, 499, 259]
    assert list(book.build("lcm", "", 4, (999, 749, 499, 249)).timesteps) == [999, 749, 499, 249]


def test_padding_rows_leave_the_latents_unchanged():
    table = tables().build("dpmpp_2m", "trailing", 3)
    _, coefficients = table.padded(6)
    x = jnp.asarray(noise())
    stepped, _ = jit_update(
        jnp.asarray(coefficients[4:5]),
        x,
        jnp.ones_like(x),
        jnp.zeros_like(x),
        jnp.array([1], jnp.uint32),
        jnp.array([4], jnp.int32),
    )
    np.testing.assert_array_equal(np.asarray(stepped), np.asarray(x))


def test_fresh_noise_is_the_slots_own():
    """Two slots with different samplers in one update: each gets what it gets alone (LCM's noise comes
    from its own seed and step, the Euler slot draws none)."""
    book = tables()
    lcm_row = book.build("lcm", "", 4).coefficients[1]
    euler_row = book.build("euler", "leading", 4).coefficients[1]
    x = jnp.asarray(np.concatenate([noise(), noise() * 3]))
    eps = jnp.asarray(stand_in_model(x, 500), jnp.float32)
    seeds, steps = jnp.array([11, 12], jnp.uint32), jnp.array([1, 1], jnp.int32)
    together, _ = jit_update(
        jnp.asarray(np.stack([lcm_row, euler_row])), x, eps, jnp.zeros_like(x), seeds, steps
    )
    for i, row in enumerate((lcm_row, euler_row)):
        alone, _ = jit_update(
            jnp.asarray(row[None]),
            x[i : i + 1],
            eps[i : i + 1],
            jnp.zeros_like(x[:1]),
            seeds[i : i + 1],
            steps[i : i + 1],
        )
        np.testing.assert_array_equal(np.asarray(together[i : i + 1]), np.asarray(alone))
