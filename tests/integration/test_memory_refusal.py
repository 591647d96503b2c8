"""A size that does not fit the machine is refused at start in one line, before it is allocated.

`sdxl-server serve --model demo --resolutions 1024x1024` with XLA's attention once grew to 23.8 GB and was
killed by the kernel after 47 s with only "Killed": the demo UNet attends at full latent resolution
(16,384 tokens) and XLA holds every score matrix. The memory plan refuses it from the compiled probe
programs' memory analysis, before any state is placed or any program runs.
"""

from __future__ import annotations

import json
import subprocess
import sys

SERVER = (sys.executable, "-m", "sdxl_server.main", "serve")
GIB = 2**30
# Python, JAX, the demo model and the probe programs' compiles: far below the 9 GiB of temporaries XLA's
# step needs at 1024x1024 (and the 23.8 GB the process once reached).
MOST_RSS_BYTES = 3 * GIB


# The server's own peak memory, reported by a small launcher process that starts it and waits for it. Not
# measured from this process: Linux carries the high-water mark of the memory a process replaces at exec
# into its peak, so a child of a pytest worker already holding engines (3-5 GB) would report that worker's
# peak, not its own. The launcher's own memory, which the server inherits that way, is small.
_LAUNCHER = """
import json, os, subprocess, sys, threading
server = subprocess.Popen(sys.argv[2:])
watchdog = threading.Timer(600, server.kill)  # a bound against a hang, not a timing check
watchdog.start()
_, status, usage = os.wait4(server.pid, 0)
watchdog.cancel()
with open(sys.argv[1], "w") as report:
    json.dump({"exit_code": os.waitstatus_to_exitcode(status), "max_rss_kib": usage.ru_maxrss}, report)
"""


def test_the_demo_model_at_1024_with_xla_attention_is_refused_in_one_line_before_allocating(tmp_path):
    out, err, report = tmp_path / "stdout", tmp_path / "stderr", tmp_path / "server.json"
    with out.open("w") as stdout, err.open("w") as stderr:
        subprocess.run(
            [sys.executable, "-c", _LAUNCHER, str(report),
             *SERVER, "--model", "demo", "--resolutions", "1024x1024", "--attention", "xla",
             "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--log-format", "json"],
            stdout=stdout,
            stderr=stderr,
            check=True,
            timeout=900,
        )  # fmt: skip
    server = json.loads(report.read_text())
    errors = err.read_text()
    assert server["exit_code"] == 2, errors[-2000:]
    not_logs = [line for line in (out.read_text() + errors).splitlines() if line and not _is_log_line(line)]
    assert len(not_logs) == 1, not_logs
    line = not_logs[0]
    assert line.startswith("sdxl-server serve: error: --resolutions: 1024x1024 does not fit the device: ")
    assert "the step's temporaries at 1024x1024" in line and "--attention xla" in line
    assert "--memory-fraction 0.9 of" in line and line.endswith("or use --attention flash")
    assert server["max_rss_kib"] * 1024 < MOST_RSS_BYTES  # ru_maxrss is in KiB on Linux


def _is_log_line(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False
