"""The kernels of ``infonce_loss`` as autograd operations: the autograd Function that eager calls
use, and the ``torch.library`` custom ops that torch.compile sees, side by side on the same host
code (``fused_forward``, ``fused_backward``).

The forward keeps, besides the inputs, only O(B(1+K)) float32 statistics (``ForwardState``).
Custom ops return tensors only, so absent ones (the logits, which only "own" keeps; the row
maxima, which only float16 "global" keeps; gradients not asked for) are empty [0] tensors there.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import backend
from .._precision import register_autocast
from . import tiles

if backend.TRITON_AVAILABLE:  # the kernel files import triton; without it only the PyTorch path runs
    from . import backward, forward

__all__ = ["LAST", "ForwardState", "InfoNCEFunction", "fused_backward", "fused_forward"]

LAST = backend.LastPath()
"""The path of the latest ``infonce_loss`` call."""

_EMPTY = (0,)  # the shape of a tensor that stands for an absent one in the custom ops


class ForwardState(NamedTuple):
    """What the backward needs besides the inputs, all float32: inverse norms ``rq`` [B], ``rp``
    [B or W B], ``rn`` [rows of neg]; ``lse`` [B, 2] (each row's largest logit and log(sum exp(z -
    it))); ``tail`` [B] (1 - p_positive); ``logits``: own mode's [B, 1+K] (None in global mode);
    ``maxima``: float16 global mode's largest |entry| per row of q, pos and neg, for the gradient
    scale sigma (else None)."""

    rq: torch.Tensor
    rp: torch.Tensor
    rn: torch.Tensor
    lse: torch.Tensor
    tail: torch.Tensor
    logits: torch.Tensor | None
    maxima: tuple | None

    def flat(self) -> list:
        """The nine tensors (rq, rp, rn, lse, tail, logits, q_max, p_max, n_max), absent ones as
        empty [0] float32 tensors."""

        def empty():
            return self.rq.new_empty(_EMPTY)

        maxima = self.maxima or (empty(), empty(), empty())
        return [*self[:5], empty() if self.logits is None else self.logits, *maxima]

    @classmethod
    def from_flat(cls, tensors) -> ForwardState:
        """The inverse of :meth:`flat`."""
        rq, rp, rn, lse, tail, logits, *maxima = tensors
        return cls(
            rq, rp, rn, lse, tail, logits if logits.numel() else None, tuple(maxima) if maxima[0].numel() else None
        )


def wants_maxima(dtype: torch.dtype, own: bool) -> bool:
    """Whether the forward keeps each row's largest |entry|: for the float16 global backward's
    gradient scale sigma."""
    return dtype == torch.float16 and not own


def fused_forward(q, pos, neg, tau: float, normalize: bool, own: bool, pos_offset: int):
    """(per-query losses [B] float32, ForwardState) from raw embeddings: q, pos [B or N, D], neg
    [N_neg, D] (own mode: [B * K, D], query i's negatives in rows i K .. i K + K - 1)."""
    cfg = tiles.kernel_tiles(q.device, q.shape[1], q.dtype)
    want_max = wants_maxima(q.dtype, own)
    (rq, q_max), (rp, p_max), (rn, n_max) = (forward.row_norms(t, normalize, want_max, cfg) for t in (q, pos, neg))
    maxima = (q_max, p_max, n_max) if want_max else None
    if not own:
        lse, tail, losses = forward.global_forward(q, pos, neg, rq, rp, rn, tau, pos_offset, cfg)
        return losses, ForwardState(rq, rp, rn, lse, tail, None, maxima)
    lse, tail, losses, logits = forward.own_forward(q, pos, neg, rq, rp, rn, tau, cfg)
    return losses, ForwardState(rq, rp, rn, lse, tail, logits, None)


def fused_backward(q, pos, neg, state: ForwardState, grad_losses, tau: float, normalize: bool, pos_offset: int, needs):
    """(dq, dpos, dneg) in the inputs' dtype for the upstream gradient [B] of the per-query losses;
    in global mode None where ``needs`` (q, pos, neg) is False."""
    w = grad_losses.float().contiguous()
    cfg = tiles.kernel_tiles(q.device, q.shape[1], q.dtype)
    rq, rp, rn, lse, tail, logits, maxima = state
    if logits is None:
        return backward.global_backward(
            q, pos, neg, rq, rp, rn, lse, tail, w, tau, normalize, pos_offset, maxima, cfg, needs
        )
    return backward.own_backward(q, pos, neg, rq, rp, rn, lse, tail, logits, w, tau, normalize, cfg)


class InfoNCEFunction(torch.autograd.Function):
    """The kernels for eager calls: ``apply(q, pos, neg, tau, normalize, own, pos_offset)`` ->
    per-query losses [B] float32, from raw embeddings (neg flattened to [rows, D]); gradients to
    q, pos and neg, only those autograd asks for. Like ``infonce_loss(..., reduction="none")``
    without its checks, dispatch, autocast and gather."""

    @staticmethod
    def forward(ctx, q, pos, neg, tau, normalize, own, pos_offset):
        losses, state = fused_forward(q, pos, neg, tau, normalize, own, pos_offset)
        ctx.save_for_backward(q, pos, neg, *state[:5], state.logits)
        ctx.tau, ctx.normalize, ctx.pos_offset = tau, normalize, pos_offset
        ctx.maxima = state.maxima  # O(B(1+K)), not inputs: no need to save them
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        q, pos, neg, *statistics, logits = ctx.saved_tensors
        state = ForwardState(*statistics, logits, ctx.maxima)
        grads = fused_backward(
            q, pos, neg, state, grad_losses, ctx.tau, ctx.normalize, ctx.pos_offset, ctx.needs_input_grad[:3]
        )
        return (*grads, None, None, None, None)


# ---- the custom ops (torch.compile) -----------------------------------------------------------

_FORWARD_OUTPUTS = tuple[(torch.Tensor,) * 10]  # the losses and ForwardState's nine tensors


@torch.library.custom_op("mgh::infonce_forward", mutates_args=())
def forward_op(
    q: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, tau: float, normalize: bool, own: bool, pos_offset: int
) -> _FORWARD_OUTPUTS:
    """(losses, rq, rp, rn, lse, tail, logits, q_max, p_max, n_max): fused_forward's, flat."""
    losses, state = fused_forward(q, pos, neg, tau, normalize, own, pos_offset)
    return losses, *state.flat()


@forward_op.register_fake
def _forward_op_shapes(q, pos, neg, tau, normalize, own, pos_offset):
    batch = q.shape[0]
    rows = (batch, batch, pos.shape[0], neg.shape[0], (batch, 2), batch)
    logits = (batch, neg.shape[0] // max(batch, 1) + 1) if own else _EMPTY
    maxima = (batch, pos.shape[0], neg.shape[0]) if wants_maxima(q.dtype, own) else (_EMPTY,) * 3
    return tuple(q.new_empty(shape, dtype=torch.float32) for shape in (*rows, logits, *maxima))


@torch.library.custom_op("mgh::infonce_backward", mutates_args=())
def backward_op(
    q: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor,
    statistics: list[torch.Tensor],
    grad_losses: torch.Tensor,
    tau: float,
    normalize: bool,
    pos_offset: int,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dpos, dneg), each empty [0] where ``needs`` is False; ``statistics``: forward_op's
    outputs after the losses."""
    state = ForwardState.from_flat(statistics)
    grads = fused_backward(q, pos, neg, state, grad_losses, tau, normalize, pos_offset, tuple(needs))
    return tuple(g if need else x.new_empty(_EMPTY) for g, need, x in zip(grads, needs, (q, pos, neg)))


@backward_op.register_fake
def _backward_op_shapes(q, pos, neg, statistics, grad_losses, tau, normalize, pos_offset, needs):
    return tuple(x.new_empty(x.shape if need else _EMPTY) for need, x in zip(needs, (q, pos, neg)))


def _save_for_backward_op(ctx, inputs, output):
    q, pos, neg, tau, normalize, _, pos_offset = inputs
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(q, pos, neg, *output[1:])
    ctx.tau, ctx.normalize, ctx.pos_offset = tau, normalize, pos_offset


def _forward_op_gradients(ctx, grad_losses, *_):
    q, pos, neg, *statistics = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:3])
    grads = backward_op(q, pos, neg, statistics, grad_losses, ctx.tau, ctx.normalize, ctx.pos_offset, needs)
    return (*(g if need else None for g, need in zip(grads, needs)), None, None, None, None)


forward_op.register_autograd(_forward_op_gradients, setup_context=_save_for_backward_op)
register_autocast("mgh::infonce_forward", cast=(0, 1, 2))
