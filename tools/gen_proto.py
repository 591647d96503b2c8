"""Generates the Python stubs and type stubs for proto/ into the client package.

Usage: python tools/gen_proto.py OUT_DIR   (the Makefile's `make proto` passes
client/sdxl_client/_proto). tests/unit/test_proto_sync.py generates into a temporary
directory and compares, so a stale checkout fails the suite.

protoc writes absolute imports (`from sdxl.v1 import sdxl_pb2`) that only work with the
output directory on sys.path; they are rewritten to import from the client package.
"""

from __future__ import annotations

import pathlib
import re
import sys

from grpc_tools import protoc

REPO = pathlib.Path(__file__).resolve().parents[1]
PROTO_ROOT = REPO / "proto"
PACKAGE = "sdxl_client._proto"


def proto_files() -> list[pathlib.Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def _rewrite_imports(path: pathlib.Path) -> None:
    text = path.read_text()
    text = re.sub(r"^from sdxl\.", f"from {PACKAGE}.sdxl.", text, flags=re.M)
    text = re.sub(r"^import sdxl\.", f"import {PACKAGE}.sdxl.", text, flags=re.M)
    text = re.sub(r"(?<![\w.])sdxl\.v1\.sdxl_pb2\b", f"{PACKAGE}.sdxl.v1.sdxl_pb2", text)
    path.write_text(text)


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Writes the generated files under out_dir and returns them, sorted."""
    out_dir.mkdir(parents=True, exist_ok=True)
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    # The mypy-protobuf plugins live next to this interpreter, which need not be on PATH.
    bin_dir = pathlib.Path(sys.executable).parent
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *(str(p.relative_to(PROTO_ROOT)) for p in proto_files()),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    generated = sorted(p for p in out_dir.rglob("*") if p.suffix in (".py", ".pyi"))
    for path in generated:
        _rewrite_imports(path)
    for package_dir in {p.parent for p in generated} | {out_dir}:
        for parent in [package_dir, *package_dir.parents]:
            if parent == out_dir.parent:
                break
            (parent / "__init__.py").touch()
    return sorted(p for p in out_dir.rglob("*") if p.is_file() and p.suffix in (".py", ".pyi"))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    for path in generate(pathlib.Path(sys.argv[1])):
        print(path)
