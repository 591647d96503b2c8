"""The chart's CPU example boots the real server: no cluster needed to check that chart and server agree.

Starts `sdxl-server serve` with exactly the environment a pod of `examples/cpu.yaml` gets (its ConfigMap
and container env), except what only a pod can provide: the gRPC, HTTP and metrics ports (0 here, never fixed)
and the directories that are volumes in the pod (the shared test caches). Then runs the `helm test` hook's
own script against it, generates an image, and checks that SIGTERM drains to a clean exit.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

import grpc
import pytest
import yaml
from chart_render import EXAMPLES, is_helm_test, one, render, server_container, server_settings
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytestmark = pytest.mark.slow
WARM_UP_TIMEOUT_SECONDS = 300
Served = tuple[str, dict[str, str], "subprocess.Popen[str]"]  # gRPC target, hook scripts, server process


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


def _wait_until_serving(target: str) -> None:
    # Watch streams every status change, so this waits without polling.
    with grpc.insecure_channel(target) as channel:
        request = health_pb2.HealthCheckRequest(service="sdxl.v1.ImageService")
        stream = health_pb2_grpc.HealthStub(channel).Watch(request, timeout=WARM_UP_TIMEOUT_SECONDS)
        for response in stream:
            if response.status == health_pb2.HealthCheckResponse.SERVING:
                stream.cancel()
                return
    pytest.fail("the server never reported SERVING")


@pytest.fixture(scope="module")
def served_cpu_example(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model_dir: pathlib.Path,
    compilation_cache_dir: pathlib.Path,
) -> Iterator[tuple[str, str, subprocess.Popen[str]]]:
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
    process = subprocess.Popen(
        [str(server_bin), "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert process.stdout is not None
    port = None
    for line in process.stdout:  # JSON log lines; the first "listening" event carries the bound port
        if line.startswith("{") and json.loads(line).get("event") == "listening":
            port = json.loads(line)["port"]
            break
    if port is None:
        pytest.fail(f"server exited with {process.wait()} before listening")
    # Keep draining the logs so that the server never blocks on a full pipe.
    threading.Thread(target=process.stdout.read, daemon=True).start()
    target = f"127.0.0.1:{port}"
    try:
        _wait_until_serving(target)
        yield target, hook_script, process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


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

    target, _, process = served_cpu_example
    with Client(target, timeout=120) as client:
        result = client.generate("a red cube on a table", seed=1, format="png")
    [image] = result.images
    assert (image.width, image.height) == (64, 64)  # server.resolutions of the example
    assert result.steps == 10  # server.defaultSteps of the example
    assert image.data.startswith(b"\x89PNG")
    # What Kubernetes sends after the preStop hook: the server drains and exits cleanly.
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 0
