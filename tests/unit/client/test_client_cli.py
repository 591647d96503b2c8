"""Pure parts of the `sdxl` command line: argument parsing, the load test's mix and statistics."""

from __future__ import annotations

import argparse
import pathlib

import numpy as np
import pytest
from sdxl_client import GeneratedImage, ImageFormat
from sdxl_client.cli import build_parser, main
from sdxl_client.cli._generate import output_path
from sdxl_client.cli._loadstats import Sample, format_summary, percentile, summarize
from sdxl_client.cli._loadtest import MixEntry, parse_mix


def test_every_request_field_has_an_option():
    args = build_parser().parse_args(
        [
            "generate", "a cat", "--negative-prompt", "dog", "--seed", "3", "-n", "2", "--steps", "5",
            "--guidance-scale", "6.5", "--size", "128x64", "--format", "webp", "--quality", "70",
            "--request-id", "r1", "-o", "out/",
        ]
    )  # fmt: skip
    assert (args.prompt, args.negative_prompt, args.seed, args.num_images) == ("a cat", "dog", 3, 2)
    assert (args.steps, args.guidance_scale, args.size, args.format) == (5, 6.5, (128, 64), "webp")
    assert (args.quality, args.request_id, args.output) == (70, "r1", "out/")


def test_target_and_token_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("SDXL_TARGET", "dns:///sdxl.default.svc:50051")
    monkeypatch.setenv("SDXL_TOKEN", "t0k")
    args = build_parser().parse_args(["info"])
    assert args.target == "dns:///sdxl.default.svc:50051" and args.token == "t0k"


def test_default_target_is_localhost(monkeypatch):
    monkeypatch.delenv("SDXL_TARGET", raising=False)
    assert build_parser().parse_args(["health"]).target == "localhost:50051"


def test_loadtest_does_not_retry_by_default_and_generate_does():
    assert build_parser().parse_args(["loadtest"]).retries == 0
    assert build_parser().parse_args(["generate", "x"]).retries > 0


def test_bad_size_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["generate", "x", "--size", "big"])
    assert exited.value.code == 2
    assert "size must look like" in capsys.readouterr().err


def test_negative_number_is_a_usage_error_naming_the_flag_even_without_a_server(capsys):
    assert main(["generate", "x", "--steps", "-3", "--target", "127.0.0.1:9", "--retries", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdxl generate: error: --steps: -3 is negative") and "Traceback" not in err


def test_output_paths(tmp_path):
    image = GeneratedImage(b"", ImageFormat.JPEG, 64, 64, seed=9, index=1)
    assert output_path(tmp_path, str(tmp_path), image, "rid", 2) == tmp_path / "rid-1.jpg"
    assert output_path(tmp_path / "cat.jpg", "cat.jpg", image, "rid", 2) == tmp_path / "cat-1.jpg"
    assert output_path(tmp_path / "cat.jpg", "cat.jpg", image, "rid", 1) == tmp_path / "cat.jpg"
    assert output_path(pathlib.Path("new"), "new/", image, "rid", 1) == pathlib.Path("new/rid-1.jpg")


def test_mix_parsing():
    assert parse_mix("64x64:4, 128x64:8:3, default") == [
        MixEntry(64, 64, 4, 1.0),
        MixEntry(128, 64, 8, 3.0),
        MixEntry(0, 0, 0, 1.0),
    ]
    for bad in ("64:4", "64x64:four", "64x64:4:0", "64x64:1:1:1", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_mix(bad)


@pytest.mark.parametrize("values", [[3.0], [1.0, 2.0], [5.0, 1.0, 4.0, 2.0, 3.0, 10.0, 0.5]])
@pytest.mark.parametrize("p", [0, 50, 90, 99, 100])
def test_percentile_matches_numpy_linear(values, p):
    assert percentile(values, p) == pytest.approx(float(np.percentile(values, p)))


def test_summary_counts_errors_by_code_and_uses_successes_for_latency():
    samples = [
        Sample(0.0, 1.0, "OK", 64, 64, 4, 2, "a"),
        Sample(0.5, 3.0, "OK", 64, 64, 4, 2, "b"),
        Sample(1.0, 0.01, "RESOURCE_EXHAUSTED", 64, 64, 4, 2, "c"),
        Sample(1.0, 0.02, "RESOURCE_EXHAUSTED", 64, 64, 4, 2, "d"),
        Sample(2.0, 0.5, "DEADLINE_EXCEEDED", 64, 64, 4, 2, "e"),
    ]
    summary = summarize(samples)
    assert summary["requests"] == 5 and summary["ok"] == 2
    assert summary["errors_by_code"] == {"RESOURCE_EXHAUSTED": 2, "DEADLINE_EXCEEDED": 1}
    assert summary["elapsed_seconds"] == 3.5
    assert summary["throughput_rps"] == pytest.approx(2 / 3.5)
    assert summary["images_per_second"] == pytest.approx(4 / 3.5)
    assert summary["latency_seconds"]["p50"] == pytest.approx(2.0)
    assert summary["latency_seconds"]["max"] == 3.0
    text = format_summary(summary)
    assert "RESOURCE_EXHAUSTED 2" in text and "p99" in text


def test_summary_of_nothing():
    summary = summarize([])
    assert summary["requests"] == 0 and summary["latency_seconds"]["p50"] is None
    assert "errors       none" in format_summary(summary)
