"""The `sdxl` command line: generate, info, health and loadtest against an sdxl-serve server."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib import metadata

from sdxl_client._channel import TargetError, parse_target
from sdxl_client._errors import SdxlError
from sdxl_client.cli import _generate, _info, _loadtest
from sdxl_client.cli._connection import add_connection_options
from sdxl_client.cli._messages import UsageError, describe

__all__ = ["build_parser", "main"]


def _version() -> str:
    try:
        return metadata.version("sdxl-client")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand (each with the shared connection options)."""
    parser = argparse.ArgumentParser(prog="sdxl", description=__doc__)
    parser.add_argument("--version", action="version", version=f"sdxl (sdxl-client) {_version()}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (_generate.add_parser(subparsers), *_info.add_parsers(subparsers)):
        add_connection_options(command)
    # A load test counts every rejection instead of hiding it behind retries.
    add_connection_options(_loadtest.add_parser(subparsers), default_retries=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (0 ok, 1 failed call, 2 bad usage).

    Errors are printed as one line (``error: CODE: message``), never as a traceback; when no server
    answers, the line asks whether one runs at the target.
    """
    args = build_parser().parse_args(argv)
    try:
        status: int = args.run(args)
    except (UsageError, TargetError) as error:
        print(f"sdxl {args.command}: error: {error}", file=sys.stderr)
        return 2
    except SdxlError as error:
        print(f"error: {describe(error, _shown_target(args.target))}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return status


def _shown_target(target: str) -> str:
    try:
        return parse_target(target)[0]  # the address really called: "127.0.0.1" means 127.0.0.1:50051
    except TargetError:
        return target
