"""The demo model's world: one flat shape of one colour on a background of another, 64 x 64 pixels.

Shared by the training script (tools/train_demo_model.py), which renders its data here, and by the tests
and checks that judge what the model drew, which measure images here. numpy and PIL only (no JAX).

Judging an image: the background colour is the median of a frame of border pixels (shapes never touch
it); the shape is every pixel closer to the shape's colour than to the background's, where the shape's
colour is first estimated from the pixels far from the background. Each colour is named by the nearest
palette entry; the shape mask is its largest connected region. The shape is the ideal circle, square or
upright triangle, drawn to fill the mask's bounding box, that overlaps the mask best (intersection over
union): a simple measure that, unlike the fill ratio alone, still tells shapes apart when blur rounds a
square's corners or a triangle's tips.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64  # pixels, the model's native resolution
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (245, 220, 30),
    "orange": (245, 135, 20),
    "purple": (140, 40, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
# Every word of every prompt in this world (see prompt()): the demo model's tokenizer has one token each.
WORDS = (*COLOURS, *SHAPES, "a", "on", "background")
# Never drawn in training, in any prompt: generating them measures generalisation, not memory.
HELD_BACK: frozenset[tuple[str, str]] = frozenset(
    {
        ("red", "triangle"),
        ("green", "square"),
        ("blue", "circle"),
        ("yellow", "circle"),
        ("purple", "triangle"),
        ("white", "square"),
    }
)
# Geometry varies within these bounds so that seeds give different images; a shape stays >= 8 px
# inside every border.
CENTRE_JITTER = 5
MIN_RADIUS, MAX_RADIUS = 13, 18
BORDER = 3  # width of the frame of pixels that shows the background


@dataclasses.dataclass(frozen=True)
class Scene:
    colour: str  # the shape's
    shape: str
    background: str


def prompt(scene: Scene) -> str:
    return f"a {scene.colour} {scene.shape} on a {scene.background} background"


def scenes(*, held_back: bool) -> list[Scene]:
    """Every scene whose (colour, shape) is held back (`held_back`) or trained on (not `held_back`)."""
    return [
        Scene(colour, shape, background)
        for colour, shape, background in itertools.product(COLOURS, SHAPES, COLOURS)
        if colour != background and ((colour, shape) in HELD_BACK) == held_back
    ]


def render(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """uint8[SIZE, SIZE, 3], the shape at a random centre and size, antialiased (drawn at 4x)."""
    scale = 4
    cx, cy = (SIZE / 2 + rng.uniform(-CENTRE_JITTER, CENTRE_JITTER, size=2)) * scale
    r = rng.uniform(MIN_RADIUS, MAX_RADIUS) * scale
    image = Image.new("RGB", (SIZE * scale, SIZE * scale), COLOURS[scene.background])
    draw = ImageDraw.Draw(image)
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif scene.shape == "square":
        half = r * 0.85  # about a circle's area
        draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif scene.shape == "triangle":
        draw.polygon(((cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)), fill=fill)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}")
    return np.asarray(image.resize((SIZE, SIZE), Image.Resampling.BOX))


@dataclasses.dataclass(frozen=True)
class Judgement:
    colour: str
    shape: str
    background: str
    fill_ratio: float  # the mask's area over its bounding box's
    overlaps: dict[str, float]  # shape -> intersection over union of the mask and that ideal shape
    shape_pixels: int


def ideal_shapes(height: int, width: int) -> dict[str, np.ndarray]:
    """Each shape drawn to fill a `height` x `width` bounding box (bool masks, pixel centres)."""
    y, x = np.mgrid[0:height, 0:width] + 0.5
    half_width = (y / height) * width / 2  # of the upright triangle, from its tip down to its base
    return {
        "circle": ((x - width / 2) / (width / 2)) ** 2 + ((y - height / 2) / (height / 2)) ** 2 <= 1,
        "square": np.ones((height, width), dtype=bool),
        "triangle": np.abs(x - width / 2) <= half_width,
    }


def nearest_colour(rgb: np.ndarray) -> str:
    names = list(COLOURS)
    palette = np.array([COLOURS[name] for name in names], dtype=np.float64)
    return names[int(np.argmin(((palette - rgb) ** 2).sum(axis=1)))]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = ndimage.sum(mask, labels, index=range(1, count + 1))
    return labels == 1 + int(np.argmax(sizes))


def judge(image: np.ndarray) -> Judgement:
    """What `image` (uint8[h, w, 3]) shows, by the measures in this module's docstring."""
    pixels = np.asarray(image, dtype=np.float64)[..., :3]
    frame = np.ones(pixels.shape[:2], dtype=bool)
    frame[BORDER:-BORDER, BORDER:-BORDER] = False
    background_rgb = np.median(pixels[frame], axis=0)
    distance_to_background = np.linalg.norm(pixels - background_rgb, axis=-1)
    far = distance_to_background > 60
    if far.sum() < 4:
        return Judgement("none", "none", nearest_colour(background_rgb), 0.0, {}, int(far.sum()))
    shape_rgb = np.median(pixels[far], axis=0)
    # Stray specks elsewhere would stretch the bounding box: the shape is the largest connected region.
    mask = _largest_component(np.linalg.norm(pixels - shape_rgb, axis=-1) < distance_to_background)
    shape_rgb = np.median(pixels[mask], axis=0)
    rows, cols = np.nonzero(mask)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    box = mask[top:bottom, left:right]
    overlaps = {
        name: float(np.logical_and(box, ideal).sum() / np.logical_or(box, ideal).sum())
        for name, ideal in ideal_shapes(*box.shape).items()
    }
    shape = max(overlaps, key=overlaps.__getitem__)
    return Judgement(
        nearest_colour(shape_rgb),
        shape,
        nearest_colour(background_rgb),
        float(box.mean()),
        overlaps,
        int(mask.sum()),
    )
