"""The dependency rules docs/ARCHITECTURE.md states, held by checking imports for real.

- the engine (``sdxl_server.engine``) imports no gRPC and no generated code (``sdxl_client._proto``);
- the service (``sdxl_server.service``) imports no JAX;
- the batching decisions (``sdxl_server.engine.batching``) import no JAX;
- the client (``sdxl_client``) imports nothing of the server, and no JAX.

Each rule is checked two ways, because each way misses what the other sees:
- statically: every ``import`` statement of every module file of the package, lazy ones inside functions
  included (they run only on some paths, so importing the module would not show them);
- dynamically: every module of the package imported in a fresh interpreter, then ``sys.modules`` read
  (what the package pulls in through others, e.g. a helper module that imports gRPC itself).

The last tests plant a violation in a copy of the package and check that the checks report it, so that a
rule cannot pass because its check looks at nothing.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

GRPC = ("grpc", "grpc_status", "grpc_health", "grpc_reflection", "grpc_tools")
JAX = ("jax", "jaxlib", "flax")


@dataclasses.dataclass(frozen=True)
class Rule:
    package: str
    forbidden: tuple[str, ...]  # module names; each also forbids its submodules
    why: str

    def breaks(self, module: str) -> bool:
        return any(module == name or module.startswith(name + ".") for name in self.forbidden)


RULES = {
    "engine": Rule("sdxl_server.engine", (*GRPC, "sdxl_client._proto"), "the engine never imports grpc"),
    "service": Rule("sdxl_server.service", JAX, "the service speaks gRPC, never JAX"),
    "batching": Rule("sdxl_server.engine.batching", JAX, "batching decisions are host-only, no JAX"),
    "client": Rule("sdxl_client", ("sdxl_server", *JAX), "the client never imports the server"),
}


def package_directory(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.submodule_search_locations, f"{package} is not an installed package"
    return Path(next(iter(spec.submodule_search_locations)))


def module_files(package: str, directory: Path) -> dict[str, Path]:
    """Every module of the package (``__main__`` included) by its dotted name."""
    modules = {}
    for path in sorted(directory.rglob("*.py")):
        parts = path.relative_to(directory).with_suffix("").parts
        if not all(part.isidentifier() for part in parts):
            continue  # not importable (data directories, scripts with dashes)
        if any(not (directory.joinpath(*parts[:i], "__init__.py")).exists() for i in range(len(parts))):
            continue  # below a directory that is not a package (shipped model files, for instance)
        name = ".".join((package, *parts))
        modules[name.removesuffix(".__init__")] = path
    return modules


def imports_in(module: str, path: Path) -> set[str]:
    """The absolute names of every module the file's import statements name, wherever they stand."""
    is_package = path.name == "__init__.py"
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the module's own package
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return names


def static_violations(rule: Rule, directory: Path) -> dict[str, list[str]]:
    """module -> the forbidden names its import statements name."""
    found = {}
    for module, path in module_files(rule.package, directory).items():
        bad = sorted(name for name in imports_in(module, path) if rule.breaks(name))
        if bad:
            found[module] = bad
    return found


_IMPORT_EACH = """
import importlib, json, sys
loaded = {}
for name in json.loads(sys.argv[1]):
    before = set(sys.modules)
    importlib.import_module(name)
    loaded[name] = sorted(set(sys.modules) - before)
print(json.dumps(loaded))
"""


def dynamic_violations(
    rule: Rule, modules: list[str], python_path: Path | None = None
) -> dict[str, list[str]]:
    """module -> the forbidden modules that importing it loaded, each module imported in turn in one fresh
    interpreter (a module is charged with what it loads first; ``python_path`` goes before the
    installed packages)."""
    env = dict(os.environ)
    if python_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(python_path), *filter(None, [env.get("PYTHONPATH")])])
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH, json.dumps(modules)],
        capture_output=True, text=True, timeout=300, env=env, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"importing {rule.package}'s modules failed:\n{done.stderr}"
    loaded: dict[str, list[str]] = json.loads(done.stdout.splitlines()[-1])
    return {module: bad for module, names in loaded.items() if (bad := [n for n in names if rule.breaks(n)])}


def importable(modules: dict[str, Path]) -> list[str]:
    """What can be imported without running a program (``__main__`` runs the command line)."""
    return [name for name in modules if not name.endswith(".__main__")]


@pytest.mark.parametrize("rule", RULES.values(), ids=RULES.keys())
def test_no_module_of_the_package_names_a_forbidden_import(rule: Rule) -> None:
    directory = package_directory(rule.package)
    assert len(module_files(rule.package, directory)) > 1, f"found no modules of {rule.package}"
    violations = static_violations(rule, directory)
    assert not violations, f"{rule.why}; module -> forbidden imports: {violations}"


@pytest.mark.parametrize("rule", RULES.values(), ids=RULES.keys())
def test_importing_every_module_of_the_package_loads_nothing_forbidden(rule: Rule) -> None:
    modules = importable(module_files(rule.package, package_directory(rule.package)))
    violations = dynamic_violations(rule, modules)
    assert not violations, f"{rule.why}; module -> forbidden modules it loaded: {violations}"


# ---- the checks catch what they are for: violations planted in a copy of the package


def _copy_of_the_distribution(package: str, tmp_path: Path) -> Path:
    """A copy of the package's top-level distribution (Python files only) under tmp_path."""
    top = package.split(".")[0]
    source = package_directory(top)
    shutil.copytree(source, tmp_path / top, ignore=_all_but_python)
    return tmp_path


def _all_but_python(directory: str, names: list[str]) -> list[str]:
    return [
        n for n in names if n == "__pycache__" or (Path(directory, n).is_file() and not n.endswith(".py"))
    ]


def _plant(directory: Path, relative: str, text: str) -> None:
    path = directory / relative
    path.write_text(path.read_text() + text if path.exists() else text)


# (rule, a module of the package, a forbidden module it will import)
PLANTED = {
    "engine": ("engine", "sdxl_server/engine/batching/buckets.py", "grpc"),
    "engine-stubs": ("engine", "sdxl_server/engine/api.py", "sdxl_client._proto.sdxl.v1.sdxl_pb2"),
    "service": ("service", "sdxl_server/service/auth.py", "jax"),
    "batching": ("batching", "sdxl_server/engine/batching/slot_table.py", "jax.numpy"),
    "client": ("client", "sdxl_client/_retry.py", "sdxl_server.logs"),
}


@pytest.mark.parametrize(("rule_name", "relative", "forbidden"), PLANTED.values(), ids=PLANTED.keys())
def test_a_forbidden_import_planted_in_a_module_fails_both_checks(
    rule_name: str, relative: str, forbidden: str, tmp_path: Path
) -> None:
    rule = RULES[rule_name]
    root = _copy_of_the_distribution(relative.split("/")[0], tmp_path)
    _plant(root, relative, f"\nimport {forbidden}  # planted\n")
    module = relative.removesuffix(".py").replace("/", ".")
    directory = root.joinpath(*rule.package.split("."))
    assert forbidden in static_violations(rule, directory)[module]
    assert forbidden in dynamic_violations(rule, [module], root)[module]


def test_a_lazy_import_inside_a_function_is_seen_by_the_static_check(tmp_path: Path) -> None:
    rule = RULES["engine"]
    root = _copy_of_the_distribution("sdxl_server", tmp_path)
    _plant(root, "sdxl_server/engine/batching/buckets.py", "\ndef _later():\n    from grpc import aio\n")
    directory = root.joinpath(*rule.package.split("."))
    assert "grpc.aio" in static_violations(rule, directory)["sdxl_server.engine.batching.buckets"]
    # Importing the module does not run the function: only the static check can see this one.
    assert dynamic_violations(rule, ["sdxl_server.engine.batching.buckets"], root) == {}


def test_an_import_through_a_helper_outside_the_package_is_seen_by_the_dynamic_check(tmp_path: Path) -> None:
    rule = RULES["service"]
    root = _copy_of_the_distribution("sdxl_server", tmp_path)
    _plant(root, "sdxl_server/planted_helper.py", "import jax\n")
    _plant(root, "sdxl_server/service/auth.py", "\nimport sdxl_server.planted_helper  # planted\n")
    directory = root.joinpath(*rule.package.split("."))
    assert static_violations(rule, directory) == {}  # the service's own statements name no JAX
    assert "jax" in dynamic_violations(rule, ["sdxl_server.service.auth"], root)["sdxl_server.service.auth"]
