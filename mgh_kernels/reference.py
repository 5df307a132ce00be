"""Eager PyTorch oracles: the ground truth of the fused ops and the baselines of the benchmarks.

* ``attention_with_colsum``: attention with per-key column sums (``ata_attention``'s truth);
* ``attention_varlen_with_colsum``: the same over packed sequences (``ata_attention_varlen``'s truth);
* ``colsum_from_attentions``: the same column sums from materialised probabilities
  (transformers' ``output_attentions``);
* ``infonce``: InfoNCE over cosine similarities (``infonce_loss``'s truth).

Everything here is written for clarity, not speed: attention materialises the full [B, H, L, L]
probabilities, InfoNCE the B x B(1+K) logits. Arithmetic runs in float32 (float64 when the inputs
are float64, so tests can measure a kernel's error against a float64 reference); results that
mirror the input come back in the input's dtype. Masks are [B, L], bool or integer 0/1, True/1 =
real token, left or right padding; a row with no real token is an error. Under ``torch.autocast``
these are eager PyTorch code under autocast: their matmuls run in the autocast dtype, and inputs of
mixed float dtypes are accepted there as autocast accepts them.

The poolings and ``ata_weights`` live in :mod:`mgh_kernels.pooling`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._precision import autocast_dtype, compute_dtype
from ._validation import check_attention_args, check_attentions, check_infonce_args, check_varlen_args

__all__ = ["attention_varlen_with_colsum", "attention_with_colsum", "colsum_from_attentions", "infonce"]


# --------------------------------------------------------------------------------------------
# Attention with per-key column sums
# --------------------------------------------------------------------------------------------


def attention_with_colsum(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
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

    Example::

        q, k, v = torch.randn(2, 8, 16, 64), torch.randn(2, 2, 16, 64), torch.randn(2, 2, 16, 64)
        out, colsum = attention_with_colsum(q, k, v, causal=True)    # colsum.sum(1) == [16., 16.]

    ``out`` is ``F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)``
    with padded keys masked and padded query rows zeroed; ``colsum`` is the sum over queries, mean
    over heads, of the probabilities transformers' eager attention returns with
    ``output_attentions=True``.
    """
    valid, scale = check_attention_args(
        q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale, amp=autocast_dtype(q)
    )
    batch, hq, length, _ = q.shape
    hkv = k.shape[1]
    if valid is None:
        valid = torch.ones(batch, length, dtype=torch.bool, device=q.device)

    compute = compute_dtype(q.dtype)
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


def attention_varlen_with_colsum(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    causal: bool,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attention_with_colsum` over packed sequences, one sequence at a time.

    Args:
        q: [total, Hq, D]; k, v: [total, Hkv, D] (flash-attention's varlen layout).
        cu_seqlens: [n + 1] int32 cumulative lengths (0, ..., total); sequence i is tokens
            ``cu_seqlens[i]:cu_seqlens[i + 1]``.
        max_seqlen: at least the longest length (checked).
        causal, scale: as :func:`attention_with_colsum`, within each sequence.

    Returns:
        ``out`` [total, Hq, D] in ``q.dtype`` and ``colsum`` [total] float32 (float64 for float64
        inputs): each token's sum over its own sequence's queries, averaged over heads.

    Example::

        cu = torch.tensor([0, 3, 10], dtype=torch.int32)
        out, colsum = attention_varlen_with_colsum(q, k, v, cu, 7, causal=True)   # q [10, H, D]

    Per sequence, ``attention_with_colsum(q[None, a:b].transpose(1, 2), ...)``; what
    flash-attention's ``flash_attn_varlen_func`` gives for ``out``.
    """
    cu_host, cu, max_seqlen, scale = check_varlen_args(
        q, k, v, cu_seqlens, max_seqlen, causal=causal, scale=scale, amp=autocast_dtype(q)
    )
    bounds = (cu_host if cu_host is not None else cu).tolist()
    outs, sums = [], []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        if stop > start:
            out, colsum = attention_with_colsum(
                *(t[None, start:stop].transpose(1, 2) for t in (q, k, v)), causal=causal, scale=scale
            )
            outs.append(out[0].transpose(0, 1))
            sums.append(colsum[0])
    return torch.cat(outs), torch.cat(sums)


def colsum_from_attentions(attentions: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Column sums from materialised attention probabilities (transformers' ``output_attentions``).

    Args:
        attentions: [B, H, L, L] softmax probabilities of one layer (queries on dim 2).
        attention_mask: [B, L] bool or 0/1, True = real token.

    Returns:
        [B, L] float32 (float64 for float64 input): the sum over valid queries of each key's
        probability, averaged over heads, zero at padded keys. Rows of padded queries are ignored
        whatever they hold (transformers fills them differently per attention backend).

    Example::

        out = model(**batch, output_attentions=True)                    # eager attention
        colsum = colsum_from_attentions(out.attentions[-1], batch["attention_mask"])

    The oracle of :func:`mgh_kernels.pooling.colsum_from_attentions`, which ``ata_pool(...,
    attentions=...)`` reduces transformers' probabilities with.
    """
    valid = check_attentions(attentions, attention_mask)
    probs = attentions.to(compute_dtype(attentions.dtype))
    kept = torch.where(valid[:, None, :, None], probs, torch.zeros((), dtype=probs.dtype, device=probs.device))
    return kept.sum(dim=2).mean(dim=1) * valid


# --------------------------------------------------------------------------------------------
# InfoNCE
# --------------------------------------------------------------------------------------------


def infonce(
    q: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor | None = None,
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

    Example::

        loss = infonce(torch.randn(4, 32), torch.randn(4, 32), torch.randn(4, 3, 32), tau=0.05)

    With "global": ``F.cross_entropy(normalize(q) @ normalize([pos; neg]).T / tau, arange(B))``,
    sentence-transformers' ``MultipleNegativesRankingLoss(scale=1 / tau)`` on the embeddings.
    """
    tau = check_infonce_args(q, pos, neg, tau=tau, negatives=negatives, reduction=reduction, amp=autocast_dtype(q))
    batch, dim = q.shape

    compute = compute_dtype(q.dtype)
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
