"""The pure parts behind the first-hour texts: targets, output plans, embedded parameters, log lines."""

from __future__ import annotations

import io
import logging
import os
import pty
import subprocess
import sys

import grpc
import pytest
from PIL import Image
from sdxl_client import ImageFormat
from sdxl_client._channel import ChannelSettings, TargetError, parse_target
from sdxl_client.cli._generate import plan_output
from sdxl_client.cli._image_metadata import Parameters, embed
from sdxl_client.cli._messages import UsageError
from sdxl_server.service.status_mapping import ServiceError, invalid_argument
from sdxl_server.service.request_log import RejectionLog


@pytest.mark.parametrize(
    ("written", "target", "tls"),
    [
        ("127.0.0.1", "127.0.0.1:50051", False),
        ("localhost:7", "localhost:7", False),
        ("http://127.0.0.1:50051", "127.0.0.1:50051", False),
        ("https://sdxl.example.com/", "sdxl.example.com:50051", True),
        ("[::1]", "[::1]:50051", False),
        ("dns:///sdxl-headless.serving", "dns:///sdxl-headless.serving:50051", False),
        ("dns:///sdxl-headless.serving:9000", "dns:///sdxl-headless.serving:9000", False),
        ("ipv4:10.0.0.1:1,10.0.0.2:2", "ipv4:10.0.0.1:1,10.0.0.2:2", False),
    ],
)
def test_targets_as_people_write_them(written, target, tls):
    assert parse_target(written) == (target, tls)
    settings = ChannelSettings(target=written)
    assert (settings.target, settings.tls) == (target, tls)


@pytest.mark.parametrize(
    ("written", "message"),
    [
        ("ftp://host:1", "unknown scheme ftp://"),
        ("http://host:1/v1", "a gRPC target has no path"),
        ("host:http", "port 'http' is not a number in 1..65535"),
        ("", "the target is empty"),
    ],
)
def test_unusable_targets_say_what_to_write(written, message):
    with pytest.raises(TargetError, match=message):
        parse_target(written)


def test_the_extension_chooses_the_format(tmp_path):
    assert plan_output("cat.jpg", None, 1).image_format is ImageFormat.JPEG
    assert plan_output("cat.JPEG", "jpeg", 1).image_format is ImageFormat.JPEG
    assert plan_output("cat.webp", None, 1).image_format is ImageFormat.WEBP
    assert plan_output(str(tmp_path), "webp", 2).image_format is ImageFormat.WEBP
    assert plan_output("-", None, 1).to_stdout
    for output, fmt, count, message in [
        ("x.png", "jpeg", 1, "contradicts"),
        ("x.gif", None, 1, "not an image format"),
        ("-", None, 2, "writes one image to stdout"),
    ]:
        with pytest.raises(UsageError, match=message):
            plan_output(output, fmt, count)


@pytest.mark.parametrize(
    ("fmt", "options"), [("PNG", {}), ("JPEG", {"quality": 80}), ("WEBP", {"quality": 80})]
)
def test_parameters_survive_in_the_file_and_the_pixels_are_untouched(fmt, options):
    text = Parameters("a 猫, at dusk", "", 30, 5.0, 7, 64, 64, "org/sdxl:v1", "sdxl-server 1").a1111_text()
    assert text.splitlines() == [
        "a 猫, at dusk",  # A1111 quotes a value holding a comma or a colon:
        'Steps: 30, Sampler: Euler, CFG scale: 5, Seed: 7, Size: 64x64, Model: "org/sdxl:v1", '
        "Version: sdxl-server 1",
    ]
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(buffer, fmt, **options)
    original = buffer.getvalue()
    tagged = embed(original, ImageFormat[fmt], text)
    with Image.open(io.BytesIO(tagged)) as image, Image.open(io.BytesIO(original)) as before:
        assert image.tobytes() == before.tobytes() and image.size == (64, 48)
        if fmt == "PNG":
            assert image.info["parameters"] == text
        else:
            assert image.getexif().get_ifd(0x8769)[0x9286] == b"UNICODE\x00" + text.encode("utf-16-be")


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rejections_first_of_a_kind_at_once_then_one_summary(caplog):
    clock = _Clock()
    rejections = RejectionLog(window_seconds=10.0, clock=clock)
    bad_steps = invalid_argument([("steps", "99 is outside 1..50")])
    full = ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, "admission queue full")
    with caplog.at_level(logging.INFO, logger="sdxl_server.requests"):
        for error in [bad_steps] * 500 + [full] * 3 + [invalid_argument([("width", "not served")])]:
            rejections.record(error)
        shown = [r.getMessage() for r in caplog.records]
        assert len(shown) == 3  # one line per kind, however many arrive
        assert shown[0].startswith("request rejected: INVALID_ARGUMENT: steps: 99 is outside 1..50")
        clock.now += 10.0
        rejections.record(full)  # a new window: the last one's counts go out first
    summary = caplog.records[3]
    assert summary.getMessage().startswith(
        "501 more requests rejected in the last 10 s: INVALID_ARGUMENT 499"
    )
    assert summary.fields["counts"] == {"INVALID_ARGUMENT": 499, "RESOURCE_EXHAUSTED": 2}  # type: ignore[attr-defined]
    assert caplog.records[4].getMessage().startswith("request rejected: RESOURCE_EXHAUSTED")


_LOG_SCRIPT = """
import logging
from sdxl_server.logs import configure_logging, fields
configure_logging("info")
logging.getLogger("jax._src.xla_bridge").info("Unable to initialize backend 'tpu': no libtpu.so")
logging.getLogger("sdxl_server").info("listening; warming up", extra=fields(event="listening", port=50051))
"""


def _stderr_of_log_script(on_a_terminal: bool) -> str:
    if not on_a_terminal:
        done = subprocess.run([sys.executable, "-c", _LOG_SCRIPT], capture_output=True, text=True, timeout=60)
        return done.stderr
    leader, follower = pty.openpty()
    with subprocess.Popen([sys.executable, "-c", _LOG_SCRIPT], stderr=follower):
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the terminal closed with the process
                break
            if not chunk:
                break
            chunks.append(chunk)
    os.close(leader)
    return b"".join(chunks).decode().replace("\r\n", "\n")


def test_logs_are_text_on_a_terminal_json_elsewhere_and_jax_probes_stay_quiet():
    text = _stderr_of_log_script(on_a_terminal=True)
    assert text.splitlines()[-1].endswith(" INFO    listening; warming up  event=listening port=50051")
    piped = _stderr_of_log_script(on_a_terminal=False)
    assert piped.startswith('{"time": ') and '"event": "listening"' in piped
    assert "Unable to initialize backend" not in text + piped
