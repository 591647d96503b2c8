"""The generated stubs in the client package must match proto/ (run `make proto` to fix)."""

from __future__ import annotations

import importlib.util
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[3]
CHECKED_IN = REPO / "client" / "sdxl_client" / "_proto"


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_proto", REPO / "tools" / "gen_proto.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_stubs_are_in_sync_with_proto(tmp_path: pathlib.Path) -> None:
    fresh = _load_generator().generate(tmp_path / "_proto")
    fresh_files = {p.relative_to(tmp_path / "_proto"): p.read_text() for p in fresh}
    checked_in = {
        p.relative_to(CHECKED_IN): p.read_text()
        for p in CHECKED_IN.rglob("*")
        if p.is_file() and p.suffix in (".py", ".pyi")
    }
    assert sorted(fresh_files) == sorted(checked_in), "generated file set differs: run `make proto`"
    stale = [str(name) for name, text in fresh_files.items() if checked_in[name] != text]
    assert not stale, f"stale generated stubs {stale}: run `make proto`"


def test_every_message_field_is_documented() -> None:
    """Every message, enum value and field in the proto has a comment (issue: 'every field documented')."""
    undocumented = []
    for proto in (REPO / "proto").rglob("*.proto"):
        lines = proto.read_text().splitlines()
        for number, line in enumerate(lines):
            stripped = line.strip()
            is_field = (
                stripped.endswith(";")
                and "=" in stripped
                and not stripped.startswith(("//", "syntax", "option"))
            )
            if is_field and not lines[number - 1].strip().startswith("//"):
                undocumented.append(f"{proto.name}:{number + 1}: {stripped}")
    assert not undocumented, "fields without a comment:\n" + "\n".join(undocumented)
