"""`sdxl generate PROMPT`: one request, images written to files, progress drawn from the stream."""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import TextIO

from sdxl_client._types import Done, GeneratedImage, ImageFormat, Progress, Queued
from sdxl_client.cli._connection import make_client


def parse_size(text: str) -> tuple[int, int]:
    """Parses ``WxH`` (e.g. ``1024x1024``) into (width, height)."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 1024x1024 (WxH), got {text!r}") from None
    return width, height


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "generate",
        help="generate images from a prompt",
        description="Generate images and write them to files. Zero means the server's default.",
    )
    parser.add_argument("prompt", help="what to draw")
    parser.add_argument("--negative-prompt", default="", help="what to steer away from")
    parser.add_argument("--seed", type=int, default=None, help="seed of the first image (default: random)")
    parser.add_argument("-n", "--num-images", type=int, default=0, help="images to generate")
    parser.add_argument("--steps", type=int, default=0, help="denoising steps")
    parser.add_argument("--guidance-scale", type=float, default=0.0, help="classifier-free guidance scale")
    parser.add_argument("--size", type=parse_size, default=None, help="WxH, e.g. 1024x1024")
    parser.add_argument("--width", type=int, default=0, help="image width (or use --size)")
    parser.add_argument("--height", type=int, default=0, help="image height (or use --size)")
    parser.add_argument(
        "--format", choices=["png", "jpeg", "webp"], default=None, help="image encoding (default: png)"
    )
    parser.add_argument("--quality", type=int, default=0, help="JPEG/WebP quality 1..100")
    parser.add_argument("--request-id", default=None, help="identifier written to the server's logs")
    parser.add_argument(
        "-o",
        "--output",
        default=".",
        help="output file, or a directory (existing, or ending in '/') for <request_id>-<index>.<ext> "
        "files; with several images a file name gets -<index> added (default: current directory)",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="draw a progress bar on stderr (default: when stderr is a terminal)",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead of file names")
    parser.set_defaults(run=run)
    return parser


def output_path(
    output: pathlib.Path, raw_output: str, image: GeneratedImage, request_id: str, count: int
) -> pathlib.Path:
    """Where an image goes: inside a directory, or the given file name (indexed when there are several)."""
    if output.is_dir() or raw_output.endswith(("/", "\\")):
        return output / f"{request_id}-{image.index}.{image.format.extension}"
    if count > 1:
        return output.with_name(f"{output.stem}-{image.index}{output.suffix}")
    return output


class ProgressBar:
    """A one-line text bar redrawn in place on a terminal stream."""

    def __init__(self, stream: TextIO, width: int = 30) -> None:
        self._stream = stream
        self._width = width

    def show(self, label: str, fraction: float) -> None:
        filled = round(self._width * min(1.0, max(0.0, fraction)))
        bar = "#" * filled + "." * (self._width - filled)
        self._stream.write(f"\r[{bar}] {fraction * 100:5.1f}% {label:<24}")
        self._stream.flush()

    def finish(self) -> None:
        self._stream.write("\n")
        self._stream.flush()


def run(args: argparse.Namespace) -> int:
    width, height = args.size if args.size else (args.width, args.height)
    show_progress = sys.stderr.isatty() if args.progress is None else args.progress
    bar = ProgressBar(sys.stderr) if show_progress else None
    expected = max(1, args.num_images)
    raw_output = args.output  # a string: pathlib would drop the trailing "/" that marks a directory
    output = pathlib.Path(raw_output)
    written: list[dict[str, object]] = []
    done: Done | None = None
    with make_client(args) as client:
        events = client.generate_stream(
            args.prompt,
            negative_prompt=args.negative_prompt,
            seed=args.seed,
            num_images=args.num_images,
            steps=args.steps,
            guidance_scale=args.guidance_scale,
            width=width,
            height=height,
            format=ImageFormat.parse(args.format),
            quality=args.quality,
            request_id=args.request_id,
        )
        request_id = args.request_id or ""
        for event in events:
            if isinstance(event, Queued):
                request_id = event.request_id
                if bar:
                    bar.show(f"queued, {event.position} ahead", 0.0)
            elif isinstance(event, Progress):
                if bar:
                    bar.show(f"step {event.completed_steps}/{event.total_steps}", event.fraction)
            elif isinstance(event, GeneratedImage):
                path = output_path(output, raw_output, event, request_id, expected)
                path.parent.mkdir(parents=True, exist_ok=True)
                event.save(path)
                written.append({"path": str(path), "seed": event.seed, "index": event.index})
            elif isinstance(event, Done):
                done = event
    if bar:
        bar.finish()
    if args.json:
        summary = {
            "request_id": done.request_id if done else request_id,
            "seed": done.seed if done else None,
            "steps": done.steps if done else None,
            "guidance_scale": done.guidance_scale if done else None,
            "prompt_truncated": done.prompt_truncated if done else None,
            "total_seconds": done.timings.total_seconds if done else None,
            "images": written,
        }
        print(json.dumps(summary, indent=2))
    else:
        for item in written:
            print(item["path"])
        if done and done.prompt_truncated:
            print(
                "note: the prompt was longer than the text encoders read and was truncated", file=sys.stderr
            )
    return 0
