"""Poolings and ATA weights: direct float64 computations, hypothesis properties, the public API."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mgh_kernels import (
    POOLING_METHODS,
    ata_pool,
    ata_weights,
    colsum_from_attentions,
    first_token_pool,
    last_token_pool,
    mean_pool,
    pool,
    reference,
    weighted_mean_pool,
)
from random_inputs import padding_mask


def direct_pool(hidden, mask, method, colsum=None, mix=0.0):
    """Per row, in float64: select the real tokens, then pool them by the definition."""
    rows = []
    for h, m, c in zip(hidden.double(), mask, colsum if colsum is not None else [None] * len(mask)):
        real = h[m]
        n = real.shape[0]
        if method == "mean":
            rows.append(real.mean(0))
        elif method == "weighted_mean":
            w = torch.arange(1, n + 1, dtype=torch.float64)
            rows.append((w[:, None] * real).sum(0) / w.sum())
        elif method == "last_token":
            rows.append(real[-1])
        elif method == "first_token":
            rows.append(real[0])
        else:
            w = c.double()[m] / c.double()[m].sum()
            w = (1 - mix) * w + mix / n
            rows.append((w[:, None] * real).sum(0))
    return torch.stack(rows)


@pytest.mark.parametrize("method", POOLING_METHODS)
@pytest.mark.parametrize("side", ["none", "left", "right", "one"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_pooling_matches_direct(method, side, dtype, gen):
    hidden = torch.randn(4, 11, 24, generator=gen).to(dtype)
    mask = padding_mask(4, 11, side, gen)
    colsum = torch.rand(4, 11, generator=gen) + 0.01 if method == "ata" else None
    got = pool(hidden, mask, method, colsum=colsum, mix=0.25 if method == "ata" else 0.0)
    want = direct_pool(hidden, mask, method, colsum, mix=0.25)
    assert got.dtype == dtype and got.shape == (4, 24)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(got.double(), want, rtol=2 * eps, atol=2 * eps)


def test_named_poolings_equal_dispatch(gen):
    hidden = torch.randn(3, 7, 5, generator=gen)
    mask = padding_mask(3, 7, "left", gen).long()
    for fn, name in (
        (mean_pool, "mean"),
        (weighted_mean_pool, "weighted_mean"),
        (last_token_pool, "last_token"),
        (first_token_pool, "first_token"),
    ):
        torch.testing.assert_close(fn(hidden, mask), pool(hidden, mask, name), rtol=0, atol=0)


@st.composite
def colsum_and_mask(draw):
    batch = draw(st.integers(1, 4))
    length = draw(st.integers(1, 12))
    lengths = draw(st.lists(st.integers(1, length), min_size=batch, max_size=batch))
    side = draw(st.sampled_from(["left", "right"]))
    pos = torch.arange(length)[None, :]
    n = torch.tensor(lengths)[:, None]
    mask = pos < n if side == "right" else pos >= length - n
    values = draw(st.lists(st.floats(1e-3, 1e3, allow_nan=False), min_size=batch * length, max_size=batch * length))
    return torch.tensor(values, dtype=torch.float64).view(batch, length), mask


@settings(max_examples=60, deadline=None)
@given(colsum_and_mask(), st.floats(0.0, 1.0))
def test_ata_weights_sum_to_one_and_vanish_on_padding(data, mix):
    colsum, mask = data
    w = ata_weights(colsum, mask, mix=mix)
    assert (w[~mask] == 0).all()
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(dim=1), torch.ones(len(w), dtype=w.dtype), rtol=1e-12, atol=1e-12)


def test_ata_weights_mix_endpoints(gen):
    colsum = torch.rand(3, 6, generator=gen) + 0.1
    mask = padding_mask(3, 6, "right", gen)
    uniform = mask.float() / mask.sum(1, keepdim=True)
    torch.testing.assert_close(ata_weights(colsum, mask, mix=1.0), uniform)
    pure = colsum * mask / (colsum * mask).sum(1, keepdim=True)
    torch.testing.assert_close(ata_weights(colsum, mask), pure)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 9),
    extra=st.integers(1, 5),
    side=st.sampled_from(["left", "right"]),
    method=st.sampled_from(POOLING_METHODS),
    causal=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_embeddings_do_not_change_with_extra_padding(n, extra, side, method, causal, seed):
    """Pad a sequence with junk tokens on either side: its embedding stays (ATA via attention)."""
    gen = torch.Generator().manual_seed(seed)
    heads, dim, hidden_size = 2, 4, 6
    q, k, v = (torch.randn(1, heads, n, dim, generator=gen, dtype=torch.float64) for _ in range(3))
    hidden = torch.randn(1, n, hidden_size, generator=gen, dtype=torch.float64)

    def padded(t, seq_dim):
        junk_shape = list(t.shape)
        junk_shape[seq_dim] = extra
        junk = torch.randn(junk_shape, generator=gen, dtype=t.dtype) * 100
        return torch.cat([t, junk] if side == "right" else [junk, t], dim=seq_dim)

    full_mask = torch.ones(1, n, dtype=torch.bool)
    pad_mask = torch.zeros(1, n + extra, dtype=torch.bool)
    pad_mask[0, :n] = True
    if side == "left":
        pad_mask = pad_mask.flip(dims=[1])

    def embed(q, k, v, hidden, mask):
        _, colsum = reference.attention_with_colsum(q, k, v, causal=causal, key_padding_mask=mask)
        return pool(hidden, mask, method, colsum=colsum if method == "ata" else None)

    plain = embed(q, k, v, hidden, full_mask)
    with_padding = embed(padded(q, 2), padded(k, 2), padded(v, 2), padded(hidden, 1), pad_mask)
    torch.testing.assert_close(with_padding, plain, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("side", ["left", "right"])
def test_ata_pool_from_output_attentions_equals_colsum(side, gen):
    q, k, v = (torch.randn(2, 3, 6, 4, generator=gen) for _ in range(3))
    mask = padding_mask(2, 6, side, gen)
    hidden = torch.randn(2, 6, 10, generator=gen)
    _, colsum = reference.attention_with_colsum(q, k, v, causal=False, key_padding_mask=mask)
    scores = (q @ k.transpose(-1, -2)) / 2.0
    probs = torch.softmax(scores.masked_fill(~mask[:, None, None, :], float("-inf")), dim=-1)
    earlier_layer = torch.full_like(probs, float("nan"))  # only the last layer may be read
    from_tuple = ata_pool(hidden, mask, attentions=(earlier_layer, probs))
    from_tensor = ata_pool(hidden, mask.long(), attentions=probs, mix=0.0)
    from_colsum = ata_pool(hidden, mask, colsum=colsum)
    torch.testing.assert_close(from_tuple, from_colsum, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(from_tensor, from_tuple, rtol=0, atol=0)


def test_pooling_gradients_flow_to_hidden_states(gen):
    hidden = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    colsum = (torch.rand(2, 5, generator=gen, dtype=torch.float64) + 0.1).requires_grad_()
    mask = padding_mask(2, 5, "left", gen)
    assert torch.autograd.gradcheck(lambda h, c: ata_pool(h, mask, colsum=c, mix=0.3), (hidden, colsum))
    for method in POOLING_METHODS[:4]:
        assert torch.autograd.gradcheck(lambda h: pool(h, mask, method), (hidden,))


@pytest.mark.parametrize("fill", [float("inf"), float("-inf"), float("nan")])
def test_ata_pool_refuses_a_row_without_a_positive_finite_total(fill, gen):
    """One +inf column sum would give inf / inf = NaN weights: refused as NaN is (NonFiniteError,
    naming the row), through the same single host read of the totals; padding may hold anything."""
    from mgh_kernels import NonFiniteError
    from sync_counter import SyncCounter

    hidden = torch.randn(3, 6, 8, generator=gen)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[2, 4:] = False
    colsum = torch.rand(3, 6, generator=gen) + 0.1
    colsum[2, 4:] = fill  # padding: ignored whatever it holds
    with SyncCounter() as syncs:
        emb = ata_pool(hidden, mask, colsum=colsum)
    good = colsum.clone()
    good[2, 4:] = 0.0
    torch.testing.assert_close(emb, ata_pool(hidden, mask, colsum=good), rtol=0, atol=0)
    counts = []
    for value in (fill, float("nan")):  # the same host reads as the NaN check's
        bad = colsum.clone()
        bad[1, 2] = value
        with SyncCounter() as failing, pytest.raises(NonFiniteError, match=r"^colsum: .* rows 1 have none"):
            ata_pool(hidden, mask, colsum=bad)
        counts.append(len(failing.ours))
    assert counts[0] == counts[1] == len(syncs.ours) + 1, (counts, syncs.ours)  # + 1: the message's row list


def test_empty_length_is_named_not_a_column_sum_error():
    for call in (
        lambda: ata_pool(torch.zeros(2, 0, 8), torch.zeros(2, 0, dtype=torch.bool), colsum=torch.zeros(2, 0)),
        lambda: ata_weights(torch.zeros(2, 0), torch.zeros(2, 0, dtype=torch.bool)),
        lambda: mean_pool(torch.zeros(2, 0, 8), torch.zeros(2, 0, dtype=torch.bool)),
    ):
        with pytest.raises(ValueError, match=r"expected at least one token \(L >= 1\), got shape \[2, 0"):
            call()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("side", ["none", "left", "right"])
def test_colsum_from_attentions_matches_its_oracle(dtype, side, gen):
    """The production reduction of output_attentions (one sum over heads and queries) against
    ``reference.colsum_from_attentions``, with garbage where padded queries and keys lie."""
    batch, heads, length = 3, 4, 9
    mask = padding_mask(batch, length, side, gen)
    probs = torch.softmax(torch.randn(batch, heads, length, length, generator=gen, dtype=torch.float64), dim=-1)
    probs = torch.where(mask[:, None, :, None], probs, float("nan"))  # padded query rows: anything, NaN too
    probs = torch.where(mask[:, None, None, :], probs, torch.rand(probs.shape, generator=gen, dtype=torch.float64))
    probs = probs.to(dtype)
    got = colsum_from_attentions(probs, mask)
    want = reference.colsum_from_attentions(probs, mask)
    assert got.dtype == want.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    # NaN in padded key columns stays out too (the oracle's "* mask" would not zero it)
    nan_keys = torch.where(mask[:, None, None, :], probs, torch.tensor(float("nan"), dtype=dtype))
    torch.testing.assert_close(colsum_from_attentions(nan_keys, mask.long()), got, rtol=0, atol=0)


def test_colsum_from_attentions_names_bad_arguments(gen):
    with pytest.raises(ValueError, match=r"attentions: expected square self-attention probabilities"):
        colsum_from_attentions(torch.rand(1, 2, 3, 4), torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"attentions: expected 4 dimensions"):
        colsum_from_attentions(torch.rand(2, 3, 3), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"attention_mask: expected shape \[1, 3\]"):
        colsum_from_attentions(torch.rand(1, 2, 3, 3), torch.ones(1, 4, dtype=torch.bool))
