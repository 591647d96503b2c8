"""``sdxl-server`` whose warm-up waits until a file exists: a test-only entry point, never in production.

A test that must observe the NOT_SERVING window (health, UNAVAILABLE, HTTP 503, no ``sdxl_load`` sample)
cannot race a warm-up that takes milliseconds when the compiled programs come from the shared cache.
This entry point takes one option of its own, ``--hold-warmup-until-file PATH``, and runs the real
``sdxl_server.main.main`` with the rest, through its ``before_warm_up`` hook: the server listens and
answers at once, and its warm-up starts only once PATH exists (the test touches it). Production
configuration (flags, ``SDXL_*``) has no way to hold a pod in NOT_SERVING.

    python -m sdxl_test_support.held_warmup serve --hold-warmup-until-file PATH [serve options]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

HOLD_OPTION = "--hold-warmup-until-file"
# ``sdxl-server serve`` through this entry point (the ``command`` of sdxl_test_support.servers'
# RunningServer and ``start``); the hold option goes among the serve options.
HELD_SERVER_COMMAND = (sys.executable, "-m", "sdxl_test_support.held_warmup", "serve")
_POLL_SECONDS = 0.05


def wait_for_file(path: str) -> None:
    """Returns once ``path`` exists (on the warm-up thread, a daemon: a SIGTERM does not wait for it)."""
    while not os.path.exists(path):
        time.sleep(_POLL_SECONDS)


def main(argv: Sequence[str] | None = None) -> int:
    hold = argparse.ArgumentParser(add_help=False)
    hold.add_argument(HOLD_OPTION, required=True)
    held, rest = hold.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    from sdxl_server.main import main as server_main

    return server_main(rest, before_warm_up=lambda: wait_for_file(held.hold_warmup_until_file))


if __name__ == "__main__":
    sys.exit(main())
