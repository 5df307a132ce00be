"""``benchmarks/bench_varlen.py``'s step functions run once here, at small shapes, and give the same
column sums (so the benchmark compares like with like)."""

import pytest
import torch

import benchmark_modules

bench = benchmark_modules.load("bench_varlen")


@pytest.mark.parametrize("part", ["fwd", "fwd+bwd"])
def test_steps_run_and_agree(part):
    lengths = bench.long_tailed_lengths(triplets=2, negatives=1, query=(2, 5), document=(6, 20))
    assert len(lengths) == 6 and max(lengths) <= 20
    sums = {impl: bench.attention_step(impl, part, lengths, heads=4, kv_heads=2, dim=8)() for impl in bench.NAMES}
    assert sums["varlen"].shape == (sum(lengths),)
    torch.testing.assert_close(sums["padded"], sums["varlen"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sums["bucketed"], sums["varlen"], rtol=1e-5, atol=1e-5)


def test_long_tailed_mix():
    lengths = bench.long_tailed_lengths()
    queries, docs = lengths[: bench.TRIPLETS], lengths[bench.TRIPLETS :]
    assert len(docs) == bench.TRIPLETS * (1 + bench.NEGATIVES)
    assert all(8 <= n <= 32 for n in queries) and all(64 <= n <= 512 for n in docs)
