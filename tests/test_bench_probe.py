"""benchmarks/bench_infonce.py on the CPU: its largest-batch probe, on a fake device whose memory
ends at a known B, and its eager baseline against the reference."""

import pytest
import torch

import benchmark_modules
from mgh_kernels import reference

bench_infonce = benchmark_modules.load("bench_infonce")


@pytest.mark.parametrize("capacity", [4096, 5000, 12345, 65536, 100_000, 1 << 21])
def test_largest_batch_brackets_the_capacity(capacity):
    tried = []

    def runs(batch):
        tried.append(batch)
        return batch <= capacity

    found = bench_infonce.largest_batch(runs, 4096, 1 << 21)
    assert found <= capacity
    if capacity < 1 << 21:
        # doubling, then four bisections: within 1/16 of the last doubling step
        assert capacity - found <= max(found // 16, 1)
    else:
        assert found == capacity
    assert len(tried) <= 10 + 4


def test_largest_batch_when_even_the_start_fails_or_the_limit_runs():
    assert bench_infonce.largest_batch(lambda b: False, 4096, 1 << 16) == 0
    assert bench_infonce.largest_batch(lambda b: True, 4096, 10_000) == 10_000
    with pytest.raises(ValueError, match="start, limit"):
        bench_infonce.largest_batch(lambda b: True, 0, 10)


def test_eager_baseline_is_the_reference_loss(gen):
    """The benchmark's eager entry computes the same loss and gradients as ``reference.infonce``
    (float32 inputs), and in bf16 returns a float32 loss with bf16 gradients."""
    q, pos = (torch.randn(6, 16, generator=gen) for _ in range(2))
    neg = torch.randn(6, 3, 16, generator=gen)
    ours = [t.clone().requires_grad_() for t in (q, pos, neg)]
    want = [t.double().requires_grad_() for t in (q, pos, neg)]
    loss = bench_infonce.eager_infonce(*ours, tau=0.05)
    expected = reference.infonce(*want, tau=0.05)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    expected.backward()
    for a, b in zip(ours, want):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=1e-6)
    half = [t.bfloat16().requires_grad_() for t in (q, pos, neg)]
    loss = bench_infonce.eager_infonce(*half, tau=0.05)
    loss.backward()
    assert loss.dtype == torch.float32 and all(t.grad.dtype == torch.bfloat16 for t in half)
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=5e-2, atol=5e-2)
