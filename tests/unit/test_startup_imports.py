"""What a server start imports before it can serve: nothing it will not use (each import is CPU time
a CPU-limited pod spends before it is ready)."""

from __future__ import annotations

import subprocess
import sys


def test_a_server_without_http_never_imports_aiohttp() -> None:
    # A fresh interpreter: this test process may have imported aiohttp for other tests.
    check = (
        "import sys, sdxl_server.main, sdxl_server.engine.jax_engine; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'aiohttp'))"
    )
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
