"""The demo model draws what it is asked, through the real gRPC server and the real client.

Every prompt here names a (colour, shape) pair that training never showed (shapes.HELD_BACK), so the
scores measure generalisation. Images are judged by shapes.judge: the nearest palette colour of the
background frame and of the shape's pixels, and the shape's fill ratio of its bounding box.
All images are generated once (concurrently, so that the server batches them) and then judged.

The floors asserted are issue 13's goals: both colours right in >= 90% of the images, the shape in >= 80%
(the shipped model measured 100% and 93%, printed with -s; chance is 1/56 for a colour pair, 1/3 for a
shape), so that a broken path (tokenizer, encoders, guidance, schedule, VAE, encoding) fails them.
"""

from __future__ import annotations

import collections
import concurrent.futures
import io
from collections.abc import Iterable

import numpy as np
import pytest
from PIL import Image
from sdxl_client import Client
from sdxl_server.engine.models import shapes
from sdxl_server.engine.models.shapes import Judgement

pytestmark = pytest.mark.slow

STEPS = 10
DEFAULT_GUIDANCE = None  # unset: the server's default (0 now means no guidance)
NO_GUIDANCE = 1.0
SEED = 1000
# For the negative prompt: a pair that training did show, with the background left open, so that the
# model picks the background; the negative prompt then names the colour it picked most often.
OPEN_PROMPT = "a white circle"
OPEN_IMAGES = 16
# Measured with the shipped model: 100% colours, 93% shapes; all right 90% at the default guidance
# against 52% at guidance 1.0 (on every other scene).
COLOURS_FLOOR = 0.9
SHAPE_FLOOR = 0.8
GUIDANCE_GAIN = 0.2


def _judge(data: bytes) -> Judgement:
    with Image.open(io.BytesIO(data)) as image:
        return shapes.judge(np.asarray(image.convert("RGB")))


def _generate(client: Client, prompt: str, seed: int, count: int, **options: object) -> list[Judgement]:
    result = client.generate(
        prompt,
        seed=seed,
        num_images=count,
        steps=STEPS,
        format="png",
        **options,  # type: ignore[arg-type]
    )
    return [_judge(image.data) for image in result.images]


@pytest.fixture(scope="module")
def judged(demo_server: str) -> dict[str, object]:
    held_back = shapes.scenes(held_back=True)
    with Client(demo_server, timeout=300) as client, concurrent.futures.ThreadPoolExecutor(32) as pool:

        def submit(prompt: str, seed: int, count: int, **options: object) -> concurrent.futures.Future:
            return pool.submit(_generate, client, prompt, seed, count, **options)

        guided = {
            scene: submit(shapes.prompt(scene), SEED + i, 1, guidance_scale=DEFAULT_GUIDANCE)
            for i, scene in enumerate(held_back)
        }
        # Every other scene: enough to compare with, at half the cost.
        unguided = {
            scene: submit(shapes.prompt(scene), SEED + i, 1, guidance_scale=NO_GUIDANCE)
            for i, scene in enumerate(held_back)
            if i % 2 == 0
        }
        seeds = range(SEED, SEED + OPEN_IMAGES, 4)
        plain = [j for future in [submit(OPEN_PROMPT, seed, 4) for seed in seeds] for j in future.result()]
        avoided = collections.Counter(j.background for j in plain).most_common(1)[0][0]
        negative_prompt = f"a {avoided} background"
        negative = [submit(OPEN_PROMPT, seed, 4, negative_prompt=negative_prompt) for seed in seeds]
        return {
            "guided": {scene: future.result()[0] for scene, future in guided.items()},
            "unguided": {scene: future.result()[0] for scene, future in unguided.items()},
            "plain": plain,
            "avoided": avoided,
            "negative": [j for future in negative for j in future.result()],
        }


def _confusion(pairs: Iterable[tuple[str, str]], labels: Iterable[str]) -> str:
    """A confusion table (rows: asked, columns: drawn) as text."""
    labels = list(labels)
    counts = collections.Counter(pairs)
    drawn = labels + sorted({got for _, got in counts if got not in labels})
    width = max(len(label) for label in drawn) + 1
    lines = ["asked\\drawn".ljust(width + 4) + "".join(label[:width].rjust(width) for label in drawn)]
    for asked in labels:
        row = [counts[(asked, got)] for got in drawn]
        if any(row):
            lines.append(asked.ljust(width + 4) + "".join(str(n).rjust(width) for n in row))
    return "\n".join(lines)


def _scores(results: dict[shapes.Scene, Judgement]) -> tuple[float, float, float]:
    """Fractions of images with both colours right, with the shape right, and with everything right."""
    colours = [j.colour == s.colour and j.background == s.background for s, j in results.items()]
    shape = [j.shape == s.shape for s, j in results.items()]
    return float(np.mean(colours)), float(np.mean(shape)), float(np.mean(np.logical_and(colours, shape)))


def _report(results: dict[shapes.Scene, Judgement]) -> str:
    colour_pairs = [(s.colour, j.colour) for s, j in results.items()]
    colour_pairs += [(s.background, j.background) for s, j in results.items()]
    shape_pairs = [(s.shape, j.shape) for s, j in results.items()]
    colours, shape, both = _scores(results)
    return (
        f"colours right {colours:.0%}, shape right {shape:.0%}, all right {both:.0%} of {len(results)}\n"
        f"colours (shape and background):\n{_confusion(colour_pairs, shapes.COLOURS)}\n"
        f"shapes:\n{_confusion(shape_pairs, shapes.SHAPES)}"
    )


def test_held_back_pairs_are_drawn_in_the_colours_asked(judged: dict[str, object]) -> None:
    results = judged["guided"]
    assert isinstance(results, dict)
    colours, _, _ = _scores(results)
    print(_report(results))
    assert colours >= COLOURS_FLOOR, _report(results)


def test_held_back_pairs_are_drawn_in_the_shape_asked(judged: dict[str, object]) -> None:
    results = judged["guided"]
    assert isinstance(results, dict)
    _, shape, _ = _scores(results)
    assert shape >= SHAPE_FLOOR, _report(results)


def test_guidance_makes_the_model_follow_the_prompt(judged: dict[str, object]) -> None:
    guided, unguided = judged["guided"], judged["unguided"]
    assert isinstance(guided, dict) and isinstance(unguided, dict)
    same_scenes = {scene: guided[scene] for scene in unguided}
    with_guidance, without = _scores(same_scenes)[2], _scores(unguided)[2]
    print(f"all right: {with_guidance:.0%} at the default guidance, {without:.0%} at guidance 1.0")
    report = f"default guidance:\n{_report(same_scenes)}\nguidance 1.0:\n{_report(unguided)}"
    assert with_guidance >= without + GUIDANCE_GAIN, report


def test_a_negative_prompt_moves_the_background_away_from_its_colour(judged: dict[str, object]) -> None:
    plain, negative, avoided = judged["plain"], judged["negative"], judged["avoided"]
    assert isinstance(plain, list) and isinstance(negative, list)
    plain_backgrounds = collections.Counter(j.background for j in plain)
    negative_backgrounds = collections.Counter(j.background for j in negative)
    print(f"{OPEN_PROMPT!r} backgrounds: {dict(plain_backgrounds)}")
    print(f"with the negative prompt 'a {avoided} background': {dict(negative_backgrounds)}")
    # The model's favourite background for this prompt, named in the negative prompt, mostly disappears.
    assert plain_backgrounds[avoided] >= 4, plain_backgrounds
    assert negative_backgrounds[avoided] <= plain_backgrounds[avoided] // 3, negative_backgrounds
    # And the shape is still white.
    assert sum(j.colour == "white" for j in negative) >= 0.8 * len(negative), negative
