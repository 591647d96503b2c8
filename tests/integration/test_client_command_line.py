"""The `sdxl` command against the shared real server: generate, info, health and loadtest."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sdxl_client.cli import main

SDXL = str(Path(sys.executable).parent / "sdxl")  # the installed console script


def test_generate_writes_images_and_draws_progress_from_the_stream(shared_server, tmp_path):
    out = tmp_path / "images/"
    done = subprocess.run(
        [
            SDXL, "generate", "a lighthouse", "--target", shared_server.target, "--seed", "21", "-n", "2",
            "--steps", "3", "--size", "128x64", "--format", "jpeg", "--quality", "80",
            "--guidance-scale", "4", "--negative-prompt", "fog", "--request-id", "cli-1",
            "-o", f"{out}/", "--progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    paths = [Path(line) for line in done.stdout.split()]
    assert sorted(p.name for p in paths) == ["cli-1-0.jpg", "cli-1-1.jpg"]
    for path in paths:
        with Image.open(path) as image:
            assert (image.format, image.size) == ("JPEG", (128, 64))
    assert "2 images x 3 steps [########################] 6/6" in done.stderr  # the bar reached the end
    assert "elapsed" in done.stderr and "seeds 21..22, 3 steps" in done.stderr


def test_generate_to_a_file_with_json_summary(shared_server, tmp_path, capsys):
    target = tmp_path / "cat.png"
    assert (
        main(
            [
                "generate",
                "a cat",
                "--target",
                shared_server.target,
                "--seed",
                "4",
                "-o",
                str(target),
                "--json",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["seed"] == 4 and summary["images"] == [{"path": str(target), "seed": 4, "index": 0}]
    with Image.open(target) as image:
        assert image.format == "PNG"


def test_generate_bad_field_is_one_clear_line(shared_server, capsys):
    assert (
        main(["generate", "x", "--target", shared_server.target, "--steps", "99", "-o", "/nonexistent/"]) == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: INVALID_ARGUMENT") and "steps" in err and "Traceback" not in err


def test_info_and_health(shared_server, capsys):
    assert main(["info", "--target", shared_server.target, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model"] == "tiny" and info["resolutions"] == ["64x64", "128x64"]
    assert main(["info", "--target", shared_server.target]) == 0
    assert "max_steps" in capsys.readouterr().out
    assert main(["health", "--target", shared_server.target, "--wait", "30"]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"


def test_target_from_the_environment(shared_server, monkeypatch, capsys):
    monkeypatch.setenv("SDXL_TARGET", shared_server.target)
    assert main(["health"]) == 0 and capsys.readouterr().out.strip() == "SERVING"


@pytest.mark.parametrize("mode", [["--concurrency", "3"], ["--rate", "10"]], ids=["closed", "open"])
def test_loadtest_report_agrees_with_its_raw_samples(shared_server, tmp_path, capsys, mode):
    report_path, plot_path = tmp_path / "report.json", tmp_path / "plot.png"
    status = main(
        [
            "loadtest", "--target", shared_server.target, *mode, "--duration", "2",
            "--mix", "64x64:2:3,128x64:3:1", "--output", str(report_path), "--plot", str(plot_path),
            "--max-error-rate", "1",  # this test checks the report's arithmetic, errors or not
        ]
    )  # fmt: skip
    assert status == 0
    printed = capsys.readouterr().out
    assert "throughput" in printed and "p99" in printed
    report = json.loads(report_path.read_text())
    samples, summary = report["samples"], report["summary"]
    assert summary["requests"] == len(samples) > 0
    ok = [s["latency"] for s in samples if s["code"] == "OK"]
    assert summary["ok"] == len(ok) > 0
    for p in (50, 90, 99):
        assert summary["latency_seconds"][f"p{p}"] == pytest.approx(float(np.percentile(ok, p)))
    elapsed = max(s["start"] + s["latency"] for s in samples)
    assert summary["throughput_rps"] == pytest.approx(len(ok) / elapsed)
    errors = {code: sum(s["code"] == code for s in samples) for code in {s["code"] for s in samples} - {"OK"}}
    assert summary["errors_by_code"] == errors
    assert {(s["width"], s["height"], s["steps"]) for s in samples} <= {(64, 64, 2), (128, 64, 3)}
    assert len({s["request_id"] for s in samples}) == len(samples)
    with Image.open(plot_path) as plot:
        assert plot.format == "PNG" and plot.size[0] > 100
