"""``benchmarks/bench_cpu_paths.py``'s step functions run once here, at small shapes, so the
benchmark cannot rot between the runs that time it."""

import pytest
import torch

import benchmark_modules
from mgh_kernels import infonce_loss

bench = benchmark_modules.load("bench_cpu_paths")


@pytest.mark.parametrize("part", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", list(bench.ATTENTION_NAMES))
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_attention_steps_run(part, impl, causal):
    bench.attention_step(impl, part, (1, 2, 40, 8), causal)()


@pytest.mark.parametrize("part", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", list(bench.INFONCE_NAMES))
def test_infonce_steps_run(part, impl):
    bench.infonce_step(impl, part, (16, 3, 8))()


def test_the_eager_loss_is_the_same_loss():
    """The "eager" entry computes what ``infonce_loss`` computes (so the ratio compares like with like)."""
    gen = torch.Generator().manual_seed(0)
    q, pos, neg = (
        torch.randn(9, 8, generator=gen),
        torch.randn(9, 8, generator=gen),
        torch.randn(9, 2, 8, generator=gen),
    )
    torch.testing.assert_close(bench.st_infonce(q, pos, neg), infonce_loss(q, pos, neg, tau=bench.TAU))
