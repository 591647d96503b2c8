"""docs/DEPLOY-GKE.md checked offline, on the guide's own text: what can be checked without a cloud.

The guide's variables block runs in bash; its values file (written by the guide's heredoc from those
variables) lints and renders with the real Helm CLI, and every object validates for Kubernetes 1.30 in
strict mode; the image the chart then runs is the tag the guide builds and pushes; the service account the
IAM grants name is the one the chart creates and the Deployment uses; the HPA's metric is the one the
guide's check step queries. Nothing here reaches Google Cloud (the guide says so).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import urllib.parse
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from sdxl_test_support.chart_render import CHART, REPO, one, run_helm

GUIDE = REPO / "docs" / "DEPLOY-GKE.md"
SCHEMA_DIR = Path(__file__).parent / "schemas"
CRD_SCHEMAS = {
    ("monitoring.googleapis.com/v1", "PodMonitoring"): "podmonitoring.json",
    ("monitoring.googleapis.com/v1", "Rules"): "gmp-rules.json",
}


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", GUIDE.read_text(), re.S)


def block_with(text: str) -> str:
    (block,) = [b for b in bash_blocks() if text in b]
    return block


def run_bash(script: str, cwd: Path) -> str:
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": os.environ["PATH"]},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def guide(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The guide's variables, its values file and the chart rendered with them, as its release."""
    work = tmp_path_factory.mktemp("guide")
    (work / "helm").symlink_to(REPO / "helm")  # the guide runs from the repository root
    variables = bash_blocks()[0]
    names = re.findall(r"^export (\w+)=", variables, re.M)
    shown = "".join(f'printf "%s=%s\\n" {name} "${name}"\n' for name in names)
    env = dict(line.split("=", 1) for line in run_bash(variables + shown, work).splitlines())
    heredoc = re.search(r"cat > sdxl-values.yaml <<EOF\n.*?\nEOF\n", block_with("cat > sdxl-values"), re.S)
    assert heredoc is not None
    run_bash(variables + heredoc.group(0), work)  # only the file: the rest of the block calls helm
    values = yaml.safe_load((work / "sdxl-values.yaml").read_text())
    rendered = run_helm(
        "template", env["RELEASE"], str(CHART), "--namespace", env["NAMESPACE"], values=values
    )
    return {
        "env": env,
        "work": work,
        "values": values,
        "manifests": [doc for doc in yaml.safe_load_all(rendered) if doc],
    }


def test_the_variables_block_runs_and_reads_the_charts_version(guide):
    env = guide["env"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert env["VERSION"] == chart["appVersion"]
    assert env["REGION"] == env["ZONE"].rsplit("-", 1)[0]


def test_the_guides_values_lint_and_every_object_validates(guide):
    output = run_helm("lint", "--strict", str(CHART), values=guide["values"])
    assert "0 chart(s) failed" in output
    for manifest in guide["manifests"]:
        schema = CRD_SCHEMAS.get((manifest["apiVersion"], manifest["kind"]))
        if schema is not None:
            jsonschema.validate(manifest, json.loads((SCHEMA_DIR / schema).read_text()))
        else:
            kubernetes_validate.validate(manifest, "1.30.0", strict=True)


def test_the_image_built_and_pushed_is_the_one_the_chart_runs(guide):
    build = block_with("docker build")
    build_line = next(line for line in build.splitlines() if line.startswith("docker build"))
    assert "--build-arg ACCELERATOR=tpu" in build_line  # the Dockerfile's TPU flavour
    tag = build_line.split(" -t ", 1)[1].split()[0]
    push = next(line for line in build.splitlines() if line.startswith("docker push"))
    assert push.split()[-1] == tag
    built = run_bash(bash_blocks()[0] + f'echo "{tag}"', guide["work"]).strip()
    container = one(guide["manifests"], "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == built
    assert built.endswith(f"{guide['env']['VERSION']}-tpu")


def test_the_service_account_granted_is_the_one_the_chart_creates(guide):
    env = guide["env"]
    account = one(guide["manifests"], "ServiceAccount")
    assert account["metadata"]["name"] == env["KSA"]
    assert account["metadata"]["namespace"] == env["NAMESPACE"]
    pod = one(guide["manifests"], "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == env["KSA"]
    grants = block_with("KSA_PRINCIPAL=")
    assert "/subject/ns/${NAMESPACE}/sa/${KSA}" in grants
    assert grants.count("--member=${KSA_PRINCIPAL}") == 2


def test_the_objects_the_guide_names_exist_under_those_names(guide):
    env, manifests = guide["env"], guide["manifests"]
    assert one(manifests, "Deployment")["metadata"]["name"] == env["FULLNAME"]
    assert one(manifests, "Service", "-headless")["metadata"]["name"] == f"{env['FULLNAME']}-headless"
    assert one(manifests, "PodMonitoring")["metadata"]["name"] == env["FULLNAME"]
    pod = one(manifests, "Deployment")["spec"]["template"]["spec"]
    assert pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == "2x2"
    assert pod["containers"][0]["resources"]["limits"]["google.com/tpu"] == 4


def test_the_hpa_metric_is_the_one_the_guide_checks(guide):
    hpa = one(guide["manifests"], "HorizontalPodAutoscaler")
    assert hpa["metadata"]["name"] == guide["env"]["FULLNAME"]
    assert hpa["spec"]["maxReplicas"] == int(guide["env"]["MAX_REPLICAS"])
    (metric,) = hpa["spec"]["metrics"]
    name = metric["external"]["metric"]["name"]
    assert name == "prometheus.googleapis.com|sdxl_demand_with_headroom|gauge"
    assert (
        metric["external"]["metric"]["selector"]["matchLabels"]["resource.labels.cluster"]
        == guide["env"]["CLUSTER"]
    )
    check = block_with("external.metrics.k8s.io")
    assert f"/namespaces/${{NAMESPACE}}/{urllib.parse.quote(name, safe='.')}" in check
