"""Public poolings: ``ata_pool`` (the drop-in for anchor-token-aware pooling) and ``pool``.

The plain poolings (mean, weighted mean, last token, first token) need no kernel: they are the
functions of :mod:`mgh_kernels.reference`, re-exported here so users import every pooling from one
place. ATA pooling needs per-key column sums of the last layer's attention; ``ata_pool`` takes
them precomputed (``colsum=``) or derives them from transformers' ``output_attentions=True``
tuple (``attentions=``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ._validation import check_choice
from .reference import (
    ata_pool_from_colsum,
    colsum_from_attentions,
    first_token_pool,
    last_token_pool,
    mean_pool,
    weighted_mean_pool,
)

__all__ = [
    "POOLING_METHODS",
    "ata_pool",
    "first_token_pool",
    "last_token_pool",
    "mean_pool",
    "pool",
    "weighted_mean_pool",
]

POOLING_METHODS = ("mean", "weighted_mean", "last_token", "first_token", "ata")


def ata_pool(
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    attentions: Optional[Sequence[torch.Tensor]] = None,
    colsum: Optional[torch.Tensor] = None,
    mix: float = 0.0,
) -> torch.Tensor:
    """Anchor-token-aware pooling: each token weighted by the attention it receives.

    Give exactly one source of attention:

    * ``attentions``: the tuple transformers returns under ``output_attentions=True`` (one
      [B, H, L, L] tensor per layer; the last is used), or a single [B, H, L, L] tensor.
    * ``colsum``: [B, L] per-key column sums already reduced over queries and heads (what
      ``mgh_kernels.reference.attention_with_colsum`` returns), which needs no L x L storage.

    Args:
        hidden_states: [B, L, H] last-layer hidden states, any float dtype.
        attention_mask: [B, L] bool or 0/1, True = real token (left or right padding).
        mix: fraction of mean pooling blended in, in [0, 1] (see ``reference.ata_weights``).

    Returns:
        [B, H] embeddings in ``hidden_states.dtype`` (float32 accumulation).

    Example::

        out = model(**batch, output_attentions=True)   # eager attention
        emb = ata_pool(out.last_hidden_state, batch["attention_mask"], attentions=out.attentions)
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
    return ata_pool_from_colsum(hidden_states, attention_mask, colsum, mix=mix)


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


def pool(
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor,
    method: str = "mean",
    *,
    attentions: Optional[Sequence[torch.Tensor]] = None,
    colsum: Optional[torch.Tensor] = None,
    mix: float = 0.0,
) -> torch.Tensor:
    """Pool [B, L, H] hidden states to [B, H] by ``method``, one of ``POOLING_METHODS``.

    ``attentions``, ``colsum`` and ``mix`` are used by ``"ata"`` only (see ``ata_pool``).
    """
    check_choice("method", method, POOLING_METHODS)
    if method == "ata":
        return ata_pool(hidden_states, attention_mask, attentions=attentions, colsum=colsum, mix=mix)
    extra = [name for name, given in (("attentions", attentions is not None), ("colsum", colsum is not None),
                                      ("mix", mix != 0.0)) if given]
    if extra:
        raise ValueError(f"{', '.join(extra)}: only used by method='ata', got method={method!r}")
    simple = {
        "mean": mean_pool,
        "weighted_mean": weighted_mean_pool,
        "last_token": last_token_pool,
        "first_token": first_token_pool,
    }
    return simple[method](hidden_states, attention_mask)
