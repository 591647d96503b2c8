"""The values table of helm/sdxl-serve/README.md, generated from the `# -- ` comments in values.yaml.

`python tests/chart/values_table.py` (or `make chart-docs`) rewrites the table between the README's markers;
tests/chart/test_chart_docs.py fails when the table is stale or a key has no comment.

Every key carries a `# -- ` comment. A mapping whose children carry comments is a section (its children get
rows); any other key is a leaf whose whole value is shown as its default.
"""

from __future__ import annotations

import json
import pathlib
import re
import sys
from typing import Any

import yaml

CHART = pathlib.Path(__file__).resolve().parents[2] / "helm" / "sdxl-serve"
VALUES = CHART / "values.yaml"
README = CHART / "README.md"
START = "<!-- values-table:start -->"
END = "<!-- values-table:end -->"

_DOC_START = re.compile(r"^(\s*)# -- (.*)$")
_DOC_MORE = re.compile(r"^(\s*)#\s?(.*)$")
_KEY = re.compile(r"^(\s*)([A-Za-z][\w.-]*):")


def key_comments(text: str) -> dict[str, str]:
    """Dotted key path -> its `# --` comment (continuation lines joined)."""
    comments: dict[str, str] = {}
    stack: list[tuple[int, str]] = []  # (indent, key) of the enclosing mappings
    pending: list[str] | None = None
    for line in text.splitlines():
        if start := _DOC_START.match(line):
            pending = [start.group(2)]
            continue
        more = _DOC_MORE.match(line)
        if more and pending is not None:
            pending.append(more.group(2))
            continue
        if key := _KEY.match(line):
            indent = len(key.group(1))
            while stack and stack[-1][0] >= indent:
                stack.pop()
            stack.append((indent, key.group(2)))
            if pending is not None:
                comments[".".join(k for _, k in stack)] = " ".join(pending)
        pending = None
    return comments


def _type_name(value: Any) -> str:
    return {bool: "bool", int: "int", float: "number", str: "string", list: "list", dict: "object"}[
        type(value)
    ]


def rows(values: dict[str, Any], comments: dict[str, str], prefix: str = "") -> list[tuple[str, ...]]:
    """(key, type, default, description) for every leaf; raises KeyError naming an uncommented key."""
    table = []
    for name, value in values.items():
        path = prefix + name
        if path not in comments:
            raise KeyError(f"{path} has no '# -- ' comment in values.yaml")
        children = [f"{path}.{child}" for child in value] if isinstance(value, dict) else []
        if any(child in comments for child in children):
            table += rows(value, comments, path + ".")
        else:
            default = json.dumps(value, separators=(",", ":"))
            table.append((path, _type_name(value), f"`{default}`", comments[path]))
    return table


def render_table() -> str:
    text = VALUES.read_text()
    lines = ["| Key | Type | Default | Description |", "| --- | --- | --- | --- |"]
    for key, kind, default, description in rows(yaml.safe_load(text), key_comments(text)):
        cells = [f"`{key}`", kind, default, description]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)


def readme_with_table(readme: str) -> str:
    before, _, rest = readme.partition(START)
    _, _, after = rest.partition(END)
    return f"{before}{START}\n{render_table()}\n{END}{after}"


if __name__ == "__main__":
    README.write_text(readme_with_table(README.read_text()))
    sys.exit(0)
