"""``eager_infonce`` (the trainer's ``--loss eager``) against its oracle ``reference.infonce``: loss and
gradients, every mode and reduction, float32, float64 and autocast."""

import pytest
import torch

from mgh_kernels import eager_infonce, reference


def embeddings(batch, k, dim, gen, dtype):
    q = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    pos = q + torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    neg = torch.randn(batch, k, dim, generator=gen, dtype=torch.float64)
    return [t.to(dtype).requires_grad_() for t in (q, pos, neg)]


def loss_and_grads(fn, inputs, **kwargs):
    for t in inputs:
        t.grad = None
    loss = fn(*inputs, **kwargs)
    weights = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    (loss * weights).sum().backward()
    return loss.detach(), [t.grad.clone() for t in inputs]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("negatives", ["global", "own"])
@pytest.mark.parametrize("batch,k", [(1, 0), (5, 3), (13, 1)])
def test_matches_the_oracle(dtype, reduction, negatives, batch, k, gen):
    inputs = embeddings(batch, k, 17, gen, dtype)
    kwargs = dict(tau=0.05, negatives=negatives, reduction=reduction)
    got, got_grads = loss_and_grads(eager_infonce, inputs, **kwargs)
    want, want_grads = loss_and_grads(reference.infonce, inputs, **kwargs)
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, want, **tol)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, **tol)


@pytest.mark.parametrize("negatives", ["global", "own"])
def test_without_negatives_and_under_autocast(negatives, gen):
    q, pos, neg = embeddings(6, 2, 8, gen, torch.float32)
    for fn in (eager_infonce, reference.infonce):
        torch.testing.assert_close(fn(q, pos, None, negatives=negatives), fn(q, pos, neg[:, :0], negatives=negatives))
    torch.testing.assert_close(
        eager_infonce(q, pos, None, negatives=negatives),
        reference.infonce(q, pos, None, negatives=negatives),
        rtol=1e-5,
        atol=1e-6,
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = eager_infonce(q, pos, neg, negatives=negatives)
        want = reference.infonce(q, pos, neg, negatives=negatives)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def test_names_bad_arguments(gen):
    q, pos, neg = embeddings(3, 1, 4, gen, torch.float32)
    with pytest.raises(ValueError, match="^tau: "):
        eager_infonce(q, pos, neg, tau=0.0)
    with pytest.raises(ValueError, match="^negatives: "):
        eager_infonce(q, pos, neg, negatives="all")
    with pytest.raises(ValueError, match="^pos: "):
        eager_infonce(q, pos[:2], neg)
