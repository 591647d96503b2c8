"""The `sdxl` command line: generate, info, health and loadtest against an sdxl-serve server."""

from __future__ import annotations

import argparse
import difflib
import shlex
import sys
from collections.abc import Sequence
from importlib import metadata
from typing import NoReturn

from sdxl_client._channel import TargetError, parse_target
from sdxl_client._errors import InvalidRequest, SdxlError
from sdxl_client.cli import _generate, _info, _loadtest
from sdxl_client.cli._connection import add_connection_options
from sdxl_client.cli._messages import UsageError, describe, unreachable

__all__ = ["EXIT_STATUSES", "build_parser", "exit_status", "main"]

EXIT_STATUSES = """exit status:
  0    done
  1    the server refused or failed a valid request: overloaded, unauthenticated, deadline passed,
       not ready within --timeout, an internal error (health: not SERVING; loadtest: too many errors)
  2    usage: an unknown option, a contradiction, or a value out of range, whether sdxl found it or
       the server did (INVALID_ARGUMENT; the message names the field)
  3    no server answered at --target
  130  interrupted (Ctrl-C)"""


def _version() -> str:
    try:
        return metadata.version("sdxl-client")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand (each with the shared connection options)."""
    parser = argparse.ArgumentParser(
        prog="sdxl",
        description=__doc__,
        epilog=EXIT_STATUSES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sdxl (sdxl-client) {_version()}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (_generate.add_parser(subparsers), *_info.add_parsers(subparsers)):
        add_connection_options(command)
        command.set_defaults(command_parser=command)
    # A load test counts every rejection instead of hiding it behind retries.
    loadtest = _loadtest.add_parser(subparsers)
    add_connection_options(loadtest, default_retries=0)
    loadtest.set_defaults(command_parser=loadtest)
    for command in subparsers.choices.values():
        command.epilog = EXIT_STATUSES
        command.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


def _refuse_leftovers(args: argparse.Namespace, leftovers: list[str]) -> None:
    """Arguments no option took: a mistyped option gets the nearest real one, loose words after the
    prompt a hint to quote it. Exits with status 2, as argparse does, with one line (no usage wall that
    would push the suggestion out of sight)."""
    command: argparse.ArgumentParser = args.command_parser

    def refuse(message: str) -> NoReturn:
        command.exit(2, f"{command.prog}: error: {message}\n")

    options = [flag for action in command._actions for flag in action.option_strings if flag.startswith("--")]
    for leftover in leftovers:
        if leftover.startswith("-"):
            flag = leftover.split("=", 1)[0]
            close = difflib.get_close_matches(flag, options, n=1, cutoff=0.75)
            listed = f" (sdxl {args.command} --help lists them)"
            suggestion = f"; did you mean {close[0]}?" if close else listed
            refuse(f"unrecognized option {flag}{suggestion}")
    words = " ".join(leftovers)
    if args.command == "generate":
        quoted = shlex.quote(f"{args.prompt} {words}") if " " not in args.prompt else None
        hint = f" (a prompt of several words needs quotes: sdxl generate {quoted} ...)" if quoted else ""
        refuse(f"unrecognized arguments: {words}{hint}")
    refuse(f"unrecognized arguments: {words}")


def exit_status(error: SdxlError) -> int:
    """2 for a field the server refused (as for a usage error sdxl finds itself), 3 when no server
    answered, 1 for every other failed call (see EXIT_STATUSES)."""
    if isinstance(error, InvalidRequest):
        return 2
    if unreachable(error):
        return 3
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (EXIT_STATUSES).

    Errors are printed as one line (``error: CODE: message``), never as a traceback; when no server
    answers, the line asks whether one runs at the target.
    """
    args, leftovers = build_parser().parse_known_args(argv)
    if leftovers:
        _refuse_leftovers(args, leftovers)
    try:
        status: int = args.run(args)
    except (UsageError, TargetError) as error:
        print(f"sdxl {args.command}: error: {error}", file=sys.stderr)
        return 2
    except SdxlError as error:
        print(f"error: {describe(error, _shown_target(args.target))}", file=sys.stderr)
        return exit_status(error)
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
