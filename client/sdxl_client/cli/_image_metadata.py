"""Generation parameters written into image files, the way other Stable Diffusion tools write them.

The text is AUTOMATIC1111's "parameters" block, which image viewers, civitai and most SD front-ends read::

    a lighthouse at dusk
    Negative prompt: fog
    Steps: 30, Sampler: Euler, CFG scale: 5, Seed: 21, Size: 1024x1024, Model: stabilityai/..., Version: ...

PNG carries it in a ``parameters`` text chunk; JPEG and WebP in the EXIF ``UserComment`` tag (UNICODE
encoding), as A1111 does with piexif. The bytes are edited in place, never re-encoded, so the pixels stay
exactly the server's (a JPEG re-encode would lose quality) and Pillow is not needed.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass

from sdxl_client._types import ImageFormat

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_EXIF_IFD_POINTER = 0x8769
_USER_COMMENT = 0x9286
_TIFF_LONG, _TIFF_UNDEFINED = 4, 7
_UNICODE_PREFIX = b"UNICODE\x00"
_JPEG_SEGMENT_MAX = 65533  # a JPEG segment's length field counts itself and holds 16 bits


@dataclass(frozen=True)
class Parameters:
    """What produced one image."""

    prompt: str
    negative_prompt: str
    steps: int
    guidance_scale: float
    seed: int
    width: int
    height: int
    model: str
    version: str

    def a1111_text(self) -> str:
        """The AUTOMATIC1111 ``parameters`` text."""
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        settings = {
            "Steps": str(self.steps),
            "Sampler": "Euler",
            "CFG scale": f"{self.guidance_scale:g}",
            "Seed": str(self.seed),
            "Size": f"{self.width}x{self.height}",
            "Model": self.model,
            "Version": self.version,
        }
        lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in settings.items() if value))
        return "\n".join(lines)


def _quote(value: str) -> str:
    # A1111 quotes a value that would break its "key: value, key: value" line (its infotext `quote`).
    return json.dumps(value, ensure_ascii=False) if any(c in value for c in ',:\n"') else value


def embed(data: bytes, image_format: ImageFormat, text: str) -> bytes:
    """``data`` with ``text`` stored as its generation parameters; unknown layouts come back unchanged."""
    if image_format in (ImageFormat.PNG, ImageFormat.DEFAULT) and data.startswith(_PNG_SIGNATURE):
        return _png_with_text(data, "parameters", text)
    if image_format is ImageFormat.JPEG and data.startswith(b"\xff\xd8"):
        return _jpeg_with_exif(data, _exif_user_comment(text, limit=_JPEG_SEGMENT_MAX - 2 - 6))
    if image_format is ImageFormat.WEBP and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        try:
            return _webp_with_exif(data, _exif_user_comment(text))
        except ValueError:  # a WebP layout this code does not know: keep the image as it came
            return data
    return data


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_with_text(data: bytes, keyword: str, text: str) -> bytes:
    try:  # tEXt is Latin-1; iTXt (UTF-8) otherwise, as Pillow's PngInfo does
        chunk = _png_chunk(b"tEXt", keyword.encode("latin-1") + b"\x00" + text.encode("latin-1"))
    except UnicodeEncodeError:
        payload = keyword.encode("latin-1") + b"\x00\x00\x00\x00\x00" + text.encode("utf-8")
        chunk = _png_chunk(b"iTXt", payload)
    after_header = len(_PNG_SIGNATURE) + 8 + 13 + 4  # IHDR is always first and 13 bytes long
    return data[:after_header] + chunk + data[after_header:]


def _exif_user_comment(text: str, limit: int | None = None) -> bytes:
    """A big-endian TIFF block: IFD0 -> Exif IFD -> UserComment (UNICODE, UTF-16BE, as piexif dumps it)."""
    comment = _UNICODE_PREFIX + text.encode("utf-16-be")
    header_size = 8 + (2 + 12 + 4) * 2
    if limit is not None and header_size + len(comment) > limit:
        comment = comment[: (limit - header_size) // 2 * 2]
    exif_ifd_offset = 8 + 2 + 12 + 4
    comment_offset = exif_ifd_offset + 2 + 12 + 4
    return (
        b"MM\x00\x2a"
        + struct.pack(">I", 8)
        + struct.pack(">HHHII", 1, _EXIF_IFD_POINTER, _TIFF_LONG, 1, exif_ifd_offset)
        + struct.pack(">I", 0)
        + struct.pack(">HHHII", 1, _USER_COMMENT, _TIFF_UNDEFINED, len(comment), comment_offset)
        + struct.pack(">I", 0)
        + comment
    )


def _jpeg_with_exif(data: bytes, tiff: bytes) -> bytes:
    payload = b"Exif\x00\x00" + tiff
    segment = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    position = 2
    if data[2:4] == b"\xff\xe0":  # keep a JFIF APP0 first, where readers look for it
        position = 4 + struct.unpack(">H", data[4:6])[0]
    return data[:position] + segment + data[position:]


def _webp_with_exif(data: bytes, tiff: bytes) -> bytes:
    chunks = data[12:]
    exif_chunk = b"EXIF" + struct.pack("<I", len(tiff)) + tiff + (b"\x00" if len(tiff) % 2 else b"")
    if chunks[:4] == b"VP8X":
        flags = chunks[8] | 0x08  # the EXIF-present bit
        body = chunks[:8] + bytes([flags]) + chunks[9:] + exif_chunk
    else:
        width, height = _webp_size(chunks)
        vp8x = (
            b"VP8X"
            + struct.pack("<I", 10)
            + bytes([0x08, 0, 0, 0])
            + (width - 1).to_bytes(3, "little")
            + (height - 1).to_bytes(3, "little")
        )
        body = vp8x + chunks + exif_chunk
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WEBP" + body


def _webp_size(chunks: bytes) -> tuple[int, int]:
    kind, payload = chunks[:4], chunks[8:]
    if kind == b"VP8 ":  # lossy: frame tag (3 bytes), start code (3 bytes), then 14-bit sizes
        width, height = struct.unpack("<HH", payload[6:10])
        return width & 0x3FFF, height & 0x3FFF
    if kind == b"VP8L":  # lossless: signature byte, then 14-bit width-1 and height-1
        bits = int.from_bytes(payload[1:5], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    raise ValueError(f"unexpected WebP chunk {kind!r}")
