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
wanted=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    .venv/bin/python -m pip install -q -e ".[dev]"
    echo "$wanted" >"$stamp"
fi
