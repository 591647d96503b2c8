"""End to end on a real cluster: install the chart with the CPU example values, wait until the pods are
ready, generate an image through a port-forward, run `helm test`, uninstall.

Needs `KUBECONFIG` pointing at a reachable cluster and `SDXL_CLUSTER_TEST_IMAGE` naming a server image the
cluster can pull, built with `--build-arg ACCELERATOR=cpu`. Where these are missing (CI and this repository's
development machine have no cluster) the module is skipped and pytest prints the reason (`-ra`).
"""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
import re
import selectors
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from PIL import Image
from sdxl_test_support.chart_render import CHART, EXAMPLES, helm_binary, run_helm

pytestmark = pytest.mark.cluster

RELEASE = "sdxl-serve"  # full name = release name, so the Service is `sdxl-serve`
READY_TIMEOUT_SECONDS = 900


def _image_values(image: str) -> dict[str, Any]:
    repository, _, digest = image.partition("@")
    if digest:
        return {"repository": repository, "digest": digest}
    repository, _, tag = image.rpartition(":")
    if "/" in tag or not repository:  # a registry port, not a tag
        return {"repository": image, "tag": "latest"}
    return {"repository": repository, "tag": tag}


@pytest.fixture(scope="module")
def kubernetes_api() -> Any:
    kubeconfig = os.environ.get("KUBECONFIG")
    if not kubeconfig:
        pytest.skip("no Kubernetes cluster: KUBECONFIG is not set (the chart is rendered and validated only)")
    if not os.environ.get("SDXL_CLUSTER_TEST_IMAGE"):
        pytest.skip(
            "SDXL_CLUSTER_TEST_IMAGE is not set (a pullable sdxl-server image built with ACCELERATOR=cpu)"
        )
    from kubernetes import client, config

    config.load_kube_config(config_file=kubeconfig)
    try:
        client.VersionApi().get_code(_request_timeout=10)
    except Exception as e:  # any failure to reach the API server means there is no cluster to test on
        pytest.skip(f"KUBECONFIG={kubeconfig} but its cluster is unreachable: {e}")
    return client


@pytest.fixture(scope="module")
def installed_release(kubernetes_api: Any) -> Iterator[str]:
    """Installs the chart into a fresh namespace and yields the namespace; uninstalls and deletes it after."""
    namespace = f"sdxl-e2e-{uuid.uuid4().hex[:8]}"
    core = kubernetes_api.CoreV1Api()
    core.create_namespace(kubernetes_api.V1Namespace(metadata=kubernetes_api.V1ObjectMeta(name=namespace)))
    try:
        import yaml

        values = yaml.safe_load((EXAMPLES / "cpu.yaml").read_text())
        values["image"] = _image_values(os.environ["SDXL_CLUSTER_TEST_IMAGE"])
        run_helm("install", RELEASE, str(CHART), "--namespace", namespace, values=values)
        yield namespace
    finally:
        with contextlib.suppress(Exception):
            run_helm("uninstall", RELEASE, "--namespace", namespace, "--wait")
        core.delete_namespace(namespace)


def _wait_until_ready(kubernetes_api: Any, namespace: str) -> None:
    from kubernetes import watch

    apps = kubernetes_api.AppsV1Api()
    events = watch.Watch().stream(
        apps.list_namespaced_deployment,
        namespace,
        field_selector=f"metadata.name={RELEASE}",
        timeout_seconds=READY_TIMEOUT_SECONDS,
    )
    for event in events:
        status = event["object"].status
        if status.ready_replicas and status.ready_replicas >= (event["object"].spec.replicas or 1):
            return
    pytest.fail(f"deployment {namespace}/{RELEASE} not ready after {READY_TIMEOUT_SECONDS} s")


@contextlib.contextmanager
def _port_forward(namespace: str) -> Iterator[int]:
    """`kubectl port-forward` to the Service on a free local port (kubectl picks it and prints it)."""
    # The kubectl that `make helm` installed next to Helm, else the one on PATH.
    kubectl = helm_binary().parent / "kubectl"
    if not kubectl.exists():
        kubectl = pathlib.Path(shutil.which("kubectl") or "kubectl")
    process = subprocess.Popen(
        [str(kubectl), "port-forward", "--namespace", namespace, f"service/{RELEASE}", ":50051"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        selector = selectors.DefaultSelector()
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout=60):
            pytest.fail("kubectl port-forward printed nothing in 60 s")
        line = process.stdout.readline()
        match = re.search(r"127\.0\.0\.1:(\d+) -> 50051", line)
        assert match, f"unexpected kubectl output: {line!r}"
        yield int(match.group(1))
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_install_generate_and_helm_test(kubernetes_api: Any, installed_release: str) -> None:
    from sdxl_client import Client

    namespace = installed_release
    _wait_until_ready(kubernetes_api, namespace)
    with _port_forward(namespace) as port, Client(f"127.0.0.1:{port}", timeout=300) as client:
        result = client.generate("a red cube on a table", seed=3, steps=2, width=64, height=64, format="png")
    [image] = result.images
    assert (image.width, image.height) == (64, 64)
    assert Image.open(io.BytesIO(image.data)).size == (64, 64)
    # The chart's own hook checks gRPC health through the Service from inside the cluster.
    output = run_helm("test", RELEASE, "--namespace", namespace, "--logs")
    assert "SERVING" in output
