"""``eager_infonce``: InfoNCE as plain PyTorch writes it, the logits materialised and autograd
running the backward (the trainer's ``--loss eager``, the baseline the fused loss is measured
against).

Scope: memory is the B x B(1+K) logits ("global") or B x (1+K) ("own") and their softmax, kept
for the backward; ``infonce_loss`` never stores them. Arithmetic in float32 (float64 for float64
inputs), as ``infonce_loss``'s; under ``torch.autocast`` the matmul runs in the autocast dtype, as
autocast runs it in sentence-transformers' loss. ``reference.infonce`` is its oracle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._precision import autocast_dtype, compute_dtype
from .._validation import check_infonce_args

__all__ = ["eager_infonce"]


def eager_infonce(
    q: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor | None = None,
    *,
    tau: float = 0.05,
    negatives: str = "global",
    reduction: str = "mean",
) -> torch.Tensor:
    """InfoNCE over cosine similarities with the logits in memory.

    Args:
        q: [B, D] queries; pos: [B, D] positives (``pos[i]`` the target of ``q[i]``); neg: None
            or [B, K, D] hard negatives. Any float dtype, one for all three (any under autocast).
        tau: temperature, logit = cosine / tau.
        negatives: "global" (every positive and negative of the batch is a candidate of every
            query) or "own" (the query's positive and its K negatives).
        reduction: "mean", "sum" or "none" (per-query losses [B]).

    Returns:
        float32 loss (float64 for float64 inputs): a scalar, or [B] with ``reduction="none"``.

    Example::

        loss = eager_infonce(q, pos, neg, tau=0.05)     # q, pos [64, 256], neg [64, 7, 256]

    With "global", sentence-transformers' ``MultipleNegativesRankingLoss(scale=1 / tau)`` on the
    embeddings: ``F.cross_entropy(normalize(q) @ normalize([pos; neg]).T / tau, arange(B))``.
    ``infonce_loss`` computes the same loss without the logits.
    """
    tau = check_infonce_args(q, pos, neg, tau=tau, negatives=negatives, reduction=reduction, amp=autocast_dtype(q))
    compute = compute_dtype(q.dtype)
    qn, pn = (F.normalize(t.to(compute), dim=-1) for t in (q, pos))
    rows = torch.arange(q.shape[0], device=q.device)
    if negatives == "global":  # candidates [B(1+K), D]: the positives, then every query's negatives
        candidates = pn if neg is None else torch.cat([pn, F.normalize(neg.to(compute), dim=-1).flatten(0, 1)])
        logits, target = qn @ candidates.T, rows
    else:  # candidates [B, 1+K, D]: each query's own positive, then its own negatives
        candidates = pn[:, None] if neg is None else torch.cat([pn[:, None], F.normalize(neg.to(compute), dim=-1)], 1)
        logits, target = (candidates @ qn[:, :, None])[..., 0], torch.zeros_like(rows)
    return F.cross_entropy(logits / tau, target, reduction=reduction)
