"""What a newcomer and an operator see in their first hour: the `sdxl` and `sdxl-server` commands run as
real processes, asserting on the exit status and the lines a person reads.

The CLI talks to the shared real server; start-up errors come from real `sdxl-server serve` processes
that must fail in about a second, before JAX or the model is loaded.
"""

from __future__ import annotations

import io
import socket
import subprocess
import sys
import uuid
from importlib import metadata
from pathlib import Path

import pytest
from PIL import Image

BIN = Path(sys.executable).parent
SDXL = str(BIN / "sdxl")  # the installed console scripts
SERVER = (sys.executable, "-m", "sdxl_server.main")
CLIENT_VERSION = metadata.version("sdxl-client")
SERVER_VERSION = metadata.version("sdxl-server")


def sdxl(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SDXL, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def a1111_parameters_of(path_or_bytes: Path | bytes) -> str:
    """The generation parameters another SD tool would read: PNG text chunk, or EXIF UserComment."""
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else path_or_bytes.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        if image.format == "PNG":
            return str(image.info["parameters"])
        comment = image.getexif().get_ifd(0x8769)[0x9286]
        assert comment.startswith(b"UNICODE\x00")
        return str(comment[8:].decode("utf-16-be"))


def free_port() -> int:
    """A port nobody listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_versions_where_people_look():
    assert sdxl("--version").stdout.strip() == f"sdxl (sdxl-client) {CLIENT_VERSION}"
    server = subprocess.run([*SERVER, "--version"], capture_output=True, text=True, timeout=60)
    assert server.returncode == 0 and server.stdout.strip() == f"sdxl-server {SERVER_VERSION}"


def test_a_cpu_start_does_not_log_jax_backend_probes_as_news(shared_server):
    # JAX logs "Unable to initialize backend 'tpu'" at info level on every machine without a TPU.
    assert "Unable to initialize backend" not in shared_server.output()


def test_server_info_reports_the_server_version(shared_server):
    shown = sdxl("info", "--target", shared_server.target).stdout
    assert ["version", "sdxl-server", SERVER_VERSION] in [line.split() for line in shown.splitlines()], shown


def test_extension_chooses_the_format_and_the_file_carries_its_parameters(shared_server, tmp_path):
    request_id = f"first-hour-{uuid.uuid4().hex[:8]}"
    done = sdxl(
        "generate", "a red fox", "--negative-prompt", "fog", "--target", shared_server.target,
        "--seed", "41", "-o", "fox.jpg", "--request-id", request_id, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "fox.jpg"
    assert done.stderr.startswith("seed 41, 4 steps, guidance 5, ")
    with Image.open(tmp_path / "fox.jpg") as image:
        assert image.format == "JPEG"
    assert a1111_parameters_of(tmp_path / "fox.jpg").splitlines() == [
        "a red fox",
        "Negative prompt: fog",
        "Steps: 4, Sampler: Euler, CFG scale: 5, Seed: 41, Size: 64x64, Model: tiny, "
        f"Version: sdxl-server {SERVER_VERSION}",
    ]
    # The operator's side: one completion line for the request.
    line = shared_server.wait_for_log_entry(
        lambda e: e.get("event") == "done" and e.get("request_id") == request_id
    )
    assert (line["status"], line["steps"], line["images"], line["resolution"]) == ("OK", 4, 1, "64x64")
    assert isinstance(line["latency_s"], float) and line["latency_s"] > 0


def test_a_format_contradicting_the_extension_is_an_error(tmp_path):
    done = sdxl("generate", "x", "--format", "jpeg", "-o", "x.png", "--target", "127.0.0.1:9", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "sdxl generate: error: --format jpeg contradicts -o x.png: the file's extension chooses the format "
        "(drop --format, or name the file .jpg)"
    )
    assert not (tmp_path / "x.png").exists()


def test_dash_output_writes_the_image_to_stdout(shared_server, tmp_path):
    done = subprocess.run(
        [SDXL, "generate", "a cat", "--seed", "3", "-o", "-", "--target", shared_server.target],
        capture_output=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(b"\x89PNG") and list(tmp_path.iterdir()) == []
    assert "Seed: 3," in a1111_parameters_of(done.stdout)
    assert done.stderr.decode().startswith("seed 3, ")


def test_seed_minus_one_means_random_and_the_seed_used_is_printed(shared_server, tmp_path):
    done = sdxl(
        "generate", "a cat", "--seed", "-1", "-o", "cat.webp", "--target", shared_server.target, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    seed = int(done.stderr.split(",")[0].removeprefix("seed "))
    assert seed >= 0 and f"Seed: {seed}," in a1111_parameters_of(tmp_path / "cat.webp")


def test_negative_steps_name_the_real_range(shared_server):
    done = sdxl("generate", "x", "--steps", "-1", "--target", shared_server.target)
    assert done.returncode == 2
    assert done.stderr.strip() == "sdxl generate: error: --steps: -1 is outside 1..20 (0: the default, 4)"


def test_a_wrong_height_is_reported_once_as_height(shared_server, tmp_path):
    done = sdxl("generate", "x", "--size", "128x128", "--target", shared_server.target, "-o", f"{tmp_path}/")
    assert done.returncode == 2  # a value the server refuses is a usage error, as one sdxl refuses itself
    assert (
        done.stderr.strip()
        == "error: INVALID_ARGUMENT: height: 128x128 is not served; use one of 64x64, 128x64"
    )


def test_a_rejection_leaves_a_trace_in_the_server_log(shared_server):
    done = sdxl("generate", "x", "-n", "7", "--target", shared_server.target)
    assert done.returncode == 2 and "num_images: 7 is more than the 4 allowed" in done.stderr

    def traces_it(entry: dict[str, object]) -> bool:
        # Logged at once when it is the first INVALID_ARGUMENT of the window, else counted in the summary
        # that closes the window (at most 10 s later).
        text = str(entry.get("reason", "")) + str(entry.get("message", ""))
        return entry.get("event") in ("rejected", "rejections") and "7 is more than" in text

    entry = shared_server.wait_for_log_entry(traces_it, timeout=30)
    assert entry.get("status", "INVALID_ARGUMENT") == "INVALID_ARGUMENT"


def test_no_server_says_so_and_says_it_retries():
    port = free_port()
    done = sdxl("info", "--target", f"127.0.0.1:{port}", "--retries", "1")
    assert done.returncode == 3  # no server answered
    retry, error = done.stderr.strip().splitlines()
    target = f"127.0.0.1:{port}"
    assert retry.startswith("retrying in ") and retry.endswith(
        f"(attempt 2 of 2): no server answers at {target}"
    )
    assert error.startswith(f"error: UNAVAILABLE: cannot reach {target}: is the server running at {target}?")


def test_an_http_url_target_is_accepted(shared_server):
    done = sdxl("health", "--target", f"http://{shared_server.target}")
    assert done.returncode == 0 and done.stdout.strip() == "SERVING"


def test_loadtest_refuses_a_mix_the_server_does_not_serve_before_sending(shared_server):
    done = sdxl("loadtest", "--mix", "256x256:4", "--duration", "2", "--target", shared_server.target)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip() == (
        f"sdxl loadtest: error: --mix does not fit the server at {shared_server.target}: "
        "256x256:4:1: 256x256 is not served (served: 64x64, 128x64)"
    )


@pytest.mark.parametrize(
    ("limit", "status", "verdict"),
    [
        ("0", 1, "FAILED       error rate 100.0% (--max-error-rate 0.0%)"),
        ("100%", 0, "passed       error rate 100.0% (--max-error-rate 100.0%)"),
    ],
    ids=["over-the-limit", "within-the-limit"],
)
def test_loadtest_fails_above_its_error_rate_and_shows_progress(shared_server, limit, status, verdict):
    # A 1 ms deadline fails every request (DEADLINE_EXCEEDED) without loading the server.
    done = sdxl(
        "loadtest", "--rate", "20", "--duration", "1", "--timeout", "0.001", "--mix", "64x64:4",
        "--max-error-rate", limit, "--progress", "--target", shared_server.target,
    )  # fmt: skip
    assert done.returncode == status, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1] == verdict
    assert "0:00 of 0:01: sent 0" in done.stderr  # the progress line, drawn from the start


def test_a_taken_metrics_port_is_one_line_naming_the_flag():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [*SERVER, "serve", "--host", "127.0.0.1", "--port", "0", "--metrics-port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"sdxl-server serve: error: --metrics-port: port {port} on 127.0.0.1 is already in use "
        "(another sdxl-server?); choose another with --metrics-port (0 picks a free one)"
    ]


def test_a_model_path_that_does_not_exist_is_one_line_naming_the_flag():
    done = subprocess.run(
        [*SERVER, "serve", "--model", "/nonexistent/sdxl", "--port", "0", "--metrics-port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "sdxl-server serve: error: --model: /nonexistent/sdxl does not exist; give a diffusers model "
        "directory, a hub id (e.g. stabilityai/stable-diffusion-xl-base-1.0) or 'demo' (the trained demo "
        "model: coloured shapes) or 'tiny' (random weights)"
    ]
