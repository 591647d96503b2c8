"""The first day, tried as a new user would (issue 24): the hints work as printed, mistakes get help, ports
clash with the flag named, and the demo model says which words it does not know.

Real processes throughout: the installed `sdxl` and `sdxl-server`, a real demo-model server with the
OpenAI door for the hints and the README's examples (their images judged by colour and shape as
tests/demo/ judges them), the shared tiny server for the CLI's behaviours, and server processes that must
refuse their flags in about a second, before JAX or the model is loaded.
"""

from __future__ import annotations

import json
import os
import re
import runpy
import shlex
import socket
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sdxl_client.cli import EXIT_STATUSES
from sdxl_server.engine.models import shapes
from sdxl_server.startup_checks import MAKE_RUN_MARKER
from sdxl_test_support.held_warmup import HELD_SERVER_COMMAND, HOLD_OPTION
from sdxl_test_support.servers import RunningServer, StartServer

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SDXL = str(BIN / "sdxl")
SERVER = (sys.executable, "-m", "sdxl_server.main")
DEMO_PROMPT = re.compile(r"\b(?:a|an) (\w+) (\w+) on a (\w+) background")


def sdxl(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SDXL, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != MAKE_RUN_MARKER} | (env or {})
    return subprocess.run(
        [*SERVER, "serve", *args], capture_output=True, text=True, timeout=60, env=environment
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def judged(path: Path) -> shapes.Judgement:
    with Image.open(path) as image:
        return shapes.judge(np.asarray(image.convert("RGB")))


def drawn_as_asked(path: Path, prompt: str) -> bool:
    match = DEMO_PROMPT.search(prompt)
    assert match is not None, prompt
    colour, shape, background = match.groups()
    j = judged(path)
    return (j.colour, j.shape, j.background) == (colour, shape, background)


@pytest.fixture(scope="module")
def demo(module_server_factory: StartServer) -> Iterator[RunningServer]:
    """`make run`'s server (the demo model), with the OpenAI door, on free ports."""
    yield module_server_factory(
        "--model", "demo", "--resolutions", "64x64", "--default-steps", "10", "--http-port", "0"
    )  # fmt: skip


# ---- the hints: every command printed or shown works as printed


def runnable_from(command: str, origin: Path) -> str:
    """`command` (a shell pipeline) with each program given relative to `origin` (where the server was
    started, as a newcomer's second terminal is) made absolute, so that it can run elsewhere."""
    segments = []
    for segment in command.split(" | "):
        words = shlex.split(segment)
        if not Path(words[0]).is_absolute() and (origin / words[0]).exists():
            words[0] = str(origin / words[0])
        segments.append(shlex.join(words))
    return " | ".join(segments)


def test_the_ready_line_suggests_installed_commands_that_draw_what_they_ask(demo, tmp_path):
    message = str(demo.wait_for_log_entry(lambda e: e.get("event") == "ready")["message"])
    commands = [line.split(": ", 1)[1] for line in message.splitlines()]
    sdxl_command, *others = commands
    assert sdxl_command.split()[0] in ("sdxl", ".venv/bin/sdxl", str(BIN / "sdxl"))
    assert "grpcurl" not in message or subprocess.run(["which", "grpcurl"]).returncode == 0
    curl = [c for c in others if c.startswith("curl")]
    assert len(curl) == 1
    for command in (sdxl_command, curl[0]):
        done = subprocess.run(
            runnable_from(command, Path.cwd()), shell=True, cwd=tmp_path, capture_output=True, timeout=300
        )
        assert done.returncode == 0, done.stderr
        assert len(done.stdout) < 1000  # a file name, not kilobytes of base64
        assert drawn_as_asked(tmp_path / "shape.png", command), (command, judged(tmp_path / "shape.png"))
        (tmp_path / "shape.png").unlink()


def readme_python_examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_the_readme_python_examples_run_and_draw_what_they_ask(demo, tmp_path, monkeypatch):
    examples = readme_python_examples()
    assert len(examples) >= 2 and any("OpenAI" in e for e in examples)
    monkeypatch.chdir(tmp_path)
    for example in examples:
        code = example.replace("127.0.0.1:50051", demo.target)
        code = code.replace("http://127.0.0.1:8080", f"http://127.0.0.1:{demo.http_port}")
        script = tmp_path / "example.py"
        script.write_text(code)
        runpy.run_path(str(script))
        (saved,) = tmp_path.glob("*.png")  # every example saves its image
        assert drawn_as_asked(saved, example), (example, judged(saved))
        saved.unlink()


def test_make_run_passes_args_to_the_server():
    # Under `make test` this runs inside make: without its MAKE* variables and with --no-print-directory, the
    # sub-make prints no "Entering/Leaving directory" lines around the command.
    outside_make = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    done = subprocess.run(
        ["make", "--no-print-directory", "-n", "run", "ARGS=--http-port 8080 --port 50061"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=outside_make,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].endswith(
        "STARTED_BY_MAKE_RUN=1 .venv/bin/sdxl-server serve --model demo --host 127.0.0.1 --port 50051 "
        "--http-port 8080 --port 50061"
    )


# ---- the demo model names the words it does not know


def test_the_cli_the_log_and_the_openai_door_name_the_words_the_demo_does_not_know(demo, tmp_path):
    request_id = f"first-day-{uuid.uuid4().hex[:8]}"
    done = sdxl(
        "generate", "a cat", "--seed", "1", "-o", "cat.png", "--request-id", request_id,
        "--target", demo.target, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (
        "note: the demo model does not know: cat (it drew the rest of the prompt)" in done.stderr.splitlines()
    )
    assert (tmp_path / "cat.png").is_file()
    entry = demo.wait_for_log_entry(lambda e: e.get("event") == "done" and e.get("request_id") == request_id)
    assert entry["unknown_words"] == "cat" and entry["status"] == "OK"
    summary = sdxl("generate", "The Red Circle, blue background!", "--json", "-o", "red.png", "--target",
                   demo.target, cwd=tmp_path)  # fmt: skip
    assert summary.returncode == 0 and '"unknown_words": []' in summary.stdout
    request = urllib.request.Request(
        f"http://127.0.0.1:{demo.http_port}/v1/images/generations",
        data=json.dumps({"prompt": "a purple dog", "seed": 3}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        assert json.load(response)["unknown_words"] == ["dog"]


# ---- mistakes get help


def test_a_mistyped_flag_gets_the_nearest_one():
    done = sdxl("generate", "a red square", "--sed", "1")
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "sdxl generate: error: unrecognized option --sed; did you mean --seed?"
    ]


def test_an_unquoted_prompt_gets_a_hint_to_quote_it():
    done = sdxl("generate", "a", "red", "square", "--target", "127.0.0.1:9")
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "sdxl generate: error: unrecognized arguments: red square "
        "(a prompt of several words needs quotes: sdxl generate 'a red square' ...)"
    ]


def test_size_and_width_together_are_refused():
    done = sdxl("generate", "x", "--size", "64x64", "--width", "128", "--target", "127.0.0.1:9")
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "sdxl generate: error: --size 64x64 and --width both set the size: give --size alone, "
        "or --width and --height"
    ]


def test_exit_statuses_are_the_same_in_help_and_readme():
    for command in ((), ("generate",)):
        assert EXIT_STATUSES in sdxl(*command, "--help").stdout
    for readme in (ROOT / "README.md", ROOT / "client" / "README.md"):
        assert EXIT_STATUSES in readme.read_text(), readme


def test_exit_statuses_follow_the_kind_of_failure(shared_server):
    target = shared_server.target
    # The same kind of mistake, found by sdxl (negative) or by the server (above --max-steps 20): 2.
    assert sdxl("generate", "x", "--steps", "-1", "--target", target).returncode == 2
    too_many = sdxl("generate", "x", "--steps", "51", "--target", target)
    assert too_many.returncode == 2 and "INVALID_ARGUMENT: steps" in too_many.stderr
    # A valid request the server could not do in time: 1. Nobody at the target: 3.
    assert sdxl("generate", "x", "--timeout", "0.001", "--target", target).returncode == 1
    assert sdxl("info", "--retries", "0", "--target", f"127.0.0.1:{free_port()}").returncode == 3


def test_missing_output_directories_are_created_and_said(shared_server, tmp_path):
    done = sdxl("generate", "x", "-o", "new/dir/x.png", "--target", shared_server.target, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "note: created the directory new/dir/ for -o new/dir/x.png" in done.stderr.splitlines()
    assert (tmp_path / "new" / "dir" / "x.png").is_file()


def test_an_output_directory_that_cannot_be_made_is_refused_before_the_call(shared_server, tmp_path):
    (tmp_path / "file").write_text("")
    output = f"{tmp_path}/file/dir/x.png"
    done = sdxl("generate", "x", "-o", output, "--target", shared_server.target)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"sdxl generate: error: -o {output}: cannot create the directory {tmp_path}/file/dir: "
        f"{tmp_path}/file is not a directory"
    ]


def test_a_refused_request_leaves_no_directory_behind(shared_server, tmp_path):
    done = sdxl(
        "generate", "x", "--steps", "51", "-o", "new/x.png", "--target", shared_server.target, cwd=tmp_path
    )
    assert done.returncode == 2 and not (tmp_path / "new").exists()


def test_the_cli_waits_through_warm_up_and_says_so(server_factory, tmp_path):
    hold = tmp_path / "start-warm-up"
    server = server_factory(HOLD_OPTION, str(hold), wait_ready=False, command=HELD_SERVER_COMMAND)
    # No retries: the wait is the health watch, not a retry loop that gives up after a few seconds.
    cli = subprocess.Popen(
        [SDXL, "generate", "x", "-o", "x.png", "--retries", "0", "--target", server.target],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert cli.stderr is not None
        first = cli.stderr.readline()
        assert first.startswith(
            f"waiting for the server at {server.target} to finish warming up (health: NOT_SERVING); "
            "up to 300 s (--timeout)"
        ), first
        hold.touch()
        _, rest = cli.communicate(timeout=300)
    finally:
        if cli.poll() is None:
            cli.kill()
    assert cli.returncode == 0, rest
    assert (tmp_path / "x.png").is_file()


def test_the_loadtest_names_the_mix_it_sends(shared_server):
    done = sdxl("loadtest", "--concurrency", "1", "--duration", "0.5", "--target", shared_server.target)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[0] == (
        f"closed loop, concurrency 1, 0.5 s, mix 64x64, 4 steps, target {shared_server.target}"
    )


# ---- the server refuses bad flags in one line, naming the flag


def test_one_port_for_two_flags_is_refused_in_one_line():
    port = free_port()
    done = serve("--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(port))
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"sdxl-server serve: error: --metrics-port: port {port} is already --port's; each of --port, "
        "--metrics-port and --http-port needs its own port (0 picks a free one)"
    ]


def test_a_taken_http_port_names_http_port():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = serve("--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--http-port", str(port))
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"sdxl-server serve: error: --http-port: port {port} on 127.0.0.1 is already in use "
        "(another sdxl-server?); choose another with --http-port (0 picks a free one)"
    ]


def test_a_taken_port_under_make_run_says_how_to_choose_another_through_make():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = serve(
            "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0", env={MAKE_RUN_MARKER: "1"}
        )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"sdxl-server serve: error: --port: port {port} on 127.0.0.1 is already in use "
        "(another sdxl-server?); choose another with --port (0 picks a free one) "
        f'(with make: make run ARGS="--port {port + 10}")'
    ]


def test_a_mistyped_model_name_fails_at_once_naming_the_known_names():
    # Before: 25 s of hub retries and a 154-line traceback.
    done = serve("--model", "Demo", "--port", "0", "--metrics-port", "0")
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "sdxl-server serve: error: --model: 'Demo' is not a model name, an existing path or a hub id "
        "(owner/name); the names are 'demo' (the trained demo model: coloured shapes) or 'tiny' "
        "(random weights); did you mean demo?"
    ]
