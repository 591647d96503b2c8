"""The demo model draws prompts as people write them: articles ("a", "an", "the"), capitals, punctuation,
a missing "on" or another preposition. Its tokenizers rewrite such prompts into the one form it was
trained on (engine/models/demo_vocabulary.py).

Two checks: the rewritten prompts give exactly the trained form's token ids (fast, no server), and,
through the real server and client, images of held-back scenes asked for in everyday phrasings are
judged by colour and shape (shapes.judge) against the same floors as tests/demo/test_demo_model.py.
Words outside the demo's world are reported, and the image is still made.
"""

from __future__ import annotations

import concurrent.futures
import io

import numpy as np
import pytest
from PIL import Image
from sdxl_client import Client
from sdxl_server.engine.models import shapes
from sdxl_server.engine.models.model_source import resolve_model

STEPS = 10
SEED = 2000
COLOURS_FLOOR = 0.9  # as tests/demo/test_demo_model.py: issue 13's goals
SHAPE_FLOOR = 0.8


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# Everyday phrasings of one scene; each held-back scene is asked for in one of them, in turn.
PHRASINGS = (
    lambda s: (
        f"{article(s.colour)} {s.colour} {s.shape} on {article(s.background)} {s.background} background"
    ),
    lambda s: f"The {s.colour.title()} {s.shape.title()} on the {s.background} background.",
    lambda s: f"{s.colour} {s.shape}, {s.background} background",
    lambda s: (
        f"{article(s.colour).title()} {s.colour} {s.shape} with {article(s.background)} "
        f"{s.background} background!"
    ),
    lambda s: f"the {s.colour} {s.shape} against the {s.background.upper()} background",
)
# The issue's own examples (trained pairs): each came out in the wrong colours before.
ISSUE_PROMPTS = {
    "an orange triangle on a blue background": shapes.Scene("orange", "triangle", "blue"),
    "an orange square on a white background": shapes.Scene("orange", "square", "white"),
}


def _asked() -> dict[str, shapes.Scene]:
    held_back = shapes.scenes(held_back=True)
    asked = {PHRASINGS[i % len(PHRASINGS)](scene): scene for i, scene in enumerate(held_back)}
    return {**asked, **ISSUE_PROMPTS}


@pytest.fixture(scope="module")
def demo_tokenizers() -> list[object]:
    from transformers import AutoTokenizer

    directory = resolve_model("demo")
    return [AutoTokenizer.from_pretrained(f"{directory}/{name}") for name in ("tokenizer", "tokenizer_2")]


def test_everyday_phrasings_read_as_the_trained_form(demo_tokenizers: list[object]) -> None:
    scenes = shapes.scenes(held_back=True) + shapes.scenes(held_back=False)
    for tokenizer in demo_tokenizers:
        assert type(tokenizer).__name__ == "CLIPTokenizerFast"  # the class that applies the normalizer
        for scene in scenes:
            trained = tokenizer(shapes.prompt(scene)).input_ids  # type: ignore[operator]
            for phrase in PHRASINGS:
                assert tokenizer(phrase(scene)).input_ids == trained, phrase(scene)  # type: ignore[operator]
        # The halves the model was also trained on.
        assert tokenizer("Red Circle.").input_ids == tokenizer("a red circle").input_ids  # type: ignore[operator]
        assert tokenizer("the blue background").input_ids == tokenizer("a blue background").input_ids  # type: ignore[operator]


def _judge(data: bytes) -> shapes.Judgement:
    with Image.open(io.BytesIO(data)) as image:
        return shapes.judge(np.asarray(image.convert("RGB")))


@pytest.fixture(scope="module")
def drawn(demo_server: str) -> dict[str, shapes.Judgement]:
    asked = _asked()
    with Client(demo_server, timeout=300) as client, concurrent.futures.ThreadPoolExecutor(32) as pool:
        futures = {
            prompt: pool.submit(client.generate, prompt, seed=SEED + i, steps=STEPS, format="png")
            for i, prompt in enumerate(asked)
        }
        results = {prompt: future.result() for prompt, future in futures.items()}
    for prompt, result in results.items():
        assert result.unknown_words == (), (prompt, result.unknown_words)  # every word is understood
    return {prompt: _judge(result.images[0].data) for prompt, result in results.items()}


def test_everyday_phrasings_are_drawn_in_the_colours_asked(drawn: dict[str, shapes.Judgement]) -> None:
    asked = _asked()
    right = {p: j.colour == asked[p].colour and j.background == asked[p].background for p, j in drawn.items()}
    wrong = {p: (drawn[p].colour, drawn[p].background) for p, ok in right.items() if not ok}
    print(f"colours right in {np.mean(list(right.values())):.0%} of {len(right)}; wrong: {wrong}")
    assert np.mean(list(right.values())) >= COLOURS_FLOOR, wrong
    for prompt in ISSUE_PROMPTS:
        assert right[prompt], (prompt, drawn[prompt])


def test_everyday_phrasings_are_drawn_in_the_shape_asked(drawn: dict[str, shapes.Judgement]) -> None:
    asked = _asked()
    right = {p: j.shape == asked[p].shape for p, j in drawn.items()}
    wrong = {p: drawn[p].shape for p, ok in right.items() if not ok}
    print(f"shape right in {np.mean(list(right.values())):.0%} of {len(right)}; wrong: {wrong}")
    assert np.mean(list(right.values())) >= SHAPE_FLOOR, wrong


def test_words_outside_the_world_are_reported_and_the_image_is_still_made(demo_server: str) -> None:
    with Client(demo_server, timeout=300) as client:
        result = client.generate(
            "A fluffy cat on a red background", negative_prompt="a dog", seed=SEED, steps=STEPS
        )
        assert result.unknown_words == ("fluffy", "cat", "dog")
        assert len(result.images) == 1 and result.images[0].to_pil().size == (64, 64)
        streamed = [e for e in client.generate_stream("a red cat", seed=SEED, steps=STEPS)]
        assert streamed[-1].unknown_words == ("cat",)  # type: ignore[union-attr]
