"""The synthesizer tests fail fast when their server dies, with its exit status and log tail.

tests/crashing_server.py dies of SIGSEGV on the first chat completion, as the miscompiled
llama-cpp-python build did; without the watcher the synthesizer would retry for minutes.
"""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from llama_server import MODEL_ALIAS, LlamaServer, ServerDied
from mgh_train.__main__ import main

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def crashing(tmp_path):
    return LlamaServer(tmp_path / "server.log", command=[sys.executable, str(HERE / "crashing_server.py"), "{port}"])


def synth_args(url, output):
    return [
        "synth",
        "--base-url",
        url,
        "--model",
        MODEL_ALIAS,
        "--output",
        str(output),
        "--task-types",
        "symmetric",
        "--tasks-per-type",
        "1",
        "--brainstorm-size",
        "5",
        "--no-progress",
    ]


def test_a_server_dying_in_process_fails_the_test_at_once_with_status_and_log(tmp_path):
    with crashing(tmp_path) as server:
        started = time.monotonic()
        with pytest.raises(ServerDied) as died, server.watched():
            main(synth_args(server.url, tmp_path / "mgh.jsonl"))
        elapsed = time.monotonic() - started
    message = str(died.value)
    assert "was killed by SIGSEGV (status 139)" in message
    assert "crashing in the stand-in's native decode" in message  # the log's tail
    assert elapsed < 30, f"the watcher took {elapsed:.0f} s"


def test_a_server_dying_under_a_subprocess_interrupts_the_wait(tmp_path):
    with crashing(tmp_path) as server:
        started = time.monotonic()
        with pytest.raises(ServerDied), server.watched():
            subprocess.run(
                [sys.executable, "-m", "mgh_train", *synth_args(server.url, tmp_path / "mgh.jsonl")],
                cwd=ROOT,
                capture_output=True,
                timeout=300,
            )
        assert time.monotonic() - started < 30


def test_a_dead_server_is_noticed_before_the_next_test(tmp_path):
    with crashing(tmp_path) as server:
        server.check()  # alive: nothing raised
        server.process.kill()
        server.process.wait()
        with pytest.raises(ServerDied, match="was killed by SIGKILL"):
            server.check()
