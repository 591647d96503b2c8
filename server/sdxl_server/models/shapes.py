"""The demo model's world: one flat shape of one colour on a background of another, 64 x 64 pixels.

Shared by the training script (tools/train_demo_model.py), which renders its data here, and by the tests
and checks that judge what the model drew, which measure images here. numpy and PIL only (no JAX).

Judging an image: the background colour is the median of a frame of border pixels (shapes never touch
it); the shape is every pixel closer to the shape's colour than to the background's, where the shape's
colour is first estimated from the pixels far from the background. Each colour is named by the nearest
palette entry. The shape is named by its fill ratio: the mask's area over its bounding box's area is
1 for a square, pi/4 = 0.79 for a circle and 1/2 for an upright triangle.
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
    fill_ratio: float
    shape_pixels: int


# Fill-ratio boundaries between triangle (0.5), circle (0.79) and square (1.0).
TRIANGLE_BELOW = 0.65
SQUARE_ABOVE = 0.89


def nearest_colour(rgb: np.ndarray) -> str:
    names = list(COLOURS)
    palette = np.array([COLOURS[name] for name in names], dtype=np.float64)
    return names[int(np.argmin(((palette - rgb) ** 2).sum(axis=1)))]


def judge(image: np.ndarray) -> Judgement:
    """What `image` (uint8[h, w, 3]) shows, by the measures in this module's docstring."""
    pixels = np.asarray(image, dtype=np.float64)[..., :3]
    frame = np.ones(pixels.shape[:2], dtype=bool)
    frame[BORDER:-BORDER, BORDER:-BORDER] = False
    background_rgb = np.median(pixels[frame], axis=0)
    distance_to_background = np.linalg.norm(pixels - background_rgb, axis=-1)
    far = distance_to_background > 60
    if far.sum() < 4:
        return Judgement("none", "none", nearest_colour(background_rgb), 0.0, int(far.sum()))
    shape_rgb = np.median(pixels[far], axis=0)
    mask = np.linalg.norm(pixels - shape_rgb, axis=-1) < distance_to_background
    shape_rgb = np.median(pixels[mask], axis=0)
    rows, cols = np.nonzero(mask)
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    fill_ratio = float(mask.sum() / box)
    if fill_ratio < TRIANGLE_BELOW:
        shape = "triangle"
    elif fill_ratio > SQUARE_ABOVE:
        shape = "square"
    else:
        shape = "circle"
    return Judgement(
        nearest_colour(shape_rgb), shape, nearest_colour(background_rgb), fill_ratio, int(mask.sum())
    )
