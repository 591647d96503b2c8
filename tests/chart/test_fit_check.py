"""fitCheck: a pre-install/pre-upgrade hook Job runs the pods' memory plan, so that a size that does not fit
fails the release before any pod exists instead of crash-looping.

What Helm does with the hook (runs it before the release's objects, stops at its failure) needs a Kubernetes
API server, which cannot run here: that part is Helm's documented hook contract. Checked here, for real: the
rendered hook, and its exact command and environment run through the server's own CLI, which refuses a size
that does not fit (exit 1, one line naming the flag) and passes one that fits. The slice is the CPU backend
here (no TPU); the same plan runs against a described v5e chip's HBM with libtpu (test_ahead_of_time.py).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from typing import Any

import pytest
from sdxl_test_support.chart_render import REPO, objects_of_kind, one, render, server_container
from sdxl_test_support.xla_flags import xla_flags

# A share of memory so small that the demo at 1024x1024 with XLA attention (about 27 GiB of scores) cannot
# fit on any CI machine, while the demo at 64x64 (about 0.1 GiB) fits on any with 2 GiB or more.
TINY_SHARE = 0.05
DEMO = {"model": {"source": "demo"}, "server": {"memoryFraction": TINY_SHARE, "attention": "xla"}}


def _fit_checks(manifests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        job
        for job in objects_of_kind(manifests, "Job")
        if job["metadata"]["labels"]["app.kubernetes.io/component"] == "fit-check"
    ]


def _container(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    (job,) = _fit_checks(manifests)
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return container


def test_the_check_runs_before_install_and_upgrade_with_the_pods_settings() -> None:
    manifests = render({"accelerator": {"tpu": {"topology": "2x4"}}})
    (job,) = _fit_checks(manifests)
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert "hook-succeeded" in annotations["helm.sh/hook-delete-policy"]
    assert job["spec"]["backoffLimit"] == 0  # the plan is deterministic: no retries
    pod = job["spec"]["template"]["spec"]
    container = _container(manifests)
    args = container["args"]
    assert args[:2] == ["compile", "--fit-check"]
    assert args[args.index("--topology") + 1] == "v5e:2x4"  # the pods' slice
    # Every server setting, as the pods get it from the ConfigMap (which does not exist yet at pre-install).
    env = {e["name"]: e["value"] for e in container["env"]}
    settings = one(manifests, "ConfigMap")["data"]
    assert {k: env[k] for k in settings} == settings
    assert container["image"] == server_container(manifests)["image"]  # the same libtpu
    # Nothing the release creates: no service account, no TPU, no model volume (the architecture is checked).
    assert "serviceAccountName" not in pod and pod["automountServiceAccountToken"] is False
    assert "google.com/tpu" not in str(container["resources"]) and "gke-tpu" not in str(pod)
    assert args[args.index("--model") + 1] == "sdxl-base"
    assert {v["name"] for v in pod["volumes"]} == {"tmp"}
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"


def test_a_pvc_cache_records_the_plans_figures_for_the_next_check_and_the_pods() -> None:
    manifests = render({"compilationCache": {"type": "pvc", "pvc": {"claimName": "jax-cache"}}})
    container = _container(manifests)
    mount = next(m for m in container["volumeMounts"] if m["name"] == "compilation-cache")
    server_mount = next(m for m in server_container(manifests)["volumeMounts"] if m["name"] == mount["name"])
    assert container["args"][container["args"].index("--cache-dir") + 1] == mount["mountPath"]
    assert mount["mountPath"] == server_mount["mountPath"]


@pytest.mark.parametrize(
    "values",
    [
        {"fitCheck": {"enabled": False}},
        {"accelerator": {"type": "cpu"}, "model": {"source": "tiny"}},
        {"accelerator": {"type": "gpu"}},
    ],
    ids=["disabled", "cpu", "gpu"],
)
def test_only_tpu_slices_are_checked_before_install(values: dict[str, Any]) -> None:
    assert _fit_checks(render(values)) == []


def test_kubectl_manifests_leave_the_hook_out() -> None:
    assert "fit-check" not in (REPO / "k8s" / "sdxl-serve.yaml").read_text()


def _run_the_hooks_command(values: dict[str, Any], home: pathlib.Path) -> subprocess.CompletedProcess[str]:
    """The rendered container's args and env, through the server's CLI, for this machine's CPU devices."""
    container = _container(render(values))
    args = list(container["args"])
    args[args.index("--topology") + 1] = "cpu"  # no TPU here: the CPU backend against this host's RAM
    env = {e["name"]: e["value"] for e in container["env"]}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"))
    env.update({k: v for k, v in os.environ.items() if k in ("PATH", "SDXL_TINY_MODEL_DIR")})
    env["XLA_FLAGS"] = xla_flags(devices=1)
    return subprocess.run(
        [sys.executable, "-m", "sdxl_server.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_a_size_that_does_not_fit_fails_the_hook_in_one_line_and_one_that_fits_passes(tmp_path) -> None:
    refused = _run_the_hooks_command(
        {**DEMO, "server": {**DEMO["server"], "resolutions": ["1024x1024"]}}, tmp_path
    )
    assert refused.returncode == 1, refused.stderr[-3000:]
    (line,) = refused.stderr.strip().splitlines()[-1:]
    assert line.startswith("sdxl-server compile: --resolutions: 1024x1024 does not fit the device"), line
    assert "--attention flash" in line  # what to change
    assert "Traceback" not in refused.stderr

    fits = _run_the_hooks_command({**DEMO, "server": {**DEMO["server"], "resolutions": ["64x64"]}}, tmp_path)
    assert fits.returncode == 0, fits.stderr[-3000:]
    assert fits.stdout.startswith("fits: memory plan: one slot per device needs"), fits.stdout
