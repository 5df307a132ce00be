"""benchmarks/bench_train.py's step builder, run on the CPU with a tiny config so the GPU benchmark's
code is exercised in CI: every variant trains, and on the same seed the fused-ATA and the eager
output_attentions variants compute the same first loss; and every variant steps in the precision
the trainer's defaults take on a GPU (bfloat16 base weights under bfloat16 autocast), and in
float16 autocast with its gradient scaler."""

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("cpu_kernels")

SPEC = importlib.util.spec_from_file_location(
    "bench_train", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train.py")
bench_train = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench_train)

TINY = {**bench_train.SMOLLM2_135M, "vocab_size": 97, "hidden_size": 48, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 2}


def test_every_variant_steps_and_ata_matches_eager():
    first = {}
    for variant in bench_train.VARIANTS:
        step = bench_train.make_step(variant, torch.device("cpu"), TINY, batch=4, length=12)
        losses = [float(step()) for _ in range(2)]
        assert all(torch.isfinite(torch.tensor(losses))), (variant, losses)
        first[variant] = losses[0]
    assert first["ours"] == pytest.approx(first["eager"], rel=1e-4)
    assert first["ours"] == pytest.approx(first["ata_eager_loss"], rel=1e-4)
    assert first["sdpa_mean"] != pytest.approx(first["ours"], rel=1e-3)  # mean pooling is another model


@pytest.mark.parametrize("precision", [("bfloat16", dict(bf16=True, dtype="bfloat16")), ("float16", dict(fp16=True))],
                         ids=lambda p: p[0])
def test_every_variant_steps_under_the_gpu_defaults_autocast(precision):
    from mgh_train.precision import resolve

    chosen = resolve(torch.device("cpu"), **precision[1])
    first = {}
    for variant in bench_train.VARIANTS:
        step = bench_train.make_step(variant, torch.device("cpu"), TINY, batch=4, length=12, precision=chosen)
        losses = [float(step()) for _ in range(2)]
        assert all(torch.isfinite(torch.tensor(losses))), (variant, losses)
        first[variant] = losses[0]
    assert first["ours"] == pytest.approx(first["eager"], rel=2e-2)
