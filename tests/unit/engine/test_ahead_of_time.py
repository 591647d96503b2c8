"""`sdxl-server compile`: programs compiled ahead of time, the program cache's key, a pod that loads them.

The CPU backend is the proxy for a TPU pod: a cache filled by the compile command for `--topology cpu`
must be loaded by an engine start with no compile. The same command for a TPU topology needs libtpu,
which lives in .venv-tpu (`make tpu-install`; CI installs it with the test prerequisites): without it
that test is skipped and says so.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from sdxl_server.engine.device.program_cache import ProgramCache
from sdxl_test_support.xla_flags import xla_flags

HERE = pathlib.Path(__file__).parent
REPO = HERE.parents[2]
TPU_PYTHON = REPO / ".venv-tpu" / "bin" / "python"
# Small and fast: one resolution, few steps (the engine start below uses the same values).
TINY_ARGS = ["--model", "tiny", "--resolutions", "64x64", "--max-steps", "8", "--seed-steps", "0"]
# engine_subprocess.config with these overrides (and the JSON ones of argv[3]) is the server the cache
# is filled for.
START_SCRIPT = """
import json, sys
from engine_subprocess import config
from sdxl_server.engine import JaxEngine
more = {"max_devices": 1, "slots_per_device": 2, **(json.loads(sys.argv[3]) if len(sys.argv) > 3 else {})}
engine = JaxEngine(config(sys.argv[1], sys.argv[2], **more))
engine.start()
built = engine.loop_statistics().programs_compiled
engine.stop()
print(json.dumps({"loaded": engine.programs_loaded, "built": built, "probes": engine.memory_probes_recorded}))
"""


def compile_command(python: pathlib.Path | str, tiny_model_dir, *args: str) -> subprocess.CompletedProcess:
    # libtpu compiles as a pod's server would: without the tests' CPU compile flags.
    flags = "--xla_force_host_platform_device_count=1" if python == TPU_PYTHON else xla_flags(devices=1)
    env = dict(os.environ, XLA_FLAGS=flags, SDXL_TINY_MODEL_DIR=str(tiny_model_dir))
    return subprocess.run(
        [str(python), "-m", "sdxl_server.main", "compile", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def start_engine(tiny_model_dir, cache_dir, **overrides: object) -> tuple[dict, str]:
    env = dict(os.environ, XLA_FLAGS=xla_flags(devices=1))
    completed = subprocess.run(
        [sys.executable, "-c", START_SCRIPT, str(tiny_model_dir), str(cache_dir), json.dumps(overrides)],
        env=env,
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(completed.stdout.strip().splitlines()[-1]), completed.stderr


@pytest.mark.slow
def test_a_cache_filled_ahead_of_time_is_loaded_at_start_with_no_compile(tiny_model_dir, tmp_path):
    # A server with per-request LoRA (--lora-dir): its plain programs and its adapter bank's both. One
    # slot (row buckets 1 and 2) keeps the programs few: each is compiled here and loaded below.
    cache, report_file = tmp_path / "cache", tmp_path / "aot.json"
    lora = {"slots_per_device": 1, "lora_places": 2, "lora_max_rank": 4, "max_loras_per_request": 2}
    compiled = compile_command(
        sys.executable,
        tiny_model_dir,
        "--topology",
        "cpu",
        *TINY_ARGS,
        "--json",
        str(report_file),
        "--cache-dir",
        str(cache),
        *[f"--{flag.replace('_', '-')}={value}" for flag, value in lora.items()],
    )
    assert compiled.returncode == 0, compiled.stderr[-4000:]
    report = json.loads(report_file.read_text())
    assert report["topology"] == "cpu" and report["fits"] is True
    assert report["total_hbm_bytes"] <= report["device_hbm_bytes"]
    names = [p["name"] for p in report["programs"]]
    # encode, insert, rearrange, and a step per row bucket and a decode per batch bucket (1 slot: a decode
    # of 1 image)
    assert {"encode", "insert-64x64", "rearrange-64x64", "decode1-64x64"} <= set(names)
    assert len([name for name in names if name.startswith("step")]) >= 2, names
    # The same steps taking the adapter bank, at a stack of 1 and of 2 (--max-loras-per-request), and the
    # encode with a request's text-encoder adapters.
    plain_steps = [name.removeprefix("step") for name in names if name.startswith("step")]
    lora_steps = [name.removeprefix("lorastep") for name in names if name.startswith("lorastep")]
    narrow = [name.replace("w1-", "-") for name in lora_steps if "w1-" in name]
    assert (
        "encode-lora" in names
        and sorted(narrow) == sorted(plain_steps)
        and len(lora_steps) == 2 * len(narrow)
    )
    for program in report["programs"]:
        assert program["hbm_bytes"] >= program["argument_bytes"] > 0, program
        assert program["compile_seconds"] > 0, program
    steps = [p for p in report["programs"] if "step" in p["name"]]
    assert all(p["flops"] > 0 and p["roofline_seconds"] > 0 for p in steps)

    assert report["slots_per_device"] == 1 and report["max_decode_batch"] == 1
    assert report["memory_plan"].startswith("memory plan: one slot per device needs")

    folder = tmp_path / "loras"
    folder.mkdir()
    started, log = start_engine(tiny_model_dir, cache, lora_dir=str(folder), **lora)
    # Every program the server builds came whole from the cache, nothing traced or compiled, and the
    # memory plan read its two probes' figures (step and decode at 64x64) instead of compiling them.
    assert started == {"loaded": len(names), "built": len(names), "probes": 2}, log[-3000:]
    assert "not in the program cache" not in log


@pytest.mark.slow
def test_a_start_that_misses_says_which_part_of_the_key_differed(tmp_path, caplog):
    devices = jax.local_devices()[:1]
    program = jax.jit(jnp.sin).lower(jax.ShapeDtypeStruct((4,), jnp.float32)).compile()
    signature = (jax.ShapeDtypeStruct((4,), jnp.float32),)
    ProgramCache(str(tmp_path), "model", devices, attention="xla").store("sin", signature, program)

    compiles = []

    def compile_program():
        compiles.append(1)
        return program

    same = ProgramCache(str(tmp_path), "model", devices, attention="xla")
    assert same.get_or_compile("sin", signature, compile_program) is not None
    assert (same.hits, same.misses, compiles) == (1, 0, [])

    other = ProgramCache(str(tmp_path), "model", devices, attention="flash")
    with caplog.at_level(logging.INFO, logger="sdxl_server.engine.device.program_cache"):
        other.get_or_compile("sin", signature, compile_program)
    assert (other.hits, other.misses, compiles) == (0, 1, [1])
    assert "saved ones differ in: attention" in caplog.text


KEY_SCRIPT = """
import json
import jax
from sdxl_server.engine.device.program_cache import ProgramCache
devices = jax.local_devices()
keys = {
    f"{n}-{attention}": ProgramCache("/nonexistent", "model", devices[:n], attention)._path("step1x1", ())
    for n in (1, 4) for attention in ("xla", "flash")
}
print(json.dumps({name: str(path) for name, path in keys.items()}))
"""


def test_the_cache_key_changes_with_attention_and_topology():
    env = dict(os.environ, XLA_FLAGS=xla_flags(devices=4))
    completed = subprocess.run(
        [sys.executable, "-c", KEY_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    paths = json.loads(completed.stdout.strip().splitlines()[-1])
    assert len(set(paths.values())) == 4, paths  # 1 vs 4 devices, xla vs flash: four different keys


@pytest.mark.slow
@pytest.mark.skipif(
    not TPU_PYTHON.exists(),
    reason="libtpu is not installed (.venv-tpu is missing: `make tpu-install`, which `make test` runs)",
)
def test_the_tiny_model_compiles_for_a_v5e_chip_ahead_of_time(tiny_model_dir, tmp_path):
    report_file = tmp_path / "v5e.json"
    compiled = compile_command(
        TPU_PYTHON,
        tiny_model_dir,
        "--topology",
        "v5e:1x1",
        *TINY_ARGS,
        "--slots-per-device",
        "1",
        "--json",
        str(report_file),
        "--cache-dir",
        str(tmp_path / "cache"),
    )
    assert compiled.returncode == 0, compiled.stderr[-4000:]
    report = json.loads(report_file.read_text())
    assert (report["topology"], report["chip"], report["dtype"]) == ("v5e:1x1", "TPU v5e", "bfloat16")
    assert report["device_hbm_bytes"] == int(15.75 * 1024**3) and report["fits"] is True
    step = next(p for p in report["programs"] if p["name"] == "step1x1-64x64")
    assert step["flops"] > 0 and step["bytes_accessed"] > 0
    assert step["roofline_seconds"] == pytest.approx(
        max(step["flops"] / 197e12, step["bytes_accessed"] / 819e9)
    )
    saved = sorted(p.name for p in (tmp_path / "cache" / "sdxl-programs").iterdir())
    executables = [name for name in saved if name.endswith(".bin")]
    assert len(executables) == len(report["programs"]) >= 5, saved
    # The memory plan's probes, recorded for the pod's start (their figures, not executables).
    assert len([name for name in saved if name.startswith("memory-probe-")]) == 2, saved
    keys = [json.loads(p.read_text()) for p in (tmp_path / "cache" / "sdxl-program-keys").iterdir()]
    assert {k["parts"]["topology"].split(":")[0] for k in keys} == {"tpu"}
    assert all(k["parts"]["libtpu"] != "?" for k in keys)


@pytest.mark.slow
def test_an_engine_per_device_has_each_devices_programs_compiled_apart(tiny_model_dir, tmp_path):
    # A partial run (the encode only) on 2 CPU devices: one report per engine, each of one device.
    report_file = tmp_path / "apart.json"
    env = dict(os.environ, XLA_FLAGS=xla_flags(devices=2), SDXL_TINY_MODEL_DIR=str(tiny_model_dir))
    compiled = subprocess.run(
        [sys.executable, "-m", "sdxl_server.main", "compile", "--topology", "cpu", *TINY_ARGS,
         "--slots-per-device", "1", "--programs", "^encode$", "--json", str(report_file)],
        env={**env, "SDXL_ENGINE_PER_DEVICE": "1"},  # as the chart's Job reads the pods' ConfigMap
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert compiled.returncode == 0, compiled.stderr[-4000:]
    engines = json.loads(report_file.read_text())["engines"]
    assert [(e["devices"], [p["name"] for p in e["programs"]]) for e in engines] == [(1, ["encode"])] * 2
    assert "engine of device 1: " in compiled.stdout


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--slots-per-device", "-1"], "--slots-per-device"),
        (["--slots-per-device", "0"], "--slots-per-device"),
        (["--slots-per-device", "1", "--max-decode-batch", "0"], "--max-decode-batch"),
        (["--slots-per-device", "1", "--memory-fraction", "2"], "--memory-fraction"),
        (
            ["--slots-per-device", "1", "--programs", "step", "--cache-dir", "/tmp/x"],
            "--programs and --cache-dir",
        ),
        (["--slots-per-device", "1", "--resolutions", "100x64"], "--resolutions"),
        (["--slots-per-device", "1", "--lora-places", "-1"], "--lora-places"),
        (["--slots-per-device", "1", "--lora-places", "2", "--lora-max-rank", "0"], "--lora-max-rank"),
        (["--slots-per-device", "1", "--fit-check", "--programs", "step"], "--fit-check and --programs"),
    ],
)
def test_bad_compile_arguments_are_refused_naming_the_flag(extra, named, capsys):
    from sdxl_server.main import main

    argv = ["compile", "--topology", "cpu", "--model", "tiny", "--resolutions", "64x64", *extra]
    assert main(argv) == 2
    assert named in capsys.readouterr().err


def test_the_fit_check_counts_the_adapter_banks_and_refuses_one_that_does_not_fit(
    tiny_model_dir, monkeypatch, capsys
):
    """What a pod with --lora-dir would refuse at start, the chart's pre-install check refuses first."""
    from sdxl_server.main import main

    monkeypatch.setenv("SDXL_TINY_MODEL_DIR", str(tiny_model_dir))
    argv = ["compile", "--fit-check", "--topology", "cpu", *TINY_ARGS[:4], "--slots-per-device", "1"]
    assert main([*argv, "--lora-places", "2"]) == 0
    assert "adapter banks 0.01 GiB" in capsys.readouterr().out  # 2 places of the tiny model at rank 64
    assert main([*argv, "--lora-places", "1000000"]) == 1  # far beyond this host's RAM
    assert "--lora-places: 1000000 LoRA adapter places of" in capsys.readouterr().err
