"""A PNG writer for uint8 RGB pixels whose compression runs without the GIL.

Pillow's PNG encoder holds the GIL while it filters and deflates, so the image workers, which exist to
encode in parallel with each other and with the step loop, took turns. Here the only per-pixel work in
Python is one numpy subtraction (PNG's "Sub" filter: each byte minus the byte of the pixel to its left,
which suits smooth photographic images about as well as Pillow's adaptive choice) and the compression is
`zlib.compress`, which releases the GIL while it deflates. The output is a standard 8-bit RGB PNG
(lossless: decoding it gives the pixels back exactly).
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SUB_FILTER = 1
MIN_LEVEL, MAX_LEVEL = 0, 9


def encode_png(pixels: np.ndarray, level: int = 1) -> bytes:
    """Encodes uint8[height, width, 3] pixels; `level` is zlib's (0: stored, 1: fastest, 9: smallest)."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected uint8[height, width, 3] pixels, got {pixels.dtype}{list(pixels.shape)}")
    if not MIN_LEVEL <= level <= MAX_LEVEL:
        raise ValueError(f"png compression level must be within {MIN_LEVEL}..{MAX_LEVEL}, got {level}")
    height, width, _ = pixels.shape
    rows = pixels.reshape(height, width * 3)
    # One buffer holds every scanline with its filter byte in front: the one copy made of the pixels.
    scanlines = np.empty((height, 1 + width * 3), np.uint8)
    scanlines[:, 0] = _SUB_FILTER
    scanlines[:, 1:4] = rows[:, :3]
    np.subtract(rows[:, 3:], rows[:, :-3], out=scanlines[:, 4:])  # wraps modulo 256, as PNG wants
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, deflate, no interlace
    return b"".join(
        (
            _SIGNATURE,
            _chunk(b"IHDR", header),
            _chunk(b"IDAT", zlib.compress(scanlines.data, level)),
            _chunk(b"IEND"),
        )
    )


def _chunk(kind: bytes, data: bytes = b"") -> bytes:
    return b"".join(
        (struct.pack(">I", len(data)), kind, data, struct.pack(">I", zlib.crc32(data, zlib.crc32(kind))))
    )
