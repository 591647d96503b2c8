"""The client package installs from PyPI into a fresh virtual environment that has no JAX, and works."""

from __future__ import annotations

import subprocess
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_client_installs_and_imports_without_jax(tmp_path):
    environment = tmp_path / "venv"
    venv.create(environment, with_pip=True)
    python = environment / "bin" / "python"
    subprocess.run(
        [
            str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
            "-c", str(REPO / "requirements" / "constraints.txt"), str(REPO / "client"),
        ],
        check=True,
        timeout=300,
    )  # fmt: skip
    check = (
        "import importlib.util, sdxl_client, sdxl_client.cli\n"
        "from sdxl_client import Client, AsyncClient, InvalidRequest\n"
        "assert importlib.util.find_spec('jax') is None, 'jax is installed'\n"
        "assert importlib.util.find_spec('sdxl_server') is None, 'the server is installed'\n"
        "try:\n"
        "    Client('127.0.0.1:9').generate('x', steps=-1)\n"
        "except InvalidRequest as error:\n"
        "    assert error.field == 'steps'\n"
        "print('ok')\n"
    )
    done = subprocess.run([str(python), "-c", check], capture_output=True, text=True, cwd=tmp_path)
    assert done.stdout.strip() == "ok", done.stderr
    help_text = subprocess.run(
        [str(environment / "bin" / "sdxl"), "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "loadtest" in help_text
    # The package ships its type information.
    site = subprocess.run(
        [str(python), "-c", "import sdxl_client, os; print(os.path.dirname(sdxl_client.__file__))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert (Path(site) / "py.typed").exists()
    assert (Path(site) / "_proto" / "sdxl" / "v1" / "sdxl_pb2.pyi").exists()
