"""`sdxl generate PROMPT`: one request, images written to files (or stdout), progress drawn from the stream.

The output's extension chooses the image format (``-o cat.jpg`` asks the server for JPEG); ``--format``
is for directories and stdout, and contradicting the extension is an error rather than a JPEG named
.png. Each file carries its generation parameters (see :mod:`sdxl_client.cli._image_metadata`).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from dataclasses import dataclass, replace

from sdxl_client._errors import SdxlError
from sdxl_client._types import Done, GeneratedImage, ImageFormat, Progress, Queued, ServerInfo
from sdxl_client.cli._connection import make_client, wait_while_warming_up
from sdxl_client.cli._image_metadata import Parameters, embed
from sdxl_client.cli._messages import UsageError
from sdxl_client.cli._terminal import StatusLine, StepProgress

STDOUT = "-"
_EXTENSIONS = {".png": ImageFormat.PNG, ".jpg": ImageFormat.JPEG, ".jpeg": ImageFormat.JPEG}
_EXTENSIONS[".webp"] = ImageFormat.WEBP


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
        description="Generate images and write them to files. Zero means the server's default "
        "(`sdxl info` shows the defaults and bounds).",
    )
    parser.add_argument("prompt", help="what to draw")
    parser.add_argument("--negative-prompt", default="", help="what to steer away from")
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the first image (default, or -1 as in AUTOMATIC1111: random, and printed)",
    )
    parser.add_argument("-n", "--num-images", type=int, default=0, help="images to generate")
    parser.add_argument("--steps", type=int, default=0, help="denoising steps")
    parser.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        help="classifier-free guidance scale (default: the model's; 0 or 1: none, one UNet row per step)",
    )
    parser.add_argument("--sampler", default=None, help="euler, ddim, dpmpp_2m or lcm (default: the model's)")
    parser.add_argument(
        "--size", type=parse_size, default=None, help="WxH, e.g. 1024x1024 (or --width and --height)"
    )
    parser.add_argument("--width", type=int, default=0, help="image width (or --size, not both)")
    parser.add_argument("--height", type=int, default=0, help="image height (or --size, not both)")
    parser.add_argument(
        "--format",
        choices=["png", "jpeg", "webp"],
        default=None,
        help="image encoding for a directory or stdout (default png); a file's extension chooses it",
    )
    parser.add_argument("--quality", type=int, default=0, help="JPEG/WebP quality 1..100")
    parser.add_argument("--request-id", default=None, help="identifier written to the server's logs")
    parser.add_argument(
        "-o",
        "--output",
        default=".",
        help="output file (.png, .jpg, .webp), '-' for stdout, or a directory (existing, or ending in "
        "'/') for <request_id>-<index>.<ext> files; with several images a file name gets -<index> added; "
        "missing directories are created, and sdxl says so (default: current directory)",
    )
    parser.add_argument(
        "--metadata",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write prompt, seed and settings into each image (PNG text / EXIF, AUTOMATIC1111 style)",
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


@dataclass(frozen=True)
class OutputPlan:
    """Where images go and in which format, decided from ``-o`` and ``--format`` before any call."""

    raw: str
    to_stdout: bool
    to_directory: bool
    image_format: ImageFormat


def plan_output(raw_output: str, requested_format: str | None, count: int) -> OutputPlan:
    """Checks ``-o`` against ``--format`` and the image count.

    Raises:
        UsageError: The extension contradicts ``--format``, names no image format, or ``-o -`` would
            get several images.
    """
    requested = ImageFormat.parse(requested_format) if requested_format else None
    if raw_output == STDOUT:
        if count > 1:
            raise UsageError(f"-o - writes one image to stdout; for -n {count} give a directory or file name")
        return OutputPlan(raw_output, True, False, requested or ImageFormat.PNG)
    path = pathlib.Path(raw_output)
    if path.is_dir() or raw_output.endswith(("/", "\\")):
        return OutputPlan(raw_output, False, True, requested or ImageFormat.PNG)
    suffix = path.suffix.lower()
    if not suffix:
        return OutputPlan(raw_output, False, False, requested or ImageFormat.PNG)
    if suffix not in _EXTENSIONS:
        raise UsageError(
            f"-o {raw_output}: {suffix} is not an image format this server writes; use .png, .jpg or .webp"
        )
    chosen = _EXTENSIONS[suffix]
    if requested is not None and requested is not chosen:
        raise UsageError(
            f"--format {requested_format} contradicts -o {raw_output}: the file's extension chooses the "
            f"format (drop --format, or name the file .{requested.extension})"
        )
    return OutputPlan(raw_output, False, False, chosen)


def output_path(
    output: pathlib.Path, raw_output: str, image: GeneratedImage, request_id: str, count: int
) -> pathlib.Path:
    """Where an image goes: inside a directory, or the given file name (indexed when there are several)."""
    if output.is_dir() or raw_output.endswith(("/", "\\")):
        return output / f"{request_id}-{image.index}.{image.format.extension}"
    if count > 1:
        return output.with_name(f"{output.stem}-{image.index}{output.suffix}")
    return output


def _check_signs(args: argparse.Namespace, width: int, height: int, info: ServerInfo | None) -> None:
    """Negative numbers cannot be sent at all (the fields are unsigned): say the server's real range.

    Without ``info`` (no server answered) the message says only that the value is negative.
    """
    values = {
        "--steps": args.steps,
        "--num-images": args.num_images,
        "--guidance-scale": args.guidance_scale or 0,
        "--quality": args.quality,
        "--width": width,
        "--height": height,
    }
    negative = [(flag, value) for flag, value in values.items() if value < 0]
    if not negative:
        return
    if info is None:
        flag, value = negative[0]
        raise UsageError(
            f"{flag}: {value:g} is negative (0 means the server's default; `sdxl info` shows the range)"
        )
    served = ", ".join(map(str, info.resolutions))
    allowed = {
        "--steps": f"is outside {info.min_steps}..{info.max_steps} (0: the default, {info.default_steps})",
        "--num-images": f"is outside 1..{info.max_images_per_request}",
        "--guidance-scale": f"is outside {info.min_guidance_scale:g}..{info.max_guidance_scale:g} "
        f"(left out: the default, {info.default_guidance_scale:g})",
        "--quality": "is outside 1..100",
        "--width": f"is negative; the served sizes are {served}",
        "--height": f"is negative; the served sizes are {served}",
    }
    flag, value = negative[0]
    raise UsageError(f"{flag}: {value:g} {allowed[flag]}")


def image_size(args: argparse.Namespace) -> tuple[int, int]:
    """(width, height) from --size or --width/--height; both kinds at once is a contradiction."""
    if args.size is None:
        return args.width, args.height
    given = [flag for flag, value in (("--width", args.width), ("--height", args.height)) if value]
    if given:
        width, height = args.size
        raise UsageError(
            f"--size {width}x{height} and {' and '.join(given)} both set the size: give --size alone, "
            "or --width and --height"
        )
    return args.size


def missing_output_directory(plan: OutputPlan) -> pathlib.Path | None:
    """The directory ``-o`` names that does not exist yet (created when the first image arrives, with a
    note), or None. Checked before the call, so that a path that cannot be made fails at once rather than
    after the images were generated, and without creating anything for a request the server refuses.

    Raises:
        UsageError: The directory cannot be created (a file in the way, no permission).
    """
    if plan.to_stdout:
        return None
    path = pathlib.Path(plan.raw)
    directory = path if plan.to_directory else path.parent
    if directory.is_dir():
        return None
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    problem = (
        "is not a directory"
        if not existing.is_dir()
        else "is not writable"
        if not os.access(existing, os.W_OK | os.X_OK)
        else None
    )
    if problem:
        raise UsageError(f"-o {plan.raw}: cannot create the directory {directory}: {existing} {problem}")
    return directory


def run(args: argparse.Namespace) -> int:
    width, height = image_size(args)
    count = max(1, args.num_images)
    plan = plan_output(args.output, args.format, count)
    if plan.to_stdout and args.json:
        raise UsageError("--json prints to stdout, where -o - writes the image; choose one")
    if plan.to_stdout and sys.stdout.isatty():
        raise UsageError("-o - writes the image to stdout, which is a terminal: redirect it (> cat.png)")
    line = StatusLine(sys.stderr, enabled=sys.stderr.isatty() if args.progress is None else args.progress)
    progress = StepProgress(line)
    output = pathlib.Path(plan.raw)
    written: list[dict[str, object]] = []
    done: Done | None = None
    try:
        with make_client(args, line) as client:
            wait_while_warming_up(client, args)
            try:
                info = client.server_info()
            except SdxlError:
                _check_signs(args, width, height, None)  # a usage error outranks an unreachable server
                raise
            _check_signs(args, width, height, info)
            missing = missing_output_directory(plan)
            parameters = Parameters(
                prompt=args.prompt,
                negative_prompt=args.negative_prompt,
                steps=args.steps or info.default_steps,
                guidance_scale=(
                    info.default_guidance_scale if args.guidance_scale is None else args.guidance_scale
                ),
                seed=0,
                width=0,
                height=0,
                model=info.model,
                version=f"sdxl-server {info.versions.get('sdxl-server', '')}".strip(),
            )
            events = client.generate_stream(
                args.prompt,
                negative_prompt=args.negative_prompt,
                seed=None if args.seed == -1 else args.seed,
                num_images=args.num_images,
                steps=args.steps,
                guidance_scale=args.guidance_scale,
                sampler=args.sampler,
                width=width,
                height=height,
                format=plan.image_format,
                quality=args.quality,
                request_id=args.request_id,
            )
            request_id = args.request_id or ""
            for event in events:
                if isinstance(event, Queued):
                    request_id = event.request_id
                    progress.queued(event.position)
                elif isinstance(event, Progress):
                    progress.steps(event.completed_steps, event.total_steps, count)
                elif isinstance(event, GeneratedImage):
                    data = event.data
                    if args.metadata:
                        exact = replace(parameters, seed=event.seed, width=event.width, height=event.height)
                        data = embed(data, event.format, exact.a1111_text())
                    if plan.to_stdout:
                        sys.stdout.buffer.write(data)
                        sys.stdout.buffer.flush()
                        written.append({"path": STDOUT, "seed": event.seed, "index": event.index})
                        continue
                    path = output_path(output, plan.raw, event, request_id, count)
                    if missing is not None and not missing.is_dir():
                        missing.mkdir(parents=True, exist_ok=True)
                        line.note(f"note: created the directory {missing}/ for -o {plan.raw}")
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(data)
                    written.append({"path": str(path), "seed": event.seed, "index": event.index})
                elif isinstance(event, Done):
                    done = event
    finally:
        line.clear()  # an error line must not land at the end of a half-drawn bar
    if args.json:
        summary = {
            "request_id": done.request_id if done else request_id,
            "seed": done.seed if done else None,
            "steps": done.steps if done else None,
            "guidance_scale": done.guidance_scale if done else None,
            "prompt_truncated": done.prompt_truncated if done else None,
            "unknown_words": list(done.unknown_words) if done else None,
            "total_seconds": done.timings.total_seconds if done else None,
            "images": written,
        }
        print(json.dumps(summary, indent=2))
        return 0
    if not plan.to_stdout:
        for item in written:
            print(item["path"])
    if done is not None:
        print(_done_line(done, written), file=sys.stderr)
        if done.prompt_truncated:
            print(
                "note: the prompt was longer than the text encoders read and was truncated", file=sys.stderr
            )
        if done.unknown_words:
            print(unknown_words_note(info.model, done.unknown_words), file=sys.stderr)
    return 0


def unknown_words_note(model: str, words: tuple[str, ...]) -> str:
    """``note: the demo model does not know: cat (it drew the rest of the prompt)``."""
    return f"note: the {model} model does not know: {', '.join(words)} (it drew the rest of the prompt)"


def _done_line(done: Done, written: list[dict[str, object]]) -> str:
    seeds = sorted(int(str(item["seed"])) for item in written) or [done.seed]
    seed = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}..{seeds[-1]}"
    return (
        f"{seed}, {done.steps} steps, guidance {done.guidance_scale:g}, "
        f"{done.timings.total_seconds:.1f} s (request {done.request_id})"
    )
