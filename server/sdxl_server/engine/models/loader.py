"""Loading a diffusers-format Flax SDXL pipeline and tokenizing prompts the way it does."""

from __future__ import annotations

import dataclasses
import json
import re
import threading
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sdxl_server.engine.models.quiet_libraries import silence_library_noise

# Parameter groups the programs use; the scheduler state is kept apart (float32, host side).
PARAM_GROUPS = ("text_encoder", "text_encoder_2", "unet", "vae")


def resolve_dtype(name: str, platform: str) -> Any:
    """'auto' is bfloat16 on accelerators and float32 on the CPU (where bf16 is slow and imprecise)."""
    if name == "auto":
        return jnp.float32 if platform == "cpu" else jnp.bfloat16
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


@dataclasses.dataclass
class LoadedModel:
    pipeline: Any  # FlaxStableDiffusionXLPipeline: module definitions, tokenizers, scheduler
    params: dict[str, Any]  # PARAM_GROUPS, cast to `dtype`
    scheduler_state: Any  # float32 always: bf16 schedules give black or degraded images
    dtype: Any
    max_tokens: int
    vae_scale_factor: int
    latent_channels: int
    # The words a model with a closed vocabulary knows (the demo model's world.json); None: any word.
    known_words: frozenset[str] | None = None
    _tokenizer_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    @property
    def dtype_name(self) -> str:
        return jnp.dtype(self.dtype).name

    def __repr__(self) -> str:
        # Short on purpose: jax.jit of a shard_map over functools.partial(fn, model, ...) formats the
        # partial, this model included, for its debug info; the generated repr printed every parameter
        # array (2-3 CPU seconds of a pod's start with the tiny model, all of it thrown away).
        return (
            f"LoadedModel(dtype={self.dtype_name}, max_tokens={self.max_tokens}, "
            f"vae_scale_factor={self.vae_scale_factor}, latent_channels={self.latent_channels})"
        )

    def tokenize(self, text: str) -> tuple[np.ndarray, bool]:
        """Token ids int32[2, max_tokens] (one row per text encoder) and whether `text` was truncated.

        Same padding and truncation as `FlaxStableDiffusionXLPipeline.prepare_inputs`, over a bounded
        prefix of the text (`readable_prefix`): the tokenizer's cost is bounded whatever a caller sends.
        """
        prefix, cut = readable_prefix(text, self.max_tokens)
        rows = []
        truncated = cut
        with self._tokenizer_lock:  # the Python CLIP tokenizer keeps a cache that is not thread-safe
            for tokenizer in (self.pipeline.tokenizer, self.pipeline.tokenizer_2):
                full = tokenizer(prefix, truncation=False, verbose=False)["input_ids"]
                truncated = truncated or len(full) > self.max_tokens
                ids = tokenizer(
                    prefix,
                    padding="max_length",
                    max_length=self.max_tokens,
                    truncation=True,
                    return_tensors="np",
                ).input_ids
                rows.append(ids[0])
                _bound_word_cache(tokenizer)
        return np.stack(rows).astype(np.int32), truncated

    def unknown_words(self, *texts: str) -> tuple[str, ...]:
        """The words of `texts` outside `known_words`, in order of appearance, each once (none without
        `known_words`). Read after the tokenizer's own normalizer, so that a word it rewrites into a
        known one (the demo model reads "the" as "a") is known."""
        if self.known_words is None:
            return ()
        normalizer = getattr(getattr(self.pipeline.tokenizer, "backend_tokenizer", None), "normalizer", None)
        unknown: dict[str, None] = {}
        for text in texts:
            prefix, _ = readable_prefix(text, self.max_tokens)
            normalized = normalizer.normalize_str(prefix) if normalizer is not None else prefix.lower()
            unknown.update((word, None) for word in _WORD.findall(normalized) if word not in self.known_words)
        return tuple(unknown)


_WORD = re.compile(r"[^\W_]+")


def _known_words(source: str) -> frozenset[str] | None:
    """The `words` list of the model folder's world.json (the demo model's), if it has one."""
    world = Path(source) / "world.json"
    if not world.is_file():
        return None
    words = json.loads(world.read_text()).get("words")
    return frozenset(words) if words else None


# A CLIP token covers at most a few characters of text (15 in the byte-level vocabulary, about as many
# in CLIP's BPE vocabulary): this many characters per token the model reads is more than any real prompt
# needs, and bounds what the tokenizer ever sees.
_CHARACTERS_PER_TOKEN = 16
# The slow CLIP tokenizer caches the BPE of every distinct word forever: cleared past this many words.
_WORD_CACHE_LIMIT = 4096


def readable_prefix(text: str, max_tokens: int) -> tuple[str, bool]:
    """The part of `text` the model can read (whitespace collapsed as CLIP's cleaning does, at most
    max_tokens x 16 characters), and whether anything was cut off.

    CLIP's BPE costs the square of a word's length, so a "word" longer than max_tokens characters (letters
    or symbols without a space) is split into pieces of that length: a piece still yields at least as many
    tokens as the model reads in the byte-level vocabulary, so the ids the model sees do not change there;
    with a BPE vocabulary only such pathological words can tokenize differently after the split."""
    collapsed = " ".join(text.split())
    budget = max_tokens * _CHARACTERS_PER_TOKEN
    cut = len(collapsed) > budget
    words = collapsed[:budget].split(" ")
    pieces = [word[i : i + max_tokens] for word in words for i in range(0, len(word), max_tokens)]
    return " ".join(pieces), cut


def _bound_word_cache(tokenizer: Any) -> None:
    cache = getattr(tokenizer, "cache", None)
    if isinstance(cache, dict) and len(cache) > _WORD_CACHE_LIMIT:
        special = {k: v for k, v in cache.items() if k.startswith("<|")}  # the start and end tokens
        cache.clear()
        cache.update(special)


def load_model(
    source: str, dtype_name: str, model_configs: str | None = None, platform: str | None = None
) -> LoadedModel:
    """Loads the pipeline from a diffusers folder (Flax or PyTorch-layout safetensors weights), a
    single-file SDXL checkpoint (read with `model_configs`: a configs folder or an architecture name,
    default sdxl-base) or a hub id; parameters cast to the resolved dtype. `platform`: the one the
    programs will run on (default: this process's; `sdxl-server compile` names a TPU from a CPU host)."""
    silence_library_noise()
    from sdxl_server.engine.models.checkpoints import load_pipeline

    platform = platform or jax.default_backend()
    dtype = resolve_dtype(dtype_name, platform)
    pipeline, params = load_pipeline(
        source,
        model_configs,
        dtype=dtype,
        # Splitting the head dimension makes attention much faster on TPU (the reference recipe's setting).
        split_head_dim=platform == "tpu",
    )
    scheduler_state = params.pop("scheduler")
    # diffusers' to_bf16 calls the removed jax.tree_map; the scheduler state stays float32 regardless.
    # One group at a time, dropping the loaded copy as soon as its cast exists: a real SDXL's 2.6 B UNet
    # parameters must not be held twice over (the host copy and the device copy) longer than needed.
    cast = {}
    for group in PARAM_GROUPS:
        cast[group] = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype=dtype), params.pop(group))
    return LoadedModel(
        pipeline=pipeline,
        params=cast,
        scheduler_state=scheduler_state,
        dtype=dtype,
        max_tokens=int(pipeline.tokenizer.model_max_length),
        vae_scale_factor=int(pipeline.vae_scale_factor),
        latent_channels=int(pipeline.unet.config.in_channels),
        known_words=_known_words(source),
    )
