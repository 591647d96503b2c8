"""A size that does not fit the machine is refused at start in one line, before it is allocated.

`sdxl-server serve --model demo --resolutions 1024x1024` with XLA's attention once grew to 23.8 GB and was
killed by the kernel after 47 s with only "Killed": the demo UNet attends at full latent resolution
(16,384 tokens) and XLA holds every score matrix. The memory plan refuses it from the compiled probe
programs' memory analysis, before any state is placed or any program runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

SERVER = (sys.executable, "-m", "sdxl_server.main", "serve")
GIB = 2**30
# Python, JAX, the demo model and the probe programs' compiles: far below the 9 GiB of temporaries XLA's
# step needs at 1024x1024 (and the 23.8 GB the process once reached).
MOST_RSS_BYTES = 3 * GIB


def test_the_demo_model_at_1024_with_xla_attention_is_refused_in_one_line_before_allocating(tmp_path):
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with out.open("w") as stdout, err.open("w") as stderr:
        process = subprocess.Popen(
            [*SERVER, "--model", "demo", "--resolutions", "1024x1024", "--attention", "xla",
             "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--log-format", "json"],
            stdout=stdout,
            stderr=stderr,
        )  # fmt: skip
    watchdog = threading.Timer(600, process.kill)  # a bound against a hang, not a timing check
    watchdog.start()
    try:
        _, status, usage = os.wait4(process.pid, 0)  # this child's own peak memory
    finally:
        watchdog.cancel()
    errors = err.read_text()
    assert os.waitstatus_to_exitcode(status) == 2, errors[-2000:]
    not_logs = [line for line in (out.read_text() + errors).splitlines() if line and not _is_log_line(line)]
    assert len(not_logs) == 1, not_logs
    line = not_logs[0]
    assert line.startswith("sdxl-server serve: error: --resolutions: 1024x1024 does not fit the device: ")
    assert "the step's temporaries at 1024x1024" in line and "--attention xla" in line
    assert "--memory-fraction 0.9 of" in line and line.endswith("or use --attention flash")
    assert usage.ru_maxrss * 1024 < MOST_RSS_BYTES  # ru_maxrss is in KiB on Linux


def _is_log_line(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False
