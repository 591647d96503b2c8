"""k8s/ holds exactly what `make manifests` renders from the chart's defaults, and the server accepts the
settings the chart hands it."""

from __future__ import annotations

import argparse
import difflib
import pathlib
import subprocess

import pytest
from sdxl_test_support.chart_render import REPO, VALUE_SETS, render_value_set, server_settings

COMMITTED = REPO / "k8s" / "sdxl-serve.yaml"


def test_k8s_manifests_match_the_chart_defaults(tmp_path: pathlib.Path) -> None:
    # Runs the real target (mk/chart.mk) into a scratch file: the command under test is the operators' one.
    fresh = tmp_path / "sdxl-serve.yaml"
    subprocess.run(
        ["make", "--no-print-directory", "-s", "-C", str(REPO), "manifests", f"MANIFESTS_FILE={fresh}"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    expected, actual = fresh.read_text(), COMMITTED.read_text()
    if expected != actual:
        diff = "".join(
            difflib.unified_diff(actual.splitlines(True), expected.splitlines(True), "k8s/", "chart")
        )
        pytest.fail(f"k8s/ is stale: run `make manifests` and commit it.\n{diff[:4000]}")


def test_k8s_manifests_leave_out_the_helm_test_pod() -> None:
    assert "helm.sh/hook" not in COMMITTED.read_text()


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_server_accepts_the_rendered_settings(value_set: str) -> None:
    # The server's own parser reads the ConfigMap's SDXL_* variables exactly as the pod would; an unknown
    # variable would be silently ignored, so every key must be one the server knows.
    from sdxl_server.server_settings import add_serve_arguments, config_from

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    known = {"SDXL_" + name.upper() for name in vars(parser.parse_args([]))}
    settings = server_settings(render_value_set(value_set))
    assert set(settings) <= known, f"unknown to the server: {set(settings) - known}"
    # The token file only exists in the pod (ServerConfig checks that it is readable).
    settings.pop("SDXL_AUTH_TOKEN_FILE", None)
    config = config_from(parser.parse_args([]), settings)
    assert (config.port, config.metrics_port, config.host) == (50051, 8000, "0.0.0.0")
    assert (
        ",".join(f"{r.width}x{r.height}" for r in config.engine.resolutions) == settings["SDXL_RESOLUTIONS"]
    )
