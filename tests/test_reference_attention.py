"""reference.attention_with_colsum and colsum_from_attentions against a direct float64 computation."""

import math

import pytest
import torch

from mgh_kernels import reference
from random_inputs import padding_mask


def direct_attention(q, k, v, causal, mask, scale):
    """Row by row, in float64, straight from the definition."""
    q, k, v = q.double(), k.double(), v.double()
    batch, hq, length, dim = q.shape
    group = hq // k.shape[1]
    out = torch.zeros(batch, hq, length, dim, dtype=torch.float64)
    colsum = torch.zeros(batch, length, dtype=torch.float64)
    for b in range(batch):
        for h in range(hq):
            for i in range(length):
                if not mask[b, i]:
                    continue
                keys = [j for j in range(length) if mask[b, j] and (not causal or j <= i)]
                scores = torch.stack([q[b, h, i] @ k[b, h // group, j] * scale for j in keys])
                p = torch.exp(scores - scores.max())
                p = p / p.sum()
                for pj, j in zip(p, keys):
                    out[b, h, i] += pj * v[b, h // group, j]
                    colsum[b, j] += pj / hq
    return out, colsum


CASES = [
    # B, Hq, Hkv, L, D
    (1, 1, 1, 1, 8),
    (2, 2, 2, 5, 8),
    (3, 4, 2, 7, 16),
    (2, 4, 1, 13, 8),
    (2, 6, 3, 17, 4),
]


@pytest.mark.parametrize("shape", CASES, ids=lambda s: "B{}-H{}/{}-L{}-D{}".format(*s))
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("side", ["none", "left", "right", "one"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_direct_float64(shape, causal, side, dtype, gen):
    batch, hq, hkv, length, dim = shape
    q = torch.randn(batch, hq, length, dim, generator=gen, dtype=dtype)
    k = torch.randn(batch, hkv, length, dim, generator=gen, dtype=dtype)
    v = torch.randn(batch, hkv, length, dim, generator=gen, dtype=dtype)
    mask = padding_mask(batch, length, side, gen)
    scale = 0.7 / math.sqrt(dim)
    out, colsum = reference.attention_with_colsum(
        q, k, v, causal=causal, key_padding_mask=None if side == "none" else mask, scale=scale
    )
    want_out, want_colsum = direct_attention(q, k, v, causal, mask, scale)
    assert out.dtype == dtype and out.shape == q.shape
    assert colsum.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert colsum.shape == (batch, length)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(out.double(), want_out, rtol=tol, atol=tol)
    torch.testing.assert_close(colsum.double(), want_colsum, rtol=tol, atol=tol)
    # Structural facts of the definition.
    assert (out[~mask[:, None, :].expand(batch, hq, length)] == 0).all()
    assert (colsum[~mask] == 0).all()
    n_valid = mask.sum(dim=1).to(colsum.dtype)
    torch.testing.assert_close(colsum.sum(dim=1), n_valid, rtol=tol, atol=tol * length)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_computed_in_float32(dtype, gen):
    q, k, v = (torch.randn(2, 4, 9, 16, generator=gen).to(dtype) for _ in range(3))
    mask = padding_mask(2, 9, "left", gen)
    out, colsum = reference.attention_with_colsum(q, k, v, causal=True, key_padding_mask=mask)
    want_out, want_colsum = direct_attention(q, k, v, True, mask, 1 / 4)
    assert out.dtype == dtype and colsum.dtype == torch.float32
    torch.testing.assert_close(colsum.double(), want_colsum, rtol=1e-5, atol=1e-5)
    # Only the final rounding to the input dtype separates out from the float64 truth.
    eps = torch.finfo(dtype).eps
    assert (out.double() - want_out).abs().max() <= eps * want_out.abs().max() + 1e-6


def test_default_scale_and_integer_mask(gen):
    q, k, v = (torch.randn(2, 2, 6, 8, generator=gen) for _ in range(3))
    mask = padding_mask(2, 6, "right", gen)
    out_int, cs_int = reference.attention_with_colsum(q, k, v, causal=False, key_padding_mask=mask.long())
    out_explicit, cs_explicit = reference.attention_with_colsum(
        q, k, v, causal=False, key_padding_mask=mask, scale=1 / math.sqrt(8)
    )
    torch.testing.assert_close(out_int, out_explicit, rtol=0, atol=0)
    torch.testing.assert_close(cs_int, cs_explicit, rtol=0, atol=0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("side", ["left", "right"])
def test_gradients_through_out_and_colsum(causal, side, gen):
    """float64 gradcheck through both outputs, GQA, with padding (fully masked padded queries)."""
    q = torch.randn(2, 4, 5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = padding_mask(2, 5, side, gen)
    w_out = torch.randn(2, 4, 5, 3, generator=gen, dtype=torch.float64)
    w_col = torch.randn(2, 5, generator=gen, dtype=torch.float64)

    def f(q, k, v):
        out, colsum = reference.attention_with_colsum(q, k, v, causal=causal, key_padding_mask=mask)
        return (out * w_out).sum() + (colsum * w_col).sum()

    assert torch.autograd.gradcheck(f, (q, k, v))
    f(q, k, v).backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    # Padded queries take no part: their gradient is exactly zero.
    assert (q.grad.transpose(1, 2)[~mask] == 0).all()


@pytest.mark.parametrize("side", ["none", "left", "right"])
def test_colsum_from_attentions_ignores_padded_rows(side, gen):
    q, k, v = (torch.randn(3, 4, 8, 8, generator=gen) for _ in range(3))
    mask = padding_mask(3, 8, side, gen)
    _, want = reference.attention_with_colsum(q, k, v, causal=True, key_padding_mask=mask)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    allowed = mask[:, None, None, :] & torch.ones(8, 8, dtype=torch.bool).tril()
    probs = torch.softmax(scores.masked_fill(~allowed, -1e9), dim=-1)
    # Whatever a backend leaves in padded query rows or padded key columns must not count.
    probs = torch.where(mask[:, None, :, None], probs, torch.rand(probs.shape, generator=gen))
    probs = torch.where(mask[:, None, None, :], probs, torch.rand(probs.shape, generator=gen))
    got = reference.colsum_from_attentions(probs, mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
