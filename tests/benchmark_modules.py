"""The benchmark scripts of ``benchmarks/`` as modules, for the tests that run their step functions
once on the CPU (so a benchmark cannot rot between the runs that time it)."""

import importlib.util
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    """``benchmarks/<name>.py``, imported as the module ``name``."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny(architecture: dict) -> dict:
    """A 2-layer, 48-wide model config of ``architecture``'s family: the benchmark's code paths in
    seconds on a CPU."""
    return {
        **architecture,
        "vocab_size": 97,
        "hidden_size": 48,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
    }
