"""packed_pool over packed rows equals pool over the same texts padded (left or right), for every
method, with instruction tokens excluded through pool_mask, and ATA weights from the varlen
attention's column sums equal to those of the padded attention."""

import pytest
import torch

from mgh_kernels import (
    POOLING_METHODS,
    NonFiniteError,
    ata_attention,
    ata_attention_varlen,
    packed_pool,
    pool,
    trusted_inputs,
    use_backend,
)

LENGTHS = [5, 1, 12, 3, 9]


def cu_of(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def padded(packed, lengths, side, fill=0.0):
    """[total, ...] -> [n, L, ...] (left or right padding) and the [n, L] mask of real tokens."""
    longest = max(lengths)
    pos = torch.arange(longest)[None, :]
    n = torch.tensor(lengths)[:, None]
    mask = pos < n if side == "right" else pos >= longest - n
    box = torch.full((len(lengths), longest) + packed.shape[1:], fill, dtype=packed.dtype)
    box[mask] = packed
    return box, mask


def instruction_mask(lengths, gen):
    """[total] bool: each text's first few tokens (an instruction prefix) excluded, at least one kept."""
    keep = []
    for n in lengths:
        prefix = int(torch.randint(0, n, (1,), generator=gen))
        keep += [False] * prefix + [True] * (n - prefix)
    return torch.tensor(keep)


@pytest.mark.parametrize("method", POOLING_METHODS)
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("exclude", [False, True], ids=["all-tokens", "no-instruction"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_equals_padded_pooling(method, side, exclude, dtype, gen):
    total = sum(LENGTHS)
    hidden = torch.randn(total, 24, generator=gen, dtype=dtype)
    keep = instruction_mask(LENGTHS, gen) if exclude else torch.ones(total, dtype=torch.bool)
    colsum = torch.rand(total, generator=gen, dtype=dtype) + 0.1 if method == "ata" else None
    kwargs = dict(colsum=colsum, mix=0.25) if method == "ata" else {}
    got = packed_pool(hidden, cu_of(LENGTHS), method, pool_mask=keep if exclude else None, **kwargs)
    box, _ = padded(hidden, LENGTHS, side)
    keep_box, _ = padded(keep, LENGTHS, side, fill=False)
    if method == "ata":
        kwargs["colsum"] = padded(colsum, LENGTHS, side)[0]
    want = pool(box, keep_box, method, **kwargs)
    assert got.dtype == want.dtype and got.shape == (len(LENGTHS), 24)
    torch.testing.assert_close(got, want, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=1e-7)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_ata_from_varlen_attention_equals_padded(causal, gen):
    """The whole ATA step: varlen attention's column sums pooled packed against the padded
    attention's column sums pooled padded (PyTorch path: quick), instruction tokens excluded."""
    total = sum(LENGTHS)
    q, k, v = (torch.randn(total, h, 16, generator=gen) for h in (4, 2, 2))
    hidden = torch.randn(total, 24, generator=gen)
    keep = instruction_mask(LENGTHS, gen)
    with use_backend("torch"):
        _, colsum = ata_attention_varlen(q, k, v, cu_of(LENGTHS), max(LENGTHS), causal=causal)
        boxes = [padded(t, LENGTHS, "right")[0].transpose(1, 2) for t in (q, k, v)]
        mask = padded(hidden, LENGTHS, "right")[1]
        _, p_colsum = ata_attention(*boxes, causal=causal, key_padding_mask=mask)
    got = packed_pool(hidden, cu_of(LENGTHS), "ata", pool_mask=keep, colsum=colsum)
    want = pool(
        padded(hidden, LENGTHS, "right")[0], padded(keep, LENGTHS, "right", fill=False)[0], "ata", colsum=p_colsum
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_gradients_equal_padded(gen):
    total = sum(LENGTHS)
    hidden = torch.randn(total, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    colsum = (torch.rand(total, generator=gen, dtype=torch.float64) + 0.1).requires_grad_()
    w = torch.randn(len(LENGTHS), 8, generator=gen, dtype=torch.float64)
    (packed_pool(hidden, cu_of(LENGTHS), "ata", colsum=colsum) * w).sum().backward()
    box_h, mask = padded(hidden.detach(), LENGTHS, "left")
    box_c, _ = padded(colsum.detach(), LENGTHS, "left")
    box_h.requires_grad_(), box_c.requires_grad_()
    (pool(box_h, mask, "ata", colsum=box_c) * w).sum().backward()
    torch.testing.assert_close(hidden.grad, box_h.grad[mask])
    torch.testing.assert_close(colsum.grad, box_c.grad[mask])


@pytest.mark.parametrize(
    "change, argument, expected",
    [
        (dict(cu_seqlens=torch.tensor([0, 2, 6])), "cu_seqlens", "torch.int32"),
        (dict(cu_seqlens=torch.tensor([0, 2, 5], dtype=torch.int32)), "cu_seqlens", "end at total = 6"),
        (dict(pool_mask=torch.tensor([1, 1, 0, 0, 0, 0])), "pool_mask", "texts 1"),
        (dict(pool_mask=torch.ones(5)), "pool_mask", "6 entries"),
        (dict(method="ata"), "colsum", "column sums"),
        (dict(method="ata", colsum=torch.zeros(6)), "colsum", "positive total"),
        (dict(method="mean", colsum=torch.ones(6)), "colsum, mix", "only used by method='ata'"),
        (dict(hidden_states=torch.randn(1, 6, 4)), "hidden_states", "[total, H]"),
        (dict(method="max"), "method", "one of"),
    ],
)
def test_bad_input_names_argument(change, argument, expected):
    args = dict(hidden_states=torch.randn(6, 4), cu_seqlens=torch.tensor([0, 2, 6], dtype=torch.int32))
    args.update(change)
    with pytest.raises(ValueError) as info:
        packed_pool(**args)
    assert str(info.value).startswith(argument + ":") and expected in str(info.value), str(info.value)
    if argument == "colsum" and expected == "positive total":
        assert isinstance(info.value, NonFiniteError)
        with trusted_inputs():
            packed_pool(**args)  # the value check reads the device: skipped when trusted
