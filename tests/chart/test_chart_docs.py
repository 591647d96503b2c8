"""The chart's documentation keeps up with the chart: every value is commented and in the README table."""

from __future__ import annotations

import pytest
import values_table
import yaml
from sdxl_test_support.chart_render import CHART


def test_every_value_has_a_doc_comment() -> None:
    text = values_table.VALUES.read_text()
    values_table.rows(yaml.safe_load(text), values_table.key_comments(text))  # raises naming the key


def test_values_yaml_names_its_schema() -> None:
    first_line = values_table.VALUES.read_text().splitlines()[0]
    assert first_line == "# yaml-language-server: $schema=values.schema.json"
    assert (CHART / "values.schema.json").is_file()


def test_readme_values_table_is_current() -> None:
    readme = values_table.README.read_text()
    assert readme == values_table.readme_with_table(readme), (
        "README values table is stale: run `make chart-docs`"
    )


def test_an_uncommented_key_is_caught() -> None:
    text = "# -- documented\na: 1\nb: 2\n"
    with pytest.raises(KeyError, match="b has no '# -- ' comment"):
        values_table.rows(yaml.safe_load(text), values_table.key_comments(text))
