"""The kernels of ``ata_attention`` as autograd operations: the autograd Function that eager calls
use, and the ``torch.library`` custom ops that torch.compile sees, side by side on the same host
code.

* ``fused_forward`` picks the forward: cuDNN's flash pass where the gate lets it through
  (``cudnn.py``), else the one-sweep kernel for short sequences, else our flash pass; then, when
  the column sums are wanted and the one sweep did not give them, the column-sum pass.
* ``ATAAttentionFunction``: eager calls (a custom op's dispatch costs several times an autograd
  Function's per call, which matters at the smallest shapes).
* ``mgh::ata_attention_forward`` / ``mgh::ata_attention_backward``: the same host code behind
  opaque custom ops with fake implementations, autograd and autocast registered, so dynamo never
  traces into a kernel launch or Triton's interpreter.

Both take the key padding mask as the kernels read it, ``key_bias(mask)``.
"""

from __future__ import annotations

import torch

from .. import backend
from .._launch import LOG2E
from .._precision import register_autocast
from .._validation import checks_values
from . import cudnn, tiles

if backend.TRITON_AVAILABLE:  # the kernel files import triton; without it only the PyTorch path runs
    from . import backward, colsum, forward

__all__ = ["LAST", "ATAAttentionFunction", "fused_backward", "fused_forward", "key_bias"]

LAST = backend.LastPath()
"""The path of the latest ``ata_attention`` call and, on the kernel paths, its forward: "one-sweep",
"triton-flash" or "cudnn-flash"."""


def key_bias(mask: torch.Tensor | None, drop_unpadded: bool) -> torch.Tensor | None:
    """The key padding mask as the kernels read it: [B, L] float32, 0 for a real token and -inf for
    padding; None for no mask, and with ``drop_unpadded`` for one that pads nothing (the unmasked
    kernels, and cuDNN's pass, give the same; finding out costs a host sync, so not inside
    :func:`~mgh_kernels.trusted_inputs`)."""
    if mask is None or (drop_unpadded and checks_values() and bool(mask.all())):
        return None
    return torch.where(mask, 0.0, float("-inf")).to(torch.float32)


def fused_forward(q, k, v, bias, causal: bool, scale: float, return_colsum: bool):
    """(out, lse, lse_scale, colsum or None). ``lse * lse_scale`` is the log-sum-exp in log2 units
    (cuDNN's stays in its natural log: no conversion op in the forward). Records the forward taken
    in ``LAST.forward``."""
    dim, length = q.shape[3], q.shape[2]
    flash = cudnn.flash_pass(q, k, v, bias, causal, scale)
    lse_scale = 1.0
    if flash is not None:
        LAST.forward = "cudnn-flash"
        (out, lse), lse_scale = flash, LOG2E
    else:
        short = tiles.one_sweep_tiles(q.device, dim, q.dtype, length, causal) if return_colsum else None
        if short is not None:
            LAST.forward = "one-sweep"
            out, lse, sums = forward.one_sweep_forward(q, k, v, bias, causal, scale, short)
            return out, lse, lse_scale, sums
        LAST.forward = "triton-flash"
        out, lse = forward.flash_forward(q, k, v, bias, causal, scale, tiles.flash_tiles(q.device, dim, q.dtype))
    if not return_colsum:
        return out, lse, lse_scale, None
    cfg = tiles.colsum_tiles(q.device, dim, q.dtype)
    return out, lse, lse_scale, colsum.column_sums(q, k, bias, lse, causal, scale, cfg, lse_scale)


def log2_lse(lse, lse_scale: float, shape):
    """The log-sum-exp as the backward kernels read it: [B, H, L] float32, log2 units, contiguous."""
    if lse_scale == 1.0:
        return lse
    return (lse.reshape(shape).float() * lse_scale).contiguous()


def fused_backward(q, k, v, out, lse, bias, dout, dcolsum, causal: bool, scale: float):
    """(dq, dk, dv) through both outputs, with ``tiles.backward_tiles``; see ``backward.backward``."""
    cfg = tiles.backward_tiles(q.device, q.shape[3], q.dtype)
    return backward.backward(q, k, v, out, lse, bias, dout, dcolsum, causal, scale, cfg)


class ATAAttentionFunction(torch.autograd.Function):
    """The kernels for eager calls: ``apply(q, k, v, key_bias, causal, scale, return_colsum)`` ->
    (out [B, Hq, L, D], colsum [B, L] float32, or an empty non-differentiable tensor without
    ``return_colsum``); gradients flow through both outputs. Like ``ata_attention`` without its
    checks, dispatch and autocast; ``key_bias`` as :func:`key_bias` gives it."""

    @staticmethod
    def forward(ctx, q, k, v, bias, causal, scale, return_colsum):
        out, lse, lse_scale, sums = fused_forward(q, k, v, bias, causal, scale, return_colsum)
        ctx.save_for_backward(q, k, v, out, lse, bias)
        ctx.causal, ctx.scale, ctx.lse_scale = causal, scale, lse_scale
        if sums is None:
            sums = torch.zeros(0, device=q.device)
            ctx.mark_non_differentiable(sums)
        return out, sums

    @staticmethod
    def backward(ctx, dout, dcolsum):
        q, k, v, out, lse, bias = ctx.saved_tensors
        lse = log2_lse(lse, ctx.lse_scale, q.shape[:3])
        dq, dk, dv = fused_backward(q, k, v, out, lse, bias, dout, dcolsum, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None, None, None


# ---- the custom ops (torch.compile) -----------------------------------------------------------


@torch.library.custom_op("mgh::ata_attention_forward", mutates_args=())
def forward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_bias: torch.Tensor | None,
    causal: bool,
    scale: float,
    return_colsum: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out [B, Hq, L, D] contiguous in q's dtype, colsum [B, L] float32 (empty [0] without
    ``return_colsum``), lse [B, Hq, L] float32 in log2 units, for the backward)."""
    out, lse, lse_scale, sums = fused_forward(q, k, v, key_bias, causal, scale, return_colsum)
    if sums is None:
        sums = q.new_empty(0, dtype=torch.float32)
    # cuDNN's output may come in q's layout; the fake implementation promises a contiguous one
    # (a copy of the output there, which the eager path does not make).
    return out.contiguous(), sums, log2_lse(lse, lse_scale, q.shape[:3])


@forward_op.register_fake
def _forward_op_shapes(q, k, v, key_bias, causal, scale, return_colsum):
    batch, hq, length, _ = q.shape
    colsum = q.new_empty((batch, length) if return_colsum else (0,), dtype=torch.float32)
    return q.new_empty(q.shape), colsum, q.new_empty((batch, hq, length), dtype=torch.float32)


@torch.library.custom_op("mgh::ata_attention_backward", mutates_args=())
def backward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    key_bias: torch.Tensor | None,
    dout: torch.Tensor | None,
    dcolsum: torch.Tensor | None,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), contiguous, in the inputs' dtype; lse as ``forward_op`` gives it."""
    return fused_backward(q, k, v, out, lse, key_bias, dout, dcolsum, causal, scale)


@backward_op.register_fake
def _backward_op_shapes(q, k, v, out, lse, key_bias, dout, dcolsum, causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _save_for_backward_op(ctx, inputs, output):
    q, k, v, bias, causal, scale, _ = inputs
    out, _, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, bias)
    ctx.causal, ctx.scale = causal, scale


def _forward_op_gradients(ctx, dout, dcolsum, _):
    q, k, v, out, lse, bias = ctx.saved_tensors
    dq, dk, dv = backward_op(q, k, v, out, lse, bias, dout, dcolsum, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None, None, None


forward_op.register_autograd(_forward_op_gradients, setup_context=_save_for_backward_op)
register_autocast("mgh::ata_attention_forward", cast=(0, 1, 2))
