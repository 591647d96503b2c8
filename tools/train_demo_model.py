"""Train the demo SDXL (`sdxl-server serve --model demo`): a tiny SDXL that draws coloured shapes.

The model has SDXL's architecture, built from the same tokenizer (plus whole-word merges for the world's
words) and text-encoder configs as the tiny random model (server/sdxl_server/engine/models/tiny_model.py): two
CLIP text encoders whose penultimate hidden states are concatenated, a UNet with text-time conditioning,
an AutoencoderKL with scale factor 8 and SDXL's Euler schedule. Its world is
server/sdxl_server/engine/models/shapes.py: one flat shape of one colour on a background of another, 64 x 64
pixels; the (colour, shape) pairs in shapes.HELD_BACK are never drawn.

Three phases, all on the CPU in under an hour (the printed log says how long each took):
1. the autoencoder learns to reconstruct rendered images (reconstruction + a small KL term);
2. every training image is encoded once; the latents' standard deviation sets `scaling_factor`;
3. the UNet and both text encoders learn to predict the noise (epsilon) added to those latents at a
   uniformly drawn timestep of SDXL's schedule (min-SNR weighted; the weights saved are an exponential
   moving average), conditioned on the prompt through the same
   `get_embeddings` the pipeline uses and on the micro-conditions the engine passes. The prompt is
   replaced by zero embeddings part of the time (the engine's unconditional input for an empty negative
   prompt), which makes classifier-free guidance work; partial prompts ("a red circle", "a blue
   background") are mixed in so that a negative prompt naming one part means something.

Everything is drawn from one seed (numpy for data, JAX keys for noise). The result is saved with
`FlaxStableDiffusionXLPipeline.save_pretrained`. The shipped model is this command with its defaults
(47 minutes on the 2-core development machine; the model's TRAINING.md has the figures):

    .venv/bin/python tools/train_demo_model.py --out server/sdxl_server/engine/models/demo
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from sdxl_server.engine.models import demo_vocabulary, shapes
from sdxl_server.engine.models.quiet_libraries import silence_library_noise
from sdxl_server.engine.models.tiny_model import (
    PROJECTION_WIDTH,
    TEXT_WIDTH,
    _random_params,
    _text_encoder,
    _write_tokenizer,
)

TIME_EMBED_WIDTH = 8
TIME_IDS = (shapes.SIZE, shapes.SIZE, 0, 0, shapes.SIZE, shapes.SIZE)  # what the engine passes
LATENT = shapes.SIZE // 8
# Fractions of UNet training examples by prompt form (the rest are full prompts).
DROPPED = 0.1  # zero embeddings: the unconditional input
SHAPE_ONLY = 0.125  # "a red circle": any background
BACKGROUND_ONLY = 0.125  # "a blue background": any shape
MIN_SNR_GAMMA = 5.0
EMA_DECAY = 0.999


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def build_modules(directory: Path) -> dict[str, Any]:
    """The pipeline's modules (without parameters); tokenizers written into `directory`."""
    from diffusers import FlaxEulerDiscreteScheduler, FlaxUNet2DConditionModel

    # Whole-word tokens for the world's words: with one token per byte, the model had to learn words
    # from letters, and a held-back pair's letters shifted every later token (64% of held-back pairs'
    # colours right, against 90% asked).
    tokenizer = _write_tokenizer(directory / "tokenizer", shapes.WORDS)
    tokenizer_2 = _write_tokenizer(directory / "tokenizer_2", shapes.WORDS)
    vocab_size = len(tokenizer.get_vocab())
    unet = FlaxUNet2DConditionModel(
        sample_size=LATENT,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(64, 96),
        layers_per_block=1,
        attention_head_dim=(4, 6),  # number of heads (diffusers' historical name)
        transformer_layers_per_block=(1, 1),
        cross_attention_dim=2 * TEXT_WIDTH,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_WIDTH,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_WIDTH + PROJECTION_WIDTH,
    )
    vae = make_vae(scaling_factor=1.0)  # the real factor is known after phase 2
    scheduler = FlaxEulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        timestep_spacing="leading",
    )
    return {
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "text_encoder": _text_encoder(vocab_size, with_projection=False),
        "text_encoder_2": _text_encoder(vocab_size, with_projection=True),
        "unet": unet,
        "vae": vae,
        "scheduler": scheduler,
    }


def make_vae(scaling_factor: float) -> Any:
    from diffusers import FlaxAutoencoderKL

    return FlaxAutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        # 4 levels (scale factor 8), narrow where the resolution is high: the cost of a step is at full
        # resolution, and the capacity that reconstruction needs is at the bottom.
        block_out_channels=(8, 16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=shapes.SIZE,
        scaling_factor=scaling_factor,
    )


def render_dataset(count_per_scene: int, rng: np.random.Generator) -> tuple[np.ndarray, list[shapes.Scene]]:
    """float32[N, 3, SIZE, SIZE] in [-1, 1] (NCHW, as diffusers' Flax VAE takes it) and their scenes."""
    scenes = [scene for scene in shapes.scenes(held_back=False) for _ in range(count_per_scene)]
    images = np.stack([shapes.render(scene, rng) for scene in scenes])
    return (images.astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2), scenes


def train_vae(vae: Any, params: Any, images: np.ndarray, steps: int, batch: int, seed: int) -> Any:
    import jax
    import jax.numpy as jnp
    import optax

    optimizer = optax.adam(optax.warmup_cosine_decay_schedule(0.0, 2e-3, 100, steps, end_value=5e-5))
    state = optimizer.init(params)

    @jax.jit
    def step(params: Any, state: Any, x: jax.Array, key: jax.Array) -> Any:
        def loss_fn(params: Any) -> Any:
            posterior = vae.apply({"params": params}, x, method=vae.encode).latent_dist
            z = posterior.sample(key)
            recon = vae.apply({"params": params}, z, method=vae.decode).sample
            mse = jnp.mean((recon - x) ** 2)
            kl = jnp.mean(posterior.kl()) / z[0].size
            # Latent channels 0-2 are asked to hold the image's colours averaged over each 8 x 8 cell
            # (channel 3 is free, for where edges cross a cell): the decoder then has the colours at hand
            # instead of discovering a code for them, which a short training does not manage.
            n, c, h, w = x.shape
            cells = x.reshape(n, c, h // 8, 8, w // 8, 8).mean(axis=(3, 5)).transpose(0, 2, 3, 1)
            aux = jnp.mean((posterior.mean[..., :3] - cells) ** 2)
            # L1 keeps edges sharp where MSE alone blurs them; the KL term only keeps latents bounded.
            return mse + jnp.mean(jnp.abs(recon - x)) + aux + 1e-6 * kl, mse

        (_, mse), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, mse

    rng = np.random.default_rng(seed)
    key = jax.random.PRNGKey(seed)
    started = time.perf_counter()
    for i in range(steps):
        key, sub = jax.random.split(key)
        x = jnp.asarray(images[rng.integers(0, len(images), batch)])
        params, state, mse = step(params, state, x, sub)
        if i % 100 == 0 or i == steps - 1:
            log(f"vae step {i}/{steps} mse {float(mse):.5f} ({time.perf_counter() - started:.0f} s)")
    return params


def encode_latents(vae: Any, params: Any, images: np.ndarray) -> np.ndarray:
    import jax

    # diffusers' Flax VAE returns NHWC latents; the UNet (and the engine) use NCHW.
    encode = jax.jit(
        lambda x: vae.apply({"params": params}, x, method=vae.encode).latent_dist.mean.transpose(0, 3, 1, 2)
    )
    return np.concatenate([np.asarray(encode(images[i : i + 256])) for i in range(0, len(images), 256)])


def prompt_forms(scene: shapes.Scene, draw: float) -> str | None:
    """The prompt a training example is shown with; None for the dropped (unconditional) one."""
    if draw < DROPPED:
        return None
    if draw < DROPPED + SHAPE_ONLY:
        return f"a {scene.colour} {scene.shape}"
    if draw < DROPPED + SHAPE_ONLY + BACKGROUND_ONLY:
        return f"a {scene.background} background"
    return shapes.prompt(scene)


def tokenize_all(modules: dict[str, Any], texts: list[str]) -> dict[str, np.ndarray]:
    """text -> int32[2, 77] token ids (one row per tokenizer), tokenized like the engine does."""
    table = {}
    for text in texts:
        rows = [
            tokenizer(
                text, padding="max_length", max_length=77, truncation=True, return_tensors="np"
            ).input_ids[0]
            for tokenizer in (modules["tokenizer"], modules["tokenizer_2"])
        ]
        table[text] = np.stack(rows).astype(np.int32)
    return table


def train_unet(
    modules: dict[str, Any],
    pipeline: Any,
    params: dict[str, Any],
    latents: np.ndarray,
    scenes: list[shapes.Scene],
    steps: int,
    batch: int,
    seed: int,
    checkpoint: Any = None,
) -> dict[str, Any]:
    """Phase 3; `checkpoint(params)` is called every 1000 steps (to look at a run before it ends)."""
    import jax
    import jax.numpy as jnp
    import optax

    unet = modules["unet"]
    scheduler = modules["scheduler"]
    alphas_cumprod = jnp.asarray(scheduler.create_state().common.alphas_cumprod)
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-3, min(200, steps // 10), steps, end_value=2e-5)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=1e-4))
    trainable = {name: params[name] for name in ("text_encoder", "text_encoder_2", "unet")}
    state = optimizer.init(trainable)
    time_ids = jnp.broadcast_to(jnp.array(TIME_IDS, dtype=jnp.float32), (batch, 6))

    @jax.jit
    def step(trainable: Any, ema: Any, state: Any, x0: Any, ids: Any, keep: Any, key: Any, i: Any) -> Any:
        t_key, n_key = jax.random.split(key)
        t = jax.random.randint(t_key, (batch,), 0, 1000)
        noise = jax.random.normal(n_key, x0.shape)
        a = alphas_cumprod[t][:, None, None, None]
        noisy = jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * noise
        # Min-SNR weighting (Hang et al., 2023, gamma 5): the nearly noise-free timesteps, where the
        # epsilon loss is large but the image is already decided, stop dominating the gradient; the
        # noisy ones, where colour and shape are chosen, get the attention (faster convergence).
        snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
        weight = jnp.minimum(snr, MIN_SNR_GAMMA) / snr

        def loss_fn(trainable: Any) -> Any:
            embeds, pooled = pipeline.get_embeddings(ids, trainable)
            embeds = embeds * keep[:, None, None]
            pooled = pooled * keep[:, None]
            predicted = unet.apply(
                {"params": trainable["unet"]},
                noisy,
                t,
                encoder_hidden_states=embeds,
                added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
            ).sample
            per_example = jnp.mean((predicted - noise) ** 2, axis=(1, 2, 3))
            return jnp.mean(weight * per_example), jnp.mean(per_example)

        (_, loss), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        updates, state = optimizer.update(grads, state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        # The model saved is an exponential moving average of the weights (its decay warms up so that
        # the early, random weights leave it quickly): smoother than the last step's weights.
        decay = jnp.minimum(EMA_DECAY, (1.0 + i) / (10.0 + i))
        ema = jax.tree_util.tree_map(lambda e, w: decay * e + (1 - decay) * w, ema, trainable)
        return trainable, ema, state, loss

    texts = {prompt_forms(scene, draw) for scene in scenes for draw in (0.15, 0.2, 0.3, 0.9)}
    table = tokenize_all(modules, sorted(t for t in texts if t is not None))
    empty = np.zeros_like(next(iter(table.values())))
    rng = np.random.default_rng(seed + 1)
    key = jax.random.PRNGKey(seed + 1)
    started = time.perf_counter()
    running = None
    ema = trainable
    for i in range(steps):
        index = rng.integers(0, len(latents), batch)
        forms = [prompt_forms(scenes[j], draw) for j, draw in zip(index, rng.random(batch), strict=True)]
        ids = np.stack([empty if text is None else table[text] for text in forms])
        keep = np.array([text is not None for text in forms], dtype=np.float32)
        key, sub = jax.random.split(key)
        x0 = jnp.asarray(latents[index])
        trainable, ema, state, loss = step(trainable, ema, state, x0, ids, keep, sub, jnp.float32(i))
        running = float(loss) if running is None else 0.98 * running + 0.02 * float(loss)
        if i % 100 == 0 or i == steps - 1:
            log(f"unet step {i}/{steps} loss {running:.4f} ({time.perf_counter() - started:.0f} s)")
        if checkpoint is not None and i % 1000 == 999 and i < steps - 1:
            checkpoint({**params, **ema})
    return {**params, **ema}


def save(modules: dict[str, Any], params: dict[str, Any], directory: Path, command: str) -> None:
    from diffusers import FlaxStableDiffusionXLPipeline

    pipeline: Any = FlaxStableDiffusionXLPipeline(
        **{name: modules[name] for name in ("text_encoder", "text_encoder_2", "vae", "tokenizer")},
        tokenizer_2=modules["tokenizer_2"],
        unet=modules["unet"],
        scheduler=modules["scheduler"],
    )
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    pipeline.save_pretrained(
        staging, params={k: params[k] for k in ("text_encoder", "text_encoder_2", "unet", "vae")}
    )
    (staging / "world.json").write_text(
        json.dumps(
            {
                "size": shapes.SIZE,
                "colours": shapes.COLOURS,
                "shapes": shapes.SHAPES,
                "held_back": sorted(shapes.HELD_BACK),
                "command": command,
            },
            indent=2,
        )
        + "\n"
    )
    # Tokenizers that read prompts as people write them ("An orange square, on the white background").
    demo_vocabulary.widen(staging)
    demo_vocabulary.write_sha256sums(staging)
    staging.chmod(0o755)
    if directory.exists():
        shutil.rmtree(directory)
    staging.rename(directory)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="model directory to write (replaced)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images-per-scene", type=int, default=48)
    parser.add_argument("--vae-steps", type=int, default=4000)
    parser.add_argument("--vae-batch", type=int, default=8)
    parser.add_argument("--unet-steps", type=int, default=7000)
    parser.add_argument("--unet-batch", type=int, default=32)
    parser.add_argument("--reuse-vae", type=Path, help="skip phase 1: take the autoencoder of this model")
    parser.add_argument(
        "--resume", type=Path, help="continue phase 3 from this model's UNet and text encoders"
    )
    args = parser.parse_args(argv)
    command = "python tools/train_demo_model.py " + " ".join(argv)
    silence_library_noise()
    import jax
    from diffusers import FlaxStableDiffusionXLPipeline

    jax.config.update("jax_default_matmul_precision", "float32")
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="demo-model-"))
    modules = build_modules(work)
    rng = np.random.default_rng(args.seed)
    params = {
        "text_encoder": _random_params(lambda k: modules["text_encoder"].init_weights(k, (1, 77)), rng),
        "text_encoder_2": _random_params(lambda k: modules["text_encoder_2"].init_weights(k, (1, 77)), rng),
        "unet": _random_params(modules["unet"].init_weights, rng),
        "vae": _random_params(modules["vae"].init_weights, rng),
    }
    count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    log(f"{count / 1e6:.2f} M parameters")
    images, scenes = render_dataset(args.images_per_scene, rng)
    log(f"rendered {len(images)} training images of {len(set(scenes))} scenes")

    phase = time.perf_counter()
    if args.reuse_vae:
        from diffusers import FlaxAutoencoderKL

        _, params["vae"] = FlaxAutoencoderKL.from_pretrained(args.reuse_vae / "vae")
    else:
        params["vae"] = train_vae(
            modules["vae"], params["vae"], images, args.vae_steps, args.vae_batch, args.seed
        )
    log(f"phase 1 (autoencoder) took {time.perf_counter() - phase:.0f} s")

    latents = encode_latents(modules["vae"], params["vae"], images)
    scaling = float(1.0 / latents.std())
    modules["vae"] = make_vae(scaling)
    log(f"latents std {latents.std():.4f} mean {latents.mean():.4f}: scaling_factor {scaling:.5f}")
    latents = latents * scaling

    pipeline = FlaxStableDiffusionXLPipeline(
        text_encoder=modules["text_encoder"],
        text_encoder_2=modules["text_encoder_2"],
        vae=modules["vae"],
        tokenizer=modules["tokenizer"],
        tokenizer_2=modules["tokenizer_2"],
        unet=modules["unet"],
        scheduler=modules["scheduler"],
    )

    def checkpoint(params: dict[str, Any]) -> None:
        save(modules, params, args.out.with_name(args.out.name + ".checkpoint"), command)

    checkpoint(params)  # the trained autoencoder, for --reuse-vae
    unet_seed = args.seed
    if args.resume:
        from diffusers import FlaxUNet2DConditionModel
        from transformers import FlaxCLIPTextModel, FlaxCLIPTextModelWithProjection

        _, params["unet"] = FlaxUNet2DConditionModel.from_pretrained(args.resume / "unet")
        for name, model_class in (
            ("text_encoder", FlaxCLIPTextModel),
            ("text_encoder_2", FlaxCLIPTextModelWithProjection),
        ):
            params[name] = model_class.from_pretrained(args.resume / name, _do_init=False)[1]
        unet_seed = args.seed + 1  # fresh batches and noise, not a replay of the first run's
    phase = time.perf_counter()
    params = train_unet(
        modules, pipeline, params, latents, scenes, args.unet_steps, args.unet_batch, unet_seed, checkpoint
    )
    log(f"phase 3 (unet + text encoders) took {time.perf_counter() - phase:.0f} s")
    save(modules, params, args.out, command)
    shutil.rmtree(work, ignore_errors=True)
    log(f"saved {args.out}; training took {time.perf_counter() - started:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
