"""The `sdxl` command line: generate, info, health and loadtest against an sdxl-serve server."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sdxl_client._errors import InvalidRequest, SdxlError
from sdxl_client.cli import _generate, _info, _loadtest
from sdxl_client.cli._connection import add_connection_options

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand (each with the shared connection options)."""
    parser = argparse.ArgumentParser(prog="sdxl", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (_generate.add_parser(subparsers), *_info.add_parsers(subparsers)):
        add_connection_options(command)
    # A load test counts every rejection instead of hiding it behind retries.
    add_connection_options(_loadtest.add_parser(subparsers), default_retries=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (0 ok, 1 failed call, 2 bad usage).

    Errors from the server are printed as one line (``error: CODE: message``), never as a traceback.
    """
    args = build_parser().parse_args(argv)
    try:
        status: int = args.run(args)
    except InvalidRequest as error:
        fields = ", ".join(f"{v.field} ({v.description})" for v in error.violations)
        print(f"error: {error}" + (f" [fields: {fields}]" if fields else ""), file=sys.stderr)
        return 1
    except SdxlError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return status
