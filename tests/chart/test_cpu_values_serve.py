"""The chart's CPU example boots the real server: no cluster needed to check that chart and server agree.

Starts `sdxl-server serve` with exactly the environment a pod of `examples/cpu.yaml` gets (its ConfigMap
and container env), except what only a pod can provide: the gRPC, HTTP and metrics ports (0 here, never fixed)
and the directories that are volumes in the pod (the shared test caches). Then runs the `helm test` hook's
own script against it, generates an image, and checks that SIGTERM drains to a clean exit.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from collections.abc import Iterator

import pytest
import yaml
from sdxl_test_support.chart_render import (
    EXAMPLES,
    is_helm_test,
    one,
    render,
    server_container,
    server_settings,
)
from sdxl_test_support.servers import RunningServer

pytestmark = pytest.mark.slow
WARM_UP_TIMEOUT_SECONDS = 300
Served = tuple[str, dict[str, str], RunningServer]  # gRPC target, hook scripts, server process


def _pod_environment() -> tuple[dict[str, str], dict[str, str]]:
    """The server's environment from the rendered CPU example, and the helm test hooks' scripts by name."""
    manifests = render(yaml.safe_load((EXAMPLES / "cpu.yaml").read_text()))
    env = server_settings(manifests)
    env.update({e["name"]: e["value"] for e in server_container(manifests)["env"] if "value" in e})
    hooks = {
        m["spec"]["containers"][0]["name"]: m["spec"]["containers"][0]["args"][0]
        for m in manifests
        if is_helm_test(m)
    }
    assert one(manifests, "ConfigMap")["data"]["SDXL_MODEL"] == "demo"
    assert set(hooks) == {"grpc-health", "image-meaning"}
    return env, hooks


@pytest.fixture(scope="module")
def served_cpu_example(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model_dir: pathlib.Path,
    compilation_cache_dir: pathlib.Path,
) -> Iterator[Served]:
    pod_env, hook_script = _pod_environment()
    home = tmp_path_factory.mktemp("pod-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDXL_")}
    env.update(pod_env)
    env.update(
        SDXL_PORT="0",
        SDXL_METRICS_PORT="0",
        SDXL_HTTP_PORT="0",
        SDXL_HOST="127.0.0.1",
        HOME=str(home),
        XDG_CACHE_HOME=str(home / ".cache"),
        SDXL_COMPILATION_CACHE_DIR=str(compilation_cache_dir),
        SDXL_TINY_MODEL_DIR=str(tiny_model_dir),
    )
    server_bin = pathlib.Path(sys.executable).parent / "sdxl-server"
    server = RunningServer([], env, command=[str(server_bin), "serve"], inherit_env=False)
    try:
        server.wait_ready(WARM_UP_TIMEOUT_SECONDS, service="sdxl.v1.ImageService")
        yield server.target, hook_script, server
    finally:
        server.kill()


def _run_hook(script: str, target: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", script, target], capture_output=True, text=True, timeout=300, check=False
    )


def test_helm_test_health_hook_passes_against_the_served_example(
    served_cpu_example: Served,
) -> None:
    target, hooks, _ = served_cpu_example
    result = _run_hook(hooks["grpc-health"], target)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1] == f"{target}: SERVING"


def test_helm_test_image_hook_sees_the_colours_and_shape_asked(served_cpu_example: Served) -> None:
    target, hooks, _ = served_cpu_example
    result = _run_hook(hooks["image-meaning"], target)
    assert result.returncode == 0, result.stdout + result.stderr
    right = int(result.stdout.splitlines()[-1].removeprefix(f"{target}: ").split()[0])
    assert right >= 3, result.stdout


def test_the_image_hook_fails_when_the_image_is_not_what_it_asked(served_cpu_example: Served) -> None:
    """The hook tells images apart: given images of another scene to judge, it fails."""
    target, hooks, _ = served_cpu_example
    other = "'a red circle on a green background'"
    script = hooks["image-meaning"].replace(
        "client.generate(shapes.prompt(asked)", f"client.generate({other}", 1
    )
    assert script != hooks["image-meaning"]
    result = _run_hook(script, target)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "images as asked" in result.stdout.splitlines()[-1], result.stdout + result.stderr


def test_example_generates_with_its_configured_defaults_and_drains_on_sigterm(
    served_cpu_example: Served,
) -> None:
    from sdxl_client import Client

    target, _, server = served_cpu_example
    with Client(target, timeout=120) as client:
        result = client.generate("a red cube on a table", seed=1, format="png")
    [image] = result.images
    assert (image.width, image.height) == (64, 64)  # server.resolutions of the example
    assert result.steps == 10  # server.defaultSteps of the example
    assert image.data.startswith(b"\x89PNG")
    # What Kubernetes sends after the preStop hook: the server drains and exits cleanly.
    assert server.terminate(timeout=120) == 0
