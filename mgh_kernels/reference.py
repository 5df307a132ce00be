"""Eager PyTorch references: the ground truth for every kernel and the baselines of the benchmarks.

Everything here is written for clarity, not speed: attention materialises the full [B, H, L, L]
probabilities. Arithmetic runs in float32 (float64 when the inputs are float64, so tests can
measure a kernel's error against a float64 reference); results that mirror the input come back
in the input's dtype.

Conventions shared by every function:

* ``attention_mask`` / ``key_padding_mask`` is [B, L], bool or integer 0/1, True/1 = real token.
  Left and right padding are both supported; a row with no real token is an error.
* Hidden states are [B, L, H]; pooled embeddings are [B, H] in the hidden states' dtype (float32
  under autocast), computed in float32.
* Under ``torch.autocast`` the attention and InfoNCE references are eager PyTorch code under
  autocast: their matmuls run in the autocast dtype, and inputs of mixed float dtypes are accepted
  there as autocast accepts them.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._backend import autocast_dtype, autocast_off
from ._validation import (
    check_attention_args,
    check_infonce_args,
    check_float,
    check_fraction,
    check_mask,
    check_same_device,
    check_tensor,
    checks_values,
)

__all__ = [
    "attention_with_colsum",
    "colsum_from_attentions",
    "ata_weights",
    "weighted_pool",
    "mean_pool",
    "weighted_mean_pool",
    "last_token_pool",
    "first_token_pool",
    "ata_pool_from_colsum",
    "infonce",
]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# Attention with per-key column sums
# --------------------------------------------------------------------------------------------


def attention_with_colsum(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    key_padding_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product self-attention that also returns each key's received attention.

    Args:
        q: [B, Hq, L, D] queries, float16/bfloat16/float32/float64.
        k, v: [B, Hkv, L, D] keys and values, same dtype and device as ``q``; ``Hq`` must be a
            multiple of ``Hkv`` (grouped-query attention: query head ``h`` reads kv head
            ``h // (Hq // Hkv)``, as in transformers' ``repeat_kv``).
        causal: query ``i`` sees keys ``j <= i`` (positions in the padded sequence, as in
            transformers); otherwise every key.
        key_padding_mask: [B, L] bool or 0/1, True = real token. Padded keys receive no
            attention; padded queries attend to nothing and their output rows are zero.
        scale: softmax scale, default ``1 / sqrt(D)``.

    Returns:
        ``out``: [B, Hq, L, D] in ``q.dtype``, zero at padded query positions.
        ``colsum``: [B, L] float32 (float64 for float64 inputs): for each key, the sum over valid
        queries of the softmax probabilities, averaged over the ``Hq`` heads; zero at padded keys.
        Over the valid keys of a row it sums to the row's number of valid queries.
    """
    valid, scale = check_attention_args(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale,
                                        amp=autocast_dtype(q))
    batch, hq, length, _ = q.shape
    hkv = k.shape[1]
    if valid is None:
        valid = torch.ones(batch, length, dtype=torch.bool, device=q.device)

    compute = _compute_dtype(q.dtype)
    group = hq // hkv
    qf = q.to(compute)
    kf = k.to(compute).repeat_interleave(group, dim=1)
    vf = v.to(compute).repeat_interleave(group, dim=1)

    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # [B, Hq, L, L]
    allowed = valid[:, None, None, :]  # [B, 1, 1, L] over keys
    if causal:
        allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    allowed = allowed.expand(batch, 1, length, length)
    # Only padded queries can have no allowed key; let them see every key so the softmax stays
    # finite (and its gradient NaN-free), then drop their rows below.
    allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    probs = torch.where(valid[:, None, :, None], probs, torch.zeros((), dtype=compute, device=q.device))

    out = torch.matmul(probs, vf).to(q.dtype)
    colsum = probs.sum(dim=2).mean(dim=1)
    return out, colsum


def colsum_from_attentions(attentions: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Column sums from materialised attention probabilities (transformers' ``output_attentions``).

    Args:
        attentions: [B, H, L, L] softmax probabilities of one layer (queries on dim 2).
        attention_mask: [B, L] bool or 0/1, True = real token.

    Returns:
        [B, L] float32 (float64 for float64 input): the sum over valid queries of each key's
        probability, averaged over heads, zero at padded keys. Rows of padded queries are ignored
        whatever they hold (transformers fills them differently per attention backend).
    """
    check_tensor("attentions", attentions, ndim=4, layout="[B, H, L, L]")
    check_float("attentions", attentions)
    batch, _, length, length_k = attentions.shape
    if length_k != length:
        raise ValueError(
            f"attentions: expected square self-attention probabilities [B, H, L, L], "
            f"got shape {list(attentions.shape)}"
        )
    valid = check_mask("attention_mask", attention_mask, batch=batch, length=length, device=attentions.device)
    probs = attentions.to(_compute_dtype(attentions.dtype))
    kept = torch.where(valid[:, None, :, None], probs, torch.zeros((), dtype=probs.dtype, device=probs.device))
    return kept.sum(dim=2).mean(dim=1) * valid


# --------------------------------------------------------------------------------------------
# Poolings
# --------------------------------------------------------------------------------------------


def _check_hidden(hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    check_tensor("hidden_states", hidden_states, ndim=3, layout="[B, L, H]")
    check_float("hidden_states", hidden_states)
    batch, length, _ = hidden_states.shape
    return check_mask(
        "attention_mask", attention_mask, batch=batch, length=length, device=hidden_states.device
    )


def ata_weights(colsum: torch.Tensor, attention_mask: torch.Tensor, mix: float = 0.0) -> torch.Tensor:
    """Anchor-token-aware pooling weights from per-key column sums.

    The weights are the column sums restricted to real tokens and normalised to sum to 1 per row
    (so padding never takes weight, and a sequence's weights do not depend on how it was padded).
    ``mix`` blends in mean pooling: ``w = (1 - mix) * ata + mix * uniform_over_real_tokens``;
    ``mix=0`` is pure ATA, ``mix=1`` is mean pooling.

    Args:
        colsum: [B, L] float, non-negative (e.g. from ``attention_with_colsum``).
        attention_mask: [B, L] bool or 0/1, True = real token.
        mix: fraction of mean-pooling weight in [0, 1].

    Returns:
        [B, L] float32 (float64 for float64 ``colsum``), each row summing to 1, zero on padding.
    """
    check_tensor("colsum", colsum, ndim=2, layout="[B, L]")
    check_float("colsum", colsum)
    batch, length = colsum.shape
    valid = check_mask("attention_mask", attention_mask, batch=batch, length=length, device=colsum.device)
    mix = check_fraction("mix", mix)
    c = colsum.to(_compute_dtype(colsum.dtype)) * valid
    total = c.sum(dim=1, keepdim=True)
    if mix < 1.0 and checks_values():
        bad = (~(total > 0)).flatten().nonzero().flatten()
        if bad.numel():
            rows = ", ".join(str(int(r)) for r in bad[:8])
            raise ValueError(
                f"colsum: expected a positive total over the real tokens of every row; rows {rows} "
                "have none (all zero, negative or NaN)"
            )
    weights = c / total.clamp_min(torch.finfo(c.dtype).tiny)
    if mix > 0.0:
        uniform = valid.to(c.dtype) / valid.sum(dim=1, keepdim=True)
        weights = (1.0 - mix) * weights + mix * uniform
    return weights


def weighted_pool(hidden_states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sum of hidden states [B, L, H] under per-token weights [B, L]; fp32 accumulation.

    Returns [B, H] in ``hidden_states.dtype``, or float32 under autocast (see ``_pooled_dtype``).
    """
    check_tensor("hidden_states", hidden_states, ndim=3, layout="[B, L, H]")
    check_float("hidden_states", hidden_states)
    check_tensor("weights", weights, ndim=2, layout="[B, L]")
    check_float("weights", weights)
    check_same_device("weights", weights, "hidden_states", hidden_states)
    if tuple(weights.shape) != tuple(hidden_states.shape[:2]):
        raise ValueError(
            f"weights: expected shape {list(hidden_states.shape[:2])} (B, L of hidden_states), "
            f"got {list(weights.shape)}"
        )
    compute = torch.promote_types(_compute_dtype(hidden_states.dtype), weights.dtype)
    with autocast_off(hidden_states.device):  # autocast would run the einsum in bf16 / fp16
        pooled = torch.einsum("bl,blh->bh", weights.to(compute), hidden_states.to(compute))
    return pooled.to(_pooled_dtype(hidden_states))


def _pooled_dtype(hidden_states: torch.Tensor) -> torch.dtype:
    """The dtype a pooling returns: the hidden states', or float32 under autocast for their device
    type, as sentence-transformers' Pooling returns there on CUDA (autocast runs its sum in
    float32)."""
    if hidden_states.dtype != torch.float64 and autocast_dtype(hidden_states) is not None:
        return torch.float32
    return hidden_states.dtype


def mean_pool(hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the real tokens' hidden states. [B, L, H], [B, L] -> [B, H]."""
    valid = _check_hidden(hidden_states, attention_mask)
    compute = _compute_dtype(hidden_states.dtype)
    weights = valid.to(compute) / valid.sum(dim=1, keepdim=True)
    return weighted_pool(hidden_states, weights)


def weighted_mean_pool(hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Position-weighted mean (SGPT, LLM2Vec's ``weighted_mean``). [B, L, H], [B, L] -> [B, H].

    The i-th real token (counting from 1, whatever the padding side) gets weight proportional to
    i, so later tokens, which have seen more of a causal model's input, count more.
    """
    valid = _check_hidden(hidden_states, attention_mask)
    compute = _compute_dtype(hidden_states.dtype)
    rank = valid.to(compute).cumsum(dim=1) * valid
    return weighted_pool(hidden_states, rank / rank.sum(dim=1, keepdim=True))


def _gather_token(hidden_states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(hidden_states.shape[0], device=hidden_states.device)
    return hidden_states[rows, index].to(_pooled_dtype(hidden_states))


def last_token_pool(hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden state of each row's last real token (left or right padding). -> [B, H]."""
    valid = _check_hidden(hidden_states, attention_mask)
    length = valid.shape[1]
    index = length - 1 - valid.flip(dims=[1]).to(torch.int8).argmax(dim=1)
    return _gather_token(hidden_states, index)


def first_token_pool(hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden state of each row's first real token (left or right padding). -> [B, H]."""
    valid = _check_hidden(hidden_states, attention_mask)
    return _gather_token(hidden_states, valid.to(torch.int8).argmax(dim=1))


def ata_pool_from_colsum(
    hidden_states: torch.Tensor, attention_mask: torch.Tensor, colsum: torch.Tensor, *, mix: float = 0.0
) -> torch.Tensor:
    """ATA pooling: hidden states [B, L, H] weighted by ``ata_weights(colsum, mask, mix)``. -> [B, H]."""
    valid = _check_hidden(hidden_states, attention_mask)
    check_tensor("colsum", colsum, ndim=2, layout="[B, L]")
    check_same_device("colsum", colsum, "hidden_states", hidden_states)
    if tuple(colsum.shape) != tuple(valid.shape):
        raise ValueError(
            f"colsum: expected shape {list(valid.shape)} (B, L of hidden_states), got {list(colsum.shape)}"
        )
    return weighted_pool(hidden_states, ata_weights(colsum, valid, mix))


# --------------------------------------------------------------------------------------------
# InfoNCE
# --------------------------------------------------------------------------------------------


def infonce(
    q: torch.Tensor,
    pos: torch.Tensor,
    neg: Optional[torch.Tensor] = None,
    *,
    tau: float = 0.05,
    negatives: str = "global",
    reduction: str = "mean",
) -> torch.Tensor:
    """InfoNCE over cosine similarities with in-batch and hard negatives.

    Args:
        q: [B, D] query embeddings (any float dtype; arithmetic in float32, float64 for float64).
        pos: [B, D] positives; ``pos[i]`` is query ``i``'s target.
        neg: optional [B, K, D] hard negatives, ``K`` may be 0.
        tau: temperature; logits are ``cos(q, c) / tau`` (tau=0.05 is scale 20).
        negatives: ``"global"``: every query scores all B positives and all B*K negatives of the
            batch (sentence-transformers' MultipleNegativesRankingLoss with n-tuples);
            ``"own"``: each query scores its own positive and its own K negatives only.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (per-query losses [B]).

    Returns:
        The cross-entropy with each query's own positive as the target: a float32 scalar
        (float64 for float64 inputs), or [B] for ``reduction="none"``.
    """
    tau = check_infonce_args(q, pos, neg, tau=tau, negatives=negatives, reduction=reduction,
                             amp=autocast_dtype(q))
    batch, dim = q.shape

    compute = _compute_dtype(q.dtype)
    qn = F.normalize(q.to(compute), dim=-1)
    pn = F.normalize(pos.to(compute), dim=-1)
    nn_ = None if neg is None else F.normalize(neg.to(compute), dim=-1)
    if negatives == "global":
        candidates = pn if nn_ is None else torch.cat([pn, nn_.reshape(-1, dim)], dim=0)
        logits = qn @ candidates.T / tau  # [B, B(1+K)]
        target = torch.arange(batch, device=q.device)
    else:
        candidates = pn[:, None] if nn_ is None else torch.cat([pn[:, None], nn_], dim=1)
        logits = torch.einsum("bd,bcd->bc", qn, candidates) / tau  # [B, 1+K]
        target = torch.zeros(batch, dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, target, reduction=reduction)
