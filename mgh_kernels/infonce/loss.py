"""``infonce_loss`` and ``InfoNCELoss``, the public loss: argument checks, the choice of path,
autocast, the cross-rank gather, the reduction.

The path (``mgh_kernels.backend``): the Triton kernels on CUDA, Triton's interpreter on CPU under
``TRITON_INTERPRET=1``, the PyTorch path otherwise. Eager calls run the kernels through
``ops.InfoNCEFunction``; while torch.compile traces a call, through the custom op
``mgh::infonce_forward`` (whose registered autocast rule then casts the inputs).
"""

from __future__ import annotations

import logging

import torch

from .. import backend
from .._precision import autocast_dtype, autocast_inputs, autocast_off
from .._validation import NEGATIVE_MODES, REDUCTIONS, check_bool, check_choice, check_infonce_args, check_positive
from . import gather as _gather
from . import ops, torch_path

__all__ = ["InfoNCELoss", "infonce_loss", "last_backend"]

logger = logging.getLogger(__name__)


def last_backend() -> str | None:
    """Which path the latest ``infonce_loss`` call took: "triton", "triton-interpreter" or
    "torch-chunked" (None before the first call)."""
    return ops.LAST.backend


def infonce_loss(
    q: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor | None = None,
    *,
    tau: float = 0.05,
    negatives: str = "global",
    normalize: bool = True,
    reduction: str = "mean",
    gather: bool = False,
) -> torch.Tensor:
    """InfoNCE with in-batch and hard negatives, never storing the B x B(1+K) logits.

    With ``negatives="global"`` it equals sentence-transformers' ``MultipleNegativesRankingLoss``
    (``scale = 1 / tau``, n-tuple negatives), loss and gradients: the cross-entropy of each query's
    cosine similarities to every positive and negative of the batch, its own positive the target
    (``reference.infonce`` defines it).

    Args:
        q: [B, D] queries; float16, bfloat16 or float32 (float32 accumulation). Under
            ``torch.autocast`` for their device type, q, pos and neg are cast once to the
            autocast dtype, as autocast casts the inputs of the matmul that computes
            sentence-transformers' MultipleNegativesRankingLoss's similarities; the loss itself is
            float32 there as well (autocast runs cross-entropy in float32).
        pos: [B, D] positives, ``pos[i]`` the target of ``q[i]``.
        neg: optional [B, K, D] hard negatives (K may be 0).
        tau: temperature (logit = cosine / tau; 0.05 is sentence-transformers' scale 20).
        negatives: "global" (every positive and negative of the batch is a candidate of every
            query, MultipleNegativesRankingLoss) or "own" (the query's positive and K negatives).
        normalize: L2-normalise the embeddings (cosine similarity); False uses raw dot products.
        reduction: "mean", "sum" or "none" (per-query losses [B]).
        gather: with "global", make every rank's positives and negatives candidates (needs an
            initialised ``torch.distributed`` group and the same B and K on every rank; see
            ``gather.py``); the loss is over this rank's queries.

    Returns:
        float32 loss (scalar, or [B] with ``reduction="none"``).

    Example::

        q = torch.randn(64, 256, requires_grad=True)
        pos, neg = torch.randn(64, 256), torch.randn(64, 7, 256)   # 7 hard negatives per query
        loss = infonce_loss(q, pos, neg, tau=0.05)                 # 64 + 448 candidates per query
        loss.backward()

    Values are not checked (that would synchronise with the host on every call): a NaN or
    infinite embedding gives a NaN loss. mgh's trainer stops at a non-finite loss, before the
    optimizer step, and names the first parameter or layer output that went non-finite.
    """
    amp = autocast_dtype(q)
    tau = check_infonce_args(q, pos, neg, tau=tau, negatives=negatives, reduction=reduction, amp=amp)
    batch, dim = q.shape
    if neg is None:
        neg = q.new_zeros(batch, 0, dim)
    check_bool("normalize", normalize)
    check_bool("gather", gather)
    if gather and negatives != "global":
        raise ValueError("gather: only meaningful with negatives='global' (own candidates are per query)")
    path = backend.dispatch("infonce_loss", q, amp, ops.LAST, logger, lambda: f"B={batch} K={neg.shape[1]} D={dim}")
    kernels_compiled = path.compiling and path.backend != backend.TORCH
    if not kernels_compiled:  # compiled, the op's autocast rule casts
        q, pos, neg = autocast_inputs(amp, q, pos, neg)
    q = q.contiguous()
    pos, neg_flat = pos.contiguous(), neg.reshape(-1, dim).contiguous()
    pos_offset = 0
    if gather:
        pos, neg_flat, pos_offset = _gather.gather_candidates(pos, neg_flat, batch)
    own = negatives == "own"
    if kernels_compiled:
        losses = ops.forward_op(q, pos, neg_flat, tau, normalize, own, pos_offset)[0]
    else:
        with autocast_off(q.device):
            if path.backend == backend.TORCH and not own and reduction != "none" and not path.compiling:
                return torch_path.loss(q, pos, neg_flat, tau, normalize, pos_offset, reduction)
            if path.backend == backend.TORCH:
                losses = torch_path.losses(q, pos, neg_flat, tau, normalize, own, pos_offset)
            else:
                losses = ops.InfoNCEFunction.apply(q, pos, neg_flat, tau, normalize, own, pos_offset)
    if reduction == "mean":
        return losses.mean()
    return losses.sum() if reduction == "sum" else losses


class InfoNCELoss(torch.nn.Module):
    """``infonce_loss`` as a module, the analogue of sentence-transformers'
    ``MultipleNegativesRankingLoss`` on embeddings already computed (it takes the model instead).

    ``InfoNCELoss(tau, negatives, normalize, reduction, gather)(q, pos, neg)``: q, pos [B, D],
    neg None or [B, K, D] (float16, bfloat16 or float32, one dtype, or any under autocast) ->
    float32 loss, a scalar or [B] with ``reduction="none"``; arguments as ``infonce_loss``'s,
    checked at construction where they can be.

    Example::

        criterion = InfoNCELoss(tau=0.05)                          # MNRL(model, scale=20) on embeddings
        loss = criterion(q, pos, neg)                              # q, pos [64, 256], neg [64, 7, 256]
        per_query = InfoNCELoss(tau=0.05, negatives="own", reduction="none")(q, pos, neg)   # [64]
    """

    def __init__(
        self,
        tau: float = 0.05,
        negatives: str = "global",
        normalize: bool = True,
        reduction: str = "mean",
        gather: bool = False,
    ):
        super().__init__()
        check_positive("tau", tau)
        check_choice("negatives", negatives, NEGATIVE_MODES)
        check_choice("reduction", reduction, REDUCTIONS)
        self.tau, self.negatives, self.normalize, self.reduction, self.gather = (
            tau,
            negatives,
            normalize,
            reduction,
            gather,
        )

    def forward(self, q: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of queries ``q`` against ``pos`` and ``neg``, as ``infonce_loss``."""
        return infonce_loss(
            q,
            pos,
            neg,
            tau=self.tau,
            negatives=self.negatives,
            normalize=self.normalize,
            reduction=self.reduction,
            gather=self.gather,
        )

    def extra_repr(self) -> str:
        return f"tau={self.tau}, negatives={self.negatives!r}, normalize={self.normalize}, reduction={self.reduction!r}"
