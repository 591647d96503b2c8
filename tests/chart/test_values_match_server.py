"""What the chart accepts, the server accepts: no value set renders into pods that crash-loop at start.

The rendered ConfigMap is the server's whole configuration (SDXL_* variables), so each accepted value set
is fed to the server's own parser (`parse_serve_config`, then the engine's checks, as `sdxl-server serve`
does before it loads anything). Sizes are checked exhaustively against the schema's pattern, which has to
spell "a multiple of 8" as a regular expression.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from sdxl_server.engine.settings import AUTO_SLOTS
from sdxl_server.server_settings import ConfigError, parse_serve_config
from sdxl_test_support.chart_render import CHART, VALUE_SETS, HelmError, render, server_settings

ACCEPTED: dict[str, dict[str, Any]] = {
    "defaults": {},
    "cpu-example": VALUE_SETS["cpu"],
    "everything-optional": VALUE_SETS["everything-optional"],
    # Helm reads values files as float64: large numbers must still reach the server as whole numbers.
    "large-numbers": {
        "server": {"maxQueue": 1_000_000, "maxConnectionAgeSeconds": 3_000_000, "slotsPerDevice": 16},
        "terminationGracePeriodSeconds": 100_000,
        "preStopSleepSeconds": 0,
    },
    # A few-step model's recipe (issue 22).
    "recipe": {
        "server": {"defaultSampler": "lcm", "defaultTimestepSpacing": "trailing", "defaultGuidanceScale": 0}
    },
    # The memory plan's settings: slots decided at start, the share of memory, the attention.
    "memory-plan": {
        "server": {
            "slotsPerDevice": "auto",
            "maxDecodeBatch": "auto",
            "memoryFraction": 0.5,
            "attention": "flash",
        }
    },
    "decode-batch": {"server": {"slotsPerDevice": 4, "maxDecodeBatch": 1}},
    "engine-per-device": {"server": {"enginePerDevice": True}},
    "smallest": {
        "server": {
            "resolutions": ["8x8", "1016x1000", "2048x1152"],
            "slotsPerDevice": 1,
            "maxQueue": 1,
            "maxSteps": 1,
            "defaultSteps": 1,
            "maxImagesPerRequest": 1,
            "stepsPerDispatch": 1,
            "drainSeconds": 0,
            "maxConnectionAgeSeconds": 1,
        }
    },
}


def _server_config_from_chart(values: dict[str, Any]) -> Any:
    env = server_settings(render(values))
    return parse_serve_config([], env)  # the server's and the engine's checks, as `sdxl-server serve`


@pytest.mark.parametrize("name", ACCEPTED)
def test_every_accepted_value_set_is_accepted_by_the_server(name):
    config = _server_config_from_chart(ACCEPTED[name])
    server = ACCEPTED[name].get("server", {})
    if "maxQueue" in server:
        assert config.engine.max_queue == server["maxQueue"]
    assert config.engine.engine_per_device == server.get("enginePerDevice", False)
    if "resolutions" in server:
        assert [str(r) for r in config.engine.resolutions] == server["resolutions"]
    if "defaultSampler" in server:
        engine = config.engine
        assert (engine.default_sampler, engine.default_timestep_spacing) == ("lcm", "trailing")
        assert engine.default_guidance_scale == 0.0
    if server.get("slotsPerDevice") == "auto":
        assert config.engine.slots_per_device == AUTO_SLOTS
        assert (config.engine.memory_fraction, config.engine.attention) == (0.5, "flash")


def _resolution_pattern() -> re.Pattern[str]:
    schema = json.loads((CHART / "values.schema.json").read_text())
    return re.compile(schema["properties"]["server"]["properties"]["resolutions"]["items"]["pattern"])


def _server_accepts(size: str) -> bool:
    """What `--resolutions SIZE` meets: the server's parser, then the server's and the engine's checks."""
    try:
        parse_serve_config(["--resolutions", size], env={})
    except ConfigError:
        return False
    return True


def test_the_schema_accepts_exactly_the_sizes_the_server_accepts():
    pattern = _resolution_pattern()
    # One to four digits, and the carries into five and six digits.
    numbers = [*range(0, 2100), *range(9980, 10020), *range(99980, 100020)]
    for n in numbers:
        for size in (f"{n}x64", f"64x{n}"):
            assert bool(pattern.search(size)) == _server_accepts(size), size


@pytest.mark.parametrize("size", ["1001x1001", "1024x1020", "0x1024"])
def test_a_size_the_server_refuses_is_refused_by_helm_naming_the_value(size):
    assert not _server_accepts(size)
    with pytest.raises(HelmError) as refused:
        render({"server": {"resolutions": [size]}})
    assert "/server/resolutions/0" in str(refused.value) and size in str(refused.value)


def test_cpu_memory_default_fits_a_real_sdxl_and_the_tiny_example_stays_small():
    def memory_request(values: dict[str, Any]) -> str:
        deployment = next(m for m in render(values) if m["kind"] == "Deployment")
        return str(deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["memory"])

    # values.yaml's own note: a real SDXL on CPU needs ~16Gi.
    assert memory_request({"accelerator": {"type": "cpu"}}) == "16Gi"
    assert memory_request(VALUE_SETS["cpu"]) == "4Gi"
