"""A tiny random SDXL in diffusers Flax format, built locally from configs (no downloads).

It has SDXL's architecture (two CLIP text encoders whose hidden states are concatenated, a UNet with
text-time conditioning, a KL autoencoder with scale factor 8, the Euler scheduler with SDXL's schedule)
at toy widths, so that everything that serves real SDXL runs on it in milliseconds per step on a CPU,
through the same `FlaxStableDiffusionXLPipeline.from_pretrained` path. Its images are noise.

The widths are tied together (see DESIGN.md, "The engine"): the UNet's cross-attention width is the sum of
the two encoders' widths; its text-time projection input is 6 micro-conditions x the time embedding width
plus encoder 2's projection width; GroupNorm uses 32 groups, so every block width is a multiple of 32;
the tokenizer's 77 tokens must fit the encoders' position embeddings; and Flax CLIP pools at the
end-of-text token found as the largest id, so that token gets the highest id of the vocabulary.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# Written last into a finished model directory: its presence means the directory is complete. The
# version changes whenever the recipe below does, so that a stale cached model is not mistaken for it.
COMPLETION_MARKER = ".tiny-sdxl-v1-complete"

TEXT_WIDTH = 32  # hidden size of both text encoders
PROJECTION_WIDTH = 32  # text_encoder_2's pooled projection
TIME_EMBED_WIDTH = 8  # UNet addition_time_embed_dim
MAX_TOKENS = 77
START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"


def build_tiny_model(directory: Path, seed: int = 0) -> Path:
    """Write a random tiny SDXL pipeline to `directory` (created; must not hold another model).

    The weights depend only on `seed`. Returns `directory`.
    """
    from diffusers import (
        FlaxAutoencoderKL,
        FlaxEulerDiscreteScheduler,
        FlaxStableDiffusionXLPipeline,
        FlaxUNet2DConditionModel,
    )

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _write_tokenizer(directory / "tokenizer")
    tokenizer_2 = _write_tokenizer(directory / "tokenizer_2")
    vocab_size = len(tokenizer.get_vocab())

    text_encoder = _text_encoder(vocab_size, with_projection=False)
    text_encoder_2 = _text_encoder(vocab_size, with_projection=True)

    # Any: mypy cannot see the methods that Flax's dataclass transform and diffusers' mixins add.
    unet: Any = FlaxUNet2DConditionModel(
        sample_size=8,  # the pipeline's default image is 8 x 8 latents = 64 x 64 pixels
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=2,
        attention_head_dim=(2, 4),  # diffusers reads this as the number of heads (a historical misnomer)
        transformer_layers_per_block=(1, 1),
        cross_attention_dim=2 * TEXT_WIDTH,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_WIDTH,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_WIDTH + PROJECTION_WIDTH,
    )
    vae: Any = FlaxAutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 32),  # 4 levels: 3 downsamplings, scale factor 8
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
        scaling_factor=0.13025,  # SDXL's
    )
    # SDXL's schedule. The Flax Euler scheduler has no steps_offset (the PyTorch one uses 1 for SDXL).
    scheduler = FlaxEulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        timestep_spacing="leading",
    )
    rng = np.random.default_rng(seed)
    pipeline: Any = FlaxStableDiffusionXLPipeline(
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        vae=vae,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
    )
    params = {
        "text_encoder": _random_params(lambda key: text_encoder.init_weights(key, (1, MAX_TOKENS)), rng),
        "text_encoder_2": _random_params(lambda key: text_encoder_2.init_weights(key, (1, MAX_TOKENS)), rng),
        "unet": _random_params(unet.init_weights, rng),
        "vae": _random_params(vae.init_weights, rng),
    }
    pipeline.save_pretrained(directory, params=params)
    return directory


def ensure_tiny_model(directory: Path) -> Path:
    """Return `directory` holding the tiny model, building it first unless it is already complete.

    Safe when several processes call it at once: each builds into its own temporary directory next to
    `directory` and renames it into place; the first rename wins and the others discard their copy.
    A tiny model of an older recipe is replaced. Raises FileExistsError if `directory` holds anything
    else.
    """
    directory = Path(directory)
    if (directory / COMPLETION_MARKER).exists():
        return directory
    if _holds_something_else(directory):
        raise _not_a_tiny_model(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.building-", dir=directory.parent))
    try:
        build_tiny_model(staging)
        staging.chmod(0o755)  # mkdtemp makes it private; the model is meant to be shared
        (staging / COMPLETION_MARKER).write_text("complete\n")
        _move_into_place(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def _move_into_place(staging: Path, directory: Path) -> None:
    for _ in range(3):
        try:
            # Atomic. Replaces only a missing or empty directory; fails if another process got there first.
            os.rename(staging, directory)
            return
        except OSError:
            if (directory / COMPLETION_MARKER).exists():
                return  # another process finished first: its copy is identical
            if _holds_something_else(directory):
                raise _not_a_tiny_model(directory) from None
            # An older recipe: move it aside (another process may be doing the same), then retry.
            discarded = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
            with contextlib.suppress(FileNotFoundError):
                os.rename(directory, discarded / "model")
            shutil.rmtree(discarded, ignore_errors=True)
    raise _not_a_tiny_model(directory)


def _holds_something_else(directory: Path) -> bool:
    """True for a non-empty directory (or a file) that is no tiny model of any recipe."""
    if not directory.exists():
        return False
    if not directory.is_dir():
        return True
    return any(directory.iterdir()) and not any(directory.glob(".tiny-sdxl*complete"))


def _not_a_tiny_model(directory: Path) -> FileExistsError:
    return FileExistsError(
        f"{directory} exists but holds no complete tiny model ({COMPLETION_MARKER} is missing); "
        "remove it and try again"
    )


def _write_tokenizer(directory: Path, words: tuple[str, ...] = ()) -> Any:
    """Write and load a CLIP tokenizer over a byte-level vocabulary, with BPE merges for `words`.

    Without `words` every text tokenizes to one token per byte (the last byte of a word carries CLIP's
    `</w>` suffix), so any prompt is representable without a trained vocabulary. Each of `words` (lower
    case letters) becomes one token, as a real CLIP vocabulary's merges make whole tokens of common words;
    any other word still falls back to its bytes.
    """
    from transformers import CLIPTokenizer
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    byte_symbols = list(bytes_to_unicode().values())
    merges, merged = _whole_word_merges(words)
    tokens = byte_symbols + [symbol + "</w>" for symbol in byte_symbols] + merged
    tokens += [START_TOKEN, END_TOKEN]  # the end token keeps the highest id: Flax CLIP pools at it
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tokenizer = CLIPTokenizer(
        vocab_file=str(directory / "vocab.json"),
        merges_file=str(directory / "merges.txt"),
        model_max_length=MAX_TOKENS,
    )
    for word in words:
        pieces = tokenizer.tokenize(word)
        if pieces != [word + "</w>"]:
            raise ValueError(f"the merges for {word!r} give {pieces}, not one token")
    tokenizer.save_pretrained(directory)
    return tokenizer


def _whole_word_merges(words: tuple[str, ...]) -> tuple[list[tuple[str, str]], list[str]]:
    """BPE merges (in rank order) that build each word left to right, and the tokens they make.

    BPE applies the lowest-ranked merge found anywhere in a word first, so a merge made for one word can
    fire inside another ("gr" of "green" inside "background"): longer words' chains rank first, and
    _write_tokenizer checks that every word ends as one token.
    """
    merges: list[tuple[str, str]] = []
    merged: list[str] = []
    for word in sorted(set(words), key=lambda w: (-len(w), w)):
        if len(word) < 2:
            continue  # a one-letter word is one byte token already
        symbols = [*word[:-1], word[-1] + "</w>"]
        left = symbols[0]
        for right in symbols[1:]:
            pair = (left, right)
            left = left + right
            if pair not in merges:
                merges.append(pair)
                merged.append(left)
    return merges, merged


def _text_encoder(vocab_size: int, *, with_projection: bool) -> Any:
    """A 2-layer CLIP text encoder of width 32, without parameters."""
    from transformers import CLIPTextConfig, FlaxCLIPTextModel, FlaxCLIPTextModelWithProjection

    end_id = vocab_size - 1  # END_TOKEN is the last and highest id
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_WIDTH,
        intermediate_size=4 * TEXT_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=PROJECTION_WIDTH,
        hidden_act="gelu",
        bos_token_id=end_id - 1,
        eos_token_id=end_id,
        pad_token_id=end_id,
    )
    model_class = FlaxCLIPTextModelWithProjection if with_projection else FlaxCLIPTextModel
    return model_class(config, _do_init=False)


def _random_params(init_weights: Callable[[Any], Any], rng: np.random.Generator) -> dict[str, Any]:
    """Random parameters with the structure that `init_weights(key)` would give.

    Flax's own initialisation runs every module eagerly (a minute for this model on 2 busy cores), so we
    only trace it for the shapes and draw the values with numpy: quick and independent of the JAX
    backend. Kernels are scaled by 1/sqrt(fan-in) so that activations keep unit scale through the
    network and images vary instead of saturating; norms start as the identity, biases at zero.
    """
    import jax
    from flax.core.frozen_dict import unfreeze
    from flax.traverse_util import flatten_dict, unflatten_dict

    shapes = jax.eval_shape(init_weights, jax.random.PRNGKey(0))
    flat = flatten_dict(unfreeze(shapes))
    values = {}
    for path, leaf in sorted(flat.items()):
        name = path[-1]
        if name == "scale":
            value = np.ones(leaf.shape)
        elif name == "bias":
            value = np.zeros(leaf.shape)
        elif name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            value = rng.standard_normal(leaf.shape) / np.sqrt(fan_in)
        elif name == "embedding":
            value = rng.standard_normal(leaf.shape)
        else:
            raise ValueError(f"no initialisation rule for parameter {'/'.join(path)}")
        values[path] = value.astype(leaf.dtype)
    return unflatten_dict(values)
