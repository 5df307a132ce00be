"""Every validation path: a ValueError that names the argument and says what was expected."""

import pytest
import torch

from mgh_kernels import NonFiniteError, ata_pool, ata_weights, mean_pool, pool, reference, trusted_inputs

B, H, L, D, HID = 2, 4, 5, 8, 6


def qkv(hq=H, hkv=2, dtype=torch.float32):
    return (
        torch.randn(B, hq, L, D, dtype=dtype),
        torch.randn(B, hkv, L, D, dtype=dtype),
        torch.randn(B, hkv, L, D, dtype=dtype),
    )


def attn(**over):
    q, k, v = qkv()
    kwargs = dict(q=q, k=k, v=v, causal=False, key_padding_mask=torch.ones(B, L, dtype=torch.bool))
    kwargs.update(over)
    return lambda: reference.attention_with_colsum(**kwargs)


HIDDEN = torch.randn(B, L, HID)
MASK = torch.ones(B, L, dtype=torch.bool)
COLSUM = torch.rand(B, L) + 0.1
EMPTY_ROW = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
Q2 = torch.randn(B, D)

CASES = {
    # attention_with_colsum
    "q rank": (attn(q=torch.randn(B, L, D)), "q", "4 dimensions"),
    "k rank": (attn(k=torch.randn(B, L, D)), "k", "4 dimensions"),
    "q not a tensor": (attn(q=[[1.0]]), "q", "torch.Tensor"),
    "q integer": (attn(q=torch.ones(B, H, L, D, dtype=torch.long)), "q", "floating dtype"),
    "k dtype": (attn(k=torch.randn(B, 2, L, D, dtype=torch.float64)), "k", "dtype torch.float32"),
    "v device": (attn(v=torch.empty(B, 2, L, D, device="meta")), "v", "cpu"),
    "k batch": (attn(k=torch.randn(B + 1, 2, L, D), v=torch.randn(B + 1, 2, L, D)), "k", "batch"),
    "k length": (attn(k=torch.randn(B, 2, L + 1, D), v=torch.randn(B, 2, L + 1, D)), "k", "sequence length"),
    "k head dim": (attn(k=torch.randn(B, 2, L, D + 1), v=torch.randn(B, 2, L, D + 1)), "k", "head dim"),
    "v shape": (attn(v=torch.randn(B, 1, L, D)), "v", "shape of k"),
    "gqa": (attn(k=torch.randn(B, 3, L, D), v=torch.randn(B, 3, L, D)), "k", "divides the query heads"),
    "causal type": (attn(causal=1), "causal", "True or False"),
    "scale": (attn(scale=0.0), "scale", "positive"),
    "mask shape": (attn(key_padding_mask=torch.ones(B, L + 1, dtype=torch.bool)), "key_padding_mask", "shape"),
    "mask rank": (attn(key_padding_mask=torch.ones(B * L, dtype=torch.bool)), "key_padding_mask", "2 dimensions"),
    "mask float": (attn(key_padding_mask=torch.ones(B, L)), "key_padding_mask", "bool or integer"),
    "mask values": (attn(key_padding_mask=torch.full((B, L), 2)), "key_padding_mask", "0 and 1"),
    "mask device": (
        attn(key_padding_mask=torch.ones(B, L, dtype=torch.bool, device="meta")),
        "key_padding_mask",
        "cpu",
    ),
    "mask all padding": (attn(key_padding_mask=EMPTY_ROW), "key_padding_mask", "rows 1 are all padding"),
    # poolings
    "hidden rank": (lambda: mean_pool(torch.randn(B, HID), MASK), "hidden_states", "3 dimensions"),
    "hidden dtype": (lambda: mean_pool(HIDDEN.long(), MASK), "hidden_states", "floating dtype"),
    "pool mask length": (lambda: mean_pool(HIDDEN, MASK[:, :-1]), "attention_mask", "shape"),
    "pool mask batch": (lambda: pool(HIDDEN, MASK[:1], "last_token"), "attention_mask", "shape"),
    "pool all padding": (lambda: pool(HIDDEN, EMPTY_ROW, "first_token"), "attention_mask", "all padding"),
    "pool method": (lambda: pool(HIDDEN, MASK, "max"), "method", "one of"),
    "pool extra colsum": (lambda: pool(HIDDEN, MASK, "mean", colsum=COLSUM), "colsum", "method='ata'"),
    "pool extra mix": (lambda: pool(HIDDEN, MASK, "weighted_mean", mix=0.5), "mix", "method='ata'"),
    # ata
    "ata neither": (lambda: ata_pool(HIDDEN, MASK), "attentions, colsum", "exactly one"),
    "ata both": (
        lambda: ata_pool(HIDDEN, MASK, colsum=COLSUM, attentions=(torch.rand(B, H, L, L),)),
        "attentions, colsum",
        "both",
    ),
    "ata colsum shape": (lambda: ata_pool(HIDDEN, MASK, colsum=COLSUM[:, :-1]), "colsum", "shape"),
    "ata colsum rank": (lambda: ata_pool(HIDDEN, MASK, colsum=COLSUM[0]), "colsum", "2 dimensions"),
    "ata colsum device": (lambda: ata_pool(HIDDEN, MASK, colsum=COLSUM.to("meta")), "colsum", "cpu"),
    "ata attentions empty": (lambda: ata_pool(HIDDEN, MASK, attentions=()), "attentions", "non-empty tuple"),
    "ata attentions None layer": (lambda: ata_pool(HIDDEN, MASK, attentions=(None,)), "attentions", "eager attention"),
    "ata attentions rank": (
        lambda: ata_pool(HIDDEN, MASK, attentions=(torch.rand(B, L, L),)),
        "attentions",
        "4 dimensions",
    ),
    "ata attentions square": (
        lambda: ata_pool(HIDDEN, MASK, attentions=torch.rand(B, H, L, L + 1)),
        "attentions",
        "square",
    ),
    "ata attentions length": (
        lambda: ata_pool(HIDDEN, MASK, attentions=torch.rand(B, H, L + 1, L + 1)),
        "attention_mask",
        "shape",
    ),
    "ata attentions device": (
        lambda: ata_pool(HIDDEN, MASK, attentions=torch.rand(B, H, L, L, device="meta")),
        "attentions",
        "cpu",
    ),
    "ata mix": (lambda: ata_pool(HIDDEN, MASK, colsum=COLSUM, mix=1.5), "mix", "[0, 1]"),
    "ata all padding": (lambda: ata_pool(HIDDEN, EMPTY_ROW, colsum=COLSUM), "attention_mask", "all padding"),
    "ata weights zero colsum": (lambda: ata_weights(torch.zeros(B, L), MASK), "colsum", "positive total"),
    "ata weights nan colsum": (lambda: ata_weights(torch.full((B, L), float("nan")), MASK), "colsum", "positive total"),
    # infonce
    "q rank infonce": (lambda: reference.infonce(torch.randn(B, 1, D), Q2), "q", "2 dimensions"),
    "pos shape": (lambda: reference.infonce(Q2, torch.randn(B, D + 1)), "pos", "shape of q"),
    "pos dtype": (lambda: reference.infonce(Q2, Q2.double()), "pos", "dtype"),
    "pos device": (lambda: reference.infonce(Q2, Q2.to("meta")), "pos", "cpu"),
    "neg rank": (lambda: reference.infonce(Q2, Q2, torch.randn(B, D)), "neg", "3 dimensions"),
    "neg batch": (lambda: reference.infonce(Q2, Q2, torch.randn(B + 1, 2, D)), "neg", "batch"),
    "neg dim": (lambda: reference.infonce(Q2, Q2, torch.randn(B, 2, D + 1)), "neg", "embedding dim"),
    "empty batch": (lambda: reference.infonce(Q2[:0], Q2[:0]), "q", "at least one query"),
    "tau": (lambda: reference.infonce(Q2, Q2, tau=0), "tau", "positive"),
    "tau type": (lambda: reference.infonce(Q2, Q2, tau="0.05"), "tau", "positive"),
    "negatives": (lambda: reference.infonce(Q2, Q2, negatives="local"), "negatives", "'global', 'own'"),
    "reduction": (lambda: reference.infonce(Q2, Q2, reduction="max"), "reduction", "'mean', 'sum', 'none'"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_names_argument(name):
    call, argument, expected = CASES[name]
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert message.startswith(argument + ":"), message
    assert expected in message, message


def test_good_inputs_of_the_table_pass():
    """The table's baseline arguments are valid, so each case fails for its own reason only."""
    attn()()
    mean_pool(HIDDEN, MASK)
    ata_pool(HIDDEN, MASK, colsum=COLSUM)
    reference.infonce(Q2, Q2, torch.randn(B, 2, D))


@pytest.mark.parametrize("fill", [0.0, float("nan")])
def test_weights_without_a_positive_total_are_a_typed_error(fill):
    """What NaN activations upstream produce is a NonFiniteError (a ValueError, as before), which
    callers such as the trainer catch by type; with mix=1 the column sums are not used."""
    colsum = COLSUM.clone()
    colsum[1] = fill
    with pytest.raises(NonFiniteError, match="^colsum: .* rows 1 have none"):
        ata_pool(HIDDEN, MASK, colsum=colsum)
    assert issubclass(NonFiniteError, ValueError)
    ata_weights(colsum, MASK, mix=1.0)


VALUE_CASES = [
    "mask values",
    "mask all padding",
    "pool all padding",
    "ata all padding",
    "ata weights zero colsum",
    "ata weights nan colsum",
]


@pytest.mark.parametrize("name", VALUE_CASES)
def test_trusted_inputs_skips_only_the_checks_that_read_values(name):
    """Inside ``trusted_inputs`` the checks of values (host syncs) are the caller's; the checks of
    ranks, shapes, dtypes and devices still raise."""
    call, _, _ = CASES[name]
    with trusted_inputs():
        call()  # no error: wrong or non-finite output is the caller's to avoid
        for structural in ("mask shape", "ata colsum device", "pos dtype"):
            with pytest.raises(ValueError):
                CASES[structural][0]()
    with pytest.raises(ValueError):
        call()  # outside, the check is back
