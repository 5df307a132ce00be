"""``ata_attention_varlen``: ``ata_attention`` over packed sequences, in flash-attention's varlen
convention (``flash_attn_varlen_func``): the tokens of n texts in one row, each text attending
only to itself, and each token's column sum taken over the queries of its own text.

Paths, as for ``ata_attention`` (``mgh_kernels.backend``): the Triton kernels of
``varlen_kernels.py`` on CUDA and under Triton's interpreter (``VarlenAttentionFunction``); the
PyTorch path otherwise, which runs the texts one after another through ``ata_attention``'s own
PyTorch path (``torch_path.attention``, the CPU one-sweep forward on the CPU). Neither ever holds a
total x total tensor: the largest score block is one text's. ``last_backend()`` tells which ran.

Under torch.compile the call runs eagerly (a graph break): the varlen kernels have no custom op.
"""

from __future__ import annotations

import functools
import logging

import torch

from .. import backend
from .._precision import autocast_dtype, autocast_inputs, autocast_off
from .._validation import check_bool, check_varlen_args
from . import tiles, torch_path
from .functional import MAX_HEAD_DIM

if backend.TRITON_AVAILABLE:  # the kernel file imports triton; without it only the PyTorch path runs
    from . import varlen_kernels

__all__ = ["VarlenAttentionFunction", "ata_attention_varlen", "last_backend"]

logger = logging.getLogger(__name__)

LAST = backend.LastPath()


def last_backend() -> str | None:
    """Which path the latest ``ata_attention_varlen`` call took: "triton", "triton-interpreter" or
    "torch-chunked" (None before the first call)."""
    return LAST.backend


class VarlenAttentionFunction(torch.autograd.Function):
    """The Triton kernels: ``apply(q, k, v, cu_seqlens, max_seqlen, causal, scale, return_colsum)``
    -> (out [total, Hq, D], colsum [total] float32, or an empty non-differentiable tensor without
    ``return_colsum``); ``cu_seqlens`` int32 on q's device. Gradients flow through both outputs."""

    @staticmethod
    def forward(ctx, q, k, v, cu, max_seqlen, causal, scale, return_colsum):
        dim = q.shape[2]
        out, lse = varlen_kernels.forward(
            q, k, v, cu, max_seqlen, causal, scale, tiles.flash_tiles(q.device, dim, q.dtype)
        )
        if return_colsum:
            sums = varlen_kernels.column_sums(
                q, k, cu, max_seqlen, lse, causal, scale, tiles.colsum_tiles(q.device, dim, q.dtype)
            )
        else:
            sums = torch.zeros(0, device=q.device)
            ctx.mark_non_differentiable(sums)
        ctx.save_for_backward(q, k, v, cu, out, lse)
        ctx.max_seqlen, ctx.causal, ctx.scale, ctx.has_colsum = max_seqlen, causal, scale, return_colsum
        return out, sums

    @staticmethod
    def backward(ctx, dout, dcolsum):
        q, k, v, cu, out, lse = ctx.saved_tensors
        dcolsum = dcolsum if ctx.has_colsum else None
        cfg = tiles.backward_tiles(q.device, q.shape[2], q.dtype)
        dq, dk, dv = varlen_kernels.backward(
            q, k, v, cu, ctx.max_seqlen, out, lse, dout, dcolsum, ctx.causal, ctx.scale, cfg
        )
        return dq, dk, dv, None, None, None, None, None


def _per_sequence(q, k, v, bounds, causal: bool, scale: float, return_colsum: bool):
    """The PyTorch path: each text through ``torch_path.attention`` as a batch of one, [1, H, L, D]
    views of the packed tensors; the results concatenated back into the packed layout. Without
    column sums each text goes through PyTorch's SDPA instead (its fused CPU flash kernels; the
    fastest route measured for the layers other than the ATA one, see benchmarks/RESULTS.md).
    The texts are ``torch.split`` pieces, whose backward is one concatenation per tensor, where
    slicing would give every text's gradient as a zero-filled [total, H, D] tensor summed by autograd."""
    outs, sums = [], []
    lengths = [stop - start for start, stop in zip(bounds[:-1], bounds[1:])]
    for text in zip(*(torch.split(t, lengths) for t in (q, k, v))):
        if text[0].shape[0] == 0:
            continue
        view = [t.transpose(0, 1)[None] for t in text]
        if not return_colsum:
            out = torch.nn.functional.scaled_dot_product_attention(
                *view, is_causal=causal, scale=scale, enable_gqa=view[0].shape[1] != view[1].shape[1]
            )
            outs.append(out[0].transpose(0, 1))
            continue
        out, colsum = torch_path.attention(*view, None, causal, scale, return_colsum)
        outs.append(out[0].transpose(0, 1))
        if return_colsum:
            sums.append(colsum[0])
    out = torch.cat(outs)
    return out, (torch.cat(sums) if return_colsum else None)


def _eager_under_compile(fn):
    """``torch.compiler.disable(fn)`` applied at the first call rather than at import: the decorator
    imports torch._dynamo, about 1.5 s that every ``import mgh_kernels`` (and CLI start) would pay."""
    disabled = None

    @functools.wraps(fn)
    def call(*args, **kwargs):
        nonlocal disabled
        if disabled is None:
            disabled = torch.compiler.disable(fn)
        return disabled(*args, **kwargs)

    return call


@_eager_under_compile
def ata_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    causal: bool = False,
    scale: float | None = None,
    return_colsum: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Self-attention over packed texts, each attending only to itself, with each token's received
    attention; never a total x total tensor.

    ``out`` is flash-attention's ``flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens,
    max_seqlen, max_seqlen, causal=causal)``; per text it equals ``ata_attention`` on that text
    alone, and ``colsum`` is that call's column sums: the sum over the text's queries of the
    softmax probabilities, averaged over heads (``reference.attention_varlen_with_colsum``).

    Args:
        q: [total, Hq, D] queries of all texts, concatenated; dtypes as ``ata_attention``.
        k, v: [total, Hkv, D], ``Hq`` a multiple of ``Hkv`` (GQA). Any strides.
        cu_seqlens: [n + 1] int32, the cumulative lengths: text i is tokens
            ``cu_seqlens[i]:cu_seqlens[i + 1]``; starts at 0, non-decreasing, ends at ``total``.
            On the CPU (checked there, copied to q's device) or on q's device (its values are then
            checked only outside :func:`~mgh_kernels.trusted_inputs`: reading them is a sync).
        max_seqlen: the longest text's length (an int; the kernels' grid is sized by it).
        causal: token i of a text sees the text's tokens j <= i; otherwise all of the text.
        scale: softmax scale, default 1/sqrt(D).
        return_colsum: also compute the column sums.

    Returns:
        ``out`` [total, Hq, D] in q's dtype (the autocast dtype under autocast) and ``colsum``
        [total] float32 (float64 on the PyTorch path for float64 inputs), or None without
        ``return_colsum``. Differentiable through both.

    Example::

        lengths = [5, 17, 1]
        cu = torch.tensor([0, 5, 22, 23], dtype=torch.int32)
        q, k, v = torch.randn(23, 8, 64), torch.randn(23, 2, 64), torch.randn(23, 2, 64)
        out, colsum = ata_attention_varlen(q, k, v, cu, max(lengths), causal=True)
        # colsum[0:5].sum() == 5, colsum[5:22].sum() == 17, colsum[22] == 1
    """
    amp = autocast_dtype(q)
    cu_host, cu, max_seqlen, scale = check_varlen_args(
        q, k, v, cu_seqlens, max_seqlen, causal=causal, scale=scale, amp=amp
    )
    check_bool("return_colsum", return_colsum)
    if q.shape[2] > MAX_HEAD_DIM:
        raise ValueError(f"q: expected a head dim D <= {MAX_HEAD_DIM}, got shape {list(q.shape)}")
    path = backend.dispatch(
        "ata_attention_varlen",
        q,
        amp,
        LAST,
        logger,
        lambda: f"{list(q.shape)}, {cu.numel() - 1} texts, max_seqlen {max_seqlen}",
    )
    q, k, v = autocast_inputs(amp, q, k, v)
    with autocast_off(q.device):
        if path.backend == backend.TORCH:
            bounds = (cu_host if cu_host is not None else cu).tolist()
            return _per_sequence(q, k, v, bounds, causal, scale, return_colsum)
        out, colsum = VarlenAttentionFunction.apply(q, k, v, cu, max_seqlen, causal, scale, return_colsum)
    return out, (colsum if return_colsum else None)
