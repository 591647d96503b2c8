"""The server's log lines (sdxl_server.logs): text on a terminal, JSON elsewhere, library probes quiet."""

from __future__ import annotations

import os
import pty
import subprocess
import sys

_LOG_SCRIPT = """
import logging
from sdxl_server.logs import configure_logging, fields
configure_logging("info")
logging.getLogger("jax._src.xla_bridge").info("Unable to initialize backend 'tpu': no libtpu.so")
logging.getLogger("sdxl_server").info("listening; warming up", extra=fields(event="listening", port=50051))
"""


def _stderr_of_log_script(on_a_terminal: bool) -> str:
    if not on_a_terminal:
        done = subprocess.run([sys.executable, "-c", _LOG_SCRIPT], capture_output=True, text=True, timeout=60)
        return done.stderr
    leader, follower = pty.openpty()
    with subprocess.Popen([sys.executable, "-c", _LOG_SCRIPT], stderr=follower):
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the terminal closed with the process
                break
            if not chunk:
                break
            chunks.append(chunk)
    os.close(leader)
    return b"".join(chunks).decode().replace("\r\n", "\n")


def test_logs_are_text_on_a_terminal_json_elsewhere_and_jax_probes_stay_quiet():
    text = _stderr_of_log_script(on_a_terminal=True)
    assert text.splitlines()[-1].endswith(" INFO    listening; warming up  event=listening port=50051")
    piped = _stderr_of_log_script(on_a_terminal=False)
    assert piped.startswith('{"time": ') and '"event": "listening"' in piped
    assert "Unable to initialize backend" not in text + piped
