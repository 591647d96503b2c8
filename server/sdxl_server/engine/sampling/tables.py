"""Per-step coefficient tables of every sampler, computed on the host as diffusers' schedulers compute them.

A sampler other than the model's own is what `SchedulerClass.from_config(model_scheduler_config)` builds
in diffusers: the model's config values (betas, training steps, steps_offset, ...) where it has them, the
class's defaults otherwise (`_DEFAULTS` below copies those of the classes reproduced). Where a Flax
scheduler exists its arithmetic is the reference (Euler leading and linspace, DDIM leading, DPM-Solver++
every spacing); otherwise the PyTorch scheduler's rule is (Euler trailing and explicit timesteps, DDIM
trailing and linspace, LCM). Only epsilon-predicting models are served.

Each table row holds the coefficients update.py applies at that step, plus the int32 timestep the UNet
sees (the Flax pipeline casts its timestep to int32 and the Flax schedulers look that cast value up again
in their float tables; the Euler tables replay that lookup, so that linspace's fractional timesteps give
what the pipeline gives). The Flax tables that depend on XLA's float32 arithmetic (linspace's division,
trailing's float32 arange) are computed with jnp, as the scheduler does, on the host's CPU.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from sdxl_server.engine.sampling.update import COEFFICIENTS

# Stands in for "no clipping": clip(v, -max, max) is v for every finite float32.
_NO_CLIP = float(np.finfo(np.float32).max)

# The config values each diffusers class falls back to when the model's config lacks them.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "euler": {"timestep_spacing": "linspace"},
    "ddim": {"clip_sample": True, "clip_sample_range": 1.0, "set_alpha_to_one": True, "steps_offset": 0},
    "dpmpp_2m": {"steps_offset": 0, "lower_order_final": True, "thresholding": False},
    "lcm": {
        "original_inference_steps": 50,
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
        "timestep_scaling": 10.0,
        "thresholding": False,
    },
}


@dataclasses.dataclass(frozen=True)
class StepTable:
    """What one request's sampler does at each of its steps."""

    timesteps: np.ndarray  # int32[steps]: what the UNet sees at step i
    coefficients: np.ndarray  # float32[steps, len(COEFFICIENTS)]
    init_noise_sigma: float  # the initial noise is scaled by this (float32 value)

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    def padded(self, max_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """(timesteps, coefficients) padded to `max_steps` rows; a padding row leaves latents unchanged."""
        timesteps = np.zeros(max_steps, np.int32)
        timesteps[: self.num_steps] = self.timesteps
        coefficients = np.tile(_row(noise_level=1.0, signal_level=1.0, from_sample=1.0), (max_steps, 1))
        coefficients[: self.num_steps] = self.coefficients
        return timesteps, coefficients


def _row(**values: float) -> np.ndarray:
    row = np.zeros(len(COEFFICIENTS), np.float32)
    row[COEFFICIENTS.index("clip")] = _NO_CLIP
    for name, value in values.items():
        row[COEFFICIENTS.index(name)] = value
    return row


class SamplerTables:
    """Builds step tables for one model, from its scheduler config and training alphas_cumprod."""

    def __init__(self, scheduler_config: Mapping[str, Any], alphas_cumprod: np.ndarray) -> None:
        self._config = dict(scheduler_config)
        if self._config.get("prediction_type", "epsilon") != "epsilon":
            raise ValueError(f"prediction_type {self._config['prediction_type']!r}: only epsilon is served")
        self.train_timesteps = int(self._config.get("num_train_timesteps", 1000))
        self._alphas_cumprod = np.asarray(alphas_cumprod, np.float32)
        if self._alphas_cumprod.shape != (self.train_timesteps,):
            raise ValueError(f"alphas_cumprod has shape {self._alphas_cumprod.shape}")

    def option(self, sampler: str, name: str) -> Any:
        """The value the diffusers class of `sampler` would hold for config key `name`."""
        return self._config.get(name, _DEFAULTS[sampler].get(name))

    def build(self, sampler: str, spacing: str, steps: int, timesteps: Sequence[int] = ()) -> StepTable:
        """The table of a valid choice (request_rules.sampling_violations): `spacing` "" with explicit
        `timesteps`."""
        if sampler == "euler":
            return self._euler(spacing, steps, timesteps)
        if sampler == "ddim":
            return self._ddim(spacing, steps)
        if sampler == "dpmpp_2m":
            return self._dpmpp_2m(spacing, steps)
        if sampler == "lcm":
            return self._lcm(steps, timesteps)
        raise ValueError(f"unknown sampler {sampler!r}")

    # ---- Euler: FlaxEulerDiscreteScheduler (leading, linspace), EulerDiscreteScheduler (trailing, explicit)

    def _train_sigmas(self) -> np.ndarray:
        acp = self._alphas_cumprod
        return (((1 - acp) / acp) ** 0.5).astype(np.float32)

    def _euler(self, spacing: str, steps: int, explicit: Sequence[int]) -> StepTable:
        train_sigmas = self._train_sigmas()
        train_indices = np.arange(0, self.train_timesteps, dtype=np.float32)
        if explicit or spacing == "trailing":
            # EulerDiscreteScheduler.set_timesteps: float32 timesteps, sigmas interpolated, a final 0.
            if explicit:
                table_timesteps = np.asarray(explicit, np.float32)
                init_rule = self.option("euler", "timestep_spacing")  # the class reads its config
            else:
                ratio = self.train_timesteps / steps
                table_timesteps = np.arange(self.train_timesteps, 0, -ratio).round().astype(np.float32) - 1
                init_rule = "trailing"
            sigmas = np.interp(table_timesteps, train_indices, train_sigmas).astype(np.float32)
            pytorch_lookup = True
        elif spacing == "leading":
            # FlaxEulerDiscreteScheduler adds 1 (it has no steps_offset); whole numbers, so numpy gives
            # the same bits as its jnp (test_sampling_tables.py).
            ratio_int = self.train_timesteps // steps
            table_timesteps = (np.arange(0, steps) * ratio_int).round()[::-1].astype(np.float32) + 1
            sigmas = np.interp(table_timesteps, train_indices, train_sigmas).astype(np.float32)
            init_rule, pytorch_lookup = "leading", False
        elif spacing == "linspace":
            table_timesteps, sigmas = _flax_euler_linspace(self._alphas_cumprod, steps)
            init_rule, pytorch_lookup = "linspace", False
        else:
            raise ValueError(f"euler cannot use spacing {spacing!r}")
        sigmas = np.concatenate([sigmas, np.zeros(1, np.float32)])
        top = np.float32(sigmas.max())
        init = top if init_rule in ("linspace", "trailing") else np.float32((top**2 + 1) ** 0.5)
        timesteps = np.zeros(steps, np.int32)
        rows = []
        for i in range(steps):
            t = np.int32(table_timesteps[i])  # the pipeline's jnp.array(timesteps, dtype=int32)[i]
            if pytorch_lookup:
                index = i  # PyTorch keeps its own step index
            else:  # Flax: jnp.where(timesteps == t, size=1), index 0 when nothing matches
                matches = np.nonzero(table_timesteps == np.float32(t))[0]
                index = int(matches[0]) if matches.size else 0
            timesteps[i] = t
            sigma, next_sigma = sigmas[index], sigmas[index + 1]
            rows.append(
                _row(
                    input_sigma=float(sigma),
                    noise_level=float(sigma),
                    signal_level=1.0,
                    from_sample=1.0,
                    from_slope=float(np.float32(next_sigma - sigma)),
                )
            )
        return StepTable(timesteps, np.stack(rows), float(init))

    # ---- DDIM (eta 0): FlaxDDIMScheduler (leading), DDIMScheduler (trailing, linspace)

    def _ddim(self, spacing: str, steps: int) -> StepTable:
        n_train = self.train_timesteps
        stride = n_train // steps
        timesteps: np.ndarray
        if spacing == "leading":
            offset = int(self.option("ddim", "steps_offset"))
            timesteps = (np.arange(0, steps) * stride).round()[::-1] + offset
        elif spacing == "trailing":
            timesteps = np.round(np.arange(n_train, 0, -n_train / steps)) - 1
        elif spacing == "linspace":
            timesteps = np.linspace(0, n_train - 1, steps).round()[::-1]
        else:
            raise ValueError(f"ddim cannot use spacing {spacing!r}")
        timesteps = timesteps.astype(np.int32)
        clip = self._clip("ddim")
        final = self._final_alpha_cumprod("ddim")
        rows = []
        for t in timesteps:
            previous = int(t) - stride
            alpha = np.float64(self._alphas_cumprod[t])
            alpha_prev = np.float64(self._alphas_cumprod[previous]) if previous >= 0 else final
            rows.append(
                _row(
                    noise_level=math.sqrt(1 - alpha),
                    signal_level=math.sqrt(alpha),
                    clip=clip,
                    from_denoised=math.sqrt(alpha_prev),
                    from_model_output=math.sqrt(1 - alpha_prev),
                )
            )
        return StepTable(timesteps, np.stack(rows), 1.0)

    def _clip(self, sampler: str) -> float:
        if self.option(sampler, "thresholding"):
            raise ValueError(f"{sampler}: dynamic thresholding is not served")
        if not self.option(sampler, "clip_sample"):
            return _NO_CLIP
        return float(self.option(sampler, "clip_sample_range"))

    def _final_alpha_cumprod(self, sampler: str) -> float:
        return 1.0 if self.option(sampler, "set_alpha_to_one") else float(self._alphas_cumprod[0])

    # ---- DPM-Solver++ 2M (midpoint): FlaxDPMSolverMultistepScheduler, every spacing

    def _dpmpp_2m(self, spacing: str, steps: int) -> StepTable:
        if self.option("dpmpp_2m", "thresholding"):
            raise ValueError("dpmpp_2m: dynamic thresholding is not served")
        timesteps = _flax_dpm_timesteps(
            spacing, steps, self.train_timesteps, int(self.option("dpmpp_2m", "steps_offset"))
        )
        acp = self._alphas_cumprod.astype(np.float64)
        alpha, sigma = np.sqrt(acp), np.sqrt(1 - acp)
        lam = np.log(alpha) - np.log(sigma)
        lower_order_final = bool(self.option("dpmpp_2m", "lower_order_final")) and steps < 15
        rows = []
        for i in range(steps):
            s0 = int(timesteps[i])
            t = int(timesteps[i + 1]) if i < steps - 1 else 0  # the Flax scheduler ends at timestep 0
            h = lam[t] - lam[s0]
            first_order = i == 0 or (i == steps - 1 and lower_order_final)
            phi = alpha[t] * (math.exp(-h) - 1.0)
            if first_order:
                from_denoised, from_history = -phi, 0.0
            else:  # D0 = m0, D1 = (m0 - m1) / r0;  x = a x - phi D0 - phi D1 / 2
                r0 = (lam[s0] - lam[int(timesteps[i - 1])]) / h
                from_denoised, from_history = -phi * (1 + 0.5 / r0), 0.5 * phi / r0
            rows.append(
                _row(
                    noise_level=sigma[s0],
                    signal_level=alpha[s0],
                    from_sample=sigma[t] / sigma[s0],
                    from_denoised=from_denoised,
                    from_history=from_history,
                )
            )
        return StepTable(timesteps.astype(np.int32), np.stack(rows), 1.0)

    # ---- LCM: LCMScheduler (its own schedule or explicit timesteps), fresh noise between steps

    def _lcm(self, steps: int, explicit: Sequence[int]) -> StepTable:
        original = int(self.option("lcm", "original_inference_steps"))
        if explicit:
            timesteps = np.asarray(explicit, np.int64)
        else:
            if not 1 <= steps <= original:
                raise ValueError(f"lcm runs 1..{original} steps, not {steps}")
            stride = self.train_timesteps // original
            origin = (np.arange(1, original + 1) * stride - 1)[::-1]
            picks = np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)
            timesteps = origin[picks]
        scaling = float(self.option("lcm", "timestep_scaling"))
        clip = self._clip("lcm")
        final = self._final_alpha_cumprod("lcm")
        rows = []
        for i, t in enumerate(timesteps):
            last = i == len(timesteps) - 1
            previous = int(t) if last else int(timesteps[i + 1])
            alpha = np.float64(self._alphas_cumprod[t])
            alpha_prev = np.float64(self._alphas_cumprod[previous]) if previous >= 0 else final
            scaled = float(t) * scaling  # get_scalings_for_boundary_condition_discrete, sigma_data 0.5
            c_skip = 0.25 / (scaled**2 + 0.25)
            c_out = scaled / (scaled**2 + 0.25) ** 0.5
            keep = 1.0 if last else math.sqrt(alpha_prev)  # the last step returns the denoised sample
            rows.append(
                _row(
                    noise_level=math.sqrt(1 - alpha),
                    signal_level=math.sqrt(alpha),
                    clip=clip,
                    from_sample=keep * c_skip,
                    from_denoised=keep * c_out,
                    from_noise=0.0 if last else math.sqrt(1 - alpha_prev),
                )
            )
        return StepTable(timesteps.astype(np.int32), np.stack(rows), 1.0)


def _on_host_cpu() -> Any:
    import jax

    return jax.default_device(jax.devices("cpu")[0])


def _flax_euler_linspace(alphas_cumprod: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """FlaxEulerDiscreteScheduler.set_timesteps' "linspace" (timesteps, sigmas without the final 0)."""
    import jax.numpy as jnp

    with _on_host_cpu():
        acp = jnp.asarray(alphas_cumprod, jnp.float32)
        timesteps = jnp.linspace(len(alphas_cumprod) - 1, 0, steps, dtype=jnp.float32)
        train_sigmas = ((1 - acp) / acp) ** 0.5
        sigmas = jnp.interp(timesteps, jnp.arange(0, len(train_sigmas)), train_sigmas)
        return np.asarray(timesteps, np.float32), np.asarray(sigmas, np.float32)


def _flax_dpm_timesteps(spacing: str, steps: int, train_timesteps: int, steps_offset: int) -> np.ndarray:
    """FlaxDPMSolverMultistepScheduler.set_timesteps' timesteps (int32[steps])."""
    import jax.numpy as jnp

    with _on_host_cpu():
        if spacing == "linspace":
            timesteps = jnp.linspace(0, train_timesteps - 1, steps + 1).round()[::-1][:-1].astype(jnp.int32)
        elif spacing == "leading":
            ratio = train_timesteps // (steps + 1)
            timesteps = (jnp.arange(0, steps + 1) * ratio).round()[::-1][:-1].astype(jnp.int32) + steps_offset
        elif spacing == "trailing":
            step = train_timesteps / steps
            timesteps = jnp.arange(train_timesteps, 0, -step).round().astype(jnp.int32) - 1
        else:
            raise ValueError(f"dpmpp_2m cannot use spacing {spacing!r}")
        return np.asarray(timesteps, np.int32)
