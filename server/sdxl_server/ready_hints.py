"""The commands the server's "ready" line suggests: each works as printed where it is printed.

A newcomer copies them straight into a second terminal, so they name commands that are installed (the
`sdxl` CLI beside this Python when it is not on PATH, as in `make run`'s .venv/bin; grpcurl only when it
is on PATH), a prompt the served model can draw (the demo model knows coloured shapes only), and a curl
that writes the image to a file instead of printing kilobytes of base64.
"""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path

DEMO_PROMPT = "a yellow circle on a purple background"  # a pair the demo model never saw in training
OTHER_PROMPT = "a lighthouse on a cliff at dusk"


def example_prompt(model: str) -> str:
    return DEMO_PROMPT if model == "demo" else OTHER_PROMPT


def installed_command(name: str) -> str | None:
    """How to run console script `name` from the current directory: its bare name when PATH finds the one
    beside this Python, else its path (relative when under the current directory); None if absent."""
    beside = Path(sys.executable).parent / name
    if not beside.exists():
        return shutil.which(name) and name
    found = shutil.which(name)
    if found and Path(found).resolve() == beside.resolve():
        return name
    try:
        return str(beside.relative_to(Path.cwd()))
    except ValueError:
        return str(beside)


def ready_hint(
    model: str,
    host: str,
    port: int,
    http_port: int | None,
    *,
    tls: bool,
    auth: bool,
) -> str:
    """The "ready" line with a copy-pasteable command per front door."""
    shown_host = "localhost" if host in ("0.0.0.0", "::", "[::]") else host
    target = f"{shown_host}:{port}"
    prompt = example_prompt(model)
    sdxl = installed_command("sdxl") or "sdxl (pip install ./client)"
    token = " --token <token>" if auth else ""
    tls_flag = " --tls" if tls else ""
    options = f"--seed 1 -o shape.png --target {target}{tls_flag}{token}"
    lines = [f"ready. Try: {sdxl} generate {shlex.quote(prompt)} {options}"]
    body = f'{{"prompt": "{prompt}", "seed": 1}}'
    if shutil.which("grpcurl"):
        grpcurl_tls = "-insecure" if tls else "-plaintext"
        grpcurl_auth = " -H 'authorization: Bearer <token>'" if auth else ""
        lines.append(
            f"   or: grpcurl {grpcurl_tls}{grpcurl_auth} -d '{body}' {target} sdxl.v1.ImageService/Generate"
        )
    if http_port is not None:
        scheme = "https" if tls else "http"
        curl_auth = " -H 'Authorization: Bearer <token>'" if auth else ""
        python = installed_command(Path(sys.executable).name) or "python3"
        save = (
            'import base64, json, sys; open("shape.png", "wb").write('
            'base64.b64decode(json.load(sys.stdin)["data"][0]["b64_json"]))'
        )
        lines.append(
            f"   or: curl -s{curl_auth} -H 'Content-Type: application/json' -d '{body}' "
            f"{scheme}://{shown_host}:{http_port}/v1/images/generations | {python} -c '{save}'"
        )
    return "\n".join(lines)
