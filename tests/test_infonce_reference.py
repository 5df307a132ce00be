"""reference.infonce against a direct float64 computation and sentence-transformers' MNRL."""

import pytest
import torch

from mgh_kernels import reference

try:  # sentence-transformers >= 6 moved the losses; older releases keep the short path
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
except ImportError:  # pragma: no cover - depends on the installed release
    from sentence_transformers.losses import MultipleNegativesRankingLoss
from sentence_transformers import SentenceTransformer


def direct_infonce(q, pos, neg, tau, negatives):
    """Per query, in float64: -log softmax of its own positive among its candidates."""
    q = q.double() / q.double().norm(dim=-1, keepdim=True)
    pos = pos.double() / pos.double().norm(dim=-1, keepdim=True)
    neg = None if neg is None else neg.double() / neg.double().norm(dim=-1, keepdim=True)
    losses = []
    for i in range(len(q)):
        if negatives == "global":
            cands = [pos] + ([] if neg is None else [neg.reshape(-1, q.shape[1])])
        else:
            cands = [pos[i : i + 1]] + ([] if neg is None else [neg[i]])
        logits = torch.cat(cands) @ q[i] / tau
        losses.append(torch.logsumexp(logits, 0) - (pos[i] @ q[i]) / tau)
    return torch.stack(losses)


def embeddings(batch, k, dim, gen, dtype=torch.float32, requires_grad=False):
    q = torch.randn(batch, dim, generator=gen).to(dtype).requires_grad_(requires_grad)
    pos = (q.detach().float() + torch.randn(batch, dim, generator=gen)).to(dtype).requires_grad_(requires_grad)
    neg = torch.randn(batch, k, dim, generator=gen).to(dtype).requires_grad_(requires_grad)
    return q, pos, neg


@pytest.mark.parametrize("k", [0, 1, 3, 7])
@pytest.mark.parametrize("negatives", ["global", "own"])
@pytest.mark.parametrize("tau", [0.01, 0.05, 1.0])
@pytest.mark.parametrize("batch", [1, 5, 13])
def test_matches_direct_float64(k, negatives, tau, batch, gen):
    q, pos, neg = embeddings(batch, k, 16, gen)
    want = direct_infonce(q, pos, neg, tau, negatives)
    per_query = reference.infonce(q, pos, neg, tau=tau, negatives=negatives, reduction="none")
    assert per_query.shape == (batch,) and per_query.dtype == torch.float32
    torch.testing.assert_close(per_query.double(), want, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(
        reference.infonce(q, pos, neg, tau=tau, negatives=negatives).double(), want.mean(), rtol=2e-5, atol=2e-5
    )
    torch.testing.assert_close(
        reference.infonce(q, pos, neg, tau=tau, negatives=negatives, reduction="sum").double(),
        want.sum(),
        rtol=2e-5,
        atol=2e-4,
    )


def test_no_negatives_equals_k_zero(gen):
    q, pos, neg = embeddings(6, 0, 8, gen)
    for mode in ("global", "own"):
        torch.testing.assert_close(
            reference.infonce(q, pos, None, negatives=mode), reference.infonce(q, pos, neg, negatives=mode)
        )


class Passthrough(torch.nn.Module):
    """A trivial sentence-transformers module: the features already hold the embedding."""

    def forward(self, features):
        return {**features, "sentence_embedding": features["embedding"]}


@pytest.mark.parametrize("k", [0, 1, 3])
@pytest.mark.parametrize("tau", [0.05, 0.5])
@pytest.mark.parametrize("batch", [1, 7])
def test_equals_sentence_transformers_mnrl(k, tau, batch, gen):
    """Global mode is MNRL (scale = 1/tau) with n-tuple hard negatives: loss and gradients."""
    q, pos, neg = embeddings(batch, k, 12, gen, dtype=torch.float64, requires_grad=True)
    model = SentenceTransformer(modules=[Passthrough()], device="cpu")
    mnrl = MultipleNegativesRankingLoss(model, scale=1.0 / tau)
    features = [{"embedding": q}, {"embedding": pos}] + [{"embedding": neg[:, j]} for j in range(k)]
    want = mnrl(features, None)
    want_grads = torch.autograd.grad(want, (q, pos, neg), allow_unused=True)

    got = reference.infonce(q, pos, neg, tau=tau, negatives="global")
    got_grads = torch.autograd.grad(got, (q, pos, neg), allow_unused=True)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(got_grads, want_grads):
        if w is None:  # K=0: MNRL never saw the empty negatives
            assert g is None or (g == 0).all()
        else:
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_extreme_similarities_stay_finite(dtype, gen):
    q = torch.randn(8, 32, generator=gen).to(dtype) * 1e3
    pos = q.clone()  # cosine 1 at tau 0.01: logits of 100
    neg = torch.stack([q, -q], dim=1)  # a negative identical to the positive, one opposite
    for mode in ("global", "own"):
        loss = reference.infonce(q.requires_grad_(), pos, neg, tau=0.01, negatives=mode)
        assert torch.isfinite(loss)
        (grad,) = torch.autograd.grad(loss, q)
        assert torch.isfinite(grad).all()
        q = q.detach()
    zero = torch.zeros(4, 8, dtype=dtype)  # zero vectors: cosine 0, not NaN
    assert torch.isfinite(reference.infonce(zero, zero))
