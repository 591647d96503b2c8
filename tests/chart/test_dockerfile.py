"""docker/Dockerfile agrees with the repository and the chart.

No container engine runs here, so the image is never built in tests; these checks read the Dockerfile and
catch what would break a build or a deployment: COPY sources that do not exist, extras that the server
package does not define, a UID or volume paths that differ from the chart's, a root user.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass

import pytest
import yaml
from sdxl_test_support.chart_render import CHART, REPO

DOCKERFILE = REPO / "docker" / "Dockerfile"


@dataclass(frozen=True)
class Instruction:
    stage: int
    keyword: str
    arguments: str


def _instructions() -> list[Instruction]:
    """The Dockerfile's instructions with continuation lines joined, numbered by build stage."""
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    instructions, stage = [], -1
    for line in logical:
        keyword, _, arguments = line.partition(" ")
        if keyword.upper() == "FROM":
            stage += 1
        instructions.append(Instruction(stage, keyword.upper(), arguments.strip()))
    return instructions


INSTRUCTIONS = _instructions()
FINAL_STAGE = max(i.stage for i in INSTRUCTIONS)


SERVER_PROJECT = tomllib.loads((REPO / "server" / "pyproject.toml").read_text())["project"]


def _all(keyword: str) -> list[str]:
    return [i.arguments for i in INSTRUCTIONS if i.keyword == keyword]


def _final(keyword: str) -> list[str]:
    return [i.arguments for i in INSTRUCTIONS if i.stage == FINAL_STAGE and i.keyword == keyword]


def _chart_defaults() -> dict:
    return dict(yaml.safe_load((CHART / "values.yaml").read_text()))


def test_is_multi_stage_and_the_runtime_copies_only_the_built_environment() -> None:
    assert FINAL_STAGE >= 1
    runtime_copies = _final("COPY")
    assert runtime_copies and all(c.startswith("--from=") for c in runtime_copies)


def test_every_copy_source_exists() -> None:
    copies = [
        i.arguments for i in INSTRUCTIONS if i.keyword == "COPY" and not i.arguments.startswith("--from")
    ]
    assert copies
    for arguments in copies:
        *sources, _destination = arguments.split()
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: no such path in the repository"


def test_installs_both_packages_with_the_pinned_versions() -> None:
    install = next(arguments for arguments in _all("RUN") if "pip install" in arguments)
    assert "-c requirements/constraints.txt" in install
    assert "./client" in install
    assert "./server" in install


def test_accelerator_argument_selects_extras_the_server_defines() -> None:
    argument = next(
        i.arguments for i in INSTRUCTIONS if i.keyword == "ARG" and i.arguments.startswith("ACCELERATOR")
    )
    assert argument == "ACCELERATOR=tpu"
    extras = tomllib.loads((REPO / "server" / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    selector = next(i.arguments for i in INSTRUCTIONS if i.keyword == "RUN" and "ACCELERATOR" in i.arguments)
    chosen = dict(re.findall(r"(\w+)\) echo \"(\[?\w*\]?)\"", selector))
    assert set(chosen) == {"tpu", "cuda", "cpu"}
    assert chosen["cpu"] == ""
    for accelerator in ("tpu", "cuda"):
        assert chosen[accelerator].strip("[]") in extras, f"sdxl-server has no [{accelerator}] extra"


def test_runs_as_the_chart_non_root_user() -> None:
    [user] = _final("USER")
    uid, _, gid = user.partition(":")
    security = _chart_defaults()["podSecurityContext"]
    assert int(uid) != 0
    assert (int(uid), int(gid)) == (security["runAsUser"], security["runAsGroup"])


def test_volumes_are_the_chart_mount_paths() -> None:
    [volumes] = _final("VOLUME")
    values = _chart_defaults()
    assert set(json.loads(volumes)) == {values["compilationCache"]["mountPath"], values["model"]["mountPath"]}


def test_entrypoint_is_sdxl_server_serve() -> None:
    scripts = SERVER_PROJECT["scripts"]
    [entrypoint] = _final("ENTRYPOINT")
    [command] = _final("CMD")
    assert json.loads(entrypoint) == ["sdxl-server"]
    assert json.loads(command) == ["serve"]
    assert "sdxl-server" in scripts
    assert set(_final("EXPOSE")[0].split()) == {"50051", "8000"}


@pytest.mark.parametrize("path", [".venv", ".tools", ".cache", ".git"])
def test_dockerignore_keeps_local_state_out_of_the_build_context(path: str) -> None:
    ignored = (REPO / ".dockerignore").read_text().split()
    assert path in ignored
