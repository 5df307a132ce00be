"""benchmarks/bench_train.py's step builder, run on the CPU with a tiny config so the GPU benchmark's
code is exercised in CI: every variant trains, and on the same seed the fused-ATA and the eager
output_attentions variants compute the same first loss; and every variant steps in the precision
the trainer's defaults take on a GPU (bfloat16 base weights under bfloat16 autocast), and in
float16 autocast with its gradient scaler."""

import json
import math

import pytest
import torch

import benchmark_modules

pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("cpu_kernels")

bench_train = benchmark_modules.load("bench_train")

TINY = benchmark_modules.tiny(bench_train.SMOLLM2_135M)


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


@pytest.mark.parametrize(
    "precision", [("bfloat16", dict(bf16=True, dtype="bfloat16")), ("float16", dict(fp16=True))], ids=lambda p: p[0]
)
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


@pytest.mark.slow  # over the default run's ~20 s: dynamo traces every peer variant
def test_the_steps_against_sentence_transformers_run_and_agree(tmp_path, monkeypatch):
    """The peer benchmark's steps on a tiny config: sentence-transformers' own training step and
    mgh's (mean pooling) compute the same first loss on the same token ids (the same loss by
    construction, MultipleNegativesRankingLoss(scale=1/tau) against infonce_loss(tau)), and every
    variant steps. The compiled ones are traced by dynamo and AOT autograd as on a GPU, but run
    with the aot_eager backend here: inductor's C++ code generation of two models takes minutes
    on 2 cores (the GPU round runs inductor)."""
    pytest.importorskip("sentence_transformers")
    real_compile = torch.compile

    def traced_only(*args, **kwargs):
        kwargs.update(backend="aot_eager", mode=None)
        return real_compile(*args, **kwargs)

    monkeypatch.setattr(torch, "compile", traced_only)
    from mgh_train.precision import resolve

    precision = resolve(torch.device("cpu"))
    bench_train._save_base(TINY, tmp_path, precision)
    rows = bench_train.seed_rows(6, 40, TINY["vocab_size"])
    seed = {tuple(min(n, 40) for n in row) for row in json.loads(bench_train.SEED_LENGTHS.read_text())["rows"]}
    assert all(tuple(len(t) for t in row) in seed for row in rows)
    first = {}
    for variant, (_, _, make, options) in bench_train.PEER_VARIANTS.items():
        step = make(tmp_path, rows, torch.device("cpu"), precision, **options)
        first[variant] = float(step())
        assert math.isfinite(float(step())), variant
    assert first["mgh"] == pytest.approx(first["st"], rel=1e-4)
    assert first["mgh_compiled"] == pytest.approx(first["mgh"], rel=1e-4)
    assert first["st_compiled"] == pytest.approx(first["st"], rel=1e-4)
