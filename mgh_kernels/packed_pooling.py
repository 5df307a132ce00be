"""The poolings of :mod:`mgh_kernels.pooling` over packed rows: hidden states [total, H] of n texts
concatenated, in flash-attention's varlen convention (int32 ``cu_seqlens`` [n + 1]).

``packed_pool(hidden, cu_seqlens, method, pool_mask=..., colsum=...)`` equals
``pool(padded_hidden, padded_pool_mask, method, colsum=padded_colsum)`` on the same texts padded
into [n, L, H] (left or right): the same per-token weights, formed per text by segment sums
(``index_add_``), never a padded tensor. ``pool_mask`` [total] (True = pooled token) excludes
tokens from pooling as the padded ``pool_mask`` does today (the instruction prefix under
``exclude_instruction``); without it every token is pooled. Sums accumulate in float32 (float64
for float64 inputs); dtypes as the padded poolings.
"""

from __future__ import annotations

import torch

from ._precision import autocast_off, compute_dtype
from ._validation import (
    NonFiniteError,
    check_choice,
    check_cu_seqlens,
    check_float,
    check_fraction,
    check_same_device,
    check_tensor,
    checks_values,
    rows_where,
)
from .pooling import POOLING_METHODS, _pooled_dtype

__all__ = ["packed_pool"]


def _segments(cu: torch.Tensor, total: int) -> torch.Tensor:
    """[total] int64: the text each token belongs to (no host sync: the output size is given)."""
    lengths = (cu[1:] - cu[:-1]).long()
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths, output_size=total)


def _segment_sum(values: torch.Tensor, segment: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros((n,) + values.shape[1:], dtype=values.dtype, device=values.device).index_add_(0, segment, values)


def packed_pool(
    hidden_states: torch.Tensor,
    cu_seqlens: torch.Tensor,
    method: str = "mean",
    *,
    pool_mask: torch.Tensor | None = None,
    colsum: torch.Tensor | None = None,
    mix: float = 0.0,
) -> torch.Tensor:
    """Pool packed hidden states [total, H] to one embedding per text, [n, H].

    Args:
        hidden_states: [total, H], the texts' tokens concatenated (any float dtype).
        cu_seqlens: [n + 1] int32 cumulative lengths, on the CPU or the hidden states' device.
        method: one of ``POOLING_METHODS``: "mean", "weighted_mean", "last_token", "first_token",
            "ata".
        pool_mask: [total] bool or 0/1, True = a token that is pooled (default: all); every text
            needs at least one.
        colsum: [total] per-token column sums (``ata_attention_varlen``'s), for "ata" only.
        mix: fraction of mean pooling blended into "ata" (see :func:`~mgh_kernels.ata_weights`).

    Returns:
        [n, H] in the hidden states' dtype (float32 under autocast).

    Example::

        out, colsum = ata_attention_varlen(q, k, v, cu, max_len, causal=True)  # the last layer's
        emb = packed_pool(hidden, cu, "ata", colsum=colsum)

    Equal to :func:`~mgh_kernels.pool` on the same texts padded into [n, L, H].
    """
    check_choice("method", method, POOLING_METHODS)
    check_tensor("hidden_states", hidden_states, ndim=2, layout="[total, H]")
    check_float("hidden_states", hidden_states)
    total = hidden_states.shape[0]
    device = hidden_states.device
    _, cu, _ = check_cu_seqlens("cu_seqlens", cu_seqlens, total=total, device=device)
    n = cu.numel() - 1
    if method != "ata" and (colsum is not None or mix != 0.0):
        raise ValueError(f"colsum, mix: only used by method='ata', got method={method!r}")
    if method == "ata" and colsum is None:
        raise ValueError("colsum: expected the [total] column sums for method='ata', got None")
    mix = check_fraction("mix", mix)
    if pool_mask is None:
        keep = torch.ones(total, dtype=torch.bool, device=device)
    else:
        check_tensor("pool_mask", pool_mask, ndim=1, layout="[total] (True or 1 = pooled token)")
        check_same_device("pool_mask", pool_mask, "hidden_states", hidden_states)
        if pool_mask.shape[0] != total:
            raise ValueError(f"pool_mask: expected {total} entries (total tokens), got {pool_mask.shape[0]}")
        keep = pool_mask != 0
    segment = _segments(cu, total)
    compute = compute_dtype(hidden_states.dtype)
    kept = keep.to(compute)
    count = _segment_sum(kept, segment, n)
    if checks_values():
        empty = rows_where(count == 0)
        if empty:
            raise ValueError(f"pool_mask: every text needs at least one pooled token; texts {empty} have none")
    if method in ("last_token", "first_token"):
        position = torch.arange(total, device=device)
        if method == "last_token":
            index = torch.full((n,), -1, dtype=torch.long, device=device).scatter_reduce_(
                0, segment, torch.where(keep, position, -1), reduce="amax"
            )
        else:
            index = torch.full((n,), total, dtype=torch.long, device=device).scatter_reduce_(
                0, segment, torch.where(keep, position, total), reduce="amin"
            )
        return hidden_states[index.clamp(0, max(total - 1, 0))].to(_pooled_dtype(hidden_states))
    if method == "mean":
        weights = kept / count[segment]
    elif method == "weighted_mean":
        running = torch.cumsum(kept, 0)
        before = torch.cat([running.new_zeros(1), running])[cu[:-1].long()]  # pooled tokens of earlier texts
        rank = (running - before[segment]) * kept
        weights = rank / _segment_sum(rank, segment, n)[segment]
    else:
        check_tensor("colsum", colsum, ndim=1, layout="[total]")
        check_float("colsum", colsum)
        check_same_device("colsum", colsum, "hidden_states", hidden_states)
        if colsum.shape[0] != total:
            raise ValueError(f"colsum: expected {total} entries (total tokens), got {colsum.shape[0]}")
        c = colsum.to(compute_dtype(colsum.dtype)) * kept
        sums = _segment_sum(c, segment, n)
        if mix < 1.0 and checks_values():
            bad = rows_where(~(sums > 0))
            if bad:
                raise NonFiniteError(
                    f"colsum: expected a positive total over the pooled tokens of every text; "
                    f"texts {bad} have none (all zero, negative or NaN)"
                )
        weights = c / sums.clamp_min(torch.finfo(c.dtype).tiny)[segment]
        if mix > 0.0:
            weights = (1.0 - mix) * weights + mix * kept.to(c.dtype) / count[segment].to(c.dtype)
    work = torch.promote_types(compute, weights.dtype)
    with autocast_off(device):
        pooled = _segment_sum(hidden_states.to(work) * weights.to(work)[:, None], segment, n)
    return pooled.to(_pooled_dtype(hidden_states))
