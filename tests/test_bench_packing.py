"""``benchmarks/bench_packing.py``'s step function run once here at a tiny config: both entries
train, compute the same first loss on the same token ids (packed rows against length buckets), and
the packed entry computes no padding; the workloads have the lengths the benchmark promises."""

import pytest
import torch

import benchmark_modules

pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("cpu_kernels")

bench = benchmark_modules.load("bench_packing")


def test_both_modes_step_and_agree():
    lengths = bench.long_tailed_lengths(3, 2, query=(2, 9), document=(10, 40))
    first = {}
    for mode in bench.MODES:
        step, tokens = bench.make_step(
            mode,
            benchmark_modules.tiny(bench.SMOLLM2_135M),
            lengths,
            triplets=3,
            negatives=2,
            device=torch.device("cpu"),
        )
        assert tokens == sum(lengths)
        first[mode] = float(step())
        assert torch.isfinite(step())
        if mode == "packed":
            assert step.forwards == 1 and step.padded_tokens == tokens
        else:
            assert step.padded_tokens > tokens  # lengths rounded to 8: padding
    assert first["packed"] == pytest.approx(first["buckets"], rel=1e-4)


def test_workloads():
    seed = bench.seed_lengths(8)
    assert len(seed) == 24 and max(seed) <= 125
    mix = bench.long_tailed_lengths(4, 3)
    assert len(mix) == 4 + 16
    assert all(8 <= n <= 32 for n in mix[:4]) and all(64 <= n <= 512 for n in mix[4:])
