"""Every pooling of hidden states [B, L, H] to embeddings [B, H], and the ATA weights.

* ``ata_pool``: anchor-token-aware pooling, each token weighted by the attention it receives
  (``ata_weights`` from per-key column sums, e.g. ``enable_ata``'s, or from transformers'
  ``output_attentions`` probabilities through ``colsum_from_attentions``);
* ``mean_pool``, ``weighted_mean_pool``, ``last_token_pool``, ``first_token_pool``: the poolings of
  sentence-transformers' ``Pooling`` module ("mean", "weightedmean", "lasttoken", "cls"), for left
  or right padding;
* ``pool``: one of them by name (``POOLING_METHODS``); ``weighted_pool``: any per-token weights.

Conventions: masks are [B, L], bool or integer 0/1, True = real token; a row without one is an
error. Sums accumulate in float32 (float64 for float64 inputs) and come back in the hidden
states' dtype, or float32 under autocast, as sentence-transformers' Pooling returns them under
CUDA autocast (which runs its sum in float32). Values are not checked for NaN (a check would
synchronise with the host), except where ATA weights could not be formed (``NonFiniteError``;
not inside :func:`~mgh_kernels.trusted_inputs`, which skips every check that reads values).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._precision import autocast_dtype, autocast_off, compute_dtype
from ._validation import (
    NonFiniteError,
    check_attentions,
    check_choice,
    check_float,
    check_fraction,
    check_mask,
    check_same_device,
    check_tensor,
    checks_values,
    rows_where,
)

__all__ = [
    "POOLING_METHODS",
    "ata_pool",
    "ata_weights",
    "colsum_from_attentions",
    "first_token_pool",
    "last_token_pool",
    "mean_pool",
    "pool",
    "weighted_mean_pool",
    "weighted_pool",
]

POOLING_METHODS = ("mean", "weighted_mean", "last_token", "first_token", "ata")


def ata_pool(
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    attentions: Sequence[torch.Tensor] | None = None,
    colsum: torch.Tensor | None = None,
    mix: float = 0.0,
) -> torch.Tensor:
    """Anchor-token-aware pooling: each token weighted by the attention it receives.

    Give exactly one source of attention:

    * ``attentions``: the tuple transformers returns under ``output_attentions=True`` (one
      [B, H, L, L] tensor per layer; the last is used), or a single [B, H, L, L] tensor.
    * ``colsum``: [B, L] per-key column sums already reduced over queries and heads (what
      ``ata_attention`` and ``enable_ata`` give), which needs no L x L storage.

    Args:
        hidden_states: [B, L, H] last-layer hidden states, any float dtype.
        attention_mask: [B, L] bool or 0/1, True = real token (left or right padding).
        mix: fraction of mean pooling blended in, in [0, 1] (see :func:`ata_weights`).

    Returns:
        [B, H] embeddings computed in float32, in ``hidden_states.dtype`` (float32 under autocast).

    Example::

        out = model(**batch, output_attentions=True)   # eager attention
        emb = ata_pool(out.last_hidden_state, batch["attention_mask"], attentions=out.attentions)

    sentence-transformers has no ATA pooling; with ``mix=1`` this is its "mean" ``Pooling``. With
    ``mix < 1`` a row whose column sums over its real tokens total no positive finite number raises
    :class:`NonFiniteError` (NaN activations upstream do that). mgh's trainer stops at it and names
    the first parameter or layer output that went non-finite.
    """
    if (attentions is None) == (colsum is None):
        raise ValueError(
            "attentions, colsum: expected exactly one of them (the output_attentions tuple or "
            f"precomputed [B, L] column sums), got {'both' if colsum is not None else 'neither'}"
        )
    if attentions is not None:
        last = _last_layer(attentions)
        if last.device != hidden_states.device:
            raise ValueError(f"attentions: expected to be on {hidden_states.device}, got {last.device}")
        colsum = colsum_from_attentions(last, attention_mask)
    valid = _check_hidden(hidden_states, attention_mask)
    check_tensor("colsum", colsum, ndim=2, layout="[B, L]")
    check_same_device("colsum", colsum, "hidden_states", hidden_states)
    if tuple(colsum.shape) != tuple(valid.shape):
        raise ValueError(
            f"colsum: expected shape {list(valid.shape)} (B, L of hidden_states), got {list(colsum.shape)}"
        )
    return weighted_pool(hidden_states, ata_weights(colsum, valid, mix))


def _last_layer(attentions) -> torch.Tensor:
    if isinstance(attentions, torch.Tensor):
        return attentions
    if isinstance(attentions, (tuple, list)) and attentions:
        last = attentions[-1]
        if isinstance(last, torch.Tensor):
            return last
        raise ValueError(
            "attentions: expected the output_attentions tuple of [B, H, L, L] tensors, "
            f"its last element is {type(last).__name__} (was the model run with eager attention?)"
        )
    raise ValueError(
        "attentions: expected a non-empty tuple of [B, H, L, L] tensors (transformers' "
        f"output_attentions) or one such tensor, got {type(attentions).__name__}"
        + (" of length 0" if isinstance(attentions, (tuple, list)) else "")
    )


def colsum_from_attentions(attentions: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-key column sums from one layer's materialised attention probabilities.

    Args:
        attentions: [B, H, L, L] softmax probabilities (queries on dim 2), any float dtype, e.g.
            the last of transformers' ``output_attentions``.
        attention_mask: [B, L] bool or 0/1, True = real token.

    Returns:
        [B, L] float32 (float64 for float64 input): each key's probability summed over the valid
        queries and averaged over heads, zero at padded keys. Rows of padded queries are ignored
        whatever they hold (transformers fills them differently per attention backend).

    Example::

        out = model(**batch, output_attentions=True)                    # eager attention
        colsum = colsum_from_attentions(out.attentions[-1], batch["attention_mask"])

    ``ata_attention``'s column sums, from the probabilities transformers returns instead;
    ``reference.colsum_from_attentions`` is its oracle. One reduction over heads and queries,
    accumulated in float32 without a float32 copy of the [B, H, L, L] tensor.
    """
    valid = check_attentions(attentions, attention_mask)
    kept = attentions.masked_fill(~valid[:, None, :, None], 0)  # padded query rows may hold NaN
    sums = kept.sum(dim=(1, 2), dtype=compute_dtype(attentions.dtype)) / attentions.shape[1]
    return torch.where(valid, sums, torch.zeros((), dtype=sums.dtype, device=sums.device))


def ata_weights(colsum: torch.Tensor, attention_mask: torch.Tensor, mix: float = 0.0) -> torch.Tensor:
    """Anchor-token-aware pooling weights from per-key column sums.

    The weights are the column sums restricted to real tokens and normalised to sum to 1 per row
    (so padding never takes weight, and a sequence's weights do not depend on how it was padded).
    ``mix`` blends in mean pooling: ``w = (1 - mix) * ata + mix * uniform_over_real_tokens``;
    ``mix=0`` is pure ATA, ``mix=1`` is mean pooling.

    Args:
        colsum: [B, L] float, non-negative (e.g. from ``ata_attention``).
        attention_mask: [B, L] bool or 0/1, True = real token.
        mix: fraction of mean-pooling weight in [0, 1].

    Returns:
        [B, L] float32 (float64 for float64 ``colsum``), each row summing to 1, zero on padding.

    Example::

        weights = ata_weights(torch.tensor([[3.0, 1.0, 0.5]]), torch.tensor([[1, 1, 0]]))
        # tensor([[0.75, 0.25, 0.00]]); (weights[..., None] * hidden).sum(1) is ata_pool's embedding

    Raises :class:`NonFiniteError` (a ``ValueError``) for a row whose column sums over its real
    tokens total no positive finite number (all zero, negative, NaN or infinite), unless ``mix`` is 1 or the call
    runs inside :func:`~mgh_kernels.trusted_inputs` (the check reads values on the host).
    """
    check_tensor("colsum", colsum, ndim=2, layout="[B, L]")
    check_float("colsum", colsum)
    batch, length = colsum.shape
    if length == 0:
        raise ValueError(f"colsum: expected at least one token (L >= 1), got shape {list(colsum.shape)}")
    valid = check_mask("attention_mask", attention_mask, batch=batch, length=length, device=colsum.device)
    mix = check_fraction("mix", mix)
    # where, not a product: padding may hold anything (inf * 0 would be NaN)
    c = torch.where(valid, colsum.to(compute_dtype(colsum.dtype)), 0.0)
    total = c.sum(dim=1, keepdim=True)
    if mix < 1.0 and checks_values():
        bad = rows_where(~((total > 0) & (total < float("inf"))))  # one host read, as before
        if bad:
            raise NonFiniteError(
                f"colsum: expected a positive total over the real tokens of every row; rows {bad} "
                "have none (all zero, negative, NaN or infinite)"
            )
    weights = c / total.clamp_min(torch.finfo(c.dtype).tiny)
    if mix > 0.0:
        uniform = valid.to(c.dtype) / valid.sum(dim=1, keepdim=True)
        weights = (1.0 - mix) * weights + mix * uniform
    return weights


def pool(
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor,
    method: str = "mean",
    *,
    attentions: Sequence[torch.Tensor] | None = None,
    colsum: torch.Tensor | None = None,
    mix: float = 0.0,
) -> torch.Tensor:
    """Pool [B, L, H] hidden states to [B, H] by ``method``, one of ``POOLING_METHODS``: "mean",
    "weighted_mean", "last_token", "first_token" or "ata" (dtypes as the method's function).

    ``attentions``, ``colsum`` and ``mix`` are used by "ata" only (see :func:`ata_pool`).

    Example::

        emb = pool(out.last_hidden_state, mask, "last_token")    # [B, H]

    The analogue of sentence-transformers' ``Pooling(dim, pooling_mode=...)`` as a function.
    """
    check_choice("method", method, POOLING_METHODS)
    if method == "ata":
        return ata_pool(hidden_states, attention_mask, attentions=attentions, colsum=colsum, mix=mix)
    extra = [
        name
        for name, given in (("attentions", attentions is not None), ("colsum", colsum is not None), ("mix", mix != 0.0))
        if given
    ]
    if extra:
        raise ValueError(f"{', '.join(extra)}: only used by method='ata', got method={method!r}")
    simple = {
        "mean": mean_pool,
        "weighted_mean": weighted_mean_pool,
        "last_token": last_token_pool,
        "first_token": first_token_pool,
    }
    return simple[method](hidden_states, attention_mask)


def weighted_pool(hidden_states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sum of hidden states [B, L, H] under per-token weights [B, L], accumulated in float32.

    Returns [B, H] in ``hidden_states.dtype``, or float32 under autocast.

    Example::

        emb = weighted_pool(hidden, ata_weights(colsum, mask))   # = ata_pool(hidden, mask, colsum=colsum)

    ``torch.einsum("bl,blh->bh", weights, hidden_states)`` with the accumulation and dtype rules above.
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
    compute = torch.promote_types(compute_dtype(hidden_states.dtype), weights.dtype)
    with autocast_off(hidden_states.device):  # autocast would run the einsum in bf16 / fp16
        pooled = torch.einsum("bl,blh->bh", weights.to(compute), hidden_states.to(compute))
    return pooled.to(_pooled_dtype(hidden_states))


def mean_pool(hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the real tokens' hidden states: [B, L, H] any float dtype, [B, L] mask -> [B, H]
    in the hidden states' dtype (float32 under autocast), summed in float32.

    Example: ``mean_pool(out.last_hidden_state, batch["attention_mask"])``. sentence-transformers'
    ``Pooling(pooling_mode="mean")``.
    """
    valid = _check_hidden(hidden_states, attention_mask)
    weights = valid.to(compute_dtype(hidden_states.dtype)) / valid.sum(dim=1, keepdim=True)
    return weighted_pool(hidden_states, weights)


def weighted_mean_pool(hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Position-weighted mean (SGPT, LLM2Vec's ``weighted_mean``): [B, L, H], [B, L] -> [B, H], dtypes
    as :func:`mean_pool`.

    The i-th real token (counting from 1, whatever the padding side) gets weight proportional to
    i, so later tokens, which have seen more of a causal model's input, count more.

    Example: ``weighted_mean_pool(out.last_hidden_state, mask)``. sentence-transformers'
    ``Pooling(pooling_mode="weightedmean")``, for left padding too.
    """
    valid = _check_hidden(hidden_states, attention_mask)
    rank = valid.to(compute_dtype(hidden_states.dtype)).cumsum(dim=1) * valid
    return weighted_pool(hidden_states, rank / rank.sum(dim=1, keepdim=True))


def last_token_pool(hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden state of each row's last real token (left or right padding): [B, L, H], [B, L] ->
    [B, H] in the hidden states' dtype (float32 under autocast).

    Example: ``last_token_pool(out.last_hidden_state, mask)``. sentence-transformers'
    ``Pooling(pooling_mode="lasttoken")``.
    """
    valid = _check_hidden(hidden_states, attention_mask)
    length = valid.shape[1]
    index = length - 1 - valid.flip(dims=[1]).to(torch.int8).argmax(dim=1)
    return _gather_token(hidden_states, index)


def first_token_pool(hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden state of each row's first real token (left or right padding): [B, L, H], [B, L] ->
    [B, H] in the hidden states' dtype (float32 under autocast).

    Example: ``first_token_pool(out.last_hidden_state, mask)``. sentence-transformers'
    ``Pooling(pooling_mode="cls")``, which takes position 0 whatever the padding.
    """
    valid = _check_hidden(hidden_states, attention_mask)
    return _gather_token(hidden_states, valid.to(torch.int8).argmax(dim=1))


def _check_hidden(hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    check_tensor("hidden_states", hidden_states, ndim=3, layout="[B, L, H]")
    check_float("hidden_states", hidden_states)
    batch, length, _ = hidden_states.shape
    if length == 0:
        raise ValueError(f"hidden_states: expected at least one token (L >= 1), got shape {list(hidden_states.shape)}")
    return check_mask("attention_mask", attention_mask, batch=batch, length=length, device=hidden_states.device)


def _pooled_dtype(hidden_states: torch.Tensor) -> torch.dtype:
    """The dtype a pooling returns: the hidden states', or float32 under autocast for their device
    type (float64 stays float64)."""
    if hidden_states.dtype != torch.float64 and autocast_dtype(hidden_states) is not None:
        return torch.float32
    return hidden_states.dtype


def _gather_token(hidden_states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(hidden_states.shape[0], device=hidden_states.device)
    return hidden_states[rows, index].to(_pooled_dtype(hidden_states))
